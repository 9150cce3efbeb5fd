/*
 * Per-host wrapping against a real SoftHSM token: the HSM wraps K(g,n,e) to
 * host ephemeral keys, the host side (common/hostwrap.c, pure OpenSSL)
 * unwraps, and the results are compared with each other and with the key
 * check value the HSM computes. The test never reads a key value from the
 * HSM; it only sees what a host would see.
 *
 * Also: every kind of bad host point is refused before the HSM is touched,
 * and no ephemeral session object outlives a call, or, when the ephemeral
 * key is shared (stek_p11_set_eph_reuse_ms), its window.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "fx.h"
#include "hostwrap.h"
#include "p11_chain.h"
#include "p11_internal.h"
#include "stek_p11.h"

/* assert_int_equal on a status; on a mismatch it names both and the detail. */
#define assert_status(expr, want)                                                                  \
    do {                                                                                           \
        stek_status st_ = (expr);                                                                  \
        stek_status want_ = (want);                                                                \
        if (st_ != want_)                                                                          \
            print_error("%s\n  got %s, want %s: %s\n", #expr, stek_status_name(st_),               \
                        stek_status_name(want_), stek_error_detail());                             \
        assert_int_equal(st_, want_);                                                              \
    } while (0)

#define GROUP "edge-web"
#define GEN 1u
#define FIRST_EPOCH 100u
#define N_EPOCHS 20u /* tickets FIRST_EPOCH .. FIRST_EPOCH + N_EPOCHS - 1 */

#define BENCH_CALLS 200
#define BENCH_EPOCHS 20

static const char kcv_msg[] = "stek-kcv-v1";

static fx_token tok;
static stek_p11 *p11;

/* ---- helpers --------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    if (fx_token_create(&tok, "stek-test") != 0)
        return -1;
    stek_p11_config cfg = {
        .module_path = tok.module,
        .token_label = tok.label,
        .pin_env = tok.pin_env,
        .so_pin_env = tok.so_pin_env,
    };
    stek_status st = stek_p11_open(&cfg, &p11);
    if (st != STEK_OK) {
        fprintf(stderr, "stek_p11_open: %s: %s\n", stek_status_name(st), stek_error_detail());
        return -1;
    }
    /* K(g,n,e) for FIRST_EPOCH .. FIRST_EPOCH + N_EPOCHS - 1. */
    st = stek_p11_root_create(p11, GROUP, GEN, FIRST_EPOCH);
    if (st == STEK_OK)
        st = stek_p11_ratchet_advance(p11, GROUP, GEN, FIRST_EPOCH + N_EPOCHS);
    if (st != STEK_OK) {
        fprintf(stderr, "root/ratchet: %s: %s\n", stek_status_name(st), stek_error_detail());
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    stek_p11_close(p11);
    p11 = NULL;
    return fx_token_destroy(&tok) == 0 ? 0 : -1;
}

/* Counts the session objects (CKA_TOKEN = FALSE) this process sees. */
static size_t session_objects(void)
{
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE q[] = {{CKA_TOKEN, &no, sizeof(no)}};
    p11_sess s;
    assert_status(p11_sess_get(p11, &s), STEK_OK);
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    stek_status st = p11_find(&s, q, 1, &objs, &n);
    free(objs);
    assert_status(p11_sess_done(&s, st), STEK_OK);
    return n;
}

static stek_host_eph *host_new(uint8_t pub[STEK_P256_POINT_BYTES])
{
    stek_host_eph *eph = NULL;
    assert_status(stek_host_eph_generate(&eph), STEK_OK);
    assert_status(stek_host_eph_public(eph, pub), STEK_OK);
    return eph;
}

/* Host side: KEK from (eph, hsm_pub, group, gen), then unwrap; returns the status. */
static stek_status host_unwrap(const stek_host_eph *eph, const uint8_t *hsm_pub, const char *group,
                               uint32_t gen, const uint8_t *blob, size_t blob_len,
                               stek_secret **key)
{
    stek_secret *kek = NULL;
    stek_status st = stek_host_kek_derive(eph, hsm_pub, STEK_P256_POINT_BYTES, group, gen, &kek);
    assert_status(st, STEK_OK);
    st = stek_host_unwrap(kek, blob, blob_len, key);
    stek_secret_free(kek);
    return st;
}

static void hmac_kcv(const uint8_t *key, uint8_t out[STEK_P11_KCV_BYTES])
{
    unsigned int len = 0;
    assert_non_null(HMAC(EVP_sha256(), key, STEK_TICKET_KEY_BYTES, (const uint8_t *)kcv_msg,
                         sizeof(kcv_msg) - 1, out, &len));
    assert_status(len, STEK_P11_KCV_BYTES);
}

/* Uncompressed public point of an OpenSSL key; returns its length. */
static size_t ossl_point(EVP_PKEY *k, uint8_t *out, size_t cap)
{
    size_t len = 0;
    assert_int_equal(EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, out, cap, &len),
                     1);
    return len;
}

/* ---- round trip ------------------------------------------------------ */

static void test_round_trip_two_hosts(void **state)
{
    (void)state;
    const uint64_t epochs[] = {FIRST_EPOCH, FIRST_EPOCH + 1, FIRST_EPOCH + 2, FIRST_EPOCH + 5};
    enum { N = sizeof(epochs) / sizeof(epochs[0]) };
    uint8_t pub1[STEK_P256_POINT_BYTES], pub2[STEK_P256_POINT_BYTES];
    stek_host_eph *h1 = host_new(pub1), *h2 = host_new(pub2);
    uint8_t hsm1[STEK_P256_POINT_BYTES], hsm2[STEK_P256_POINT_BYTES];
    uint8_t blobs1[N][STEK_WRAPPED_KEY_BYTES], blobs2[N][STEK_WRAPPED_KEY_BYTES];

    assert_status(
        stek_p11_wrap_tickets(p11, GROUP, GEN, pub1, sizeof(pub1), epochs, N, hsm1, blobs1),
        STEK_OK);
    assert_status(
        stek_p11_wrap_tickets(p11, GROUP, GEN, pub2, sizeof(pub2), epochs, N, hsm2, blobs2),
        STEK_OK);
    assert_status(stek_p256_point_check(hsm1, sizeof(hsm1)), STEK_OK);
    assert_status(stek_p256_point_check(hsm2, sizeof(hsm2)), STEK_OK);
    /* A fresh HSM ephemeral key per call. */
    assert_memory_not_equal(hsm1, hsm2, sizeof(hsm1));
    /* The ephemeral objects are gone. */
    assert_int_equal(session_objects(), 0);

    stek_secret *k1[N], *k2[N];
    for (size_t i = 0; i < N; i++) {
        /* Different KEKs, so different blobs for the same key. */
        assert_memory_not_equal(blobs1[i], blobs2[i], STEK_WRAPPED_KEY_BYTES);
        k1[i] = k2[i] = NULL;
        assert_status(host_unwrap(h1, hsm1, GROUP, GEN, blobs1[i], STEK_WRAPPED_KEY_BYTES, &k1[i]),
                      STEK_OK);
        assert_status(host_unwrap(h2, hsm2, GROUP, GEN, blobs2[i], STEK_WRAPPED_KEY_BYTES, &k2[i]),
                      STEK_OK);
        assert_status(stek_secret_len(k1[i]), STEK_TICKET_KEY_BYTES);
        assert_status(stek_secret_len(k2[i]), STEK_TICKET_KEY_BYTES);
        /* Same epoch, same key, whichever host it was wrapped for. */
        assert_memory_equal(stek_secret_cdata(k1[i]), stek_secret_cdata(k2[i]),
                            STEK_TICKET_KEY_BYTES);

        /* The HMAC the HSM computes over the key equals ours over the unwrapped bytes. */
        uint8_t kcv_hsm[STEK_P11_KCV_BYTES], kcv_host[STEK_P11_KCV_BYTES];
        assert_status(stek_p11_ticket_check_value(p11, GROUP, GEN, epochs[i], kcv_hsm), STEK_OK);
        hmac_kcv(stek_secret_cdata(k1[i]), kcv_host);
        assert_memory_equal(kcv_hsm, kcv_host, STEK_P11_KCV_BYTES);
    }
    /* Different epochs: different keys and different 16-byte names. */
    for (size_t i = 0; i < N; i++) {
        for (size_t j = i + 1; j < N; j++) {
            const uint8_t *a = stek_secret_cdata(k1[i]), *b = stek_secret_cdata(k1[j]);
            assert_memory_not_equal(a, b, STEK_TICKET_KEY_BYTES);
            assert_memory_not_equal(a, b, STEK_TICKET_NAME_BYTES);
            assert_memory_not_equal(a + STEK_TICKET_NAME_BYTES, b + STEK_TICKET_NAME_BYTES,
                                    STEK_TICKET_HMAC_BYTES);
            assert_memory_not_equal(a + STEK_TICKET_NAME_BYTES + STEK_TICKET_HMAC_BYTES,
                                    b + STEK_TICKET_NAME_BYTES + STEK_TICKET_HMAC_BYTES,
                                    STEK_TICKET_AES_BYTES);
        }
    }
    for (size_t i = 0; i < N; i++) {
        stek_secret_free(k1[i]);
        stek_secret_free(k2[i]);
    }
    stek_host_eph_free(h1);
    stek_host_eph_free(h2);
}

/* Wrapping twice to the same host key: new HSM point and blob, same key. */
/*
 * Ticket key names come from the HSM without the key leaving it, and equal
 * the name a host computes from the unwrapped key.
 */
static void test_ticket_names(void **state)
{
    (void)state;
    const uint64_t epochs[] = {FIRST_EPOCH, FIRST_EPOCH + 1, FIRST_EPOCH + 7};
    uint8_t names[3][STEK_TICKET_NAME_BYTES];
    uint8_t again[3][STEK_TICKET_NAME_BYTES];
    assert_status(stek_p11_ticket_names(p11, GROUP, GEN, epochs, 3, names), STEK_OK);
    assert_status(stek_p11_ticket_names(p11, GROUP, GEN, epochs, 3, again), STEK_OK);
    assert_memory_equal(names, again, sizeof(names));
    assert_memory_not_equal(names[0], names[1], STEK_TICKET_NAME_BYTES);
    assert_memory_not_equal(names[1], names[2], STEK_TICKET_NAME_BYTES);

    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blobs[3][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), epochs, 3, hsm, blobs),
                  STEK_OK);
    for (int i = 0; i < 3; i++) {
        stek_secret *k = NULL;
        uint8_t host_name[STEK_TICKET_NAME_BYTES];
        assert_status(host_unwrap(h, hsm, GROUP, GEN, blobs[i], STEK_WRAPPED_KEY_BYTES, &k),
                      STEK_OK);
        assert_status(stek_host_ticket_name(k, host_name), STEK_OK);
        assert_memory_equal(host_name, names[i], STEK_TICKET_NAME_BYTES);
        /* The name is not a slice of the key: nothing of it is revealed. */
        for (size_t off = 0; off + STEK_TICKET_NAME_BYTES <= STEK_TICKET_KEY_BYTES; off++)
            assert_memory_not_equal(stek_secret_data(k) + off, names[i], STEK_TICKET_NAME_BYTES);
        stek_secret_free(k);
    }
    stek_host_eph_free(h);

    const uint64_t missing[] = {FIRST_EPOCH, FIRST_EPOCH + N_EPOCHS};
    assert_status(stek_p11_ticket_names(p11, GROUP, GEN, missing, 2, names), STEK_ERR_NOT_FOUND);
    assert_status(stek_p11_ticket_names(p11, "Bad Group", GEN, epochs, 1, names),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_ticket_names(NULL, GROUP, GEN, epochs, 1, names), STEK_ERR_INVALID_ARG);
}

static void test_same_host_twice(void **state)
{
    (void)state;
    const uint64_t e = FIRST_EPOCH + 3;
    uint8_t pub[STEK_P256_POINT_BYTES];
    stek_host_eph *h = host_new(pub);
    uint8_t hsm_a[STEK_P256_POINT_BYTES], hsm_b[STEK_P256_POINT_BYTES];
    uint8_t blob_a[1][STEK_WRAPPED_KEY_BYTES], blob_b[1][STEK_WRAPPED_KEY_BYTES];
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm_a, blob_a),
                  STEK_OK);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm_b, blob_b),
                  STEK_OK);
    assert_memory_not_equal(hsm_a, hsm_b, sizeof(hsm_a));
    assert_memory_not_equal(blob_a[0], blob_b[0], STEK_WRAPPED_KEY_BYTES);

    stek_secret *ka = NULL, *kb = NULL;
    assert_status(host_unwrap(h, hsm_a, GROUP, GEN, blob_a[0], STEK_WRAPPED_KEY_BYTES, &ka),
                  STEK_OK);
    assert_status(host_unwrap(h, hsm_b, GROUP, GEN, blob_b[0], STEK_WRAPPED_KEY_BYTES, &kb),
                  STEK_OK);
    assert_memory_equal(stek_secret_cdata(ka), stek_secret_cdata(kb), STEK_TICKET_KEY_BYTES);
    /* The HSM point of one set does not open the other set's blob. */
    stek_secret *kx = NULL;
    assert_status(host_unwrap(h, hsm_a, GROUP, GEN, blob_b[0], STEK_WRAPPED_KEY_BYTES, &kx),
                  STEK_ERR_VERIFY);
    assert_null(kx);
    stek_secret_free(ka);
    stek_secret_free(kb);
    stek_host_eph_free(h);
}

/* No epochs: still a valid HSM point, and nothing left behind. */
static void test_zero_epochs(void **state)
{
    (void)state;
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    stek_host_eph *h = host_new(pub);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), NULL, 0, hsm, NULL),
                  STEK_OK);
    assert_status(stek_p256_point_check(hsm, sizeof(hsm)), STEK_OK);
    assert_int_equal(session_objects(), 0);
    stek_host_eph_free(h);
}

/* ---- the wrong host, context or blob -------------------------------- */

static void test_wrong_host_or_context(void **state)
{
    (void)state;
    const uint64_t epochs[] = {FIRST_EPOCH, FIRST_EPOCH + 1};
    uint8_t pub1[STEK_P256_POINT_BYTES], pub2[STEK_P256_POINT_BYTES];
    stek_host_eph *h1 = host_new(pub1), *h2 = host_new(pub2);
    uint8_t hsm1[STEK_P256_POINT_BYTES];
    uint8_t blobs1[2][STEK_WRAPPED_KEY_BYTES];
    assert_status(
        stek_p11_wrap_tickets(p11, GROUP, GEN, pub1, sizeof(pub1), epochs, 2, hsm1, blobs1),
        STEK_OK);

    /* Control: the right host, group and generation open it. */
    stek_secret *k = NULL;
    assert_status(host_unwrap(h1, hsm1, GROUP, GEN, blobs1[0], STEK_WRAPPED_KEY_BYTES, &k),
                  STEK_OK);
    assert_non_null(k);
    stek_secret_free(k);

    for (size_t i = 0; i < 2; i++) {
        /* Host 2 computes a KEK against host 1's HSM point: a different Z. */
        k = NULL;
        assert_status(host_unwrap(h2, hsm1, GROUP, GEN, blobs1[i], STEK_WRAPPED_KEY_BYTES, &k),
                      STEK_ERR_VERIFY);
        assert_null(k);
        /* The right host, but another group or generation in the context. */
        assert_status(host_unwrap(h1, hsm1, "edge-api", GEN, blobs1[i], STEK_WRAPPED_KEY_BYTES, &k),
                      STEK_ERR_VERIFY);
        assert_null(k);
        assert_status(host_unwrap(h1, hsm1, GROUP, GEN + 1, blobs1[i], STEK_WRAPPED_KEY_BYTES, &k),
                      STEK_ERR_VERIFY);
        assert_null(k);
        assert_status(host_unwrap(h1, hsm1, GROUP, GEN - 1, blobs1[i], STEK_WRAPPED_KEY_BYTES, &k),
                      STEK_ERR_VERIFY);
        assert_null(k);
    }
    stek_host_eph_free(h1);
    stek_host_eph_free(h2);
}

static void test_tampered_blob(void **state)
{
    (void)state;
    const uint64_t e = FIRST_EPOCH + 4;
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm, blob),
                  STEK_OK);
    stek_secret *k = NULL;
    assert_status(host_unwrap(h, hsm, GROUP, GEN, blob[0], STEK_WRAPPED_KEY_BYTES, &k), STEK_OK);
    stek_secret_free(k);

    /* Every byte position, a one-bit flip: the RFC 5649 check catches it. */
    for (size_t pos = 0; pos < STEK_WRAPPED_KEY_BYTES; pos++) {
        uint8_t bad[STEK_WRAPPED_KEY_BYTES];
        memcpy(bad, blob[0], sizeof(bad));
        bad[pos] ^= 0x01;
        k = NULL;
        assert_status(host_unwrap(h, hsm, GROUP, GEN, bad, sizeof(bad), &k), STEK_ERR_VERIFY);
        assert_null(k);
    }
    /* Truncated and extended blobs. */
    k = NULL;
    assert_status(host_unwrap(h, hsm, GROUP, GEN, blob[0], STEK_WRAPPED_KEY_BYTES - 8, &k),
                  STEK_ERR_VERIFY);
    assert_null(k);
    uint8_t longer[STEK_WRAPPED_KEY_BYTES + 8];
    memcpy(longer, blob[0], STEK_WRAPPED_KEY_BYTES);
    memset(longer + STEK_WRAPPED_KEY_BYTES, 0, 8);
    assert_status(host_unwrap(h, hsm, GROUP, GEN, longer, sizeof(longer), &k), STEK_ERR_VERIFY);
    assert_null(k);
    stek_host_eph_free(h);
}

/* ---- bad host points ------------------------------------------------- */

/* Wraps to a bad point: STEK_ERR_BAD_POINT, and no session object left. */
static void expect_bad_point(const uint8_t *pt, size_t len, const char *what)
{
    const uint64_t e = FIRST_EPOCH;
    uint8_t hsm[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    size_t before = session_objects();
    stek_status st = stek_p11_wrap_tickets(p11, GROUP, GEN, pt, len, &e, 1, hsm, blob);
    if (st != STEK_ERR_BAD_POINT)
        print_error("bad point case: %s\n", what);
    assert_status(st, STEK_ERR_BAD_POINT);
    assert_int_equal(before, 0);
    assert_int_equal(session_objects(), 0);
}

static void test_bad_points(void **state)
{
    (void)state;
    uint8_t good[STEK_P256_POINT_BYTES];
    stek_host_eph *h = host_new(good);

    /* Not on the curve: the last byte of Y flipped. */
    uint8_t off[STEK_P256_POINT_BYTES];
    memcpy(off, good, sizeof(off));
    off[64] ^= 0x01;
    expect_bad_point(off, sizeof(off), "Y flipped");
    assert_non_null(strstr(stek_error_detail(), "curve"));
    /* And X flipped. */
    memcpy(off, good, sizeof(off));
    off[10] ^= 0x80;
    expect_bad_point(off, sizeof(off), "X flipped");

    /* A valid point of another 256-bit curve: same length and prefix. */
    EVP_PKEY *k1 = EVP_EC_gen("secp256k1");
    assert_non_null(k1);
    uint8_t k1pt[STEK_P256_POINT_BYTES + 8];
    assert_status(ossl_point(k1, k1pt, sizeof(k1pt)), STEK_P256_POINT_BYTES);
    assert_int_equal(k1pt[0], 0x04);
    expect_bad_point(k1pt, STEK_P256_POINT_BYTES, "secp256k1");
    EVP_PKEY_free(k1);

    /* A P-384 point: 97 bytes. */
    EVP_PKEY *k384 = EVP_EC_gen("P-384");
    assert_non_null(k384);
    uint8_t p384[128];
    assert_int_equal(ossl_point(k384, p384, sizeof(p384)), 97);
    expect_bad_point(p384, 97, "P-384");
    /* Its first 65 bytes are not a P-256 point either. */
    expect_bad_point(p384, STEK_P256_POINT_BYTES, "P-384 prefix");
    EVP_PKEY_free(k384);

    /* Truncated: 64 bytes of a good point; and one byte too long. */
    expect_bad_point(good, STEK_P256_POINT_BYTES - 1, "truncated");
    uint8_t longer[STEK_P256_POINT_BYTES + 1];
    memcpy(longer, good, STEK_P256_POINT_BYTES);
    longer[STEK_P256_POINT_BYTES] = 0;
    expect_bad_point(longer, sizeof(longer), "66 bytes");

    /* Compressed form of the good point (right parity), and the other parity. */
    uint8_t comp[33];
    memcpy(comp + 1, good + 1, 32);
    comp[0] = (uint8_t)(0x02 | (good[64] & 1));
    expect_bad_point(comp, sizeof(comp), "compressed");
    comp[0] ^= 0x01;
    expect_bad_point(comp, sizeof(comp), "compressed, other parity");
    /* Hybrid form (0x06/0x07) of the good point: 65 bytes, valid to OpenSSL. */
    uint8_t hybrid[STEK_P256_POINT_BYTES];
    memcpy(hybrid, good, sizeof(hybrid));
    hybrid[0] = (uint8_t)(0x06 | (good[64] & 1));
    expect_bad_point(hybrid, sizeof(hybrid), "hybrid");

    /* The point at infinity: a lone 0x00, and 65 zero bytes. */
    const uint8_t inf1[1] = {0x00};
    expect_bad_point(inf1, sizeof(inf1), "infinity (1 byte)");
    uint8_t zeros[STEK_P256_POINT_BYTES];
    memset(zeros, 0, sizeof(zeros));
    expect_bad_point(zeros, sizeof(zeros), "65 zero bytes");
    /* 0x04 followed by zeros: (0, 0) is not on the curve. */
    zeros[0] = 0x04;
    expect_bad_point(zeros, sizeof(zeros), "04 || zeros");

    /* Garbage, raw and with the right prefix. */
    for (int i = 0; i < 8; i++) {
        uint8_t junk[STEK_P256_POINT_BYTES];
        assert_int_equal(RAND_bytes(junk, sizeof(junk)), 1);
        if (i % 2 == 1)
            junk[0] = 0x04;
        else if (junk[0] == 0x04)
            junk[0] = 0x05;
        expect_bad_point(junk, sizeof(junk), "garbage");
    }
    /* Coordinates at or above the field prime. */
    uint8_t big[STEK_P256_POINT_BYTES];
    memset(big, 0xff, sizeof(big));
    big[0] = 0x04;
    expect_bad_point(big, sizeof(big), "ff coordinates");

    /* Nothing at all. */
    expect_bad_point(NULL, 0, "NULL, 0");
    expect_bad_point(NULL, STEK_P256_POINT_BYTES, "NULL, 65");
    expect_bad_point(good, 0, "good pointer, 0");

    /* Control: the good point still works, so the refusals were about the points. */
    const uint64_t e = FIRST_EPOCH;
    uint8_t hsm[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, good, sizeof(good), &e, 1, hsm, blob),
                  STEK_OK);
    assert_int_equal(session_objects(), 0);
    stek_host_eph_free(h);
}

/* ---- missing keys and bad arguments ---------------------------------- */

static void test_missing_epoch(void **state)
{
    (void)state;
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blobs[2][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);

    /* Before the root, at the chain key's epoch (no ticket yet), far ahead. */
    const uint64_t missing[] = {FIRST_EPOCH - 1, FIRST_EPOCH + N_EPOCHS, 5000};
    for (size_t i = 0; i < sizeof(missing) / sizeof(missing[0]); i++) {
        assert_status(
            stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &missing[i], 1, hsm, blobs),
            STEK_ERR_NOT_FOUND);
        assert_int_equal(session_objects(), 0);
    }
    /* One present, one missing: the whole call fails, nothing left behind. */
    const uint64_t mixed[] = {FIRST_EPOCH, FIRST_EPOCH + N_EPOCHS + 7};
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), mixed, 2, hsm, blobs),
                  STEK_ERR_NOT_FOUND);
    assert_int_equal(session_objects(), 0);
    /* A generation or group that has no keys at all. */
    const uint64_t e = FIRST_EPOCH;
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN + 1, pub, sizeof(pub), &e, 1, hsm, blobs),
                  STEK_ERR_NOT_FOUND);
    assert_status(stek_p11_wrap_tickets(p11, "edge-api", GEN, pub, sizeof(pub), &e, 1, hsm, blobs),
                  STEK_ERR_NOT_FOUND);
    assert_int_equal(session_objects(), 0);
    stek_host_eph_free(h);
}

static void test_bad_args(void **state)
{
    (void)state;
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blobs[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    const uint64_t e = FIRST_EPOCH;

    /* Bad group names. */
    const char *bad_groups[] = {
        "",
        "Edge",
        "edge web",
        "edge/web",
        "\xc3\xa9"
        "dge",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"};
    for (size_t i = 0; i < sizeof(bad_groups) / sizeof(bad_groups[0]); i++)
        assert_status(
            stek_p11_wrap_tickets(p11, bad_groups[i], GEN, pub, sizeof(pub), &e, 1, hsm, blobs),
            STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_wrap_tickets(p11, NULL, GEN, pub, sizeof(pub), &e, 1, hsm, blobs),
                  STEK_ERR_INVALID_ARG);
    /* NULL handle and outputs. */
    assert_status(stek_p11_wrap_tickets(NULL, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm, blobs),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, NULL, blobs),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), NULL, 1, hsm, blobs),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm, NULL),
                  STEK_ERR_INVALID_ARG);
    assert_int_equal(session_objects(), 0);

    /* Host side: bad HSM points and groups are refused before any crypto. */
    stek_secret *kek = NULL;
    uint8_t bad[STEK_P256_POINT_BYTES];
    memset(bad, 0, sizeof(bad));
    assert_status(stek_host_kek_derive(h, bad, sizeof(bad), GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    assert_null(kek);
    assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm, blobs),
                  STEK_OK);
    assert_status(stek_host_kek_derive(h, hsm, sizeof(hsm), "Bad Group", GEN, &kek),
                  STEK_ERR_INVALID_ARG);
    assert_null(kek);
    stek_host_eph_free(h);
}

/* ---- the shared ephemeral key ------------------------------------------ */

static unsigned long eph_made(void)
{
    return atomic_load(&p11->eph_generated);
}

static double ms_since(const struct timespec *t0)
{
    struct timespec now;
    assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &now), 0);
    return (double)(now.tv_sec - t0->tv_sec) * 1e3 + (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Returns once more than ms have passed since t0 (a known deadline, not a
 * guess at readiness). */
static void wait_past(const struct timespec *t0, int ms)
{
    struct timespec pause = {0, 50 * 1000000L};
    while (ms_since(t0) <= ms + 10)
        nanosleep(&pause, NULL);
}

/* Wraps K(FIRST_EPOCH + 4) to pub; writes the HSM point and the blob. */
static void wrap_one(const uint8_t *pub, uint8_t hsm[STEK_P256_POINT_BYTES],
                     uint8_t blob[1][STEK_WRAPPED_KEY_BYTES])
{
    const uint64_t e = FIRST_EPOCH + 4;
    assert_status(
        stek_p11_wrap_tickets(p11, GROUP, GEN, pub, STEK_P256_POINT_BYTES, &e, 1, hsm, blob),
        STEK_OK);
}

/* Unwraps a blob as host h, expecting success, and returns the key. */
static stek_secret *unwrap_ok(const stek_host_eph *h, const uint8_t *hsm,
                              const uint8_t blob[1][STEK_WRAPPED_KEY_BYTES])
{
    stek_secret *k = NULL;
    assert_status(host_unwrap(h, hsm, GROUP, GEN, blob[0], STEK_WRAPPED_KEY_BYTES, &k), STEK_OK);
    return k;
}

/* Back to a key per set; the shared key is destroyed by the next wrap. */
static void eph_reset(void)
{
    stek_p11_set_eph_reuse_ms(p11, 0);
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    wrap_one(pub, hsm, blob);
    stek_host_eph_free(h);
    assert_int_equal(session_objects(), 0);
}

static void test_shared_eph_two_hosts(void **state)
{
    (void)state;
    stek_p11_set_eph_reuse_ms(p11, 60000);
    uint8_t pub1[STEK_P256_POINT_BYTES], pub2[STEK_P256_POINT_BYTES];
    uint8_t hsm1[STEK_P256_POINT_BYTES], hsm2[STEK_P256_POINT_BYTES];
    uint8_t blob1[1][STEK_WRAPPED_KEY_BYTES], blob2[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h1 = host_new(pub1), *h2 = host_new(pub2);
    unsigned long made = eph_made();

    wrap_one(pub1, hsm1, blob1);
    wrap_one(pub2, hsm2, blob2);
    assert_int_equal(eph_made(), made + 1);
    assert_memory_equal(hsm1, hsm2, sizeof(hsm1));
    /* One HSM key, still a KEK per host: different blobs of the same key,
     * each opened only by its own host. */
    assert_memory_not_equal(blob1[0], blob2[0], STEK_WRAPPED_KEY_BYTES);
    stek_secret *k1 = unwrap_ok(h1, hsm1, blob1), *k2 = unwrap_ok(h2, hsm2, blob2);
    assert_memory_equal(stek_secret_cdata(k1), stek_secret_cdata(k2), STEK_TICKET_KEY_BYTES);
    stek_secret *kx = NULL;
    assert_status(host_unwrap(h1, hsm2, GROUP, GEN, blob2[0], STEK_WRAPPED_KEY_BYTES, &kx),
                  STEK_ERR_VERIFY);
    assert_null(kx);
    /* Only the private half stays, and pooled sessions reach it. */
    assert_int_equal(session_objects(), 1);

    stek_secret_free(k1);
    stek_secret_free(k2);
    stek_host_eph_free(h1);
    stek_host_eph_free(h2);
    eph_reset();
    assert_int_equal(eph_made(), made + 2);
}

static void test_shared_eph_window_ends(void **state)
{
    (void)state;
    enum { WINDOW_MS = 500 };
    stek_p11_set_eph_reuse_ms(p11, WINDOW_MS);
    uint8_t pub[STEK_P256_POINT_BYTES], hsm_a[STEK_P256_POINT_BYTES];
    uint8_t hsm_b[STEK_P256_POINT_BYTES], hsm_c[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    unsigned long made = eph_made();

    struct timespec t0;
    assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &t0), 0);
    wrap_one(pub, hsm_a, blob);
    wrap_one(pub, hsm_b, blob);
    /* Two wraps take milliseconds, even under ASan; a slower machine fails
     * here rather than passing wrongly. */
    assert_true(ms_since(&t0) < WINDOW_MS);
    assert_memory_equal(hsm_a, hsm_b, sizeof(hsm_a));
    assert_int_equal(eph_made(), made + 1);

    /* Past the window: a new key, and the old one is destroyed. */
    wait_past(&t0, WINDOW_MS);
    wrap_one(pub, hsm_c, blob);
    assert_memory_not_equal(hsm_a, hsm_c, sizeof(hsm_a));
    assert_int_equal(eph_made(), made + 2);
    assert_int_equal(session_objects(), 1);
    stek_secret_free(unwrap_ok(h, hsm_c, blob));

    stek_host_eph_free(h);
    eph_reset();
}

/* Past its window, the key is destroyed by the sweep alone: an idle service
 * keeps no ephemeral private key. */
static void test_shared_eph_swept(void **state)
{
    (void)state;
    enum { WINDOW_MS = 300 };
    stek_p11_set_eph_reuse_ms(p11, WINDOW_MS);
    uint8_t pub[STEK_P256_POINT_BYTES], hsm_a[STEK_P256_POINT_BYTES];
    uint8_t hsm_b[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    unsigned long made = eph_made();

    struct timespec t0;
    assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &t0), 0);
    wrap_one(pub, hsm_a, blob);
    /* Within the window the sweep keeps it (a slower machine fails here
     * rather than passing wrongly). */
    stek_p11_eph_sweep(p11);
    assert_true(ms_since(&t0) < WINDOW_MS);
    assert_int_equal(session_objects(), 1);

    wait_past(&t0, WINDOW_MS);
    stek_p11_eph_sweep(p11);
    assert_int_equal(session_objects(), 0);
    assert_int_equal(eph_made(), made + 1);
    /* The next set makes a new key. */
    wrap_one(pub, hsm_b, blob);
    assert_memory_not_equal(hsm_a, hsm_b, sizeof(hsm_a));
    assert_int_equal(eph_made(), made + 2);
    stek_p11_eph_sweep(NULL); /* ignored */

    stek_host_eph_free(h);
    eph_reset();
}

/* Destroys every session private key this process has: the shared one. */
static void destroy_eph_behind_the_layer(void)
{
    CK_BBOOL no = CK_FALSE;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE q[] = {{CKA_TOKEN, &no, sizeof(no)}, {CKA_CLASS, &cls, sizeof(cls)}};
    p11_sess s;
    assert_status(p11_sess_get(p11, &s), STEK_OK);
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    stek_status st = p11_find(&s, q, 2, &objs, &n);
    assert_int_equal(n, 1);
    for (size_t i = 0; st == STEK_OK && i < n; i++)
        st = p11_destroy(&s, objs[i]);
    free(objs);
    assert_status(p11_sess_done(&s, st), STEK_OK);
}

/* The HSM refuses the shared key: the set is still built, with a fresh key,
 * and the refused one is never used again. */
static void test_shared_eph_refused(void **state)
{
    (void)state;
    stek_p11_set_eph_reuse_ms(p11, 60000);
    uint8_t pub[STEK_P256_POINT_BYTES], hsm_a[STEK_P256_POINT_BYTES];
    uint8_t hsm_b[STEK_P256_POINT_BYTES], hsm_c[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);
    unsigned long made = eph_made();

    wrap_one(pub, hsm_a, blob);
    destroy_eph_behind_the_layer();
    wrap_one(pub, hsm_b, blob);
    assert_memory_not_equal(hsm_a, hsm_b, sizeof(hsm_a));
    assert_int_equal(eph_made(), made + 2);
    stek_secret_free(unwrap_ok(h, hsm_b, blob));
    /* The replacement is shared in turn. */
    wrap_one(pub, hsm_c, blob);
    assert_memory_equal(hsm_b, hsm_c, sizeof(hsm_b));
    assert_int_equal(eph_made(), made + 2);

    stek_host_eph_free(h);
    eph_reset();
}

/* A reconnect forgets the shared key (finalizing destroyed it) and the next
 * set gets a fresh one. */
static void test_shared_eph_after_reconnect(void **state)
{
    (void)state;
    stek_p11_set_eph_reuse_ms(p11, 60000);
    uint8_t pub[STEK_P256_POINT_BYTES], hsm_a[STEK_P256_POINT_BYTES];
    uint8_t hsm_b[STEK_P256_POINT_BYTES];
    uint8_t blob[1][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);

    wrap_one(pub, hsm_a, blob);
    unsigned long reconnects = atomic_load(&p11->reconnects);
    atomic_store(&p11->lost, true);
    /* Reconnects are spaced (RECONNECT_SPACING_MS): retry to a deadline. */
    struct timespec t0, pause = {0, 50 * 1000000L};
    assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &t0), 0);
    const uint64_t e = FIRST_EPOCH + 4;
    stek_status st;
    while ((st = stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), &e, 1, hsm_b, blob)) ==
               STEK_ERR_HSM_UNAVAILABLE &&
           ms_since(&t0) < 5000)
        nanosleep(&pause, NULL);
    assert_status(st, STEK_OK);
    assert_int_equal(atomic_load(&p11->reconnects), reconnects + 1);
    assert_memory_not_equal(hsm_a, hsm_b, sizeof(hsm_a));
    stek_secret_free(unwrap_ok(h, hsm_b, blob));
    assert_int_equal(session_objects(), 1);

    stek_host_eph_free(h);
    eph_reset();
}

enum { CONC_THREADS = 4, CONC_WRAPS = 8 };

typedef struct conc_host {
    pthread_t t;
    stek_host_eph *h;
    uint8_t pub[STEK_P256_POINT_BYTES];
    uint8_t hsm[CONC_WRAPS][STEK_P256_POINT_BYTES];
    uint8_t blobs[CONC_WRAPS][1][STEK_WRAPPED_KEY_BYTES];
    stek_status st[CONC_WRAPS];
} conc_host;

static void *conc_wrap(void *arg)
{
    conc_host *c = arg;
    const uint64_t e = FIRST_EPOCH + 4;
    for (int i = 0; i < CONC_WRAPS; i++)
        c->st[i] = stek_p11_wrap_tickets(p11, GROUP, GEN, c->pub, sizeof(c->pub), &e, 1, c->hsm[i],
                                         c->blobs[i]);
    return NULL;
}

/* Builds racing for the first key make exactly one, and all use it. */
static void test_shared_eph_concurrent(void **state)
{
    (void)state;
    stek_p11_set_eph_reuse_ms(p11, 60000);
    static conc_host hosts[CONC_THREADS];
    unsigned long made = eph_made();
    for (int i = 0; i < CONC_THREADS; i++)
        hosts[i].h = host_new(hosts[i].pub);
    for (int i = 0; i < CONC_THREADS; i++)
        assert_int_equal(pthread_create(&hosts[i].t, NULL, conc_wrap, &hosts[i]), 0);
    for (int i = 0; i < CONC_THREADS; i++)
        assert_int_equal(pthread_join(hosts[i].t, NULL), 0);
    assert_int_equal(eph_made(), made + 1);
    for (int i = 0; i < CONC_THREADS; i++) {
        for (int j = 0; j < CONC_WRAPS; j++) {
            assert_status(hosts[i].st[j], STEK_OK);
            assert_memory_equal(hosts[i].hsm[j], hosts[0].hsm[0], STEK_P256_POINT_BYTES);
            stek_secret_free(unwrap_ok(hosts[i].h, hosts[i].hsm[j], hosts[i].blobs[j]));
        }
        stek_host_eph_free(hosts[i].h);
    }
    eph_reset();
}

/* ---- wrapping while the chain moves ----------------------------------- */

enum { RACE_READERS = 3, RACE_STEPS = 120, RACE_WINDOW = 4 };
#define RACE_GROUP "race"
#define RACE_FIRST 5000u

typedef struct race {
    _Atomic uint64_t current;
    atomic_bool stop;
    atomic_ulong wrapped, refused;
    stek_status writer_st, first_refusal;
    char refusal[256];
    pthread_mutex_t mu;
} race;

/* One epoch per step, as stekd's refresh does: K(e + 3) and R(e + 4), then
 * the keys that left the window are destroyed. */
static void *race_writer(void *arg)
{
    race *r = arg;
    struct timespec pause = {0, 2 * 1000000L};
    for (int i = 0; i < RACE_STEPS && r->writer_st == STEK_OK; i++) {
        uint64_t e = atomic_load(&r->current) + 1;
        r->writer_st = stek_p11_ratchet_advance(p11, RACE_GROUP, GEN, e + 4);
        atomic_store(&r->current, e);
        if (r->writer_st == STEK_OK)
            r->writer_st =
                stek_p11_ticket_destroy_before(p11, RACE_GROUP, GEN, e + 1 - RACE_WINDOW, NULL);
        nanosleep(&pause, NULL);
    }
    atomic_store(&r->stop, true);
    return NULL;
}

/* Wraps the window e-1 .. e+2 again and again. A key destroyed between the
 * list and the wrap is NOT_FOUND (stekd rebuilds from the new view); any
 * other failure is the bug this test is for. */
static void *race_reader(void *arg)
{
    race *r = arg;
    stek_host_eph *h = NULL;
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    uint8_t blobs[RACE_WINDOW][STEK_WRAPPED_KEY_BYTES];
    if (stek_host_eph_generate(&h) != STEK_OK || stek_host_eph_public(h, pub) != STEK_OK)
        abort();
    while (!atomic_load(&r->stop)) {
        uint64_t e = atomic_load(&r->current), epochs[RACE_WINDOW];
        for (unsigned i = 0; i < RACE_WINDOW; i++)
            epochs[i] = e - 1 + i;
        stek_status st = stek_p11_wrap_tickets(p11, RACE_GROUP, GEN, pub, sizeof(pub), epochs,
                                               RACE_WINDOW, hsm, blobs);
        if (st == STEK_OK) {
            atomic_fetch_add(&r->wrapped, 1);
        } else if (st != STEK_ERR_NOT_FOUND && atomic_fetch_add(&r->refused, 1) == 0) {
            pthread_mutex_lock(&r->mu);
            r->first_refusal = st;
            snprintf(r->refusal, sizeof(r->refusal), "%s", stek_error_detail());
            pthread_mutex_unlock(&r->mu);
        }
    }
    stek_host_eph_free(h);
    return NULL;
}

/*
 * SoftHSM's file store does not exclude threads of one process from an
 * object file being written: before the layer's token lock, a wrap racing
 * the ratchet could keep a half-read new ticket key, refused for good with
 * CKR_KEY_UNEXTRACTABLE (about 1 in 60 wraps here).
 */
static void test_wrap_while_ratcheting(void **state)
{
    (void)state;
    stek_p11_set_eph_reuse_ms(p11, 1000);
    assert_status(stek_p11_root_create(p11, RACE_GROUP, GEN, RACE_FIRST), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, RACE_GROUP, GEN, RACE_FIRST + 4), STEK_OK);
    static race r;
    atomic_init(&r.current, RACE_FIRST);
    r.writer_st = STEK_OK;
    r.first_refusal = STEK_OK;
    pthread_mutex_init(&r.mu, NULL);
    pthread_t w, rd[RACE_READERS];
    for (int i = 0; i < RACE_READERS; i++)
        assert_int_equal(pthread_create(&rd[i], NULL, race_reader, &r), 0);
    assert_int_equal(pthread_create(&w, NULL, race_writer, &r), 0);
    assert_int_equal(pthread_join(w, NULL), 0);
    for (int i = 0; i < RACE_READERS; i++)
        assert_int_equal(pthread_join(rd[i], NULL), 0);
    pthread_mutex_destroy(&r.mu);
    printf("wrap while ratcheting: %d steps, %lu sets wrapped, %lu refused%s%s\n", RACE_STEPS,
           atomic_load(&r.wrapped), atomic_load(&r.refused), r.refused ? ", first: " : "",
           r.refusal);
    assert_status(r.writer_st, STEK_OK);
    assert_status(r.first_refusal, STEK_OK);
    assert_int_equal(atomic_load(&r.refused), 0);
    assert_true(atomic_load(&r.wrapped) > 0);
    eph_reset();
}

/* ---- throughput (printed, not asserted) ------------------------------ */

static void test_wrap_throughput(void **state)
{
    (void)state;
    uint64_t epochs[BENCH_EPOCHS];
    for (unsigned i = 0; i < BENCH_EPOCHS; i++)
        epochs[i] = FIRST_EPOCH + i;
    _Static_assert(BENCH_EPOCHS <= N_EPOCHS, "the ratchet made fewer keys than the bench wraps");
    uint8_t pub[STEK_P256_POINT_BYTES], hsm[STEK_P256_POINT_BYTES];
    static uint8_t blobs[BENCH_EPOCHS][STEK_WRAPPED_KEY_BYTES];
    stek_host_eph *h = host_new(pub);

    /* A fresh HSM ephemeral key per set, then one shared key (stekd's way). */
    for (int shared = 0; shared < 2; shared++) {
        stek_p11_set_eph_reuse_ms(p11, shared ? 60000 : 0);
        struct timespec t0, t1;
        assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &t0), 0);
        for (int i = 0; i < BENCH_CALLS; i++)
            assert_status(stek_p11_wrap_tickets(p11, GROUP, GEN, pub, sizeof(pub), epochs,
                                                BENCH_EPOCHS, hsm, blobs),
                          STEK_OK);
        assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &t1), 0);
        double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("wrap, %s: %.0f calls/s, %.0f keys/s (%d calls of %d epochs in %.3f s)\n",
               shared ? "shared ephemeral key" : "ephemeral key per set", BENCH_CALLS / secs,
               (double)BENCH_CALLS * BENCH_EPOCHS / secs, BENCH_CALLS, BENCH_EPOCHS, secs);
        fflush(stdout);
    }

    /* The last set is still a good one. */
    stek_secret *k = NULL;
    assert_status(
        host_unwrap(h, hsm, GROUP, GEN, blobs[BENCH_EPOCHS - 1], STEK_WRAPPED_KEY_BYTES, &k),
        STEK_OK);
    stek_secret_free(k);
    stek_host_eph_free(h);
    eph_reset();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_two_hosts),
        cmocka_unit_test(test_same_host_twice),
        cmocka_unit_test(test_ticket_names),
        cmocka_unit_test(test_zero_epochs),
        cmocka_unit_test(test_wrong_host_or_context),
        cmocka_unit_test(test_tampered_blob),
        cmocka_unit_test(test_bad_points),
        cmocka_unit_test(test_missing_epoch),
        cmocka_unit_test(test_bad_args),
        cmocka_unit_test(test_shared_eph_two_hosts),
        cmocka_unit_test(test_shared_eph_window_ends),
        cmocka_unit_test(test_shared_eph_swept),
        cmocka_unit_test(test_shared_eph_refused),
        cmocka_unit_test(test_shared_eph_after_reconnect),
        cmocka_unit_test(test_shared_eph_concurrent),
        cmocka_unit_test(test_wrap_while_ratcheting),
        cmocka_unit_test(test_wrap_throughput),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
