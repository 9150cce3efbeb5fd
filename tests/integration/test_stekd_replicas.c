/*
 * Two stekd replicas, each with its own SoftHSM token, the second seeded
 * from the first with stekctl (transport-create on B, export-chain on A with
 * the SO PIN, import-chain on B), serve byte-identical keys for the same
 * group and epochs. Each replica signs with its own HSM's key, so a host
 * pins both.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "stek/v1/stek.pb-c.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

static fx_stekd a, b;
static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

/* Runs stekctl against replica r's token and config; returns its exit code. */
static int stekctl(fx_stekd *r, char *const args[])
{
    char *argv[16] = {STEKCTL_PATH, "--config", r->config_path};
    size_t n = 3;
    for (size_t i = 0; args[i] != NULL && n < 15; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    char log[FX_PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/stekctl.log", r->dir);
    pid_t pid;
    int status = -1;
    if (fx_token_activate(&r->tok) != 0 || fx_spawn(argv, log, &pid) != 0 ||
        fx_wait_exit(pid, 30000, &status) != 0)
        return -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "stekctl failed; see %s\n", log);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

typedef struct fetched {
    size_t n;
    uint64_t epochs[8];
    uint8_t keys[8][80];
} fetched;

static EVP_PKEY *read_pub(const char *path)
{
    FILE *f = fopen(path, "r");
    EVP_PKEY *k = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    return k;
}

/* Fetches from replica r with a host certificate of r's CA and one shared
 * ephemeral key; verifies with r's signing key and unwraps. */
static void fetch(fx_stekd *r, stek_host_eph *eph, const uint8_t pub[65], const uint8_t nonce[16],
                  fetched *out)
{
    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = "edge-a", .uri_sans = uris};
    fx_cert host;
    assert_int_equal(fx_stekd_host_cert(r, &o, &host), 0);
    fx_grpc *ch = NULL;
    assert_int_equal(
        fx_grpc_open(&ch, r->target, r->ca.cert_path, host.cert_path, host.key_path, "localhost"),
        0);
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", pub, 65, nonce, 16, host.key_path, &req, &len), 0);
    fx_grpc_result res = {0};
    assert_int_equal(fx_grpc_unary(ch, "/stek.v1.KeyService/GetKeySet", req, len, 10000, &res), 0);
    free(req);
    assert_int_equal(res.status, GRPC_STATUS_OK);

    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, res.body_len, res.body);
    assert_non_null(ks);
    EVP_PKEY *svc = read_pub(r->signing_pem_path);
    assert_non_null(svc);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    assert_int_equal(EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, svc), 1);
    assert_int_equal(EVP_DigestVerify(md, ks->signature.data, ks->signature.len,
                                      ks->signed_set.data, ks->signed_set.len),
                     1);
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(svc);
    Stek__V1__SignedKeySet *s =
        stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    assert_non_null(s);
    stek_secret *kek = NULL;
    assert_int_equal(stek_host_kek_derive(eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len, "edge",
                                          (uint32_t)s->generation, &kek),
                     STEK_OK);
    assert_true(s->n_keys <= 8);
    out->n = s->n_keys;
    for (size_t i = 0; i < s->n_keys; i++) {
        stek_secret *k = NULL;
        assert_int_equal(
            stek_host_unwrap(kek, s->keys[i]->wrapped.data, s->keys[i]->wrapped.len, &k), STEK_OK);
        out->epochs[i] = s->keys[i]->epoch;
        memcpy(out->keys[i], stek_secret_data(k), 80);
        stek_secret_free(k);
    }
    stek_secret_free(kek);
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    stek__v1__key_set__free_unpacked(ks, NULL);
    fx_grpc_result_free(&res);
    fx_grpc_close(ch);
}

static void test_seeded_replicas_serve_identical_keys(void **state)
{
    (void)state;
    assert_int_equal(fx_stekd_setup(&a, 30, 60, groups, 1, NULL), 0);
    assert_int_equal(fx_stekd_setup(&b, 30, 60, groups, 1, NULL), 0);
    /* The operator's order: signing keys on both, the group on A with
     * stekctl, then A's chain key (still at the current epoch) to B. */
    a.no_roots = true;
    b.no_roots = true;
    assert_int_equal(fx_stekd_provision(&a), 0);
    assert_int_equal(fx_stekd_provision(&b), 0);
    char *add[] = {"group", "add", "edge", NULL};
    assert_int_equal(stekctl(&a, add), 0);

    char tpub[FX_PATH_MAX + 32], blob[FX_PATH_MAX + 32];
    snprintf(tpub, sizeof(tpub), "%s/transport.pem", b.dir);
    snprintf(blob, sizeof(blob), "%s/chain.bin", a.dir);
    char *mk[] = {"transport-create", "--id", "seed", "--out", tpub, NULL};
    assert_int_equal(stekctl(&b, mk), 0);
    char *ex[] = {"export-chain", "edge", "--transport", tpub, "--id", "seed", "--out", blob, NULL};
    assert_int_equal(stekctl(&a, ex), 0);
    char *im[] = {"import-chain", "--in", blob, NULL};
    assert_int_equal(stekctl(&b, im), 0);

    assert_int_equal(fx_stekd_start(&a), 0);
    assert_int_equal(fx_stekd_start(&b), 0);

    stek_host_eph *eph = NULL;
    uint8_t pub[65], nonce[16];
    assert_int_equal(stek_host_eph_generate(&eph), STEK_OK);
    assert_int_equal(stek_host_eph_public(eph, pub), STEK_OK);
    assert_int_equal(RAND_bytes(nonce, 16), 1);
    fetched fa, fb;
    fetch(&a, eph, pub, nonce, &fa);
    fetch(&b, eph, pub, nonce, &fb);
    size_t common = 0;
    for (size_t i = 0; i < fa.n; i++)
        for (size_t j = 0; j < fb.n; j++)
            if (fa.epochs[i] == fb.epochs[j]) {
                assert_memory_equal(fa.keys[i], fb.keys[j], 80);
                common++;
            }
    fprintf(stderr, "replicas: A holds %zu keys, B holds %zu, %zu common epochs identical\n", fa.n,
            fb.n, common);
    assert_true(common >= 2);
    OPENSSL_cleanse(&fa, sizeof(fa));
    OPENSSL_cleanse(&fb, sizeof(fb));
    stek_host_eph_free(eph);

    int code = -1;
    assert_int_equal(fx_stekd_stop(&a, 8000, &code), 0);
    assert_int_equal(code, 0);
    assert_int_equal(fx_stekd_stop(&b, 8000, &code), 0);
    assert_int_equal(code, 0);
}

/* Runs even when an assertion failed: no stekd outlives the test. */
static int teardown(void **state)
{
    (void)state;
    fx_stekd_destroy(&a);
    fx_stekd_destroy(&b);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_seeded_replicas_serve_identical_keys),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
