/*
 * libstek end to end, through its public API only (linked against the
 * shared libstek): a real stekd (epochs 4 s, lifetime 8 s, group "edge"),
 * two hosts with their own certificates (one EC, one RSA), each with a
 * stek_client attached to its own server SSL_CTX, and real OpenSSL
 * handshakes over in-memory BIO pairs: a ticket issued by server A resumes
 * on server B under TLS 1.2 and TLS 1.3. A client that has no key (its
 * service address is dead) still gives full handshakes, without a ticket.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#define EPOCH_S 4
#define LIFETIME_S 8
#define GROUP "edge"

static fx_stekd d;
static fx_cert cert_a, cert_b;
static stek_client *client_a, *client_b, *client_dead;
static SSL_CTX *server_a, *server_b, *server_dead;
static char state_dir[FX_PATH_MAX + 16];

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

static stek_client *client_for(const fx_cert *cert, const char *target, const char *dir)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_options_set_state_dir(o, dir);
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(r));
    return c;
}

static SSL_CTX *server_ctx(void)
{
    return fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    const char *uri_a[] = {"spiffe://fleet/edge/a", NULL};
    const char *uri_b[] = {"spiffe://fleet/edge/b", NULL};
    fx_cert_opts oa = {.name = "edge-a", .key_type = FX_KEY_EC_P256, .uri_sans = uri_a};
    fx_cert_opts ob = {.name = "edge-b", .key_type = FX_KEY_RSA_2048, .uri_sans = uri_b};
    if (fx_stekd_host_cert(&d, &oa, &cert_a) != 0 || fx_stekd_host_cert(&d, &ob, &cert_b) != 0)
        return -1;
    snprintf(state_dir, sizeof(state_dir), "%s/state", d.dir);
    if (mkdir(state_dir, 0700) != 0)
        return -1;
    client_a = client_for(&cert_a, d.target, state_dir);
    client_b = client_for(&cert_b, d.target, NULL);
    /* Port 1 on loopback: refused at once, so this client never has a key. */
    client_dead = client_for(&cert_a, "127.0.0.1:1", NULL);
    server_a = server_ctx();
    server_b = server_ctx();
    server_dead = server_ctx();
    if (client_a == NULL || client_b == NULL || client_dead == NULL || server_a == NULL ||
        server_b == NULL || server_dead == NULL)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    /* Clients first: they detach from the contexts they still reference. */
    stek_client_free(client_a);
    stek_client_free(client_b);
    stek_client_free(client_dead);
    SSL_CTX_free(server_a);
    SSL_CTX_free(server_b);
    SSL_CTX_free(server_dead);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- in-memory handshakes ------------------------------------------------------------ */

typedef fx_tls_result hs_result;

static hs_result handshake(SSL_CTX *sctx, int version, SSL_SESSION *resume)
{
    return fx_tls_handshake(sctx, version, NULL, resume);
}

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

/* ---- tests --------------------------------------------------------------------------- */

static void test_ready_and_attach(void **state)
{
    (void)state;
    assert_int_equal(stek_client_wait_ready(client_a, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(client_b, 20000), STEK_RESULT_OK);
    /* Attach after ready: the context's timeout is capped at L. */
    SSL_CTX_set_timeout(server_a, 7200);
    assert_int_equal(stek_client_attach(client_a, server_a), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_b, server_b), STEK_RESULT_OK);
    assert_int_equal(SSL_CTX_get_timeout(server_a), LIFETIME_S);
    assert_true(SSL_CTX_get_timeout(server_b) <= LIFETIME_S);
    assert_int_equal(SSL_CTX_get_max_early_data(server_a), 0);
    /* A context takes one client. */
    assert_int_equal(stek_client_attach(client_b, server_a), STEK_RESULT_ALREADY);
    assert_int_equal(stek_client_attach(NULL, server_a), STEK_RESULT_INVALID_ARGUMENT);

    stek_counters k = counters(client_a);
    assert_true(k.ready);
    assert_true(k.sets_accepted >= 1);
    assert_int_equal(k.sets_rejected, 0);
    assert_int_equal(k.generation, 1);
    uint64_t own = fx_stekd_epoch_now(&d);
    assert_true(k.current_epoch + 1 >= own && k.current_epoch <= own + 1);
    assert_true(k.last_fetch_unix > 0 && k.last_fetch_unix <= (int64_t)time(NULL));
    assert_true(k.stream_up);

    /* The high-water mark reached the state directory, mode 0600. */
    char path[FX_PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s.generation", state_dir, GROUP);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    unsigned long long g = 0;
    assert_int_equal(fscanf(f, "%llu", &g), 1);
    fclose(f);
    assert_int_equal(g, 1);
}

static void cross_host(int version)
{
    stek_counters a0 = counters(client_a), b0 = counters(client_b);

    hs_result full = handshake(server_a, version, NULL);
    assert_true(full.ok);
    assert_false(full.client_reused);
    assert_non_null(full.session);
    assert_true(SSL_SESSION_has_ticket(full.session));
    /* The ticket's lifetime hint is capped at L. */
    assert_true(SSL_SESSION_get_ticket_lifetime_hint(full.session) <= LIFETIME_S);

    hs_result res = handshake(server_b, version, full.session);
    assert_true(res.ok);
    assert_true(res.client_reused);
    assert_true(res.server_reused);

    /* And on A itself. */
    hs_result again = handshake(server_a, version, full.session);
    assert_true(again.ok);
    assert_true(again.client_reused);

    stek_counters a1 = counters(client_a), b1 = counters(client_b);
    assert_true(a1.tickets_issued >= a0.tickets_issued + 1);
    /* Resumed, or renewed when a rotation fell between the handshakes. */
    assert_int_equal(b1.tickets_resumed + b1.tickets_renewed,
                     b0.tickets_resumed + b0.tickets_renewed + 1);
    assert_int_equal(a1.tickets_resumed + a1.tickets_renewed,
                     a0.tickets_resumed + a0.tickets_renewed + 1);
    assert_int_equal(b1.no_key_encrypts, 0);
    assert_int_equal(b1.miss_unknown + b1.miss_expired + b1.miss_other_generation, 0);
    fprintf(stderr, "TLS 0x%x: A issued %llu resumed %llu renewed %llu; B resumed %llu\n", version,
            (unsigned long long)a1.tickets_issued, (unsigned long long)a1.tickets_resumed,
            (unsigned long long)a1.tickets_renewed, (unsigned long long)b1.tickets_resumed);
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(res.session);
    SSL_SESSION_free(again.session);
}

static void test_cross_host_tls12(void **state)
{
    (void)state;
    cross_host(TLS1_2_VERSION);
}

static void test_cross_host_tls13(void **state)
{
    (void)state;
    cross_host(TLS1_3_VERSION);
}

/* Many resumptions in a row, across a rotation: always resumed or renewed. */
static void test_across_rotation(void **state)
{
    (void)state;
    hs_result full = handshake(server_a, TLS1_3_VERSION, NULL);
    assert_true(full.ok);
    uint64_t e0 = counters(client_a).current_epoch;
    SSL_SESSION *sess = full.session;
    time_t until = time(NULL) + EPOCH_S + 3;
    while (counters(client_b).current_epoch == e0 && time(NULL) < until) {
        struct timespec ts = {0, 200 * 1000000L};
        nanosleep(&ts, NULL);
    }
    assert_true(counters(client_b).current_epoch > e0);
    /* The old ticket still resumes (its key is within its window), and the
     * new one issued on resumption carries the new key. */
    stek_counters b0 = counters(client_b);
    hs_result res = handshake(server_b, TLS1_3_VERSION, sess);
    assert_true(res.ok);
    assert_true(res.client_reused);
    stek_counters b1 = counters(client_b);
    assert_int_equal(b1.tickets_renewed, b0.tickets_renewed + 1);
    SSL_SESSION_free(sess);
    /* The renewed ticket resumes as current. */
    hs_result res2 = handshake(server_b, TLS1_3_VERSION, res.session);
    assert_true(res2.ok);
    assert_true(res2.client_reused);
    assert_int_equal(counters(client_b).tickets_resumed, b1.tickets_resumed + 1);
    SSL_SESSION_free(res.session);
    SSL_SESSION_free(res2.session);
}

static void no_key(int version)
{
    stek_counters k0 = counters(client_dead);
    hs_result full = handshake(server_dead, version, NULL);
    assert_true(full.ok);
    assert_false(full.client_reused);
    assert_non_null(full.session);
    assert_false(SSL_SESSION_has_ticket(full.session));
    stek_counters k1 = counters(client_dead);
    assert_true(k1.no_key_encrypts >= k0.no_key_encrypts + 1);
    assert_int_equal(k1.tickets_issued, 0);
    SSL_SESSION_free(full.session);

    /* A ticket of another server (A's) is unknown here: a full handshake. */
    hs_result a = handshake(server_a, version, NULL);
    assert_true(a.ok);
    hs_result res = handshake(server_dead, version, a.session);
    assert_true(res.ok);
    assert_false(res.client_reused);
    assert_true(counters(client_dead).miss_unknown >= k1.miss_unknown + 1);
    SSL_SESSION_free(a.session);
    SSL_SESSION_free(res.session);
}

static void test_no_key(void **state)
{
    (void)state;
    assert_int_equal(stek_client_wait_ready(client_dead, 300), STEK_RESULT_TIMEOUT);
    assert_int_equal(stek_client_attach(client_dead, server_dead), STEK_RESULT_OK);
    no_key(TLS1_2_VERSION);
    no_key(TLS1_3_VERSION);
    stek_counters k = counters(client_dead);
    assert_false(k.ready);
    assert_false(k.stream_up);
    assert_int_equal(k.sets_accepted, 0);
    assert_int_equal(k.generation, 0);
}

/* A copy of sess whose ticket has byte `at` (from the end) flipped. */
static SSL_SESSION *tampered(const SSL_SESSION *sess, size_t at)
{
    const unsigned char *tick = NULL;
    size_t tlen = 0;
    SSL_SESSION_get0_ticket(sess, &tick, &tlen);
    assert_true(tlen > at);
    unsigned char *der = NULL;
    int dlen = i2d_SSL_SESSION((SSL_SESSION *)sess, &der);
    assert_true(dlen > 0);
    /* The ticket is stored verbatim (an OCTET STRING) in the encoding. */
    unsigned char *p = memmem(der, (size_t)dlen, tick, tlen);
    assert_non_null(p);
    p[tlen - 1 - at] ^= 0x01;
    const unsigned char *q = der;
    SSL_SESSION *out = d2i_SSL_SESSION(NULL, &q, dlen);
    OPENSSL_free(der);
    assert_non_null(out);
    return out;
}

/* A ticket under a live key of ours whose MAC (its last 32 bytes) or
 * ciphertext was changed: a full handshake, counted as miss_bad_mac; the
 * genuine ticket still resumes, counted once as resumed. */
static void bad_mac(int version)
{
    hs_result full = handshake(server_a, version, NULL);
    assert_true(full.ok);
    assert_non_null(full.session);
    for (size_t at = 0; at < 64; at += 31) { /* in the MAC, then in the ciphertext */
        SSL_SESSION *bad = tampered(full.session, at);
        stek_counters k0 = counters(client_b);
        hs_result res = handshake(server_b, version, bad);
        assert_true(res.ok);
        assert_false(res.server_reused);
        stek_counters k1 = counters(client_b);
        assert_int_equal(k1.miss_bad_mac, k0.miss_bad_mac + 1);
        assert_int_equal(k1.tickets_resumed + k1.tickets_renewed,
                         k0.tickets_resumed + k0.tickets_renewed);
        assert_int_equal(k1.miss_unknown, k0.miss_unknown);
        SSL_SESSION_free(bad);
        SSL_SESSION_free(res.session);
    }
    stek_counters k0 = counters(client_b);
    hs_result good = handshake(server_b, version, full.session);
    assert_true(good.ok);
    assert_true(good.server_reused);
    stek_counters k1 = counters(client_b);
    assert_int_equal(k1.tickets_resumed + k1.tickets_renewed,
                     k0.tickets_resumed + k0.tickets_renewed + 1);
    assert_int_equal(k1.miss_bad_mac, k0.miss_bad_mac);
    /* TLS 1.3 renews every resumed ticket, as OpenSSL's own keys do (a
     * ticket reused across connections links them: RFC 8446 C.4); TLS 1.2
     * keeps a current key's ticket. */
    const unsigned char *t0 = NULL, *t1 = NULL;
    size_t l0 = 0, l1 = 0;
    SSL_SESSION_get0_ticket(full.session, &t0, &l0);
    SSL_SESSION_get0_ticket(good.session, &t1, &l1);
    assert_true(l0 > 0 && l1 > 0);
    bool same = l0 == l1 && memcmp(t0, t1, l0) == 0;
    const bool by_current = k1.tickets_resumed == k0.tickets_resumed + 1;
    if (version == TLS1_3_VERSION)
        assert_false(same);
    else
        assert_true(same == by_current); /* a rotation in between renews it */
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(good.session);
}

static void test_bad_mac(void **state)
{
    (void)state;
    bad_mac(TLS1_2_VERSION);
    bad_mac(TLS1_3_VERSION);
}

static bool rejected_rollback(const stek_counters *k, uint64_t unused)
{
    (void)unused;
    return k->sets_rejected_by[STEK_REJECTED_ROLLBACK] >= 1;
}

static bool wait_counters(stek_client *c, bool (*cond)(const stek_counters *, uint64_t),
                          uint64_t arg, int timeout_s);

/* A high-water mark above stekd's generation (as after a rekey seen
 * earlier) makes its sets rollbacks; a corrupt mark file is refused. */
static void test_persisted_rollback(void **state)
{
    (void)state;
    char dir[FX_PATH_MAX + 32], path[FX_PATH_MAX + 64];
    snprintf(dir, sizeof(dir), "%s/state-hwm", d.dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(path, sizeof(path), "%s/%s.generation", dir, GROUP);
    assert_int_equal(fx_write_file(path, "5\n", 0600), 0);
    stek_client *c = client_for(&cert_b, d.target, dir);
    assert_non_null(c);
    assert_true(wait_counters(c, rejected_rollback, 0, 10));
    stek_counters k = counters(c);
    assert_false(k.ready);
    assert_int_equal(k.sets_accepted, 0);
    assert_true(k.sets_rejected >= 1);
    stek_client_free(c);

    assert_int_equal(fx_write_file(path, "five\n", 0600), 0);
    stek_options *o = NULL;
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    assert_int_equal(stek_options_add_server(o, d.target), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_ca(o, d.ca.cert_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cert(o, cert_b.cert_path, cert_b.key_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_service_key(o, d.signing_pem_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_group(o, GROUP), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_state_dir(o, dir), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_IO);
    stek_options_free(o);
}

static bool wait_counters(stek_client *c, bool (*cond)(const stek_counters *, uint64_t),
                          uint64_t arg, int timeout_s)
{
    time_t until = time(NULL) + timeout_s;
    do {
        stek_counters k = counters(c);
        if (cond(&k, arg))
            return true;
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
    } while (time(NULL) < until);
    return false;
}

static bool not_ready(const stek_counters *k, uint64_t unused)
{
    (void)unused;
    return !k->ready;
}

/*
 * stekd stopped: tickets keep coming (stale keys past encrypt_until, with
 * lifetimes cut to what is left of the key), resumption continues, and
 * once the last key's decrypt deadline passes there is no key at all:
 * full handshakes without a ticket, and old tickets miss as expired.
 * Runs last: stekd stays down.
 */
static void test_outage(void **state)
{
    (void)state;
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    hs_result old12 = handshake(server_a, TLS1_2_VERSION, NULL);
    assert_true(old12.ok);
    assert_true(SSL_SESSION_has_ticket(old12.session));

    /* Within two epochs (CURRENT, then NEXT, run out), encryption goes stale. */
    stek_counters a0 = counters(client_a);
    hs_result stale = {0};
    time_t until = time(NULL) + 2 * EPOCH_S + 3;
    while (time(NULL) < until) {
        stale = handshake(server_a, TLS1_3_VERSION, NULL);
        assert_true(stale.ok);
        assert_true(SSL_SESSION_has_ticket(stale.session));
        if (counters(client_a).tickets_stale > a0.tickets_stale)
            break;
        SSL_SESSION_free(stale.session);
        stale.session = NULL;
        struct timespec ts = {0, 250 * 1000000L};
        nanosleep(&ts, NULL);
    }
    assert_non_null(stale.session);
    stek_counters a1 = counters(client_a);
    assert_true(a1.tickets_stale > a0.tickets_stale);
    assert_false(a1.stream_up);
    assert_true(a1.ready);
    /* Its lifetime is what is left of the key: less than L. */
    fprintf(stderr, "stale ticket lifetime %lu s (L = %d s)\n",
            (unsigned long)SSL_SESSION_get_ticket_lifetime_hint(stale.session), LIFETIME_S);
    assert_true(SSL_SESSION_get_ticket_lifetime_hint(stale.session) < LIFETIME_S);
    /* It resumes on B, which holds the same keys. */
    hs_result res = handshake(server_b, TLS1_3_VERSION, stale.session);
    assert_true(res.ok);
    assert_true(res.client_reused);

    /* Then every key expires on its deadline, service or not. */
    assert_true(wait_counters(client_a, not_ready, 0, LIFETIME_S + 2 * EPOCH_S + 3));
    assert_true(wait_counters(client_b, not_ready, 0, 3));
    stek_counters b0 = counters(client_b);
    hs_result none = handshake(server_b, TLS1_3_VERSION, NULL);
    assert_true(none.ok);
    assert_false(SSL_SESSION_has_ticket(none.session));
    /* The TLS 1.2 ticket from before the outage (the client still offers
     * it: its own timeout is pushed out) no longer resumes. */
    SSL_SESSION_set_time(old12.session, (long)time(NULL));
    SSL_SESSION_set_timeout(old12.session, 3600);
    hs_result late = handshake(server_b, TLS1_2_VERSION, old12.session);
    assert_true(late.ok);
    assert_false(late.client_reused);
    stek_counters b1 = counters(client_b);
    assert_true(b1.no_key_encrypts > b0.no_key_encrypts);
    assert_int_equal(b1.miss_expired, b0.miss_expired + 1);
    SSL_SESSION_free(old12.session);
    SSL_SESSION_free(stale.session);
    SSL_SESSION_free(res.session);
    SSL_SESSION_free(none.session);
    SSL_SESSION_free(late.session);
}

static void test_options(void **state)
{
    (void)state;
    stek_options *o = NULL;
    stek_client *c = NULL;
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_group(o, "Bad Group"), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_add_server(o, ""), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_set_ca(o, NULL), STEK_RESULT_INVALID_ARGUMENT);
    /* Incomplete. */
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_CONFIG);
    assert_null(c);
    assert_int_equal(stek_options_add_server(o, d.target), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_ca(o, d.ca.cert_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cert(o, cert_a.cert_path, cert_a.key_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_group(o, GROUP), STEK_RESULT_OK);
    /* A pinned key that is not a public key file. */
    assert_int_equal(stek_options_set_service_key(o, d.ca.cert_path), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_CRYPTO);
    stek_options_free(o);
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    assert_int_equal(stek_options_add_server(o, d.target), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_ca(o, d.ca.cert_path), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_cert(o, cert_a.cert_path, "/nonexistent"), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_group(o, GROUP), STEK_RESULT_OK);
    assert_int_equal(stek_options_set_service_key(o, d.signing_pem_path), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_IO);
    stek_options_free(o);
    assert_string_equal(stek_result_name(STEK_RESULT_TIMEOUT), "STEK_RESULT_TIMEOUT");
    stek_client_free(NULL);
    stek_options_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ready_and_attach), cmocka_unit_test(test_cross_host_tls12),
        cmocka_unit_test(test_cross_host_tls13), cmocka_unit_test(test_across_rotation),
        cmocka_unit_test(test_no_key),           cmocka_unit_test(test_bad_mac),
        cmocka_unit_test(test_options),          cmocka_unit_test(test_persisted_rollback),
        cmocka_unit_test(test_outage),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
