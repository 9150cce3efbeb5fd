/*
 * hostwrap.h against an HSM side played by OpenSSL alone: the test makes its
 * own "HSM" key pair, computes Z, the KEK (from the documented layout, not
 * from kek.c) and the RFC 5649 blob, and the host side must get the key back.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "hostwrap.h"

#define GROUP "edge-web"
#define GEN 3u

/* The simulated HSM: its ephemeral key pair and its public point. */
typedef struct {
    EVP_PKEY *key;
    uint8_t pub[STEK_P256_POINT_BYTES];
} hsm_side;

static void hsm_new(hsm_side *h)
{
    size_t len = 0;
    h->key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    assert_non_null(h->key);
    assert_int_equal(EVP_PKEY_get_octet_string_param(h->key, OSSL_PKEY_PARAM_PUB_KEY, h->pub,
                                                     sizeof(h->pub), &len),
                     1);
    assert_int_equal(len, STEK_P256_POINT_BYTES);
}

static EVP_PKEY *pub_key(const uint8_t *pt)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)"P-256", 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, 65),
        OSSL_PARAM_construct_end(),
    };
    EVP_PKEY *k = NULL;
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    assert_non_null(c);
    assert_int_equal(EVP_PKEY_fromdata_init(c), 1);
    assert_int_equal(EVP_PKEY_fromdata(c, &k, EVP_PKEY_PUBLIC_KEY, params), 1);
    EVP_PKEY_CTX_free(c);
    return k;
}

/* HSM steps 1-2: Z = ECDH, KEK = AES-256-CBC(Z, SHA-256(ctx)[0:16], labels). */
static void hsm_kek(const hsm_side *h, const uint8_t host_pub[65], const char *group, uint32_t gen,
                    uint8_t kek[32])
{
    uint8_t z[32];
    size_t zlen = sizeof(z);
    EVP_PKEY *peer = pub_key(host_pub);
    EVP_PKEY_CTX *d = EVP_PKEY_CTX_new_from_pkey(NULL, h->key, NULL);
    assert_non_null(d);
    assert_int_equal(EVP_PKEY_derive_init(d), 1);
    assert_int_equal(EVP_PKEY_derive_set_peer(d, peer), 1);
    assert_int_equal(EVP_PKEY_derive(d, z, &zlen), 1);
    assert_int_equal(zlen, 32);
    EVP_PKEY_CTX_free(d);
    EVP_PKEY_free(peer);

    uint8_t ctx[65 + 65 + 1 + 64 + 4 + 11], digest[32];
    size_t n = 0, glen = strlen(group);
    memcpy(ctx + n, h->pub, 65);
    n += 65;
    memcpy(ctx + n, host_pub, 65);
    n += 65;
    ctx[n++] = (uint8_t)glen;
    memcpy(ctx + n, group, glen);
    n += glen;
    for (int s = 24; s >= 0; s -= 8)
        ctx[n++] = (uint8_t)(gen >> s);
    memcpy(ctx + n, "stek-kek-v1", 11);
    n += 11;
    assert_non_null(SHA256(ctx, n, digest));

    uint8_t labels[32] = {0};
    memcpy(labels, "stek-kek-v1", 11);
    memcpy(labels + 16, "stek-kek-v1", 11);
    labels[31] = 1;

    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    assert_non_null(c);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_cbc(), NULL, z, digest), 1);
    assert_int_equal(EVP_CIPHER_CTX_set_padding(c, 0), 1);
    assert_int_equal(EVP_EncryptUpdate(c, kek, &o1, labels, sizeof(labels)), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, kek + o1, &o2), 1);
    assert_int_equal(o1 + o2, 32);
    EVP_CIPHER_CTX_free(c);
}

/* HSM step 3: RFC 5649 wrap; returns the blob length. */
static size_t hsm_wrap(const uint8_t kek[32], const uint8_t *key, size_t key_len, uint8_t *blob)
{
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    assert_non_null(c);
    EVP_CIPHER_CTX_set_flags(c, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_wrap_pad(), NULL, kek, NULL), 1);
    assert_int_equal(EVP_EncryptUpdate(c, blob, &o1, key, (int)key_len), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, blob + o1, &o2), 1);
    EVP_CIPHER_CTX_free(c);
    return (size_t)(o1 + o2);
}

/* Shared per-test state: one host, one HSM, one wrapped ticket key. */
typedef struct {
    stek_host_eph *host;
    uint8_t host_pub[65];
    hsm_side hsm;
    uint8_t key[STEK_TICKET_KEY_BYTES];
    uint8_t blob[STEK_WRAPPED_KEY_BYTES + 16];
    size_t blob_len;
} fixture;

static int setup(void **state)
{
    fixture *f = test_calloc(1, sizeof(*f));
    assert_int_equal(stek_host_eph_generate(&f->host), STEK_OK);
    assert_int_equal(stek_host_eph_public(f->host, f->host_pub), STEK_OK);
    hsm_new(&f->hsm);
    assert_int_equal(RAND_bytes(f->key, sizeof(f->key)), 1);
    uint8_t kek[32];
    hsm_kek(&f->hsm, f->host_pub, GROUP, GEN, kek);
    f->blob_len = hsm_wrap(kek, f->key, sizeof(f->key), f->blob);
    assert_int_equal(f->blob_len, STEK_WRAPPED_KEY_BYTES);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    stek_host_eph_free(f->host);
    EVP_PKEY_free(f->hsm.key);
    test_free(f);
    return 0;
}

/* Host side: derive the KEK for (group, gen) and unwrap blob; returns the status. */
static stek_status host_unwrap(fixture *f, const stek_host_eph *host, const char *group,
                               uint32_t gen, const uint8_t *blob, size_t blob_len,
                               stek_secret **key)
{
    stek_secret *kek = NULL;
    stek_status st = stek_host_kek_derive(host, f->hsm.pub, sizeof(f->hsm.pub), group, gen, &kek);
    if (st == STEK_OK)
        st = stek_host_unwrap(kek, blob, blob_len, key);
    stek_secret_free(kek);
    return st;
}

static void test_public_point_is_valid(void **state)
{
    fixture *f = *state;
    assert_int_equal(f->host_pub[0], 0x04);
    assert_int_equal(stek_p256_point_check(f->host_pub, sizeof(f->host_pub)), STEK_OK);
    uint8_t again[65];
    assert_int_equal(stek_host_eph_public(f->host, again), STEK_OK);
    assert_memory_equal(again, f->host_pub, 65);
}

static void test_round_trip(void **state)
{
    fixture *f = *state;
    stek_secret *key = NULL;
    assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, f->blob, f->blob_len, &key), STEK_OK);
    assert_non_null(key);
    assert_int_equal(stek_secret_len(key), STEK_TICKET_KEY_BYTES);
    assert_memory_equal(stek_secret_cdata(key), f->key, STEK_TICKET_KEY_BYTES);
    stek_secret_free(key);
}

static void test_kek_matches_hsm_side(void **state)
{
    fixture *f = *state;
    uint8_t want[32];
    stek_secret *kek = NULL;
    hsm_kek(&f->hsm, f->host_pub, GROUP, GEN, want);
    assert_int_equal(
        stek_host_kek_derive(f->host, f->hsm.pub, sizeof(f->hsm.pub), GROUP, GEN, &kek), STEK_OK);
    assert_int_equal(stek_secret_len(kek), STEK_KEK_BYTES);
    assert_memory_equal(stek_secret_cdata(kek), want, 32);
    /* CBC chaining: the two halves differ although the labels share 15 bytes. */
    assert_memory_not_equal(stek_secret_cdata(kek), stek_secret_cdata(kek) + 16, 16);
    stek_secret_free(kek);
}

static void test_other_host_cannot_unwrap(void **state)
{
    fixture *f = *state;
    stek_host_eph *other = NULL;
    stek_secret *key = (stek_secret *)f; /* must be reset to NULL on failure */
    assert_int_equal(stek_host_eph_generate(&other), STEK_OK);
    assert_int_equal(host_unwrap(f, other, GROUP, GEN, f->blob, f->blob_len, &key),
                     STEK_ERR_VERIFY);
    assert_null(key);
    stek_host_eph_free(other);
}

static void test_tampered_blob(void **state)
{
    fixture *f = *state;
    for (size_t i = 0; i < f->blob_len; i += 7) {
        stek_secret *key = NULL;
        f->blob[i] ^= 0x01;
        assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, f->blob, f->blob_len, &key),
                         STEK_ERR_VERIFY);
        assert_null(key);
        f->blob[i] ^= 0x01;
    }
}

static void test_truncated_or_extended_blob(void **state)
{
    fixture *f = *state;
    const size_t lens[] = {0, 1, 8, 16, 80, 87, 89, 96};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        stek_secret *key = NULL;
        assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, f->blob, lens[i], &key),
                         STEK_ERR_VERIFY);
        assert_null(key);
    }
}

static void test_wrong_group(void **state)
{
    fixture *f = *state;
    stek_secret *key = NULL;
    assert_int_equal(host_unwrap(f, f->host, "edge-api", GEN, f->blob, f->blob_len, &key),
                     STEK_ERR_VERIFY);
    assert_null(key);
    assert_int_equal(host_unwrap(f, f->host, "Edge Web", GEN, f->blob, f->blob_len, &key),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(host_unwrap(f, f->host, NULL, GEN, f->blob, f->blob_len, &key),
                     STEK_ERR_INVALID_ARG);
    assert_null(key);
}

static void test_wrong_generation(void **state)
{
    fixture *f = *state;
    stek_secret *key = NULL;
    assert_int_equal(host_unwrap(f, f->host, GROUP, GEN + 1, f->blob, f->blob_len, &key),
                     STEK_ERR_VERIFY);
    assert_int_equal(host_unwrap(f, f->host, GROUP, GEN - 1, f->blob, f->blob_len, &key),
                     STEK_ERR_VERIFY);
    assert_null(key);
}

static void test_bad_hsm_point(void **state)
{
    fixture *f = *state;
    stek_secret *kek = (stek_secret *)f;
    uint8_t pt[97];
    memcpy(pt, f->hsm.pub, 65);

    pt[64] ^= 1; /* off the curve */
    assert_int_equal(stek_host_kek_derive(f->host, pt, 65, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    assert_null(kek);
    pt[64] ^= 1;
    assert_int_equal(stek_host_kek_derive(f->host, pt, 64, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    assert_int_equal(stek_host_kek_derive(f->host, pt, 33, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    const uint8_t inf[1] = {0};
    assert_int_equal(stek_host_kek_derive(f->host, inf, 1, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    assert_int_equal(stek_host_kek_derive(f->host, NULL, 0, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);

    /* A secp256k1 point has the right shape but the wrong curve. */
    EVP_PKEY *k1 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "secp256k1");
    size_t len = 0;
    assert_non_null(k1);
    assert_int_equal(
        EVP_PKEY_get_octet_string_param(k1, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof(pt), &len), 1);
    EVP_PKEY_free(k1);
    assert_int_equal(len, 65);
    assert_int_equal(stek_host_kek_derive(f->host, pt, len, GROUP, GEN, &kek), STEK_ERR_BAD_POINT);
    assert_null(kek);
}

static void test_wrapped_key_of_wrong_size_or_zero(void **state)
{
    fixture *f = *state;
    uint8_t kek_bytes[32], blob[128], key[96];
    hsm_kek(&f->hsm, f->host_pub, GROUP, GEN, kek_bytes);
    assert_int_equal(RAND_bytes(key, sizeof(key)), 1);

    /* 73..79 bytes pad to the same 88-byte blob; the unwrapped length tells. */
    const size_t sizes[] = {73, 79, 72, 96};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        stek_secret *out = NULL;
        size_t n = hsm_wrap(kek_bytes, key, sizes[i], blob);
        assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, blob, n, &out), STEK_ERR_VERIFY);
        assert_null(out);
    }

    stek_secret *out = NULL;
    memset(key, 0, sizeof(key));
    size_t n = hsm_wrap(kek_bytes, key, STEK_TICKET_KEY_BYTES, blob);
    assert_int_equal(n, STEK_WRAPPED_KEY_BYTES);
    assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, blob, n, &out), STEK_ERR_VERIFY);
    assert_non_null(strstr(stek_error_detail(), "zero"));
    assert_null(out);
}

static void test_bad_args(void **state)
{
    fixture *f = *state;
    stek_secret *kek = NULL, *key = NULL, *short_kek = NULL;
    uint8_t pub[65];

    assert_int_equal(stek_host_eph_generate(NULL), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_host_eph_public(NULL, pub), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_host_eph_public(f->host, NULL), STEK_ERR_INVALID_ARG);
    stek_host_eph_free(NULL);

    assert_int_equal(stek_host_kek_derive(NULL, f->hsm.pub, 65, GROUP, GEN, &kek),
                     STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_host_kek_derive(f->host, f->hsm.pub, 65, GROUP, GEN, NULL),
                     STEK_ERR_INVALID_ARG);
    assert_null(kek);

    assert_int_equal(stek_host_kek_derive(f->host, f->hsm.pub, 65, GROUP, GEN, &kek), STEK_OK);
    assert_int_equal(stek_host_unwrap(NULL, f->blob, f->blob_len, &key), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_host_unwrap(kek, NULL, f->blob_len, &key), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_host_unwrap(kek, f->blob, f->blob_len, NULL), STEK_ERR_INVALID_ARG);
    assert_null(key);

    /* A KEK of the wrong size is a caller bug, not a verification failure. */
    assert_int_equal(stek_secret_new(16, &short_kek), STEK_OK);
    assert_int_equal(stek_host_unwrap(short_kek, f->blob, f->blob_len, &key), STEK_ERR_INVALID_ARG);
    assert_null(key);
    stek_secret_free(short_kek);
    stek_secret_free(kek);
}

static void test_two_hosts_get_the_same_key(void **state)
{
    fixture *f = *state;
    stek_host_eph *second = NULL;
    uint8_t second_pub[65], kek[32], blob[STEK_WRAPPED_KEY_BYTES];
    stek_secret *a = NULL, *b = NULL;
    assert_int_equal(stek_host_eph_generate(&second), STEK_OK);
    assert_int_equal(stek_host_eph_public(second, second_pub), STEK_OK);
    assert_memory_not_equal(second_pub, f->host_pub, 65);

    hsm_kek(&f->hsm, second_pub, GROUP, GEN, kek);
    assert_int_equal(hsm_wrap(kek, f->key, sizeof(f->key), blob), sizeof(blob));
    assert_memory_not_equal(blob, f->blob, sizeof(blob));

    assert_int_equal(host_unwrap(f, f->host, GROUP, GEN, f->blob, f->blob_len, &a), STEK_OK);
    assert_int_equal(host_unwrap(f, second, GROUP, GEN, blob, sizeof(blob), &b), STEK_OK);
    assert_memory_equal(stek_secret_cdata(a), stek_secret_cdata(b), STEK_TICKET_KEY_BYTES);
    /* Each host's blob is useless to the other. */
    stek_secret *x = NULL;
    assert_int_equal(host_unwrap(f, second, GROUP, GEN, f->blob, f->blob_len, &x), STEK_ERR_VERIFY);
    stek_secret_free(a);
    stek_secret_free(b);
    stek_host_eph_free(second);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_public_point_is_valid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kek_matches_hsm_side, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_host_cannot_unwrap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tampered_blob, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_or_extended_blob, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_group, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_generation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_hsm_point, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrapped_key_of_wrong_size_or_zero, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_args, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_hosts_get_the_same_key, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
