/*
 * The service signing key on a real SoftHSM token: created once, signs in
 * the HSM, exports a PEM that stock OpenSSL verifies with, and its private
 * half never yields CKA_VALUE.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "fx.h"
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

static fx_token tok;
static stek_p11 *p11;

static const uint8_t msg[] = "stek-keyset-v1: profile 1, group edge-web, generation 3, epoch 42";

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
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    stek_p11_close(p11);
    p11 = NULL;
    return fx_token_destroy(&tok) == 0 ? 0 : -1;
}

/* The signing public key as OpenSSL sees it, from the layer's PEM. */
static EVP_PKEY *pinned_key(void)
{
    char *pem = NULL;
    assert_status(stek_p11_signing_pubkey_pem(p11, &pem), STEK_OK);
    assert_non_null(pem);
    assert_non_null(strstr(pem, "-----BEGIN PUBLIC KEY-----"));
    BIO *bio = BIO_new_mem_buf(pem, -1);
    assert_non_null(bio);
    EVP_PKEY *k = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    free(pem);
    assert_non_null(k);
    return k;
}

/* 1 valid, anything else invalid (0, or <0 for a signature that does not parse). */
static int verify(EVP_PKEY *k, const uint8_t *m, size_t m_len, const uint8_t *sig, size_t sig_len)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    assert_non_null(ctx);
    assert_int_equal(EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k), 1);
    int rc = EVP_DigestVerify(ctx, sig, sig_len, m, m_len);
    EVP_MD_CTX_free(ctx);
    return rc;
}

static void test_before_create(void **state)
{
    (void)state;
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    assert_status(stek_p11_sign(p11, msg, sizeof(msg), sig, &sig_len), STEK_ERR_NOT_FOUND);
    char *pem = (char *)"sentinel";
    assert_status(stek_p11_signing_pubkey_pem(p11, &pem), STEK_ERR_NOT_FOUND);
    assert_null(pem);
}

static void test_create_once(void **state)
{
    (void)state;
    assert_status(stek_p11_signing_key_create(p11), STEK_OK);
    assert_status(stek_p11_signing_key_create(p11), STEK_ERR_EXISTS);
    /* Exactly one key pair in the token after the second attempt. */
    stek_p11_object_info *objs = NULL;
    size_t n = 0, priv = 0, pub = 0;
    assert_status(stek_p11_list(p11, &objs, &n), STEK_OK);
    for (size_t i = 0; i < n; i++) {
        if (objs[i].kind != STEK_P11_KIND_SIGNING)
            continue;
        assert_string_equal(objs[i].label, "stek:signing");
        assert_true(objs[i].token);
        priv += objs[i].is_private_key;
        pub += objs[i].is_public_key;
    }
    free(objs);
    assert_int_equal(priv, 1);
    assert_int_equal(pub, 1);
}

static void test_pem_is_p256(void **state)
{
    (void)state;
    EVP_PKEY *k = pinned_key();
    assert_int_equal(EVP_PKEY_get_base_id(k), EVP_PKEY_EC);
    assert_int_equal(EVP_PKEY_get_bits(k), 256);
    char curve[64];
    size_t len = 0;
    assert_int_equal(
        EVP_PKEY_get_utf8_string_param(k, OSSL_PKEY_PARAM_GROUP_NAME, curve, sizeof(curve), &len),
        1);
    assert_string_equal(curve, "prime256v1");
    /* The exported point passes OpenSSL's full public-key check. */
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, k, NULL);
    assert_non_null(c);
    assert_int_equal(EVP_PKEY_public_check(c), 1);
    EVP_PKEY_CTX_free(c);
    /* Stable: a second export is the same key. */
    EVP_PKEY *k2 = pinned_key();
    assert_int_equal(EVP_PKEY_eq(k, k2), 1);
    EVP_PKEY_free(k2);
    EVP_PKEY_free(k);
}

static void test_sign_verify(void **state)
{
    (void)state;
    EVP_PKEY *k = pinned_key();
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    const size_t m_len = sizeof(msg) - 1;
    assert_status(stek_p11_sign(p11, msg, m_len, sig, &sig_len), STEK_OK);
    assert_true(sig_len > 8);
    assert_true(sig_len <= STEK_P11_SIGNATURE_MAX_BYTES);
    assert_int_equal(sig[0], 0x30); /* DER SEQUENCE */
    assert_int_equal(verify(k, msg, m_len, sig, sig_len), 1);

    /* Any one byte of the message changed: invalid. */
    const size_t positions[] = {0, 1, 7, m_len / 2, m_len - 2, m_len - 1};
    for (size_t i = 0; i < sizeof(positions) / sizeof(positions[0]); i++) {
        uint8_t m2[sizeof(msg)];
        memcpy(m2, msg, m_len);
        m2[positions[i]] ^= 0x01;
        assert_int_not_equal(verify(k, m2, m_len, sig, sig_len), 1);
    }
    /* A shorter or longer message: invalid. */
    assert_int_not_equal(verify(k, msg, m_len - 1, sig, sig_len), 1);
    assert_int_not_equal(verify(k, msg, m_len + 1, sig, sig_len), 1);

    /* Any one byte of the signature changed: invalid. */
    for (size_t pos = 0; pos < sig_len; pos++) {
        uint8_t s2[STEK_P11_SIGNATURE_MAX_BYTES];
        memcpy(s2, sig, sig_len);
        s2[pos] ^= 0x01;
        assert_int_not_equal(verify(k, msg, m_len, s2, sig_len), 1);
    }

    /* ECDSA is randomized: a second signature differs and verifies too. */
    uint8_t sig2[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig2_len = 0;
    assert_status(stek_p11_sign(p11, msg, m_len, sig2, &sig2_len), STEK_OK);
    assert_true(sig2_len <= STEK_P11_SIGNATURE_MAX_BYTES);
    assert_false(sig2_len == sig_len && memcmp(sig, sig2, sig_len) == 0);
    assert_int_equal(verify(k, msg, m_len, sig2, sig2_len), 1);
    EVP_PKEY_free(k);
}

/* Many signatures: DER lengths vary with leading zeros; all stay in bounds. */
static void test_many_signatures(void **state)
{
    (void)state;
    EVP_PKEY *k = pinned_key();
    for (unsigned i = 0; i < 64; i++) {
        uint8_t m[8];
        for (int j = 0; j < 8; j++)
            m[j] = (uint8_t)(i * 31 + j);
        uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
        size_t sig_len = 0;
        assert_status(stek_p11_sign(p11, m, sizeof(m), sig, &sig_len), STEK_OK);
        assert_true(sig_len > 0 && sig_len <= STEK_P11_SIGNATURE_MAX_BYTES);
        assert_int_equal(verify(k, m, sizeof(m), sig, sig_len), 1);
    }
    /* The empty message is a message too. */
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    assert_status(stek_p11_sign(p11, NULL, 0, sig, &sig_len), STEK_OK);
    assert_int_equal(verify(k, (const uint8_t *)"", 0, sig, sig_len), 1);
    assert_int_not_equal(verify(k, (const uint8_t *)"x", 1, sig, sig_len), 1);
    EVP_PKEY_free(k);
}

static void test_private_key_attributes(void **state)
{
    (void)state;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, (void *)"stek:signing", 12},
    };
    p11_sess s;
    assert_status(p11_sess_get(p11, &s), STEK_OK);
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    stek_status st = p11_find(&s, q, 2, &objs, &n);
    if (st != STEK_OK) {
        free(objs);
        assert_status(p11_sess_done(&s, st), STEK_OK);
    }
    assert_int_equal(n, 1);
    CK_OBJECT_HANDLE h = objs[0];
    free(objs);

    bool sensitive = p11_get_bool(&s, h, CKA_SENSITIVE);
    bool always_sensitive = p11_get_bool(&s, h, CKA_ALWAYS_SENSITIVE);
    bool extractable = p11_get_bool(&s, h, CKA_EXTRACTABLE);
    bool never_extractable = p11_get_bool(&s, h, CKA_NEVER_EXTRACTABLE);
    bool token = p11_get_bool(&s, h, CKA_TOKEN);
    bool can_sign = p11_get_bool(&s, h, CKA_SIGN);
    bool can_derive = p11_get_bool(&s, h, CKA_DERIVE);

    /* The one read of CKA_VALUE this test makes, to see it refused. */
    uint8_t buf[128];
    CK_ATTRIBUTE a = {CKA_VALUE, buf, sizeof(buf)};
    stek_status vst = P11_CALL(p11, C_GetAttributeValue, s.h, h, &a, 1);
    char detail[256];
    snprintf(detail, sizeof(detail), "%s", stek_error_detail());
    CK_ULONG value_len = a.ulValueLen;
    memset(buf, 0, sizeof(buf));
    assert_status(p11_sess_done(&s, STEK_OK), STEK_OK);

    assert_true(sensitive);
    assert_true(always_sensitive);
    assert_false(extractable);
    assert_true(never_extractable);
    assert_true(token);
    assert_true(can_sign);
    assert_false(can_derive);
    assert_int_not_equal(vst, STEK_OK);
    assert_non_null(strstr(detail, "C_GetAttributeValue"));
    assert_non_null(strstr(detail, "CKR_ATTRIBUTE_SENSITIVE"));
    assert_true(value_len == CK_UNAVAILABLE_INFORMATION);
}

static void test_bad_args(void **state)
{
    (void)state;
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    char *pem = NULL;
    assert_status(stek_p11_sign(NULL, msg, sizeof(msg), sig, &sig_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_sign(p11, NULL, 5, sig, &sig_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_sign(p11, msg, sizeof(msg), NULL, &sig_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_sign(p11, msg, sizeof(msg), sig, NULL), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_signing_pubkey_pem(NULL, &pem), STEK_ERR_INVALID_ARG);
    assert_null(pem);
    assert_status(stek_p11_signing_pubkey_pem(p11, NULL), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_signing_key_create(NULL), STEK_ERR_INVALID_ARG);
    /* The handle is unharmed. */
    assert_status(stek_p11_sign(p11, msg, sizeof(msg), sig, &sig_len), STEK_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* Order matters: the first test runs before the key exists. */
        cmocka_unit_test(test_before_create),   cmocka_unit_test(test_create_once),
        cmocka_unit_test(test_pem_is_p256),     cmocka_unit_test(test_sign_verify),
        cmocka_unit_test(test_many_signatures), cmocka_unit_test(test_private_key_attributes),
        cmocka_unit_test(test_bad_args),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
