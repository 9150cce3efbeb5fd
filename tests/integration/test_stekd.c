/*
 * stekd end to end on loopback: a real stekd process, a SoftHSM token in a
 * temp dir, certificates made here, and hosts that verify and unwrap what
 * they get exactly as libstek will (signature first, then unwrap).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "schedule.h"
#include "stek_p11.h"
#include "stek/v1/stek.pb-c.h"

#define EPOCH_S 4
#define LIFETIME_S 4 /* one past epoch in every set: keys expire during the run */
#define GET "/stek.v1.KeyService/GetKeySet"
#define WATCH "/stek.v1.KeyService/WatchKeySet"

static fx_stekd d;
static EVP_PKEY *service_key; /* the pinned signing key */
static uint64_t epoch_at_start;

typedef struct host {
    fx_cert cert;
    stek_host_eph *eph;
    uint8_t pub[STEK_P256_POINT_BYTES];
    uint8_t nonce[16];
    fx_grpc *ch;
} host;

static host edge_a, edge_b, other;

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", "dns:*.edge.example", NULL}},
    {"other", {"uri:spiffe://fleet/other/*", NULL}},
};

static int host_init(host *h, const char *name, fx_key_type kt, const char *uri, fx_eku eku)
{
    const char *uris[] = {uri, NULL};
    fx_cert_opts o = {.name = name, .key_type = kt, .uri_sans = uri ? uris : NULL, .eku = eku};
    if (fx_stekd_host_cert(&d, &o, &h->cert) != 0 || stek_host_eph_generate(&h->eph) != STEK_OK ||
        stek_host_eph_public(h->eph, h->pub) != STEK_OK || RAND_bytes(h->nonce, 16) != 1)
        return -1;
    return fx_grpc_open(&h->ch, d.target, d.ca.cert_path, h->cert.cert_path, h->cert.key_path,
                        "localhost");
}

static void host_free(host *h)
{
    fx_grpc_close(h->ch);
    stek_host_eph_free(h->eph);
    memset(h, 0, sizeof(*h));
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    epoch_at_start = fx_stekd_epoch_now(&d);
    FILE *f = fopen(d.signing_pem_path, "r");
    service_key = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    if (service_key == NULL)
        return -1;
    if (host_init(&edge_a, "edge-a", FX_KEY_EC_P256, "spiffe://fleet/edge/a", FX_EKU_CLIENT) ||
        host_init(&edge_b, "edge-b", FX_KEY_RSA_2048, "spiffe://fleet/edge/b", FX_EKU_CLIENT) ||
        host_init(&other, "other-x", FX_KEY_EC_P256, "spiffe://fleet/other/x", FX_EKU_CLIENT))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    host_free(&edge_a);
    host_free(&edge_b);
    host_free(&other);
    int code = -1;
    int rc = d.pid > 0 ? fx_stekd_stop(&d, 10000, &code) : 0;
    EVP_PKEY_free(service_key);
    fx_stekd_destroy(&d);
    return rc == 0 && (code == 0 || code == -1) ? 0 : -1;
}

/* ---- host-side checks, as libstek does them ------------------------------ */

static bool signature_ok(const Stek__V1__KeySet *ks)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, service_key) == 1 &&
              EVP_DigestVerify(md, ks->signature.data, ks->signature.len, ks->signed_set.data,
                               ks->signed_set.len) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

static void request_for(const host *h, const char *group, uint8_t **req, size_t *len)
{
    assert_int_equal(fx_stek_request(group, h->pub, sizeof(h->pub), h->nonce, sizeof(h->nonce),
                                     h->cert.key_path, req, len),
                     0);
}

/* GetKeySet for h; asserts the status. */
static void get(const host *h, const char *group, grpc_status_code want, fx_grpc_result *r)
{
    uint8_t *req = NULL;
    size_t len = 0;
    request_for(h, group, &req, &len);
    assert_int_equal(fx_grpc_unary(h->ch, GET, req, len, 10000, r), 0);
    free(req);
    if (r->status != want)
        fprintf(stderr, "status %d (%s), wanted %d\n", (int)r->status, r->details, (int)want);
    assert_int_equal(r->status, want);
}

/* Verifies a KeySet message for h and returns its signed content. */
static Stek__V1__SignedKeySet *accept_set(const host *h, const uint8_t *msg, size_t len,
                                          const char *identity)
{
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    assert_null(ks->heartbeat);
    assert_true(signature_ok(ks));
    Stek__V1__SignedKeySet *s =
        stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    stek__v1__key_set__free_unpacked(ks, NULL);
    assert_non_null(s);
    assert_string_equal(s->context, "stek-set-v1");
    assert_int_equal(s->kdf_profile, 1);
    assert_string_equal(s->host_identity, identity);
    assert_int_equal(s->host_eph_pub.len, sizeof(h->pub));
    assert_memory_equal(s->host_eph_pub.data, h->pub, sizeof(h->pub));
    assert_memory_equal(s->nonce.data, h->nonce, sizeof(h->nonce));
    assert_int_equal(s->generation, 1);
    assert_true(s->generation_start > 0);
    return s;
}

/* Unwraps every key of s with h's ephemeral key into keys[i] (80 bytes). */
static stek_status unwrap_all(const host *h, const Stek__V1__SignedKeySet *s, uint8_t (*keys)[80])
{
    stek_secret *kek = NULL;
    stek_status st = stek_host_kek_derive(h->eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len, s->group,
                                          (uint32_t)s->generation, &kek);
    for (size_t i = 0; st == STEK_OK && i < s->n_keys; i++) {
        stek_secret *k = NULL;
        st = stek_host_unwrap(kek, s->keys[i]->wrapped.data, s->keys[i]->wrapped.len, &k);
        if (st == STEK_OK) {
            uint8_t name[STEK_TICKET_NAME_BYTES];
            assert_int_equal(stek_host_ticket_name(k, name), STEK_OK);
            assert_int_equal(s->keys[i]->name.len, STEK_TICKET_NAME_BYTES);
            assert_memory_equal(name, s->keys[i]->name.data, STEK_TICKET_NAME_BYTES);
            memcpy(keys[i], stek_secret_data(k), 80);
        }
        stek_secret_free(k);
    }
    stek_secret_free(kek);
    return st;
}

static size_t count_state(const Stek__V1__SignedKeySet *s, Stek__V1__KeyState state)
{
    size_t n = 0;
    for (size_t i = 0; i < s->n_keys; i++)
        n += s->keys[i]->state == state;
    return n;
}

static uint64_t current_epoch(const Stek__V1__SignedKeySet *s)
{
    for (size_t i = 0; i < s->n_keys; i++)
        if (s->keys[i]->state == STEK__V1__KEY_STATE__KEY_STATE_CURRENT)
            return s->keys[i]->epoch;
    fail_msg("no current key");
    return 0;
}

/* ---- tests --------------------------------------------------------------- */

/* Two hosts of one group, one EC and one RSA, get identical keys. */
static void test_two_hosts_same_keys(void **state)
{
    (void)state;
    fx_grpc_result ra = {0}, rb = {0};
    get(&edge_a, "edge", GRPC_STATUS_OK, &ra);
    get(&edge_b, "edge", GRPC_STATUS_OK, &rb);
    Stek__V1__SignedKeySet *sa =
        accept_set(&edge_a, ra.body, ra.body_len, "uri:spiffe://fleet/edge/a");
    Stek__V1__SignedKeySet *sb =
        accept_set(&edge_b, rb.body, rb.body_len, "uri:spiffe://fleet/edge/b");
    assert_int_equal(count_state(sa, STEK__V1__KEY_STATE__KEY_STATE_CURRENT), 1);
    assert_int_equal(count_state(sa, STEK__V1__KEY_STATE__KEY_STATE_NEXT), 1);
    assert_true(sa->n_keys >= 2 && sa->n_keys <= 2 + LIFETIME_S / EPOCH_S);
    /* Ascending epochs, next last, and times that follow the schedule. */
    for (size_t i = 0; i < sa->n_keys; i++) {
        const Stek__V1__Key *k = sa->keys[i];
        if (i > 0)
            assert_int_equal(k->epoch, sa->keys[i - 1]->epoch + 1);
        assert_int_equal(k->not_before, k->epoch * EPOCH_S * 1000000000ULL);
        assert_int_equal(k->encrypt_until, (k->epoch + 1) * EPOCH_S * 1000000000ULL);
        assert_int_equal(k->decrypt_until, k->encrypt_until + LIFETIME_S * 1000000000ULL);
        assert_int_equal(k->wrapped.len, STEK_WRAPPED_KEY_BYTES);
    }
    assert_int_equal(sa->keys[sa->n_keys - 1]->state, STEK__V1__KEY_STATE__KEY_STATE_NEXT);

    uint8_t ka[8][80], kb[8][80];
    assert_true(sa->n_keys <= 8);
    assert_int_equal(unwrap_all(&edge_a, sa, ka), STEK_OK);
    assert_int_equal(unwrap_all(&edge_b, sb, kb), STEK_OK);
    /* Compare by epoch: the two calls may straddle a rotation. */
    size_t common = 0;
    for (size_t i = 0; i < sa->n_keys; i++)
        for (size_t j = 0; j < sb->n_keys; j++)
            if (sa->keys[i]->epoch == sb->keys[j]->epoch) {
                assert_memory_equal(ka[i], kb[j], 80);
                common++;
            }
    assert_true(common >= 2);
    OPENSSL_cleanse(ka, sizeof(ka));
    OPENSSL_cleanse(kb, sizeof(kb));
    stek__v1__signed_key_set__free_unpacked(sa, NULL);
    stek__v1__signed_key_set__free_unpacked(sb, NULL);
    fx_grpc_result_free(&ra);
    fx_grpc_result_free(&rb);
}

/* The signature covers every byte; another host's key opens nothing. */
static void test_signature_and_binding(void **state)
{
    (void)state;
    fx_grpc_result r = {0};
    get(&edge_a, "edge", GRPC_STATUS_OK, &r);
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, r.body_len, r.body);
    assert_non_null(ks);
    assert_true(signature_ok(ks));
    for (size_t i = 0; i < ks->signed_set.len; i++) {
        ks->signed_set.data[i] ^= 0x01;
        assert_false(signature_ok(ks));
        ks->signed_set.data[i] ^= 0x01;
    }
    assert_true(signature_ok(ks));
    Stek__V1__SignedKeySet *s =
        stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    assert_non_null(s);
    uint8_t keys[8][80];
    /* edge_b's ephemeral key against a set made for edge_a. */
    assert_int_equal(unwrap_all(&edge_b, s, keys), STEK_ERR_VERIFY);
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    stek__v1__key_set__free_unpacked(ks, NULL);
    fx_grpc_result_free(&r);
}

/* A host of another group is denied, and so is any unknown group, alike. */
static void test_permission_denied(void **state)
{
    (void)state;
    fx_grpc_result r1 = {0}, r2 = {0}, r3 = {0};
    get(&other, "edge", GRPC_STATUS_PERMISSION_DENIED, &r1);
    get(&other, "no-such-group", GRPC_STATUS_PERMISSION_DENIED, &r2);
    get(&edge_a, "other", GRPC_STATUS_PERMISSION_DENIED, &r3);
    assert_null(r1.body);
    fx_grpc_result_free(&r1);
    fx_grpc_result_free(&r2);
    fx_grpc_result_free(&r3);
    fx_grpc_result ok = {0};
    get(&other, "other", GRPC_STATUS_OK, &ok);
    fx_grpc_result_free(&ok);
}

static void raw_call(const host *h, const uint8_t *req, size_t len, grpc_status_code want)
{
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(h->ch, GET, req, len, 10000, &r), 0);
    if (r.status != want)
        fprintf(stderr, "status %d (%s), wanted %d\n", (int)r.status, r.details, (int)want);
    assert_int_equal(r.status, want);
    assert_true(r.details[0] != '\0' || want == GRPC_STATUS_OK);
    fx_grpc_result_free(&r);
}

/* Bad requests get precise statuses and the server keeps serving. */
static void test_bad_requests(void **state)
{
    (void)state;
    const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02};
    raw_call(&edge_a, garbage, sizeof(garbage), GRPC_STATUS_INVALID_ARGUMENT);

    uint8_t *big = calloc(1, 8192);
    raw_call(&edge_a, big, 8192, GRPC_STATUS_RESOURCE_EXHAUSTED);
    free(big);

    uint8_t *req = NULL;
    size_t len = 0;
    /* Empty group. */
    assert_int_equal(
        fx_stek_request("", edge_a.pub, 65, edge_a.nonce, 16, edge_a.cert.key_path, &req, &len), 0);
    raw_call(&edge_a, req, len, GRPC_STATUS_INVALID_ARGUMENT);
    free(req);

    /* A point off the curve, signed correctly. */
    uint8_t bad[65];
    memcpy(bad, edge_a.pub, 65);
    bad[64] ^= 0x01;
    assert_int_equal(
        fx_stek_request("edge", bad, 65, edge_a.nonce, 16, edge_a.cert.key_path, &req, &len), 0);
    raw_call(&edge_a, req, len, GRPC_STATUS_FAILED_PRECONDITION);
    free(req);

    /* Signed with another host's key. */
    assert_int_equal(
        fx_stek_request("edge", edge_a.pub, 65, edge_a.nonce, 16, edge_b.cert.key_path, &req, &len),
        0);
    raw_call(&edge_a, req, len, GRPC_STATUS_UNAUTHENTICATED);
    free(req);

    /* A nonce that is too short. */
    assert_int_equal(
        fx_stek_request("edge", edge_a.pub, 65, edge_a.nonce, 4, edge_a.cert.key_path, &req, &len),
        0);
    raw_call(&edge_a, req, len, GRPC_STATUS_INVALID_ARGUMENT);
    free(req);

    fx_grpc_result ok = {0};
    get(&edge_a, "edge", GRPC_STATUS_OK, &ok);
    fx_grpc_result_free(&ok);
}

/* Certificates that must not get keys: no EKU clientAuth, or no matching SAN. */
static void test_bad_certificates(void **state)
{
    (void)state;
    host h = {0};
    assert_int_equal(host_init(&h, "no-eku", FX_KEY_EC_P256, "spiffe://fleet/edge/q", FX_EKU_NONE),
                     0);
    fx_grpc_result r = {0};
    get(&h, "edge", GRPC_STATUS_PERMISSION_DENIED, &r);
    assert_non_null(strstr(r.details, "clientAuth"));
    fx_grpc_result_free(&r);
    host_free(&h);

    /* A CN but no typed SAN: there is no CN fallback. */
    assert_int_equal(host_init(&h, "spiffe.fleet.edge", FX_KEY_EC_P256, NULL, FX_EKU_CLIENT), 0);
    get(&h, "edge", GRPC_STATUS_PERMISSION_DENIED, &r);
    fx_grpc_result_free(&r);
    host_free(&h);
}

static int handshake_fails(const char *cert, const char *key, const char *ca_dir_name)
{
    (void)ca_dir_name;
    fx_grpc *ch = NULL;
    if (fx_grpc_open(&ch, d.target, d.ca.cert_path, cert, key, "localhost") != 0)
        return 1; /* refused at once is also a failure to connect */
    uint8_t *req = NULL;
    size_t len = 0;
    int rc = -1;
    if (fx_stek_request("edge", edge_a.pub, 65, edge_a.nonce, 16, key ? key : edge_a.cert.key_path,
                        &req, &len) == 0) {
        fx_grpc_result r = {0};
        if (fx_grpc_unary(ch, GET, req, len, 5000, &r) == 0)
            rc = r.status == GRPC_STATUS_UNAVAILABLE ? 1 : 0;
        fx_grpc_result_free(&r);
    }
    free(req);
    fx_grpc_close(ch);
    return rc;
}

/* No client certificate, another CA's, or an expired one: no handshake. */
static void test_handshake_refusals(void **state)
{
    (void)state;
    assert_int_equal(handshake_fails(NULL, NULL, NULL), 1);

    fx_ca rogue;
    char dir[FX_PATH_MAX + 16];
    snprintf(dir, sizeof(dir), "%s/rogue", d.dir);
    assert_int_equal(fx_ca_create(&rogue, dir), 0);
    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = "rogue-a", .uri_sans = uris};
    fx_cert c;
    assert_int_equal(fx_cert_issue(&rogue, &o, &c), 0);
    assert_int_equal(handshake_fails(c.cert_path, c.key_path, NULL), 1);
    fx_ca_free(&rogue);

    fx_cert_opts e = {.name = "expired-a", .uri_sans = uris, .expired = true};
    assert_int_equal(fx_stekd_host_cert(&d, &e, &c), 0);
    assert_int_equal(handshake_fails(c.cert_path, c.key_path, NULL), 1);
}

static void test_health(void **state)
{
    (void)state;
    int serving = -1;
    grpc_status_code st;
    assert_int_equal(fx_grpc_health(edge_a.ch, "", 5000, &serving, &st), 1);
    assert_int_equal(st, GRPC_STATUS_OK);
    assert_int_equal(serving, 1); /* SERVING */
    assert_int_equal(fx_grpc_health(edge_a.ch, "stek.v1.KeyService", 5000, &serving, &st), 1);
    assert_int_equal(fx_grpc_health(edge_a.ch, "no.Such", 5000, &serving, &st), -1);
    assert_int_equal(st, GRPC_STATUS_NOT_FOUND);
}

/* A method stekd does not serve is answered at once, not left to time out. */
static void test_unknown_method(void **state)
{
    (void)state;
    fx_grpc_result r = {0};
    const uint8_t body[] = {0x0a, 0x00};
    assert_int_equal(
        fx_grpc_unary(edge_a.ch, "/stek.v1.KeyService/NoSuchMethod", body, sizeof(body), 5000, &r),
        0);
    assert_int_equal(r.status, GRPC_STATUS_UNIMPLEMENTED);
    fx_grpc_result_free(&r);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * A rotation reaches an open watch stream within a second; heartbeats keep
 * a quiet stream alive; keys leave the window on schedule.
 */
static void test_watch_rotation(void **state)
{
    (void)state;
    uint8_t *req = NULL;
    size_t len = 0;
    request_for(&edge_a, "edge", &req, &len);
    fx_grpc_stream *s = NULL;
    assert_int_equal(fx_grpc_stream_start(edge_a.ch, WATCH, req, len, 60000, &s), 0);
    free(req);

    uint8_t *msg = NULL;
    size_t mlen = 0;
    assert_int_equal(fx_grpc_stream_read(s, 5000, &msg, &mlen), 1);
    Stek__V1__SignedKeySet *first = accept_set(&edge_a, msg, mlen, "uri:spiffe://fleet/edge/a");
    free(msg);
    uint64_t e0 = current_epoch(first);
    stek__v1__signed_key_set__free_unpacked(first, NULL);

    /* Wait for the next two rotations; note heartbeats in between. */
    int heartbeats = 0;
    uint64_t seen = e0;
    int64_t deadline = mono_ms() + 3 * EPOCH_S * 1000 + 3000;
    while (seen < e0 + 2 && mono_ms() < deadline) {
        int got = fx_grpc_stream_read(s, 3000, &msg, &mlen);
        assert_int_equal(got, 1);
        Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, mlen, msg);
        assert_non_null(ks);
        if (ks->heartbeat != NULL) {
            heartbeats++;
            assert_true(ks->heartbeat->interval > 0);
            stek__v1__key_set__free_unpacked(ks, NULL);
            free(msg);
            continue;
        }
        stek__v1__key_set__free_unpacked(ks, NULL);
        Stek__V1__SignedKeySet *set = accept_set(&edge_a, msg, mlen, "uri:spiffe://fleet/edge/a");
        free(msg);
        uint64_t e = current_epoch(set);
        if (e > seen) {
            /* Arrived within a second of the epoch's start. */
            int64_t now_ms = (int64_t)time(NULL) * 1000;
            int64_t start_ms = (int64_t)e * EPOCH_S * 1000;
            assert_true(now_ms - start_ms <= 1500);
            /* Nothing older than the decrypt window is still served. */
            assert_true(set->keys[0]->epoch >= e - LIFETIME_S / EPOCH_S);
            seen = e;
        }
        stek__v1__signed_key_set__free_unpacked(set, NULL);
    }
    assert_true(seen >= e0 + 2);
    assert_true(heartbeats >= 1);
    fx_grpc_stream_cancel_and_free(s);
}

/* Runs stekctl fetch with host h's certificate; returns the exit code and the output. */
static int fetch_cmd(const host *h, const char *group, const char *pubkey, char *out, size_t cap)
{
    char log[FX_PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/fetch-%s.log", d.dir, group);
    remove(log);
    char *argv[] = {STEKCTL_PATH,
                    "--config",
                    d.config_path,
                    "fetch",
                    (char *)group,
                    "--target",
                    d.target,
                    "--ca",
                    d.ca.cert_path,
                    "--cert",
                    (char *)h->cert.cert_path,
                    "--key",
                    (char *)h->cert.key_path,
                    "--pubkey",
                    (char *)pubkey,
                    "--server-name",
                    "localhost",
                    NULL};
    pid_t pid;
    int status = -1;
    assert_int_equal(fx_spawn(argv, log, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 20000, &status), 0);
    FILE *f = fopen(log, "r");
    assert_non_null(f);
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = '\0';
    fclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* stekctl fetch: a host's view of a set, checked like a host would. */
static void test_stekctl_fetch(void **state)
{
    (void)state;
    static char out[16384];
    assert_int_equal(fetch_cmd(&edge_a, "edge", d.signing_pem_path, out, sizeof(out)), 0);
    assert_non_null(strstr(out, "signature    valid"));
    assert_non_null(strstr(out, "identity     uri:spiffe://fleet/edge/a"));
    assert_non_null(strstr(out, " current "));
    assert_non_null(strstr(out, " next "));

    /* Another key pinned: the set is rejected, exit 1. */
    char other_pem[FX_PATH_MAX + 32];
    snprintf(other_pem, sizeof(other_pem), "%s/not-the-service.pem", d.dir);
    FILE *f = fopen(other_pem, "w");
    assert_non_null(f);
    EVP_PKEY *k = EVP_EC_gen("P-256");
    assert_int_equal(PEM_write_PUBKEY(f, k), 1);
    fclose(f);
    EVP_PKEY_free(k);
    assert_int_equal(fetch_cmd(&edge_a, "edge", other_pem, out, sizeof(out)), 1);
    assert_non_null(strstr(out, "STEK_REJECT_SIGNATURE"));

    /* A host of another group: the server's refusal is shown, exit 1. */
    assert_int_equal(fetch_cmd(&edge_a, "other", d.signing_pem_path, out, sizeof(out)), 1);
    assert_non_null(strstr(out, "status       7"));
}

/* SIGTERM: stekd finishes and exits 0 within a few seconds. */
static uint64_t epoch_at_stop;

static void test_sigterm(void **state)
{
    (void)state;
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    assert_int_equal(code, 0);
    epoch_at_stop = fx_stekd_epoch_now(&d);
}

/*
 * After the run (several rotations), the token itself holds no ticket key
 * older than the decrypt window: stekd destroyed them in the HSM, on
 * schedule, not just stopped serving them.
 */
static void test_keys_destroyed_in_hsm(void **state)
{
    (void)state;
    assert_true(epoch_at_stop > 0);
    stek_p11_config c = {
        .module_path = d.tok.module, .token_label = d.tok.label, .pin_env = d.tok.pin_env};
    stek_p11 *p11 = NULL;
    assert_int_equal(fx_token_activate(&d.tok), 0);
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    stek_p11_object_info *o = NULL;
    size_t n = 0;
    assert_int_equal(stek_p11_list(p11, &o, &n), STEK_OK);
    uint64_t oldest = UINT64_MAX, newest = 0;
    size_t tickets = 0;
    for (size_t i = 0; i < n; i++) {
        if (o[i].kind != STEK_P11_KIND_TICKET || strcmp(o[i].group, "edge") != 0)
            continue;
        tickets++;
        oldest = o[i].epoch < oldest ? o[i].epoch : oldest;
        newest = o[i].epoch > newest ? o[i].epoch : newest;
    }
    free(o);
    stek_p11_close(p11);
    fprintf(stderr, "token after the run: %zu ticket keys, epochs %llu..%llu, stopped in %llu\n",
            tickets, (unsigned long long)oldest, (unsigned long long)newest,
            (unsigned long long)epoch_at_stop);
    /* One epoch of slack: stekd may have stopped just before a boundary. */
    assert_true(oldest + LIFETIME_S / EPOCH_S + 1 >= epoch_at_stop);
    /* The window, plus K(e+2) for the next epoch's staged sets (and one
     * epoch of slack). */
    assert_true(tickets <= LIFETIME_S / EPOCH_S + 4);
    /* The watch test waited for two rotations, so the first epoch's key is
     * past its window and must be gone from the token. */
    assert_true(epoch_at_stop >= epoch_at_start + 2);
    assert_true(oldest > epoch_at_start);
    assert_true(newest <= epoch_at_stop + STEK_SCHED_CHAIN_LEAD - 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_hosts_same_keys),
        cmocka_unit_test(test_signature_and_binding),
        cmocka_unit_test(test_permission_denied),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_bad_certificates),
        cmocka_unit_test(test_handshake_refusals),
        cmocka_unit_test(test_health),
        cmocka_unit_test(test_unknown_method),
        cmocka_unit_test(test_watch_rotation),
        cmocka_unit_test(test_stekctl_fetch),
        cmocka_unit_test(test_sigterm),
        cmocka_unit_test(test_keys_destroyed_in_hsm),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
