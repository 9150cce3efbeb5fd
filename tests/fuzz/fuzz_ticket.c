/*
 * libstek's ticket callback on the decrypt path (client/stek_client.c:
 * ticket_cb and dec_cb), through real OpenSSL handshakes in memory.
 *
 * At start the harness makes a real libstek client whose keys come from a
 * sealed cache file it wrote (three fixed keys of group "edge"), with an
 * unreachable stekd address, so the keys are libstek's own installed ones,
 * and attaches it to a TLS server context. Each input then becomes the
 * session ticket of a TLS 1.2 ClientHello (SSL_set_session_ticket_ext),
 * and the server processes that ClientHello: the ticket callback looks the
 * name up, OpenSSL checks the HMAC, decrypts, decodes the session, and
 * dec_cb gives the verdict. Whatever ticket anyone can make, the server
 * must go on (resume or full handshake), never fail the handshake.
 *
 * The first byte picks the mode:
 *   0  the rest is the ticket as sent;
 *   1  the harness makes the ticket as OpenSSL would, under installed key
 *      (byte 1 % 4; 3 = a key nobody has): name | IV | AES-256-CBC(rest) |
 *      HMAC-SHA256, so the rest, a session encoding, gets past the MAC and
 *      reaches OpenSSL's decoding and dec_cb.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "cache.h"
#include "fuzz.h"
#include "stek/stek.h"

#define GROUP "edge"
#define N_KEYS 3
#define NS INT64_C(1000000000)
#define DAY_NS (86400 * NS)
#define MODES 2

static stek_client *client;
static SSL_CTX *sctx, *cctx;
static uint8_t keys[N_KEYS][STEK_RING_ENTRY_BYTES]; /* name | hmac | aes, fixed */

static void write_pem(const char *name, const char *pem, char *path)
{
    fuzz_write_file(name, (const uint8_t *)pem, strlen(pem), path);
}

/* The cache file a previous run of the host would have left: three live keys. */
static void write_cache(const char *cache_path, const char *cert_path, EVP_PKEY *seal_priv)
{
    stek_cache_contents *c = calloc(1, sizeof(*c));
    if (c == NULL)
        fuzz_fail("out of memory");
    c->keys = calloc(N_KEYS, sizeof(*c->keys));
    if (c->keys == NULL || stek_secret_new(sizeof(keys), &c->material) != STEK_OK ||
        stek_cache_host_id(cert_path, c->host_id) != STEK_OK)
        fuzz_fail("cache contents: %s", stek_error_detail());
    const int64_t now = stek_walltime_ns();
    const uint64_t e = 1000;
    c->written_at = now;
    c->n_groups = 1;
    snprintf(c->groups[0].name, sizeof(c->groups[0].name), "%s", GROUP);
    c->groups[0].generation = 1;
    c->groups[0].current_epoch = e;
    c->groups[0].first = 0;
    c->groups[0].count = N_KEYS;
    c->n_keys = N_KEYS;
    /* Windows of days: the keys outlive any fuzzing run. */
    /* Old (encrypted until yesterday), current (for 30 days), next. */
    const int64_t from[N_KEYS] = {-2, -1, 30}, until[N_KEYS] = {-1, 30, 31};
    for (size_t i = 0; i < N_KEYS; i++) {
        c->keys[i].epoch = e - 1 + i;
        c->keys[i].not_before = now + from[i] * DAY_NS;
        c->keys[i].encrypt_until = now + until[i] * DAY_NS;
        c->keys[i].decrypt_until = now + 60 * DAY_NS;
    }
    memcpy(stek_secret_data(c->material), keys, sizeof(keys));
    EVP_PKEY *pub = NULL;
    if (stek_cache_sealing_public(seal_priv, &pub) != STEK_OK ||
        stek_cache_write(cache_path, pub, c) != STEK_OK)
        fuzz_fail("cache write: %s", stek_error_detail());
    EVP_PKEY_free(pub);
    stek_cache_contents_free(c);
}

/* Stops the client's thread before the process's exit handlers (OpenSSL's) run. */
static void cleanup(void)
{
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    stek_client_free(client);
}

static void init(void)
{
    if (client != NULL)
        return;
    for (size_t i = 0; i < N_KEYS; i++)
        for (size_t j = 0; j < STEK_RING_ENTRY_BYTES; j++)
            keys[i][j] = (uint8_t)(0x30 + i * 17 + j * 5);
    char cert[512], key[512], svc[512], seal[512], cache[600], state[512];
    EVP_PKEY *host_key = fuzz_derived_key("host", false);
    EVP_PKEY *seal_key = fuzz_derived_key("sealing", false);
    char *host_pem = fuzz_private_pem(host_key), *seal_pem = fuzz_private_pem(seal_key);
    write_pem("host.pem", fuzz_host_cert_pem(), cert);
    write_pem("host-key.pem", host_pem, key);
    write_pem("seal.pem", seal_pem, seal);
    OPENSSL_clear_free(host_pem, strlen(host_pem));
    OPENSSL_clear_free(seal_pem, strlen(seal_pem));
    EVP_PKEY_free(host_key);
    EVP_PKEY *svc_key = fuzz_derived_key("service", true);
    BIO *b = BIO_new(BIO_s_mem());
    char *pem = NULL;
    long n = 0;
    if (b == NULL || PEM_write_bio_PUBKEY(b, svc_key) != 1 || (n = BIO_get_mem_data(b, &pem)) <= 0)
        fuzz_fail("service key");
    fuzz_write_file("service.pem", (const uint8_t *)pem, (size_t)n, svc);
    BIO_free(b);
    EVP_PKEY_free(svc_key);
    snprintf(state, sizeof(state), "%s/state", fuzz_tmpdir());
    snprintf(cache, sizeof(cache), "%s/keys.cache", state);
    if (mkdir(state, 0700) != 0)
        fuzz_fail("state dir");
    write_cache(cache, cert, seal_key);
    EVP_PKEY_free(seal_key);

    stek_options *o = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK ||
        stek_options_add_server(o, "127.0.0.1:1") != STEK_RESULT_OK || /* never answers */
        stek_options_set_ca(o, cert) != STEK_RESULT_OK ||
        stek_options_set_cert(o, cert, key) != STEK_RESULT_OK ||
        stek_options_set_service_key(o, svc) != STEK_RESULT_OK ||
        stek_options_set_group(o, GROUP) != STEK_RESULT_OK ||
        stek_options_set_state_dir(o, state) != STEK_RESULT_OK ||
        stek_options_set_cache(o, cache, seal) != STEK_RESULT_OK)
        fuzz_fail("options");
    stek_result r = stek_client_new(o, &client);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fuzz_fail("stek_client_new: %s", stek_result_name(r));
    stek_counters k;
    if (stek_client_get_counters(client, &k) != STEK_RESULT_OK || !k.cache_loaded || !k.ready)
        fuzz_fail("the client did not load its keys from the cache");

    sctx = SSL_CTX_new(TLS_server_method());
    cctx = SSL_CTX_new(TLS_client_method());
    if (sctx == NULL || cctx == NULL || SSL_CTX_use_certificate_chain_file(sctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(sctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION) != 1 ||
        stek_client_attach(client, sctx) != STEK_RESULT_OK)
        fuzz_fail("TLS contexts");
    atexit(cleanup);
}

/* OpenSSL's ticket layout under installed key k: name | iv | CBC(pt) | HMAC. */
static size_t make_ticket(const uint8_t *k, const uint8_t *pt, size_t len, uint8_t *out)
{
    static const uint8_t iv[16] = "stek-fuzz-iv-16";
    memcpy(out, k, 16);
    memcpy(out + 16, iv, 16);
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL || EVP_EncryptInit_ex(c, EVP_aes_256_cbc(), NULL, k + 48, iv) != 1 ||
        EVP_EncryptUpdate(c, out + 32, &o1, pt, (int)len) != 1 ||
        EVP_EncryptFinal_ex(c, out + 32 + o1, &o2) != 1)
        fuzz_fail("AES-256-CBC");
    EVP_CIPHER_CTX_free(c);
    size_t n = 32 + (size_t)o1 + (size_t)o2;
    unsigned int mac_len = 0;
    if (HMAC(EVP_sha256(), k + 16, 32, out, n, out + n, &mac_len) == NULL || mac_len != 32)
        fuzz_fail("HMAC");
    return n + 32;
}

/*
 * A client sends ticket in its ClientHello; the server processes it.
 * Returns whether the server resumed; fails hard when the server failed.
 */
static bool offer(const uint8_t *ticket, size_t len, bool authentic)
{
    SSL *cs = SSL_new(cctx), *ss = SSL_new(sctx);
    BIO *cb = NULL, *sb = NULL;
    if (cs == NULL || ss == NULL || BIO_new_bio_pair(&cb, 0, &sb, 0) != 1)
        fuzz_fail("SSL_new");
    SSL_set_bio(cs, cb, cb);
    SSL_set_bio(ss, sb, sb);
    SSL_set_connect_state(cs);
    SSL_set_accept_state(ss);
    /* No bytes: the client's own empty extension (a ticket asked for, none offered). */
    if (len > 0 && SSL_set_session_ticket_ext(cs, (void *)ticket, (int)len) != 1)
        fuzz_fail("SSL_set_session_ticket_ext");
    bool reused = false;
    int rc = SSL_do_handshake(cs);
    if (rc != -1 || SSL_get_error(cs, rc) != SSL_ERROR_WANT_READ) {
        /* OpenSSL's client refused to send it: nothing reaches the server. */
        if (fuzz_verbose())
            fprintf(stderr, "ticket: the client did not send a ClientHello\n");
        goto done;
    }
    /* The server reads the ClientHello (the ticket callbacks run there) and
     * answers; it then waits for the client, whether it resumed or not. */
    rc = SSL_do_handshake(ss);
    if (rc != -1 || SSL_get_error(ss, rc) != SSL_ERROR_WANT_READ) {
        /* An authentic ticket (MAC'd under our key, so only the key holder
         * can make one) may carry a session OpenSSL refuses to resume
         * fatally, e.g. with a cipher the client did not offer. A ticket
         * anyone can send must never fail the handshake. */
        if (authentic) {
            if (fuzz_verbose())
                ERR_print_errors_fp(stderr);
            goto done;
        }
        ERR_print_errors_fp(stderr);
        fuzz_fail("the server failed on a ticket of %zu bytes", len);
    }
    reused = SSL_session_reused(ss) == 1;
done:
    SSL_free(cs);
    SSL_free(ss);
    ERR_clear_error();
    return reused;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init();
    if (size < 1)
        return 0;
    bool reused;
    if (data[0] % MODES == 0 || size < 2) {
        reused = offer(data + 1, size - 1, false);
    } else {
        uint8_t other[STEK_RING_ENTRY_BYTES];
        memset(other, 0x7e, sizeof(other));
        const uint8_t *k = data[1] % 4 < N_KEYS ? keys[data[1] % 4] : other;
        uint8_t *t = malloc(size + 96);
        if (t == NULL)
            fuzz_fail("out of memory");
        reused = offer(t, make_ticket(k, data + 2, size - 2, t), k != other);
        if (reused && k == other)
            fuzz_fail("resumed a ticket under a key the client does not have");
        free(t);
    }
    if (fuzz_verbose()) {
        stek_counters c;
        if (stek_client_get_counters(client, &c) == STEK_RESULT_OK)
            fprintf(stderr,
                    "ticket: reused %d; resumed %llu renewed %llu unknown %llu bad_mac %llu\n",
                    reused, (unsigned long long)c.tickets_resumed,
                    (unsigned long long)c.tickets_renewed, (unsigned long long)c.miss_unknown,
                    (unsigned long long)c.miss_bad_mac);
    }
    return 0;
}

/* ---- seeds ------------------------------------------------------------------------------ */

void fuzz_seeds(fuzz_emit_fn emit)
{
    init();
    /* A full TLS 1.2 handshake: the server's session encoding, and the ticket it issued. */
    SSL *cs = SSL_new(cctx), *ss = SSL_new(sctx);
    BIO *cb = NULL, *sb = NULL;
    if (cs == NULL || ss == NULL || BIO_new_bio_pair(&cb, 0, &sb, 0) != 1)
        fuzz_fail("SSL_new");
    SSL_set_bio(cs, cb, cb);
    SSL_set_bio(ss, sb, sb);
    SSL_set_connect_state(cs);
    SSL_set_accept_state(ss);
    for (int i = 0; i < 20 && (!SSL_is_init_finished(cs) || !SSL_is_init_finished(ss)); i++) {
        SSL_do_handshake(cs);
        SSL_do_handshake(ss);
    }
    SSL_SESSION *c_sess = SSL_get1_session(cs);
    const unsigned char *tick = NULL;
    size_t tick_len = 0;
    if (!SSL_is_init_finished(cs) || c_sess == NULL)
        fuzz_fail("seed handshake");
    SSL_SESSION_get0_ticket(c_sess, &tick, &tick_len);
    if (tick_len == 0 || tick_len > 2000)
        fuzz_fail("no ticket issued");
    uint8_t buf[4096];
    buf[0] = 0;
    memcpy(buf + 1, tick, tick_len);
    emit("ticket-issued", buf, tick_len + 1);
    buf[1 + tick_len - 1] ^= 0x01; /* the MAC */
    emit("ticket-bad-mac", buf, tick_len + 1);
    memset(buf + 1, 0xee, 16); /* a name nobody has */
    emit("ticket-unknown-name", buf, tick_len + 1);

    unsigned char *der = NULL;
    int der_len = i2d_SSL_SESSION(SSL_get_session(ss), &der);
    if (der_len <= 0 || der_len > 2000)
        fuzz_fail("i2d_SSL_SESSION");
    const char *names[4] = {"session-old-key", "session-current-key", "session-next-key",
                            "session-unknown-key"};
    for (uint8_t k = 0; k < 4; k++) {
        buf[0] = 1;
        buf[1] = k;
        memcpy(buf + 2, der, (size_t)der_len);
        emit(names[k], buf, (size_t)der_len + 2);
    }
    buf[0] = 1;
    buf[1] = 1;
    memcpy(buf + 2, "not a session", 13);
    emit("session-garbage", buf, 15);
    OPENSSL_free(der);
    SSL_SESSION_free(c_sess);
    SSL_free(cs);
    SSL_free(ss);
}
