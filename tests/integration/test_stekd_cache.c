/*
 * stekd's key-set cache, observed from the HSM side: stekd loads the
 * counting shim in front of SoftHSM, and the test counts the C_WrapKey and
 * C_Sign calls each request costs. A reconnecting host (same ephemeral key
 * and nonce) costs none; the cache holds at most wrap_cache_entries sets.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "hostwrap.h"

static fx_stekd d;
static fx_shim shim;
static fx_cert host;
static fx_grpc *ch;

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

typedef struct eph {
    stek_host_eph *k;
    uint8_t pub[STEK_P256_POINT_BYTES];
    uint8_t nonce[16];
} eph;

static int config_replace(const char *from, const char *to)
{
    FILE *f = fopen(d.config_path, "r");
    if (f == NULL)
        return -1;
    char buf[16384];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *at = strstr(buf, from);
    if (at == NULL)
        return -1;
    char out[20000];
    snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - buf), buf, to, at + strlen(from));
    return fx_write_file(d.config_path, out, 0600);
}

static int setup(void **state)
{
    (void)state;
    /* An epoch long enough that no rotation changes the view mid-test. */
    if (fx_stekd_setup(&d, 3600, 7200, groups, 1, "") != 0 || fx_shim_setup(&shim, &d.tok) != 0)
        return -1;
    char line[FX_PATH_MAX + 32];
    snprintf(line, sizeof(line), "module = \"%s\"", shim.module);
    char old[FX_PATH_MAX + 32];
    snprintf(old, sizeof(old), "module = \"%s\"", d.tok.module);
    if (config_replace(old, line) != 0 ||
        config_replace("max_request_bytes = 4096;", "max_request_bytes = 4096; "
                                                    "wrap_cache_entries = 2;") != 0)
        return -1;
    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = "edge-a", .uri_sans = uris};
    if (fx_stekd_start(&d) != 0 || fx_stekd_host_cert(&d, &o, &host) != 0)
        return -1;
    return fx_grpc_open(&ch, d.target, d.ca.cert_path, host.cert_path, host.key_path, "localhost");
}

static int teardown(void **state)
{
    (void)state;
    fx_grpc_close(ch);
    fx_stekd_destroy(&d);
    return 0;
}

static void eph_new(eph *e)
{
    assert_int_equal(stek_host_eph_generate(&e->k), STEK_OK);
    assert_int_equal(stek_host_eph_public(e->k, e->pub), STEK_OK);
    assert_int_equal(RAND_bytes(e->nonce, sizeof(e->nonce)), 1);
}

static void get_ok(const eph *e)
{
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", e->pub, sizeof(e->pub), e->nonce, sizeof(e->nonce),
                                     host.key_path, &req, &len),
                     0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, "/stek.v1.KeyService/GetKeySet", req, len, 10000, &r), 0);
    free(req);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    fx_grpc_result_free(&r);
}

typedef struct calls {
    int wraps, signs;
} calls;

static calls count(void)
{
    calls c = {fx_shim_count(&shim, "C_WrapKey"), fx_shim_count(&shim, "C_Sign")};
    assert_true(c.wraps >= 0 && c.signs >= 0);
    return c;
}

static void test_reconnect_costs_no_hsm_call(void **state)
{
    (void)state;
    eph a;
    eph_new(&a);
    calls c0 = count();
    get_ok(&a);
    calls c1 = count();
    assert_true(c1.wraps > c0.wraps); /* the first answer was wrapped in the HSM */
    assert_int_equal(c1.signs, c0.signs + 1);

    get_ok(&a); /* the same host process reconnecting */
    get_ok(&a);
    calls c2 = count();
    assert_int_equal(c2.wraps, c1.wraps);
    assert_int_equal(c2.signs, c1.signs);

    /* Another host process: its own wraps and signature. */
    eph b;
    eph_new(&b);
    get_ok(&b);
    calls c3 = count();
    assert_int_equal(c3.wraps - c2.wraps, c1.wraps - c0.wraps);
    assert_int_equal(c3.signs, c2.signs + 1);
    stek_host_eph_free(a.k);
    stek_host_eph_free(b.k);
}

/* The cache holds wrap_cache_entries (2) sets: a third host evicts the first. */
static void test_cache_is_bounded(void **state)
{
    (void)state;
    eph e[3];
    for (int i = 0; i < 3; i++) {
        eph_new(&e[i]);
        get_ok(&e[i]);
    }
    calls before = count();
    get_ok(&e[2]); /* still cached */
    get_ok(&e[1]);
    calls hit = count();
    assert_int_equal(hit.signs, before.signs);
    get_ok(&e[0]); /* evicted: built again */
    calls miss = count();
    assert_int_equal(miss.signs, hit.signs + 1);
    assert_true(miss.wraps > hit.wraps);
    for (int i = 0; i < 3; i++)
        stek_host_eph_free(e[i].k);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reconnect_costs_no_hsm_call),
        cmocka_unit_test(test_cache_is_bounded),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
