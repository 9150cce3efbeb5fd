/* kek.h: the byte contract (iv, label blocks) and input checks (group, P-256 point). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "kek.h"

static const char *P256_P = "FFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF";
static const char *P256_B = "5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B";

/* A fresh key's public point on the named curve; returns its length. */
static size_t fresh_point(const char *curve, uint8_t *out, size_t cap)
{
    EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", curve);
    assert_non_null(k);
    size_t len = 0;
    assert_int_equal(EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, out, cap, &len),
                     1);
    EVP_PKEY_free(k);
    return len;
}

static void expect_bad_point(const uint8_t *pt, size_t len, const char *detail_word)
{
    assert_int_equal(stek_p256_point_check(pt, len), STEK_ERR_BAD_POINT);
    if (detail_word != NULL)
        assert_non_null(strstr(stek_error_detail(), detail_word));
}

static void test_point_valid(void **state)
{
    (void)state;
    uint8_t pt[STEK_P256_POINT_BYTES];
    for (int i = 0; i < 8; i++) {
        assert_int_equal(fresh_point("P-256", pt, sizeof(pt)), STEK_P256_POINT_BYTES);
        assert_int_equal(stek_p256_point_check(pt, sizeof(pt)), STEK_OK);
    }
}

static void test_point_wrong_length(void **state)
{
    (void)state;
    uint8_t pt[STEK_P256_POINT_BYTES + 1];
    assert_int_equal(fresh_point("P-256", pt, sizeof(pt)), STEK_P256_POINT_BYTES);
    expect_bad_point(NULL, 0, "length");
    expect_bad_point(NULL, STEK_P256_POINT_BYTES, "length");
    expect_bad_point(pt, 0, "length");
    expect_bad_point(pt, STEK_P256_POINT_BYTES - 1, "length"); /* truncated */
    pt[STEK_P256_POINT_BYTES] = 0;
    expect_bad_point(pt, STEK_P256_POINT_BYTES + 1, "length"); /* trailing byte */
}

static void test_point_at_infinity(void **state)
{
    (void)state;
    /* SEC 1 encodes infinity as a lone zero byte, and OpenSSL decodes it. */
    const uint8_t inf[1] = {0x00};
    expect_bad_point(inf, sizeof(inf), "length");
    uint8_t zeros[STEK_P256_POINT_BYTES] = {0};
    expect_bad_point(zeros, sizeof(zeros), "prefix");
}

static void test_point_compressed_and_hybrid(void **state)
{
    (void)state;
    uint8_t pt[STEK_P256_POINT_BYTES], alt[STEK_P256_POINT_BYTES];
    assert_int_equal(fresh_point("P-256", pt, sizeof(pt)), STEK_P256_POINT_BYTES);

    /* Compressed: 0x02|parity(y) || x, 33 bytes. */
    alt[0] = (uint8_t)(0x02 | (pt[64] & 1));
    memcpy(alt + 1, pt + 1, 32);
    expect_bad_point(alt, 33, "length");
    /* The same with 32 bytes of junk after it, to reach the prefix check. */
    memset(alt + 33, 0x41, 32);
    expect_bad_point(alt, sizeof(alt), "prefix");

    /* Hybrid: 0x06|parity(y) || x || y, a valid point OpenSSL would take. */
    memcpy(alt, pt, sizeof(pt));
    alt[0] = (uint8_t)(0x06 | (pt[64] & 1));
    expect_bad_point(alt, sizeof(alt), "prefix");
}

static void test_point_not_on_curve(void **state)
{
    (void)state;
    uint8_t pt[STEK_P256_POINT_BYTES];
    assert_int_equal(fresh_point("P-256", pt, sizeof(pt)), STEK_P256_POINT_BYTES);
    pt[64] ^= 0x01;
    expect_bad_point(pt, sizeof(pt), "curve");
    pt[64] ^= 0x01;
    pt[10] ^= 0x20;
    expect_bad_point(pt, sizeof(pt), "curve");

    uint8_t origin[STEK_P256_POINT_BYTES] = {0x04};
    expect_bad_point(origin, sizeof(origin), "curve");
}

static void test_point_other_curves(void **state)
{
    (void)state;
    uint8_t pt[97];
    /* secp256k1 has the same sizes, so only the curve equation catches it. */
    for (int i = 0; i < 4; i++) {
        assert_int_equal(fresh_point("secp256k1", pt, sizeof(pt)), STEK_P256_POINT_BYTES);
        expect_bad_point(pt, STEK_P256_POINT_BYTES, NULL);
    }
    assert_int_equal(fresh_point("P-384", pt, sizeof(pt)), 97);
    expect_bad_point(pt, 97, "length");
    /* A P-384 point cut to P-256's size is still no P-256 point. */
    expect_bad_point(pt, STEK_P256_POINT_BYTES, NULL);
}

/*
 * Finds a point (x, y) with a small x, so that x + p still fits in 32 bytes:
 * that encoding is congruent to a curve point but is not a canonical one.
 */
static void small_x_point(BIGNUM *x, BIGNUM *y, BN_CTX *bn)
{
    BIGNUM *p = NULL, *b = NULL, *rhs = BN_new(), *t = BN_new();
    assert_true(BN_hex2bn(&p, P256_P) > 0 && BN_hex2bn(&b, P256_B) > 0);
    for (BN_ULONG v = 1;; v++) {
        /* rhs = x^3 - 3x + b mod p */
        assert_true(BN_set_word(x, v));
        assert_true(BN_mod_sqr(t, x, p, bn) && BN_mod_mul(rhs, t, x, p, bn));
        assert_true(BN_set_word(t, 3 * v) && BN_mod_sub(rhs, rhs, t, p, bn));
        assert_true(BN_mod_add(rhs, rhs, b, p, bn));
        if (BN_mod_sqrt(y, rhs, p, bn) != NULL) {
            assert_true(BN_mod_sqr(t, y, p, bn) && BN_cmp(t, rhs) == 0);
            break;
        }
    }
    BN_free(p);
    BN_free(b);
    BN_free(rhs);
    BN_free(t);
}

static void test_point_coordinate_not_reduced(void **state)
{
    (void)state;
    BN_CTX *bn = BN_CTX_new();
    BIGNUM *x = BN_new(), *y = BN_new(), *p = NULL;
    assert_true(BN_hex2bn(&p, P256_P) > 0);
    small_x_point(x, y, bn);

    uint8_t pt[STEK_P256_POINT_BYTES] = {0x04};
    assert_int_equal(BN_bn2binpad(x, pt + 1, 32), 32);
    assert_int_equal(BN_bn2binpad(y, pt + 33, 32), 32);
    /* Control: the canonical encoding, leading zero bytes and all, passes. */
    assert_int_equal(stek_p256_point_check(pt, sizeof(pt)), STEK_OK);

    /* x + p encodes the same field element but is out of range. */
    assert_true(BN_add(x, x, p));
    assert_int_equal(BN_num_bytes(x), 32);
    assert_int_equal(BN_bn2binpad(x, pt + 1, 32), 32);
    expect_bad_point(pt, sizeof(pt), "field");

    /* Each coordinate equal to p, and both all-ones. */
    assert_int_equal(BN_bn2binpad(p, pt + 1, 32), 32);
    expect_bad_point(pt, sizeof(pt), "field");
    assert_int_equal(BN_bn2binpad(y, pt + 1, 32), 32);
    assert_int_equal(BN_bn2binpad(p, pt + 33, 32), 32);
    expect_bad_point(pt, sizeof(pt), "field");
    memset(pt + 1, 0xff, 64);
    expect_bad_point(pt, sizeof(pt), "field");

    BN_free(x);
    BN_free(y);
    BN_free(p);
    BN_CTX_free(bn);
}

static void test_point_garbage_never_crashes(void **state)
{
    (void)state;
    uint8_t buf[160];
    for (int i = 0; i < 2000; i++) {
        uint8_t r[2];
        assert_int_equal(RAND_bytes(r, sizeof(r)), 1);
        assert_int_equal(RAND_bytes(buf, sizeof(buf)), 1);
        size_t len = r[0] % sizeof(buf);
        if (r[1] & 1)
            buf[0] = 0x04;
        /* A random 65-byte string is on the curve with probability ~2^-256. */
        assert_int_equal(stek_p256_point_check(buf, len), STEK_ERR_BAD_POINT);
    }
}

static void test_group_name_accepts(void **state)
{
    (void)state;
    char max[STEK_GROUP_MAX_BYTES + 1];
    memset(max, 'a', STEK_GROUP_MAX_BYTES);
    max[STEK_GROUP_MAX_BYTES] = '\0';
    assert_int_equal(stek_group_name_check("a"), STEK_OK);
    assert_int_equal(stek_group_name_check("edge-web.example_1"), STEK_OK);
    assert_int_equal(stek_group_name_check("0.9_z-"), STEK_OK);
    assert_int_equal(stek_group_name_check(max), STEK_OK);
}

static void test_group_name_rejects(void **state)
{
    (void)state;
    char big[STEK_GROUP_MAX_BYTES + 2];
    memset(big, 'a', STEK_GROUP_MAX_BYTES + 1);
    big[STEK_GROUP_MAX_BYTES + 1] = '\0';
    const char *bad[] = {"", "Edge", "a b", "a/b", "a\n", "caf\xc3\xa9", "a:b", "a*", big};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(stek_group_name_check(bad[i]), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_group_name_check(NULL), STEK_ERR_INVALID_ARG);
}

/* The documented ctx, assembled by hand, hashed by OpenSSL's one-shot SHA256. */
static void reference_iv(const uint8_t *hsm, const uint8_t *host, const char *group, uint32_t gen,
                         uint8_t iv[16])
{
    uint8_t ctx[65 + 65 + 1 + 64 + 4 + 11];
    size_t n = 0, glen = strlen(group);
    memcpy(ctx + n, hsm, 65);
    n += 65;
    memcpy(ctx + n, host, 65);
    n += 65;
    ctx[n++] = (uint8_t)glen;
    memcpy(ctx + n, group, glen);
    n += glen;
    ctx[n++] = (uint8_t)(gen >> 24);
    ctx[n++] = (uint8_t)(gen >> 16);
    ctx[n++] = (uint8_t)(gen >> 8);
    ctx[n++] = (uint8_t)gen;
    memcpy(ctx + n, "stek-kek-v1", 11);
    n += 11;
    uint8_t d[SHA256_DIGEST_LENGTH];
    assert_non_null(SHA256(ctx, n, d));
    memcpy(iv, d, 16);
}

static void test_iv_matches_reference(void **state)
{
    (void)state;
    uint8_t hsm[65], host[65], iv[16], ref[16];
    assert_int_equal(fresh_point("P-256", hsm, sizeof(hsm)), 65);
    assert_int_equal(fresh_point("P-256", host, sizeof(host)), 65);
    const char *groups[] = {"a", "edge-web", "x.y_z-0123456789"};
    const uint32_t gens[] = {0, 1, 0x01020304u, UINT32_MAX};
    for (size_t g = 0; g < 3; g++) {
        for (size_t k = 0; k < 4; k++) {
            assert_int_equal(stek_kek_iv(hsm, host, groups[g], gens[k], iv), STEK_OK);
            reference_iv(hsm, host, groups[g], gens[k], ref);
            assert_memory_equal(iv, ref, 16);
        }
    }
}

static void test_iv_depends_on_every_input(void **state)
{
    (void)state;
    uint8_t hsm[65], host[65], base[16], iv[16];
    assert_int_equal(fresh_point("P-256", hsm, sizeof(hsm)), 65);
    assert_int_equal(fresh_point("P-256", host, sizeof(host)), 65);
    assert_int_equal(stek_kek_iv(hsm, host, "edge", 7, base), STEK_OK);

    assert_int_equal(stek_kek_iv(host, hsm, "edge", 7, iv), STEK_OK); /* roles swapped */
    assert_memory_not_equal(iv, base, 16);
    assert_int_equal(stek_kek_iv(hsm, host, "edgf", 7, iv), STEK_OK);
    assert_memory_not_equal(iv, base, 16);
    assert_int_equal(stek_kek_iv(hsm, host, "edge", 8, iv), STEK_OK);
    assert_memory_not_equal(iv, base, 16);
    assert_int_equal(stek_kek_iv(hsm, host, "edge", 7, iv), STEK_OK); /* deterministic */
    assert_memory_equal(iv, base, 16);
}

static void test_iv_bad_args(void **state)
{
    (void)state;
    uint8_t pt[65] = {0x04}, iv[16];
    assert_int_equal(stek_kek_iv(NULL, pt, "g", 1, iv), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_kek_iv(pt, NULL, "g", 1, iv), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_kek_iv(pt, pt, NULL, 1, iv), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_kek_iv(pt, pt, "G", 1, iv), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_kek_iv(pt, pt, "", 1, iv), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_kek_iv(pt, pt, "g", 1, NULL), STEK_ERR_INVALID_ARG);
}

static void test_label_blocks(void **state)
{
    (void)state;
    static const uint8_t want[STEK_KEK_LABEL_BYTES] = {
        's', 't', 'e', 'k', '-', 'k', 'e', 'k', '-', 'v', '1', 0, 0, 0, 0, 0,
        's', 't', 'e', 'k', '-', 'k', 'e', 'k', '-', 'v', '1', 0, 0, 0, 0, 1,
    };
    uint8_t out[STEK_KEK_LABEL_BYTES];
    memset(out, 0xcc, sizeof(out));
    stek_kek_label_blocks(out);
    assert_memory_equal(out, want, sizeof(want));
    assert_memory_not_equal(out, out + 16, 16);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_point_valid),
        cmocka_unit_test(test_point_wrong_length),
        cmocka_unit_test(test_point_at_infinity),
        cmocka_unit_test(test_point_compressed_and_hybrid),
        cmocka_unit_test(test_point_not_on_curve),
        cmocka_unit_test(test_point_other_curves),
        cmocka_unit_test(test_point_coordinate_not_reduced),
        cmocka_unit_test(test_point_garbage_never_crashes),
        cmocka_unit_test(test_group_name_accepts),
        cmocka_unit_test(test_group_name_rejects),
        cmocka_unit_test(test_iv_matches_reference),
        cmocka_unit_test(test_iv_depends_on_every_input),
        cmocka_unit_test(test_iv_bad_args),
        cmocka_unit_test(test_label_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
