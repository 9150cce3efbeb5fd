#include "kek.h"

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

/* The P-256 field prime, big-endian; coordinates are integers below it. */
static const uint8_t p256_field[32] = {
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
};

/*
 * OpenSSL's decoder checks the field range and the curve equation, and its
 * public-key check adds infinity and the order, so the curve arithmetic is
 * left to it. The structural checks come first so that each defect gets its
 * own detail, and because OpenSSL accepts encodings the contract forbids: a
 * lone 0x00 (infinity), compressed and hybrid (0x06/0x07) points.
 */
stek_status stek_p256_point_check(const uint8_t *pt, size_t len)
{
    stek_status st = STEK_OK;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;

    if (pt == NULL || len != STEK_P256_POINT_BYTES)
        STEK_BAIL(STEK_ERR_BAD_POINT, "EC point: length %zu, want %d (uncompressed P-256)",
                  pt == NULL ? (size_t)0 : len, STEK_P256_POINT_BYTES);
    if (pt[0] != 0x04)
        STEK_BAIL(STEK_ERR_BAD_POINT, "EC point: prefix 0x%02x, want 0x04 (uncompressed)", pt[0]);
    if (memcmp(pt + 1, p256_field, 32) >= 0 || memcmp(pt + 33, p256_field, 32) >= 0)
        STEK_BAIL(STEK_ERR_BAD_POINT, "EC point: coordinate not below the P-256 field prime");

    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)"prime256v1", 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, len),
        OSSL_PARAM_construct_end(),
    };
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    STEK_ENSURE_GOTO(ctx != NULL, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_PKEY_fromdata_init(ctx) == 1, STEK_ERR_CRYPTO);
    /* fromdata fails when the point does not satisfy the curve equation. */
    if (EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
        STEK_BAIL_GOTO(STEK_ERR_BAD_POINT, "EC point: not on the P-256 curve");
    EVP_PKEY_CTX_free(ctx);
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    STEK_ENSURE_GOTO(ctx != NULL, STEK_ERR_CRYPTO);
    /* The full public check adds "not infinity" and "n·Q = O". */
    if (EVP_PKEY_public_check(ctx) != 1)
        STEK_BAIL_GOTO(STEK_ERR_BAD_POINT, "EC point: fails the P-256 public-key check");

done:
    /* A rejected point is an expected outcome; keep OpenSSL's queue clean. */
    ERR_clear_error();
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    return st;
}

stek_status stek_group_name_check(const char *group)
{
    STEK_ENSURE_REF(group);
    /* Bounded scan: an unterminated buffer is never read past max+1 bytes. */
    size_t len = 0;
    for (; len <= STEK_GROUP_MAX_BYTES && group[len] != '\0'; len++) {
        char c = group[len];
        bool ok =
            (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
        if (!ok)
            STEK_BAIL(STEK_ERR_INVALID_ARG, "group name: byte %zu is not in [a-z0-9._-]", len);
    }
    if (len == 0 || len > STEK_GROUP_MAX_BYTES)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "group name: length must be 1..%d", STEK_GROUP_MAX_BYTES);
    return STEK_OK;
}

stek_status stek_kek_iv(const uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                        const uint8_t host_pub[STEK_P256_POINT_BYTES], const char *group,
                        uint32_t generation, uint8_t iv[STEK_KEK_IV_BYTES])
{
    stek_status st = STEK_OK;
    EVP_MD_CTX *md = NULL;
    uint8_t digest[32];
    unsigned int dlen = 0;

    STEK_ENSURE_REF(hsm_pub);
    STEK_ENSURE_REF(host_pub);
    STEK_ENSURE_REF(iv);
    STEK_GUARD(stek_group_name_check(group));

    /* The length prefix keeps (group, generation) unambiguous in the hash. */
    const uint8_t glen = (uint8_t)strlen(group);
    const uint8_t gen_be[4] = {(uint8_t)(generation >> 24), (uint8_t)(generation >> 16),
                               (uint8_t)(generation >> 8), (uint8_t)generation};

    md = EVP_MD_CTX_new();
    STEK_ENSURE_GOTO(md != NULL, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestUpdate(md, hsm_pub, STEK_P256_POINT_BYTES) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestUpdate(md, host_pub, STEK_P256_POINT_BYTES) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestUpdate(md, &glen, 1) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestUpdate(md, group, glen) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestUpdate(md, gen_be, sizeof(gen_be)) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(
        EVP_DigestUpdate(md, STEK_KEK_CONTEXT_LABEL, sizeof(STEK_KEK_CONTEXT_LABEL) - 1) == 1,
        STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_DigestFinal_ex(md, digest, &dlen) == 1 && dlen == sizeof(digest),
                     STEK_ERR_CRYPTO);
    memcpy(iv, digest, STEK_KEK_IV_BYTES);

done:
    EVP_MD_CTX_free(md);
    return st;
}

void stek_kek_label_blocks(uint8_t out[STEK_KEK_LABEL_BYTES])
{
    /*
     * CBC chaining already separates the halves; distinct blocks also keep
     * them apart under an HSM that would process the blocks independently.
     */
    _Static_assert(sizeof(STEK_KEK_CONTEXT_LABEL) - 1 < 16, "label must leave room for the index");
    memset(out, 0, STEK_KEK_LABEL_BYTES);
    for (unsigned i = 0; i < STEK_KEK_LABEL_BYTES / 16; i++) {
        memcpy(out + 16 * i, STEK_KEK_CONTEXT_LABEL, sizeof(STEK_KEK_CONTEXT_LABEL) - 1);
        out[16 * i + 15] = (uint8_t)i;
    }
}
