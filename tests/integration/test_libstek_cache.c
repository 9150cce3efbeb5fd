/*
 * libstek's sealed cache and host keys in a token, end to end: a real
 * stekd (epochs 4 s, lifetime 30 s, group "edge"), libstek TLS servers, and
 * real OpenSSL handshakes in memory.
 *
 *   (c) without the cache, a full run leaves only the high-water mark in the
 *       state directory, and no file under the test directory holds a key;
 *   (b) a host whose certificate key and sealing key are both in a SoftHSM
 *       token (pkcs11: URIs, through libp11's engine) fetches keys over mTLS,
 *       issues a ticket and writes its cache; EC keys, then RSA keys;
 *   (a) with stekd stopped, a client recreated with the same options is
 *       ready from its cache and resumes the ticket issued before; the file
 *       is mode 0600 and holds no key in the clear; the token hosts too;
 *   (d) a corrupted cache file is rejected (counted), the client starts
 *       anyway, and is ready once stekd is back.
 *
 * Linked against libstek's static archive: the checks decrypt the cache
 * file through client/cache.h to learn which key bytes must not appear.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "cache.h"
#include "fx_stekd.h"
#include "fx_tls.h"
#include "p11engine.h"
#include "stek/stek.h"

#define EPOCH_S 4
#define LIFETIME_S 30
#define GROUP "edge"

static fx_stekd d;
static fx_token host_tok; /* the hosts' token: a sibling of stekd's */

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

/* One host: its certificate, key (file or URI), state dir and cache. */
typedef struct host {
    fx_cert cert;
    char key[2 * FX_PATH_MAX];
    char seal[2 * FX_PATH_MAX];
    char dir[FX_PATH_MAX + 32];
    char state[FX_PATH_MAX + 64];
    char cache[FX_PATH_MAX + 64];
    SSL_SESSION *ticket13, *ticket12; /* issued before the restart */
} host;

static host ha;            /* (a), (d): file keys */
static host hp_ec, hp_rsa; /* (b): keys in the token */

/* ---- helpers ----------------------------------------------------------------------------- */

static stek_client *client_new(const host *h, bool cache)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, d.target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, h->cert.cert_path, h->key);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_options_set_state_dir(o, h->state);
    if (r == STEK_RESULT_OK && cache)
        r = stek_options_set_cache(o, h->cache, h->seal);
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(r));
    return c;
}

static SSL_CTX *server_ctx(stek_client *c)
{
    SSL_CTX *ctx = fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
    if (ctx != NULL && stek_client_attach(c, ctx) != STEK_RESULT_OK) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

static int run_tool(char *const argv[])
{
    char log[FX_PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s/tool.log", d.dir);
    pid_t pid;
    int status = -1;
    if (fx_spawn(argv, log, &pid) != 0 || fx_wait_exit(pid, 20000, &status) != 0)
        return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Writes k's private (PKCS#8) or public (SubjectPublicKeyInfo) half as DER. */
static int write_key_der(EVP_PKEY *k, bool priv, const char *path)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    int ok = priv ? i2d_PKCS8PrivateKey_fp(f, k, NULL, NULL, 0, NULL, NULL) : i2d_PUBKEY_fp(f, k);
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* pkcs11-tool --write-object into the hosts' token. */
static int token_write(const char *der, const char *type, const char *label, const char *id,
                       bool derive)
{
    char *argv[] = {"pkcs11-tool",
                    "--module",
                    host_tok.module,
                    "--login",
                    "--pin",
                    host_tok.pin,
                    "--token-label",
                    host_tok.label,
                    "--write-object",
                    (char *)der,
                    "--type",
                    (char *)type,
                    "--label",
                    (char *)label,
                    "--id",
                    (char *)id,
                    derive ? "--usage-derive" : NULL,
                    NULL};
    return run_tool(argv);
}

static void uri_of(char *out, size_t n, const char *label)
{
    snprintf(out, n, "pkcs11:token=%s;object=%s;type=private?pin-source=file:%s", host_tok.label,
             label, host_tok.pin_file);
}

/*
 * A host whose certificate key and sealing key live in the hosts' token
 * only: both are written with pkcs11-tool and every file copy is removed.
 */
static int token_host(host *h, const char *name, fx_key_type type, const char *id_cert,
                      const char *id_seal)
{
    char uri_san[96];
    snprintf(uri_san, sizeof(uri_san), "spiffe://fleet/edge/%s", name);
    const char *uris[] = {uri_san, NULL};
    fx_cert_opts o = {.name = name, .key_type = type, .uri_sans = uris};
    if (fx_stekd_host_cert(&d, &o, &h->cert) != 0)
        return -1;
    char der[FX_PATH_MAX + 128], label[64];
    /* The certificate key, with its certificate (same id). */
    FILE *f = fopen(h->cert.key_path, "r");
    EVP_PKEY *k = f != NULL ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    if (f != NULL)
        fclose(f);
    f = fopen(h->cert.cert_path, "r");
    X509 *x = f != NULL ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
    if (f != NULL)
        fclose(f);
    snprintf(label, sizeof(label), "%s-tls", name);
    snprintf(der, sizeof(der), "%s/%s.der", d.dir, label);
    int rc = k != NULL && x != NULL && write_key_der(k, true, der) == 0 ? 0 : -1;
    if (rc == 0)
        rc = token_write(der, "privkey", label, id_cert, false);
    unlink(der);
    f = rc == 0 ? fopen(der, "wb") : NULL;
    rc = f != NULL && i2d_X509_fp(f, x) == 1 ? 0 : -1;
    if (f != NULL && fclose(f) != 0)
        rc = -1;
    if (rc == 0)
        rc = token_write(der, "cert", label, id_cert, false);
    unlink(der);
    EVP_PKEY_free(k);
    X509_free(x);
    /* Nothing but the token can serve the handshake or sign requests. */
    if (rc != 0 || unlink(h->cert.key_path) != 0)
        return -1;
    uri_of(h->key, sizeof(h->key), label);

    /* The sealing key, made here and never written to a file but for the
     * token import; its public half too, which libp11 reads for EC. */
    EVP_PKEY *s = type == FX_KEY_EC_P256 ? EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")
                                         : EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    snprintf(label, sizeof(label), "%s-seal", name);
    snprintf(der, sizeof(der), "%s/%s.der", d.dir, label);
    rc = s != NULL && write_key_der(s, true, der) == 0 ? 0 : -1;
    if (rc == 0)
        rc = token_write(der, "privkey", label, id_seal, type == FX_KEY_EC_P256);
    unlink(der);
    if (rc == 0 && write_key_der(s, false, der) == 0)
        rc = token_write(der, "pubkey", label, id_seal, type == FX_KEY_EC_P256);
    unlink(der);
    EVP_PKEY_free(s);
    if (rc != 0)
        return -1;
    uri_of(h->seal, sizeof(h->seal), label);
    return 0;
}

static int host_dirs(host *h, const char *name)
{
    snprintf(h->dir, sizeof(h->dir), "%s/%s", d.dir, name);
    snprintf(h->state, sizeof(h->state), "%s/state", h->dir);
    snprintf(h->cache, sizeof(h->cache), "%s/cache/keys.cache", h->dir);
    char cache_dir[FX_PATH_MAX + 64];
    snprintf(cache_dir, sizeof(cache_dir), "%s/cache", h->dir);
    return mkdir(h->dir, 0700) == 0 && mkdir(h->state, 0700) == 0 && mkdir(cache_dir, 0700) == 0
               ? 0
               : -1;
}

/* A file host: certificate key and an EC P-256 sealing key as PEM files. */
static int file_host(host *h, const char *name)
{
    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = name, .key_type = FX_KEY_EC_P256, .uri_sans = uris};
    if (host_dirs(h, name) != 0 || fx_stekd_host_cert(&d, &o, &h->cert) != 0)
        return -1;
    snprintf(h->key, sizeof(h->key), "%s", h->cert.key_path);
    snprintf(h->seal, sizeof(h->seal), "%s/seal.pem", h->dir);
    EVP_PKEY *s = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    FILE *f = fopen(h->seal, "w");
    int ok = s != NULL && f != NULL && PEM_write_PrivateKey(f, s, NULL, NULL, 0, NULL, NULL) == 1;
    if (f != NULL && fclose(f) != 0)
        ok = 0;
    EVP_PKEY_free(s);
    return ok && chmod(h->seal, 0600) == 0 ? 0 : -1;
}

/* The cache file's contents, unsealed with the host's sealing key. */
static stek_cache_contents *unseal(const host *h)
{
    EVP_PKEY *priv = NULL;
    if (stek_p11engine_is_uri(h->seal)) {
        assert_int_equal(stek_p11engine_load_private_key(h->seal, &priv), STEK_OK);
    } else {
        FILE *f = fopen(h->seal, "r");
        assert_non_null(f);
        priv = PEM_read_PrivateKey(f, NULL, NULL, NULL);
        fclose(f);
    }
    assert_non_null(priv);
    uint8_t id[STEK_CACHE_HOST_ID_BYTES];
    assert_int_equal(stek_cache_host_id(h->cert.cert_path, id), STEK_OK);
    const char *const names[] = {GROUP};
    const uint64_t hwm[] = {0};
    stek_cache_expect x = {.host_id = id,
                           .wall_now = stek_walltime_ns(),
                           .n_groups = 1,
                           .groups = names,
                           .generation_hwm = hwm};
    stek_cache_contents *cc = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    stek_status st = stek_cache_read(h->cache, priv, &x, &cc, &why);
    if (st != STEK_OK)
        fprintf(stderr, "unseal: %s %s: %s\n", stek_status_name(st), stek_cache_reject_name(why),
                stek_error_detail());
    assert_int_equal(st, STEK_OK);
    EVP_PKEY_free(priv);
    return cc;
}

/* ---- key bytes in files ------------------------------------------------------------------- */

static const stek_cache_contents *scan_keys; /* nftw has no context argument */
static size_t scan_files, scan_hits;

static bool holds_key(const uint8_t *buf, size_t n, const stek_cache_contents *k)
{
    for (size_t i = 0; i < k->n_keys; i++) {
        const uint8_t *e = stek_secret_cdata(k->material) + i * STEK_RING_ENTRY_BYTES;
        const uint8_t *halves[] = {e + STEK_RING_NAME_BYTES,
                                   e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES};
        for (size_t h = 0; h < 2; h++)
            for (size_t j = 0; j + 32 <= n; j++)
                if (buf[j] == halves[h][0] && memcmp(buf + j, halves[h], 32) == 0)
                    return true;
    }
    return false;
}

static bool file_holds_key(const char *path, const stek_cache_contents *k)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return false; /* a socket or a file gone meanwhile */
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    assert_non_null(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    fclose(f);
    bool hit = holds_key(buf, n, k);
    free(buf);
    return hit;
}

static int scan_one(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)ftw;
    if (type == FTW_F && S_ISREG(sb->st_mode)) {
        scan_files++;
        if (file_holds_key(path, scan_keys)) {
            fprintf(stderr, "key bytes in %s\n", path);
            scan_hits++;
        }
    }
    return 0;
}

/* How many files under root hold a half of one of k's keys. */
static size_t files_with_keys(const char *root, const stek_cache_contents *k)
{
    scan_keys = k;
    scan_files = scan_hits = 0;
    assert_int_equal(nftw(root, scan_one, 16, FTW_PHYS), 0);
    fprintf(stderr, "scanned %zu files under %s for %zu keys: %zu hits\n", scan_files, root,
            k->n_keys, scan_hits);
    assert_true(scan_files > 10);
    return scan_hits;
}

/* The name of the key a session's ticket was made with. */
static bool ticket_key_cached(SSL_SESSION *s, const stek_cache_contents *k)
{
    const unsigned char *t = NULL;
    size_t len = 0;
    SSL_SESSION_get0_ticket(s, &t, &len);
    assert_true(len > STEK_RING_NAME_BYTES);
    for (size_t i = 0; i < k->n_keys; i++)
        if (memcmp(stek_secret_cdata(k->material) + i * STEK_RING_ENTRY_BYTES, t,
                   STEK_RING_NAME_BYTES) == 0)
            return true;
    return false;
}

static void assert_mode_0600(const char *path)
{
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
}

/* ---- fixtures ---------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_token_create_sibling(&host_tok, &d.tok, "stek-hosts") != 0 || fx_stekd_start(&d) != 0)
        return -1;
    if (file_host(&ha, "edge-a") != 0 || host_dirs(&hp_ec, "edge-p1") != 0 ||
        host_dirs(&hp_rsa, "edge-p2") != 0 ||
        token_host(&hp_ec, "edge-p1", FX_KEY_EC_P256, "0b01", "0b02") != 0 ||
        token_host(&hp_rsa, "edge-p2", FX_KEY_RSA_2048, "0b03", "0b04") != 0)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    host *hs[] = {&ha, &hp_ec, &hp_rsa};
    for (size_t i = 0; i < 3; i++) {
        SSL_SESSION_free(hs[i]->ticket13);
        SSL_SESSION_free(hs[i]->ticket12);
    }
    fx_token_destroy(&host_tok);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- tests ------------------------------------------------------------------------------- */

/* Issues a TLS 1.3 and a TLS 1.2 ticket on a server of c, kept in h. */
static void issue_tickets(host *h, stek_client *c)
{
    SSL_CTX *s = server_ctx(c);
    assert_non_null(s);
    fx_tls_result r13 = fx_tls_handshake(s, TLS1_3_VERSION, NULL, NULL);
    fx_tls_result r12 = fx_tls_handshake(s, TLS1_2_VERSION, NULL, NULL);
    assert_true(r13.ok && r12.ok);
    assert_true(SSL_SESSION_has_ticket(r13.session));
    assert_true(SSL_SESSION_has_ticket(r12.session));
    h->ticket13 = r13.session;
    h->ticket12 = r12.session;
    SSL_CTX_free(s);
}

/* The tickets issued before the restart resume on a server of c. */
static void resume_tickets(host *h, stek_client *c)
{
    SSL_CTX *s = server_ctx(c);
    assert_non_null(s);
    stek_counters k0 = counters(c);
    SSL_SESSION *ts[] = {h->ticket13, h->ticket12};
    const int versions[] = {TLS1_3_VERSION, TLS1_2_VERSION};
    for (size_t i = 0; i < 2; i++) {
        fx_tls_result r = fx_tls_handshake(s, versions[i], NULL, ts[i]);
        assert_true(r.ok);
        assert_true(r.client_reused);
        assert_true(r.server_reused);
        SSL_SESSION_free(r.session);
    }
    stek_counters k1 = counters(c);
    assert_int_equal(k1.tickets_resumed + k1.tickets_renewed,
                     k0.tickets_resumed + k0.tickets_renewed + 2);
    SSL_CTX_free(s);
}

/* The option's arguments, and sealing keys that cannot be used. */
static void test_cache_options(void **state)
{
    (void)state;
    stek_options *o = NULL;
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cache(o, "/tmp/x.cache", NULL), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_set_cache(o, NULL, "/tmp/seal.pem"),
                     STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_set_cache(o, "", "/tmp/seal.pem"), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_set_cache(NULL, NULL, NULL), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_set_cache(o, NULL, NULL), STEK_RESULT_OK);
    stek_options_free(o);

    host h = {0};
    assert_int_equal(file_host(&h, "edge-o"), 0);
    /* A sealing key on another curve: not usable. */
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    FILE *f = fopen(h.seal, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, p384, NULL, NULL, 0, NULL, NULL), 1);
    assert_int_equal(fclose(f), 0);
    EVP_PKEY_free(p384);
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    assert_int_equal(stek_options_add_server(o, d.target), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_ca(o, d.ca.cert_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cert(o, h.cert.cert_path, h.key), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_service_key(o, d.signing_pem_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_group(o, GROUP), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cache(o, h.cache, h.seal), STEK_RESULT_OK);
    stek_client *c = NULL;
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_CRYPTO);
    assert_null(c);
    /* No sealing key file at all. */
    unlink(h.seal);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_IO);
    /* A pkcs11: key that is not in the token. */
    char uri[2 * FX_PATH_MAX];
    uri_of(uri, sizeof(uri), "no-such-key");
    assert_int_equal(stek_options_set_cache(o, h.cache, uri), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_IO);
    assert_int_equal(stek_options_set_cert(o, h.cert.cert_path, uri), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_IO);
    stek_options_free(o);
    /* Nothing was written. */
    struct stat sb;
    assert_int_not_equal(stat(h.cache, &sb), 0);
}

/* A cache that cannot be written: logged and counted, serving goes on. */
static void test_cache_write_error(void **state)
{
    (void)state;
    host h = {0};
    assert_int_equal(file_host(&h, "edge-w"), 0);
    snprintf(h.cache, sizeof(h.cache), "%s/no-such-dir/keys.cache", h.dir);
    stek_client *c = client_new(&h, true);
    assert_non_null(c);
    assert_int_equal(stek_client_wait_ready(c, 20000), STEK_RESULT_OK);
    stek_counters k = counters(c);
    assert_true(k.cache_write_errors >= 1);
    assert_int_equal(k.cache_rejected, 0);
    assert_int_equal(k.cache_loaded, 0);
    assert_true(k.sets_accepted >= 1);
    stek_client_free(c);
}

/* Cache disabled: nothing about keys reaches the disk. */
static void test_cache_disabled(void **state)
{
    (void)state;
    host hn = {0}, hx = {0};
    assert_int_equal(file_host(&hn, "edge-n"), 0);
    assert_int_equal(file_host(&hx, "edge-x"), 0);
    stek_client *plain = client_new(&hn, false);
    stek_client *cached = client_new(&hx, true); /* only to learn the key bytes */
    assert_non_null(plain);
    assert_non_null(cached);
    assert_int_equal(stek_client_wait_ready(plain, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(cached, 20000), STEK_RESULT_OK);

    /* A full run: tickets issued and resumed. */
    issue_tickets(&hn, plain);
    resume_tickets(&hn, plain);
    stek_counters k = counters(plain);
    assert_int_equal(k.cache_loaded + k.cache_rejected + k.cache_write_errors, 0);
    stek_client_free(plain);

    /* Its state directory holds the high-water mark only, and nothing
     * else was written in its directory. */
    DIR *dd = opendir(hn.state);
    assert_non_null(dd);
    struct dirent *e;
    size_t n = 0;
    while ((e = readdir(dd)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        assert_string_equal(e->d_name, GROUP ".generation");
        n++;
    }
    closedir(dd);
    assert_int_equal(n, 1);
    char cache_dir[FX_PATH_MAX + 64];
    snprintf(cache_dir, sizeof(cache_dir), "%s/cache", hn.dir);
    assert_int_equal(rmdir(cache_dir), 0); /* still empty */

    /* The same group's keys, as the cached client holds them: no file
     * under the test directory has one of them, the sealed cache included. */
    stek_cache_contents *keys = unseal(&hx);
    assert_true(keys->n_keys >= 2);
    assert_true(ticket_key_cached(hn.ticket13, keys));
    assert_int_equal(files_with_keys(d.dir, keys), 0);
    stek_cache_contents_free(keys);
    stek_client_free(cached);
    SSL_SESSION_free(hn.ticket13);
    SSL_SESSION_free(hn.ticket12);
}

/* Keys in a token: mTLS, request signing and sealing through libp11. */
static void token_fetch(host *h)
{
    stek_client *c = client_new(h, true);
    assert_non_null(c);
    stek_result r = stek_client_wait_ready(c, 20000);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "not ready; stekd log: %s\n", d.log_path);
    assert_int_equal(r, STEK_RESULT_OK);
    stek_counters k = counters(c);
    assert_true(k.sets_accepted >= 1);
    assert_int_equal(k.cache_loaded + k.cache_rejected + k.cache_write_errors, 0);
    issue_tickets(h, c);
    assert_mode_0600(h->cache);
    stek_client_free(c);
}

static void test_token_keys_fetch(void **state)
{
    (void)state;
    token_fetch(&hp_ec);
    token_fetch(&hp_rsa);
}

/* Restarted while stekd is down: ready from the cache, old tickets resume. */
static void test_restart_from_cache(void **state)
{
    (void)state;
    stek_client *c = client_new(&ha, true);
    assert_non_null(c);
    assert_int_equal(stek_client_wait_ready(c, 20000), STEK_RESULT_OK);
    issue_tickets(&ha, c);
    assert_mode_0600(ha.cache);

    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    stek_client_free(c);

    c = client_new(&ha, true);
    assert_non_null(c);
    stek_counters k = counters(c);
    assert_int_equal(k.cache_loaded, 1);
    assert_int_equal(k.cache_rejected, 0);
    assert_int_equal(k.sets_accepted, 0);
    assert_true(k.ready); /* at once: nothing to wait for */
    assert_int_equal(k.generation, 1);
    assert_true(k.current_epoch > 0);
    assert_false(k.stream_up);
    assert_int_equal(stek_client_wait_ready(c, 1000), STEK_RESULT_OK);
    resume_tickets(&ha, c);

    /* The file: mode 0600, no key in the clear, and it holds the key the
     * old tickets were made with. */
    assert_mode_0600(ha.cache);
    stek_cache_contents *keys = unseal(&ha);
    assert_true(ticket_key_cached(ha.ticket13, keys));
    assert_true(ticket_key_cached(ha.ticket12, keys));
    assert_false(file_holds_key(ha.cache, keys));
    stek_cache_contents_free(keys);
    stek_client_free(c);
}

/* The token hosts, restarted with stekd still down. */
static void token_restart(host *h)
{
    stek_client *c = client_new(h, true);
    assert_non_null(c);
    stek_counters k = counters(c);
    assert_int_equal(k.cache_loaded, 1);
    assert_int_equal(k.cache_rejected, 0);
    assert_int_equal(stek_client_wait_ready(c, 1000), STEK_RESULT_OK);
    resume_tickets(h, c);
    stek_cache_contents *keys = unseal(h);
    assert_true(ticket_key_cached(h->ticket13, keys));
    assert_false(file_holds_key(h->cache, keys));
    stek_cache_contents_free(keys);
    stek_client_free(c);
}

static void test_token_keys_restart(void **state)
{
    (void)state;
    token_restart(&hp_ec);
    token_restart(&hp_rsa);
}

/* stekd again, on the port the clients know. */
static void restart_stekd(void)
{
    const char *colon = strrchr(d.target, ':');
    assert_non_null(colon);
    FILE *f = fopen(d.config_path, "r");
    assert_non_null(f);
    char buf[16384], out[16384 + 64];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *from = "\"127.0.0.1:0\"";
    char *at = strstr(buf, from);
    assert_non_null(at);
    snprintf(out, sizeof(out), "%.*s\"127.0.0.1:%s\"%s", (int)(at - buf), buf, colon + 1,
             at + strlen(from));
    assert_int_equal(fx_write_file(d.config_path, out, 0600), 0);
    assert_int_equal(fx_stekd_start(&d), 0);
}

/* Corrupts one byte of the cache file, in its sealed contents. */
static void corrupt(const char *path)
{
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, 120, SEEK_SET), 0);
    int ch = fgetc(f);
    assert_int_not_equal(ch, EOF);
    assert_int_equal(fseek(f, 120, SEEK_SET), 0);
    assert_int_not_equal(fputc(ch ^ 0x20, f), EOF);
    assert_int_equal(fclose(f), 0);
}

/*
 * A corrupted file: rejected and counted, and the client starts anyway;
 * with stekd back, a client started on the corrupted file becomes ready
 * and rewrites the file, which the next start loads.
 *
 * (The client that started during the outage would become ready too, but
 * only once its transport reconnects: gRPC 1.51 makes progress on a failed
 * channel only from its 5 s backup poller while no call waits, which with
 * libstek's own backoff can take most of a minute. Hence a second client.)
 */
static void test_corrupt_cache(void **state)
{
    (void)state;
    corrupt(ha.cache);
    stek_client *c = client_new(&ha, true);
    assert_non_null(c);
    stek_counters k = counters(c);
    assert_int_equal(k.cache_rejected, 1);
    assert_int_equal(k.cache_loaded, 0);
    assert_false(k.ready);
    assert_int_equal(stek_client_wait_ready(c, 300), STEK_RESULT_TIMEOUT);
    stek_client_free(c);

    restart_stekd();
    c = client_new(&ha, true);
    assert_non_null(c);
    k = counters(c);
    assert_int_equal(k.cache_rejected, 1);
    assert_int_equal(k.cache_loaded, 0);
    assert_int_equal(stek_client_wait_ready(c, 20000), STEK_RESULT_OK);
    k = counters(c);
    assert_true(k.sets_accepted >= 1);
    assert_int_equal(k.cache_write_errors, 0);
    stek_client_free(c);

    /* The file was rewritten whole: the next start loads it. */
    c = client_new(&ha, true);
    assert_non_null(c);
    k = counters(c);
    assert_int_equal(k.cache_loaded, 1);
    assert_int_equal(k.cache_rejected, 0);
    assert_true(k.ready);
    stek_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_options),      cmocka_unit_test(test_cache_write_error),
        cmocka_unit_test(test_cache_disabled),     cmocka_unit_test(test_token_keys_fetch),
        cmocka_unit_test(test_restart_from_cache), cmocka_unit_test(test_token_keys_restart),
        cmocka_unit_test(test_corrupt_cache),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
