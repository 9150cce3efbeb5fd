/*
 * reqsig.h: the signing input byte for byte, sign/verify round trips for
 * every accepted key type, and every way a signature must fail to verify.
 * Wrong-padding signatures are made here with OpenSSL directly, so the test
 * does not trust reqsig.c's own parameters.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "reqsig.h"

#define GROUP "edge-web"

enum { K_P256, K_P384, K_RSA, K_COUNT };
static const char *const KEY_NAMES[K_COUNT] = {"P-256", "P-384", "RSA-2048"};

/* Each host: its private key, the public half alone (what stekd sees), another host's. */
typedef struct {
    EVP_PKEY *priv[K_COUNT];
    EVP_PKEY *pub[K_COUNT];
    EVP_PKEY *other[K_COUNT];
    uint8_t eph[65];
    uint8_t nonce[32];
} fixture;

static EVP_PKEY *keygen(int which)
{
    EVP_PKEY *k = NULL;
    switch (which) {
    case K_P256:
        k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        break;
    case K_P384:
        k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
        break;
    default:
        k = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
        break;
    }
    assert_non_null(k);
    return k;
}

/* The public key alone, through SubjectPublicKeyInfo like a certificate's. */
static EVP_PKEY *public_only(EVP_PKEY *k)
{
    unsigned char *der = NULL;
    int len = i2d_PUBKEY(k, &der);
    assert_true(len > 0);
    const unsigned char *p = der;
    EVP_PKEY *pub = d2i_PUBKEY(NULL, &p, len);
    assert_non_null(pub);
    OPENSSL_free(der);
    return pub;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    for (int i = 0; i < K_COUNT; i++) {
        f->priv[i] = keygen(i);
        f->pub[i] = public_only(f->priv[i]);
        f->other[i] = keygen(i);
    }
    EVP_PKEY *eph = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    size_t len = 0;
    if (eph == NULL ||
        EVP_PKEY_get_octet_string_param(eph, "pub", f->eph, sizeof(f->eph), &len) != 1 ||
        len != sizeof(f->eph) || RAND_bytes(f->nonce, sizeof(f->nonce)) != 1)
        return -1;
    EVP_PKEY_free(eph);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < K_COUNT; i++) {
        EVP_PKEY_free(f->priv[i]);
        EVP_PKEY_free(f->pub[i]);
        EVP_PKEY_free(f->other[i]);
    }
    free(f);
    return 0;
}

static void sign_ok(const fixture *f, int k, uint8_t **sig, size_t *sig_len)
{
    assert_int_equal(stek_reqsig_sign(f->priv[k], GROUP, f->eph, sizeof(f->eph), f->nonce,
                                      sizeof(f->nonce), sig, sig_len),
                     STEK_OK);
    assert_non_null(*sig);
    assert_true(*sig_len > 0 && *sig_len <= STEK_REQSIG_MAX_BYTES);
}

static stek_status verify(const fixture *f, EVP_PKEY *pub, const uint8_t *sig, size_t sig_len)
{
    return stek_reqsig_verify(pub, GROUP, f->eph, sizeof(f->eph), f->nonce, sizeof(f->nonce), sig,
                              sig_len);
}

/* A failed verification says so and leaves nothing in OpenSSL's error queue. */
static void expect_verify_fail(const fixture *f, EVP_PKEY *pub, const uint8_t *sig, size_t sig_len)
{
    assert_int_equal(verify(f, pub, sig, sig_len), STEK_ERR_VERIFY);
    assert_int_equal(ERR_peek_error(), 0);
}

/* Signs the request's input with OpenSSL directly: pad < 0 means no RSA padding set. */
static void sign_by_hand(const fixture *f, EVP_PKEY *key, int pad, int saltlen, uint8_t **sig,
                         size_t *sig_len)
{
    uint8_t *msg = NULL;
    size_t msg_len = 0;
    assert_int_equal(stek_reqsig_input(GROUP, f->eph, sizeof(f->eph), f->nonce, sizeof(f->nonce),
                                       &msg, &msg_len),
                     STEK_OK);
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    EVP_PKEY_CTX *p = NULL;
    assert_non_null(m);
    assert_int_equal(EVP_DigestSignInit_ex(m, &p, "SHA256", NULL, NULL, key, NULL), 1);
    if (pad >= 0) {
        assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(p, pad), 1);
        if (pad == RSA_PKCS1_PSS_PADDING) {
            assert_int_equal(EVP_PKEY_CTX_set_rsa_mgf1_md(p, EVP_sha256()), 1);
            assert_int_equal(EVP_PKEY_CTX_set_rsa_pss_saltlen(p, saltlen), 1);
        }
    }
    assert_int_equal(EVP_DigestSign(m, NULL, sig_len, msg, msg_len), 1);
    *sig = malloc(*sig_len);
    assert_non_null(*sig);
    assert_int_equal(EVP_DigestSign(m, *sig, sig_len, msg, msg_len), 1);
    EVP_MD_CTX_free(m);
    free(msg);
}

/* Verifies with OpenSSL directly, the RSA salt length given (ignored for EC). */
static int verify_by_hand(const fixture *f, EVP_PKEY *pub, int saltlen, const uint8_t *sig,
                          size_t sig_len)
{
    uint8_t *msg = NULL;
    size_t msg_len = 0;
    assert_int_equal(stek_reqsig_input(GROUP, f->eph, sizeof(f->eph), f->nonce, sizeof(f->nonce),
                                       &msg, &msg_len),
                     STEK_OK);
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    EVP_PKEY_CTX *p = NULL;
    assert_non_null(m);
    assert_int_equal(EVP_DigestVerifyInit_ex(m, &p, "SHA256", NULL, NULL, pub, NULL), 1);
    if (EVP_PKEY_get_base_id(pub) == EVP_PKEY_RSA) {
        assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(p, RSA_PKCS1_PSS_PADDING), 1);
        assert_int_equal(EVP_PKEY_CTX_set_rsa_mgf1_md(p, EVP_sha256()), 1);
        assert_int_equal(EVP_PKEY_CTX_set_rsa_pss_saltlen(p, saltlen), 1);
    }
    int rc = EVP_DigestVerify(m, sig, sig_len, msg, msg_len);
    ERR_clear_error();
    EVP_MD_CTX_free(m);
    free(msg);
    return rc;
}

static void test_input_bytes(void **state)
{
    (void)state;
    const uint8_t eph[] = {0x04, 0xaa, 0xbb};
    const uint8_t nonce[] = {0x00, 0xff};
    const uint8_t want[] = {
        's',  't',  'e',  'k',  '-',  'r',  'e',  'q', '-', 'v', '1', /* context, no NUL */
        0x00, 0x00, 0x00, 0x02, 'g',  '1',                            /* group */
        0x00, 0x00, 0x00, 0x03, 0x04, 0xaa, 0xbb,                     /* eph_pub */
        0x00, 0x00, 0x00, 0x02, 0x00, 0xff,                           /* nonce */
    };
    uint8_t *msg = NULL;
    size_t len = 0;
    assert_int_equal(stek_reqsig_input("g1", eph, sizeof(eph), nonce, sizeof(nonce), &msg, &len),
                     STEK_OK);
    assert_int_equal(len, sizeof(want));
    assert_memory_equal(msg, want, sizeof(want));
    free(msg);

    /* Empty fields still carry their length, so they cannot slide into each other. */
    const uint8_t want_empty[] = {
        's', 't', 'e', 'k', '-', 'r', 'e', 'q', '-', 'v', '1', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    };
    assert_int_equal(stek_reqsig_input("", NULL, 0, NULL, 0, &msg, &len), STEK_OK);
    assert_int_equal(len, sizeof(want_empty));
    assert_memory_equal(msg, want_empty, sizeof(want_empty));
    free(msg);

    /* Moving a byte across a field boundary changes the input. */
    uint8_t *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    const uint8_t ab[] = {'a', 'b'};
    assert_int_equal(stek_reqsig_input("x", ab, 2, ab, 1, &a, &alen), STEK_OK);
    assert_int_equal(stek_reqsig_input("x", ab, 1, ab, 2, &b, &blen), STEK_OK);
    assert_int_equal(alen, blen);
    assert_memory_not_equal(a, b, alen);
    free(a);
    free(b);
}

static void test_input_rejects(void **state)
{
    (void)state;
    const uint8_t buf[4] = {1, 2, 3, 4};
    uint8_t *msg = (uint8_t *)buf;
    size_t len = 99;
    assert_int_equal(stek_reqsig_input(NULL, buf, 4, buf, 4, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_null(msg);
    assert_int_equal(len, 0);
    assert_int_equal(stek_reqsig_input("g", NULL, 4, buf, 4, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", buf, 4, NULL, 4, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", buf, 4, buf, 4, NULL, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", buf, 4, buf, 4, &msg, NULL), STEK_ERR_INVALID_ARG);
    assert_null(msg);
}

static void test_input_lengths(void **state)
{
    (void)state;
    uint8_t *big = calloc(1, 65537);
    char *group = malloc(65537);
    assert_non_null(big);
    assert_non_null(group);
    uint8_t *msg = NULL;
    size_t len = 0;

    /* 65535 bytes is the most a field may hold. */
    assert_int_equal(stek_reqsig_input("g", big, 65535, big, 65535, &msg, &len), STEK_OK);
    assert_int_equal(len, 11 + 12 + 1 + 65535 + 65535);
    free(msg);
    memset(group, 'g', 65535);
    group[65535] = '\0';
    assert_int_equal(stek_reqsig_input(group, NULL, 0, NULL, 0, &msg, &len), STEK_OK);
    assert_int_equal(len, 11 + 12 + 65535);
    free(msg);
    msg = NULL;

    /* One more is rejected, for each field. */
    group[65535] = 'g';
    group[65536] = '\0';
    assert_int_equal(stek_reqsig_input(group, NULL, 0, NULL, 0, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", big, 65536, big, 16, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", big, 65, big, 65536, &msg, &len), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_input("g", big, SIZE_MAX, big, 16, &msg, &len),
                     STEK_ERR_INVALID_ARG);
    assert_null(msg);

    /* sign and verify refuse the same lengths before any crypto. */
    fixture f0 = {0};
    EVP_PKEY *k = keygen(K_P256);
    uint8_t *sig = NULL;
    size_t sig_len = 0;
    assert_int_equal(stek_reqsig_sign(k, group, f0.eph, 65, f0.nonce, 16, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, "g", big, 65536, f0.nonce, 16, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_null(sig);
    assert_int_equal(stek_reqsig_verify(k, "g", f0.eph, 65, big, 65536, big, 64),
                     STEK_ERR_INVALID_ARG);
    EVP_PKEY_free(k);
    free(big);
    free(group);
}

static void test_sign_verify_roundtrip(void **state)
{
    fixture *f = *state;
    for (int k = 0; k < K_COUNT; k++) {
        uint8_t *sig = NULL;
        size_t sig_len = 0;
        sign_ok(f, k, &sig, &sig_len);
        assert_int_equal(verify(f, f->pub[k], sig, sig_len), STEK_OK);
        assert_int_equal(verify(f, f->priv[k], sig, sig_len), STEK_OK);
        if (k == K_RSA) {
            assert_int_equal(sig_len, 256);
        } else {
            assert_int_equal(sig[0], 0x30); /* a DER SEQUENCE, not raw r||s */
        }
        /* Independently: SHA-256, and for RSA exactly PSS/MGF1-SHA-256/salt 32. */
        assert_int_equal(verify_by_hand(f, f->pub[k], 32, sig, sig_len), 1);
        if (k == K_RSA)
            assert_int_not_equal(verify_by_hand(f, f->pub[k], 20, sig, sig_len), 1);
        free(sig);

        /* Empty eph and nonce are framed, not special: they still round-trip. */
        assert_int_equal(stek_reqsig_sign(f->priv[k], GROUP, NULL, 0, NULL, 0, &sig, &sig_len),
                         STEK_OK);
        assert_int_equal(stek_reqsig_verify(f->pub[k], GROUP, NULL, 0, NULL, 0, sig, sig_len),
                         STEK_OK);
        free(sig);
        print_message("%s ok\n", KEY_NAMES[k]);
    }
}

static void test_verify_wrong_input(void **state)
{
    fixture *f = *state;
    for (int k = 0; k < K_COUNT; k++) {
        uint8_t *sig = NULL;
        size_t sig_len = 0;
        sign_ok(f, k, &sig, &sig_len);

        char group[] = GROUP;
        for (size_t i = 0; i < sizeof(group) - 1; i++) {
            group[i] ^= 0x01;
            assert_int_equal(stek_reqsig_verify(f->pub[k], group, f->eph, sizeof(f->eph), f->nonce,
                                                sizeof(f->nonce), sig, sig_len),
                             STEK_ERR_VERIFY);
            group[i] ^= 0x01;
        }
        assert_int_equal(stek_reqsig_verify(f->pub[k], "edge-we", f->eph, sizeof(f->eph), f->nonce,
                                            sizeof(f->nonce), sig, sig_len),
                         STEK_ERR_VERIFY);
        uint8_t eph[sizeof(f->eph)], nonce[sizeof(f->nonce)];
        memcpy(eph, f->eph, sizeof(eph));
        memcpy(nonce, f->nonce, sizeof(nonce));
        for (size_t i = 0; i < sizeof(eph); i++) {
            eph[i] ^= 0x80;
            assert_int_equal(stek_reqsig_verify(f->pub[k], GROUP, eph, sizeof(eph), f->nonce,
                                                sizeof(f->nonce), sig, sig_len),
                             STEK_ERR_VERIFY);
            eph[i] ^= 0x80;
        }
        for (size_t i = 0; i < sizeof(nonce); i++) {
            nonce[i] ^= 0x01;
            assert_int_equal(stek_reqsig_verify(f->pub[k], GROUP, f->eph, sizeof(f->eph), nonce,
                                                sizeof(nonce), sig, sig_len),
                             STEK_ERR_VERIFY);
            nonce[i] ^= 0x01;
        }
        /* A shorter nonce or eph: the length prefix is covered. */
        assert_int_equal(stek_reqsig_verify(f->pub[k], GROUP, f->eph, sizeof(f->eph), f->nonce,
                                            sizeof(f->nonce) - 1, sig, sig_len),
                         STEK_ERR_VERIFY);
        assert_int_equal(stek_reqsig_verify(f->pub[k], GROUP, f->eph, sizeof(f->eph) - 1, f->nonce,
                                            sizeof(f->nonce), sig, sig_len),
                         STEK_ERR_VERIFY);
        assert_int_equal(ERR_peek_error(), 0);
        free(sig);
    }
}

static void test_verify_bad_signature(void **state)
{
    fixture *f = *state;
    for (int k = 0; k < K_COUNT; k++) {
        uint8_t *sig = NULL;
        size_t sig_len = 0;
        sign_ok(f, k, &sig, &sig_len);

        /* One flipped byte, at every position. */
        for (size_t i = 0; i < sig_len; i++) {
            sig[i] ^= 0x01;
            expect_verify_fail(f, f->pub[k], sig, sig_len);
            sig[i] ^= 0x01;
        }
        assert_int_equal(verify(f, f->pub[k], sig, sig_len), STEK_OK);

        expect_verify_fail(f, f->pub[k], sig, sig_len - 1); /* truncated */
        expect_verify_fail(f, f->pub[k], sig, 1);
        expect_verify_fail(f, f->pub[k], sig, 0);  /* empty */
        expect_verify_fail(f, f->pub[k], NULL, 0); /* an unset bytes field */

        /* Trailing bytes after a valid signature. */
        uint8_t *longer = malloc(sig_len + 1);
        assert_non_null(longer);
        memcpy(longer, sig, sig_len);
        longer[sig_len] = 0;
        expect_verify_fail(f, f->pub[k], longer, sig_len + 1);
        free(longer);

        /* Over the size limit, without being read. */
        uint8_t huge[STEK_REQSIG_MAX_BYTES + 1];
        memset(huge, 0x30, sizeof(huge));
        expect_verify_fail(f, f->pub[k], huge, sizeof(huge));

        /* Another host's key, and the other key types' signatures. */
        expect_verify_fail(f, f->other[k], sig, sig_len);
        for (int j = 0; j < K_COUNT; j++)
            if (j != k)
                expect_verify_fail(f, f->pub[j], sig, sig_len);
        free(sig);
    }
}

static void test_verify_garbage(void **state)
{
    fixture *f = *state;
    uint8_t buf[STEK_REQSIG_MAX_BYTES];
    /* DER-looking garbage: a SEQUENCE of two INTEGERs that are not a signature. */
    const uint8_t der[] = {0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01};
    const uint8_t bad_der[] = {0x30, 0x82, 0xff, 0xff, 0x02, 0x01};
    for (int k = 0; k < K_COUNT; k++) {
        expect_verify_fail(f, f->pub[k], der, sizeof(der));
        expect_verify_fail(f, f->pub[k], bad_der, sizeof(bad_der));
        memset(buf, 0, sizeof(buf));
        expect_verify_fail(f, f->pub[k], buf, 256);
        memset(buf, 0xff, sizeof(buf));
        expect_verify_fail(f, f->pub[k], buf, 256);
        for (int i = 0; i < 64; i++) {
            size_t len = 0;
            assert_int_equal(RAND_bytes((uint8_t *)&len, sizeof(len)), 1);
            len = len % sizeof(buf) + 1;
            assert_int_equal(RAND_bytes(buf, (int)len), 1);
            if (i % 2 == 0)
                buf[0] = 0x30;
            expect_verify_fail(f, f->pub[k], buf, len);
        }
    }
}

static void test_verify_wrong_rsa_padding(void **state)
{
    fixture *f = *state;
    uint8_t *sig = NULL;
    size_t sig_len = 0;

    /* The control: a hand-made PSS signature with salt 32 is accepted. */
    sign_by_hand(f, f->priv[K_RSA], RSA_PKCS1_PSS_PADDING, 32, &sig, &sig_len);
    assert_int_equal(verify(f, f->pub[K_RSA], sig, sig_len), STEK_OK);
    free(sig);

    /* PKCS#1 v1.5: OpenSSL's default for an RSA key. */
    sign_by_hand(f, f->priv[K_RSA], -1, 0, &sig, &sig_len);
    assert_int_equal(sig_len, 256);
    expect_verify_fail(f, f->pub[K_RSA], sig, sig_len);
    free(sig);
    sign_by_hand(f, f->priv[K_RSA], RSA_PKCS1_PADDING, 0, &sig, &sig_len);
    expect_verify_fail(f, f->pub[K_RSA], sig, sig_len);
    free(sig);

    /* PSS with another salt length, even though everything else matches. */
    const int salts[] = {20, 0, 31, 33, RSA_PSS_SALTLEN_MAX};
    for (size_t i = 0; i < sizeof(salts) / sizeof(salts[0]); i++) {
        sign_by_hand(f, f->priv[K_RSA], RSA_PKCS1_PSS_PADDING, salts[i], &sig, &sig_len);
        expect_verify_fail(f, f->pub[K_RSA], sig, sig_len);
        free(sig);
    }
}

/* EVP_PKEY_Q_keygen takes no size for "RSA-PSS" in OpenSSL 3.0: build it by hand. */
static EVP_PKEY *rsa_pss_keygen(void)
{
    EVP_PKEY *k = NULL;
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "RSA-PSS", NULL);
    assert_non_null(c);
    assert_int_equal(EVP_PKEY_keygen_init(c), 1);
    assert_int_equal(EVP_PKEY_CTX_set_rsa_keygen_bits(c, 2048), 1);
    assert_int_equal(EVP_PKEY_generate(c, &k), 1);
    assert_int_equal(EVP_PKEY_get_base_id(k), EVP_PKEY_RSA_PSS);
    EVP_PKEY_CTX_free(c);
    return k;
}

static void test_unsupported_keys(void **state)
{
    fixture *f = *state;
    EVP_PKEY *keys[] = {
        EVP_PKEY_Q_keygen(NULL, NULL, "ED25519"),
        EVP_PKEY_Q_keygen(NULL, NULL, "ED448"),
        EVP_PKEY_Q_keygen(NULL, NULL, "X25519"),
        EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-521"),
        EVP_PKEY_Q_keygen(NULL, NULL, "EC", "secp256k1"),
        EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024),
        rsa_pss_keygen(), /* an id-RSASSA-PSS certificate key */
    };
    assert_int_equal(ERR_peek_error(), 0);
    uint8_t dummy[64];
    memset(dummy, 0x30, sizeof(dummy));
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        assert_non_null(keys[i]);
        uint8_t *sig = (uint8_t *)dummy;
        size_t sig_len = 99;
        assert_int_equal(stek_reqsig_sign(keys[i], GROUP, f->eph, sizeof(f->eph), f->nonce,
                                          sizeof(f->nonce), &sig, &sig_len),
                         STEK_ERR_INVALID_ARG);
        assert_null(sig);
        assert_int_equal(sig_len, 0);
        assert_int_equal(verify(f, keys[i], dummy, sizeof(dummy)), STEK_ERR_INVALID_ARG);
        assert_int_equal(ERR_peek_error(), 0);
        EVP_PKEY_free(keys[i]);
    }
}

static void test_null_args(void **state)
{
    fixture *f = *state;
    EVP_PKEY *k = f->priv[K_P256];
    uint8_t *sig = NULL;
    size_t sig_len = 0;

    assert_int_equal(stek_reqsig_sign(NULL, GROUP, f->eph, 65, f->nonce, 32, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, NULL, f->eph, 65, f->nonce, 32, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, GROUP, NULL, 65, f->nonce, 32, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, GROUP, f->eph, 65, NULL, 32, &sig, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, GROUP, f->eph, 65, f->nonce, 32, NULL, &sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_sign(k, GROUP, f->eph, 65, f->nonce, 32, &sig, NULL),
                     STEK_ERR_INVALID_ARG);
    assert_null(sig);

    sign_ok(f, K_P256, &sig, &sig_len);
    EVP_PKEY *pub = f->pub[K_P256];
    assert_int_equal(stek_reqsig_verify(NULL, GROUP, f->eph, 65, f->nonce, 32, sig, sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_verify(pub, NULL, f->eph, 65, f->nonce, 32, sig, sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_verify(pub, GROUP, NULL, 65, f->nonce, 32, sig, sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_verify(pub, GROUP, f->eph, 65, NULL, 32, sig, sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_verify(pub, GROUP, f->eph, 65, f->nonce, 32, NULL, sig_len),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_reqsig_verify(pub, GROUP, f->eph, 65, f->nonce, 32, sig, sig_len),
                     STEK_OK);
    free(sig);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_input_bytes),        cmocka_unit_test(test_input_rejects),
        cmocka_unit_test(test_input_lengths),      cmocka_unit_test(test_sign_verify_roundtrip),
        cmocka_unit_test(test_verify_wrong_input), cmocka_unit_test(test_verify_bad_signature),
        cmocka_unit_test(test_verify_garbage),     cmocka_unit_test(test_verify_wrong_rsa_padding),
        cmocka_unit_test(test_unsupported_keys),   cmocka_unit_test(test_null_args),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
