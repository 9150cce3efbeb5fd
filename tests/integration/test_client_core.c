/*
 * libstek's private core against a real stekd: requests built with
 * stek_request_build, carried by client/transport.c alone (no test gRPC
 * client), judged by stek_accept with the pinned service key that stekd's
 * token holds. Epochs are 3 s, so a watch sees a rotation within seconds.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/status.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "accept.h"
#include "fx_stekd.h"
#include "transport.h"

#define EPOCH_S 3
#define LIFETIME_S 6 /* two past epochs in every set */
#define GROUP "edge"

static fx_stekd d;
static EVP_PKEY *service_key; /* pinned: the PEM stekd's token exported */
static const stek_sched sched = {.origin = 0, .epoch_s = EPOCH_S, .lifetime_s = LIFETIME_S};

typedef struct host {
    const char *identity;
    fx_cert cert;
    EVP_PKEY *cert_key;
    stek_host_eph *eph;
    uint8_t nonce[16];
    stek_transport *t;
} host;

static host edge_a, edge_b;

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
    {"other", {"uri:spiffe://fleet/other/*", NULL}},
};

static EVP_PKEY *read_key(const char *path, bool private_key)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    EVP_PKEY *k = private_key ? PEM_read_PrivateKey(f, NULL, NULL, NULL)
                              : PEM_read_PUBKEY(f, NULL, NULL, NULL);
    fclose(f);
    return k;
}

static int host_init(host *h, const char *name, fx_key_type kt, const char *uri,
                     const char *identity)
{
    const char *uris[] = {uri, NULL};
    fx_cert_opts o = {.name = name, .key_type = kt, .uri_sans = uris, .eku = FX_EKU_CLIENT};
    h->identity = identity;
    if (fx_stekd_host_cert(&d, &o, &h->cert) != 0 || stek_host_eph_generate(&h->eph) != STEK_OK ||
        RAND_bytes(h->nonce, sizeof(h->nonce)) != 1)
        return -1;
    h->cert_key = read_key(h->cert.key_path, true);
    if (h->cert_key == NULL)
        return -1;
    stek_transport_opts to = {
        .target = d.target,
        .ca_pem_path = d.ca.cert_path,
        .cert_pem_path = h->cert.cert_path,
        .key_pem_path = h->cert.key_path,
        .server_name_override = "localhost",
        .max_reconnect_backoff_ms = 1000,
    };
    return stek_transport_open(&to, &h->t) == STEK_OK ? 0 : -1;
}

static void host_free(host *h)
{
    stek_transport_close(h->t);
    stek_host_eph_free(h->eph);
    EVP_PKEY_free(h->cert_key);
    memset(h, 0, sizeof(*h));
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    service_key = read_key(d.signing_pem_path, false);
    if (service_key == NULL)
        return -1;
    if (host_init(&edge_a, "edge-a", FX_KEY_EC_P256, "spiffe://fleet/edge/a",
                  "uri:spiffe://fleet/edge/a") != 0 ||
        host_init(&edge_b, "edge-b", FX_KEY_RSA_2048, "spiffe://fleet/edge/b",
                  "uri:spiffe://fleet/edge/b") != 0)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    host_free(&edge_a);
    host_free(&edge_b);
    EVP_PKEY_free(service_key);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- helpers ----------------------------------------------------------------- */

static stek_accept_ctx ctx_for(const host *h)
{
    stek_accept_ctx c = {
        .service_pubs = &service_key,
        .n_service_pubs = 1,
        .identity = h->identity,
        .eph = h->eph,
        .nonce = h->nonce,
        .nonce_len = sizeof(h->nonce),
        .group = GROUP,
        .sched = &sched,
        .now = (int64_t)time(NULL),
        .generation_hwm = 0,
    };
    return c;
}

static void request_for(const host *h, const char *group, uint8_t **req, size_t *len)
{
    stek_status st =
        stek_request_build(group, h->eph, h->nonce, sizeof(h->nonce), h->cert_key, req, len);
    if (st != STEK_OK)
        fprintf(stderr, "stek_request_build: %s\n", stek_error_detail());
    assert_int_equal(st, STEK_OK);
}

/* GetKeySet for h; returns the serialized KeySet (free()). */
static uint8_t *get(const host *h, size_t *len)
{
    uint8_t *req = NULL, *resp = NULL;
    size_t req_len = 0;
    int status = -2;
    char details[128];
    request_for(h, GROUP, &req, &req_len);
    stek_status st = stek_transport_get(h->t, req, req_len, 10000, &resp, len, &status, details,
                                        sizeof(details));
    if (st != STEK_OK)
        fprintf(stderr, "get: %s (gRPC %d: %s)\n", stek_error_detail(), status, details);
    assert_int_equal(st, STEK_OK);
    assert_int_equal(status, GRPC_STATUS_OK);
    free(req);
    return resp;
}

static stek_accepted_set *accept_ok(const stek_accept_ctx *c, const uint8_t *msg, size_t len)
{
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_COUNT;
    bool hb = true;
    stek_status st = stek_accept(c, msg, len, &set, &why, &hb);
    if (st != STEK_OK)
        fprintf(stderr, "accept: %s: %s\n", stek_reject_name(why), stek_error_detail());
    assert_int_equal(st, STEK_OK);
    assert_false(hb);
    assert_non_null(set);
    return set;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- tests ---------------------------------------------------------------------- */

/* A set fetched and accepted by the core alone, shaped as the schedule says. */
static void test_get_and_accept(void **state)
{
    (void)state;
    size_t len = 0;
    uint8_t *msg = get(&edge_a, &len);
    stek_accept_ctx c = ctx_for(&edge_a);
    stek_accepted_set *set = accept_ok(&c, msg, len);

    uint64_t own = fx_stekd_epoch_now(&d);
    assert_true(set->current_epoch + 1 >= own && set->current_epoch <= own + 1);
    assert_string_equal(set->group, GROUP);
    assert_string_equal(set->identity, "uri:spiffe://fleet/edge/a");
    assert_int_equal(set->generation, 1);
    assert_true(set->generation_start > 0);
    assert_true(set->issued_at / 1000000000 <= (int64_t)time(NULL));
    assert_true(set->n_keys >= 2 && set->n_keys <= 2 + LIFETIME_S / EPOCH_S);
    assert_int_equal(set->keys[set->current].state, STEK_KEY_CURRENT);
    assert_int_equal(set->keys[set->n_keys - 1].state, STEK_KEY_NEXT);
    for (size_t i = 0; i < set->n_keys; i++) {
        const stek_accepted_key *k = &set->keys[i];
        assert_int_equal(k->not_before, (int64_t)k->epoch * EPOCH_S * 1000000000LL);
        assert_int_equal(k->decrypt_until, k->encrypt_until + LIFETIME_S * 1000000000LL);
        /* Distinct keys, none all-zero. */
        const uint8_t *e = stek_accepted_entry(set, i);
        assert_false(stek_ct_is_zero(e, STEK_ACCEPT_ENTRY_BYTES));
        for (size_t j = 0; j < i; j++)
            assert_memory_not_equal(e, stek_accepted_entry(set, j), STEK_ACCEPT_ENTRY_BYTES);
    }
    stek_accepted_set_free(set);

    /* The same bytes pass without a schedule (T0 and P from the set), and
     * with a high-water mark equal to the generation. */
    c.sched = NULL;
    c.generation_hwm = 1;
    stek_accepted_set_free(accept_ok(&c, msg, len));
    /* ... and fail against a higher one. */
    c.generation_hwm = 2;
    stek_accepted_set *set2 = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    assert_int_equal(stek_accept(&c, msg, len, &set2, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_ROLLBACK);
    free(msg);
}

/* Two hosts, one EC and one RSA certificate, unwrap identical keys. */
static void test_two_hosts_same_keys(void **state)
{
    (void)state;
    size_t la = 0, lb = 0;
    uint8_t *ma = get(&edge_a, &la);
    uint8_t *mb = get(&edge_b, &lb);
    stek_accept_ctx ca = ctx_for(&edge_a), cb = ctx_for(&edge_b);
    stek_accepted_set *sa = accept_ok(&ca, ma, la);
    stek_accepted_set *sb = accept_ok(&cb, mb, lb);
    /* Compare by epoch: the two calls may straddle a rotation. */
    size_t common = 0;
    for (size_t i = 0; i < sa->n_keys; i++)
        for (size_t j = 0; j < sb->n_keys; j++)
            if (sa->keys[i].epoch == sb->keys[j].epoch) {
                assert_memory_equal(stek_accepted_entry(sa, i), stek_accepted_entry(sb, j),
                                    STEK_ACCEPT_ENTRY_BYTES);
                common++;
            }
    assert_true(common >= 2);
    stek_accepted_set_free(sa);
    stek_accepted_set_free(sb);
    free(ma);
    free(mb);
}

/* A set made for host A is no good to host B: other identity, other key. */
static void test_cross_host_rejected(void **state)
{
    (void)state;
    size_t len = 0;
    uint8_t *msg = get(&edge_a, &len);
    stek_accept_ctx cb = ctx_for(&edge_b);
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    assert_int_equal(stek_accept(&cb, msg, len, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_IDENTITY);
    assert_null(set);
    /* Even a host that accepts any identity is stopped by the ephemeral key. */
    cb.identity = NULL;
    assert_int_equal(stek_accept(&cb, msg, len, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_EPH_KEY);
    assert_null(set);
    /* Another service key (B's certificate key is an RSA key: not a pin). */
    EVP_PKEY *wrong = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(wrong);
    stek_accept_ctx ca = ctx_for(&edge_a);
    ca.service_pubs = &wrong;
    assert_int_equal(stek_accept(&ca, msg, len, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_SIGNATURE);
    EVP_PKEY_free(wrong);
    free(msg);
}

/* The server's refusals come back as STEK_ERR_IO with their gRPC status. */
static void test_refusals(void **state)
{
    (void)state;
    uint8_t *req = NULL, *resp = NULL;
    size_t req_len = 0, resp_len = 0;
    int status = -2;
    char details[128];
    request_for(&edge_a, "other", &req, &req_len);
    assert_int_equal(stek_transport_get(edge_a.t, req, req_len, 5000, &resp, &resp_len, &status,
                                        details, sizeof(details)),
                     STEK_ERR_IO);
    assert_int_equal(status, GRPC_STATUS_PERMISSION_DENIED);
    assert_true(details[0] != '\0');
    assert_null(resp);
    free(req);

    /* Garbage bytes: INVALID_ARGUMENT. */
    const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    assert_int_equal(stek_transport_get(edge_a.t, garbage, sizeof(garbage), 5000, &resp, &resp_len,
                                        &status, details, sizeof(details)),
                     STEK_ERR_IO);
    assert_int_equal(status, GRPC_STATUS_INVALID_ARGUMENT);

    /* Requests the builder refuses to make. */
    assert_int_equal(stek_request_build("Bad Group", edge_a.eph, edge_a.nonce, 16, edge_a.cert_key,
                                        &req, &req_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(
        stek_request_build(GROUP, edge_a.eph, edge_a.nonce, 8, edge_a.cert_key, &req, &req_len),
        STEK_ERR_INVALID_ARG);
    assert_null(req);

    /* Files that are not there. */
    stek_transport *t = NULL;
    stek_transport_opts to = {.target = d.target,
                              .ca_pem_path = "/nonexistent/ca.pem",
                              .cert_pem_path = edge_a.cert.cert_path,
                              .key_pem_path = edge_a.cert.key_path};
    assert_int_equal(stek_transport_open(&to, &t), STEK_ERR_IO);
    assert_null(t);
    to.ca_pem_path = d.ca.cert_path;
    to.key_pem_path = NULL;
    assert_int_equal(stek_transport_open(&to, &t), STEK_ERR_INVALID_ARG);
}

/* A watch stream: a set at once, a new one at the next rotation, heartbeats between. */
static void test_watch_rotation(void **state)
{
    (void)state;
    uint8_t *req = NULL;
    size_t req_len = 0;
    request_for(&edge_a, GROUP, &req, &req_len);
    stek_watch *w = NULL;
    assert_int_equal(stek_transport_watch_start(edge_a.t, req, req_len, &w), STEK_OK);
    free(req);

    uint8_t *msg = NULL;
    size_t len = 0;
    assert_int_equal(stek_transport_watch_read(w, 5000, &msg, &len), 1);
    stek_accept_ctx c = ctx_for(&edge_a);
    stek_accepted_set *first = accept_ok(&c, msg, len);
    free(msg);
    const uint64_t e0 = first->current_epoch;

    int heartbeats = 0, sets = 0;
    stek_accepted_set *later = NULL;
    int64_t deadline = mono_ms() + 2 * EPOCH_S * 1000 + 4000;
    /* Until the next rotation and a heartbeat (in either order: the first
     * set may come just before an epoch boundary). */
    while ((later == NULL || heartbeats == 0) && mono_ms() < deadline) {
        int got = stek_transport_watch_read(w, 3000, &msg, &len);
        if (got != 1)
            fprintf(stderr, "watch_read: %d (%s)\n", got, stek_error_detail());
        assert_int_equal(got, 1);
        c = ctx_for(&edge_a);
        c.generation_hwm = 1;
        c.current_epoch_hwm = e0;
        stek_accepted_set *set = NULL;
        stek_reject why = STEK_REJECT_COUNT;
        bool hb = false;
        stek_status st = stek_accept(&c, msg, len, &set, &why, &hb);
        free(msg);
        if (st != STEK_OK)
            fprintf(stderr, "accept: %s: %s\n", stek_reject_name(why), stek_error_detail());
        assert_int_equal(st, STEK_OK);
        if (hb) {
            heartbeats++;
            continue;
        }
        sets++;
        if (set->current_epoch > e0 && later == NULL)
            later = set;
        else
            stek_accepted_set_free(set);
    }
    assert_non_null(later);
    assert_true(heartbeats >= 1);
    /* The old CURRENT is still there to decrypt, with the same bytes. */
    bool found = false;
    for (size_t i = 0; i < later->n_keys; i++)
        if (later->keys[i].epoch == e0) {
            assert_memory_equal(stek_accepted_entry(later, i),
                                stek_accepted_entry(first, first->current),
                                STEK_ACCEPT_ENTRY_BYTES);
            found = true;
        }
    assert_true(found);
    fprintf(stderr, "watch: epoch %llu -> %llu, %d heartbeats, %d other sets\n",
            (unsigned long long)e0, (unsigned long long)later->current_epoch, heartbeats, sets - 1);
    stek_accepted_set_free(first);
    stek_accepted_set_free(later);

    /* Nothing more within 10 ms is a timeout, not the end of the stream. */
    int got = stek_transport_watch_read(w, 10, &msg, &len);
    if (got == 1)
        free(msg);
    assert_true(got == 1 || got == -1);
    int status = -2;
    assert_int_equal(stek_transport_watch_status(w, 10, &status, NULL, 0), STEK_ERR_IO);
    assert_int_equal(status, STEK_TRANSPORT_NO_STATUS);
    stek_transport_watch_cancel_free(w);
}

/* stekd gone: calls end quickly with STEK_ERR_IO, never hang. */
static void test_stekd_stopped(void **state)
{
    (void)state;
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);

    uint8_t *req = NULL, *resp = NULL;
    size_t req_len = 0, resp_len = 0;
    int status = -2;
    char details[128];
    request_for(&edge_a, GROUP, &req, &req_len);
    int64_t t0 = mono_ms();
    stek_status st = stek_transport_get(edge_a.t, req, req_len, 2000, &resp, &resp_len, &status,
                                        details, sizeof(details));
    int64_t took = mono_ms() - t0;
    fprintf(stderr, "get with stekd down: gRPC %d (%s) after %lld ms\n", status, details,
            (long long)took);
    assert_int_equal(st, STEK_ERR_IO);
    assert_true(status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED);
    assert_true(took < 3000);
    assert_null(resp);

    /* A watch on a dead server starts, then ends with UNAVAILABLE. */
    stek_watch *w = NULL;
    assert_int_equal(stek_transport_watch_start(edge_b.t, req, req_len, &w), STEK_OK);
    uint8_t *msg = NULL;
    size_t len = 0;
    assert_int_equal(stek_transport_watch_read(w, 5000, &msg, &len), 0);
    assert_int_equal(stek_transport_watch_status(w, 5000, &status, details, sizeof(details)),
                     STEK_OK);
    assert_int_equal(status, GRPC_STATUS_UNAVAILABLE);
    stek_transport_watch_cancel_free(w);
    free(req);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_and_accept),      cmocka_unit_test(test_two_hosts_same_keys),
        cmocka_unit_test(test_cross_host_rejected), cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_watch_rotation),      cmocka_unit_test(test_stekd_stopped),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
