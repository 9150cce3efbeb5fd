#include "hostwrap.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>

struct stek_host_eph {
    EVP_PKEY *pkey;
};

/* Records an OpenSSL failure with its reason, then empties the queue. */
static stek_status crypto_fail(const char *what)
{
    unsigned long e = ERR_peek_last_error();
    const char *why = e != 0 ? ERR_reason_error_string(e) : NULL;
    stek_status st = stek_error_set(STEK_ERR_CRYPTO, "%s: %s", what, why ? why : "failed");
    ERR_clear_error();
    return st;
}

stek_status stek_host_eph_generate(stek_host_eph **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    stek_host_eph *eph = calloc(1, sizeof(*eph));
    STEK_ENSURE(eph != NULL, STEK_ERR_NOMEM);
    eph->pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (eph->pkey == NULL) {
        free(eph);
        return crypto_fail("EVP_PKEY_Q_keygen(P-256)");
    }
    *out = eph;
    return STEK_OK;
}

stek_status stek_host_eph_public(const stek_host_eph *eph, uint8_t out[STEK_P256_POINT_BYTES])
{
    STEK_ENSURE_REF(eph);
    STEK_ENSURE_REF(out);
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(eph->pkey, OSSL_PKEY_PARAM_PUB_KEY, out,
                                        STEK_P256_POINT_BYTES, &len) != 1)
        return crypto_fail("EVP_PKEY_get_octet_string_param(pub)");
    /* The default point format is uncompressed; anything else is a bug. */
    STEK_ENSURE(len == STEK_P256_POINT_BYTES && out[0] == 0x04, STEK_ERR_CRYPTO);
    return STEK_OK;
}

void stek_host_eph_free(stek_host_eph *eph)
{
    if (eph == NULL)
        return;
    EVP_PKEY_free(eph->pkey);
    free(eph);
}

/* The HSM's point as an EVP_PKEY; the caller has already validated it. */
static stek_status peer_from_point(const uint8_t *pt, size_t len, EVP_PKEY **peer)
{
    stek_status st = STEK_OK;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)"prime256v1", 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, len),
        OSSL_PARAM_construct_end(),
    };
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, peer, EVP_PKEY_PUBLIC_KEY, params) != 1)
        st = crypto_fail("EVP_PKEY_fromdata(hsm point)");
    EVP_PKEY_CTX_free(ctx);
    return st;
}

/* Z = x-coordinate of eph·peer, written straight into a locked buffer. */
static stek_status ecdh_z(EVP_PKEY *priv, EVP_PKEY *peer, stek_secret **z)
{
    stek_status st = STEK_OK;
    EVP_PKEY_CTX *ctx = NULL;
    size_t zlen = STEK_ECDH_Z_BYTES;

    STEK_GUARD(stek_secret_new(STEK_ECDH_Z_BYTES, z));
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
    if (ctx == NULL || EVP_PKEY_derive_init(ctx) != 1 || EVP_PKEY_derive_set_peer(ctx, peer) != 1 ||
        EVP_PKEY_derive(ctx, stek_secret_data(*z), &zlen) != 1)
        STEK_GUARD_GOTO(crypto_fail("ECDH derive"));
    /* OpenSSL pads Z to the field size; a short Z would not match the HSM. */
    STEK_ENSURE_GOTO(zlen == STEK_ECDH_Z_BYTES, STEK_ERR_CRYPTO);

done:
    EVP_PKEY_CTX_free(ctx);
    if (st != STEK_OK) {
        stek_secret_free(*z);
        *z = NULL;
    }
    return st;
}

/* KEK = AES-256-CBC(Z, iv, label blocks), mirroring CKM_AES_CBC_ENCRYPT_DATA. */
static stek_status cbc_kek(const stek_secret *z, const uint8_t iv[STEK_KEK_IV_BYTES],
                           stek_secret **kek)
{
    stek_status st = STEK_OK;
    EVP_CIPHER_CTX *ctx = NULL;
    uint8_t labels[STEK_KEK_LABEL_BYTES];
    int n = 0, fin = 0;

    stek_kek_label_blocks(labels);
    STEK_GUARD(stek_secret_new(STEK_KEK_BYTES, kek));
    uint8_t *out = stek_secret_data(*kek);
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL ||
        EVP_EncryptInit_ex(ctx, EVP_aes_256_cbc(), NULL, stek_secret_cdata(z), iv) != 1 ||
        EVP_CIPHER_CTX_set_padding(ctx, 0) != 1 ||
        EVP_EncryptUpdate(ctx, out, &n, labels, sizeof(labels)) != 1 ||
        EVP_EncryptFinal_ex(ctx, out + n, &fin) != 1)
        STEK_GUARD_GOTO(crypto_fail("AES-256-CBC KEK"));
    STEK_ENSURE_GOTO(n + fin == STEK_KEK_BYTES, STEK_ERR_CRYPTO);

done:
    /* Frees the expanded key schedule of Z along with the context. */
    EVP_CIPHER_CTX_free(ctx);
    if (st != STEK_OK) {
        stek_secret_free(*kek);
        *kek = NULL;
    }
    return st;
}

stek_status stek_host_kek_derive(const stek_host_eph *eph, const uint8_t *hsm_pub,
                                 size_t hsm_pub_len, const char *group, uint32_t generation,
                                 stek_secret **kek)
{
    stek_status st = STEK_OK;
    EVP_PKEY *peer = NULL;
    stek_secret *z = NULL;
    uint8_t host_pub[STEK_P256_POINT_BYTES];
    uint8_t iv[STEK_KEK_IV_BYTES];

    STEK_ENSURE_REF(kek);
    *kek = NULL;
    STEK_ENSURE_REF(eph);
    STEK_GUARD(stek_p256_point_check(hsm_pub, hsm_pub_len));
    STEK_GUARD(stek_host_eph_public(eph, host_pub));
    STEK_GUARD(stek_kek_iv(hsm_pub, host_pub, group, generation, iv));

    STEK_GUARD_GOTO(peer_from_point(hsm_pub, hsm_pub_len, &peer));
    STEK_GUARD_GOTO(ecdh_z(eph->pkey, peer, &z));
    STEK_GUARD_GOTO(cbc_kek(z, iv, kek));

done:
    stek_secret_free(z);
    EVP_PKEY_free(peer);
    return st;
}

stek_status stek_host_unwrap(const stek_secret *kek, const uint8_t *blob, size_t blob_len,
                             stek_secret **key)
{
    stek_status st = STEK_OK;
    EVP_CIPHER_CTX *ctx = NULL;
    stek_secret *out = NULL;
    int n = 0, fin = 0;

    STEK_ENSURE_REF(key);
    *key = NULL;
    STEK_ENSURE_REF(kek);
    STEK_ENSURE_REF(blob);
    STEK_ENSURE(stek_secret_len(kek) == STEK_KEK_BYTES, STEK_ERR_INVALID_ARG);
    if (blob_len != STEK_WRAPPED_KEY_BYTES)
        STEK_BAIL(STEK_ERR_VERIFY, "wrapped key: %zu bytes, want %d", blob_len,
                  STEK_WRAPPED_KEY_BYTES);

    /*
     * RFC 5649 unwrapping works in place over the whole input length before
     * it strips the integrity block, so the buffer gets blob_len bytes and is
     * truncated (tail cleansed) afterwards.
     */
    STEK_GUARD(stek_secret_new(blob_len, &out));
    uint8_t *o = stek_secret_data(out);
    ctx = EVP_CIPHER_CTX_new();
    STEK_ENSURE_GOTO(ctx != NULL, STEK_ERR_NOMEM);
    /* Wrap modes are refused by EVP unless the caller opts in. */
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    if (EVP_DecryptInit_ex(ctx, EVP_aes_256_wrap_pad(), NULL, stek_secret_cdata(kek), NULL) != 1)
        STEK_GUARD_GOTO(crypto_fail("AES-256-KWP init"));
    /* On a well-formed length the only way to fail is the integrity check. */
    if (EVP_DecryptUpdate(ctx, o, &n, blob, (int)blob_len) != 1 ||
        EVP_DecryptFinal_ex(ctx, o + n, &fin) != 1) {
        ERR_clear_error();
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, "wrapped key: integrity check failed");
    }
    if (n + fin != STEK_TICKET_KEY_BYTES)
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, "wrapped key: unwraps to %d bytes, want %d", n + fin,
                       STEK_TICKET_KEY_BYTES);
    STEK_GUARD_GOTO(stek_secret_truncate(out, STEK_TICKET_KEY_BYTES));
    /* A zero key is what a broken HSM template or a bug would produce. */
    if (stek_ct_is_zero(o, STEK_TICKET_KEY_BYTES))
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, "wrapped key: unwraps to an all-zero key");
    *key = out;
    out = NULL;

done:
    EVP_CIPHER_CTX_free(ctx);
    stek_secret_free(out);
    return st;
}

stek_status stek_host_ticket_name(const stek_secret *key, uint8_t name[STEK_TICKET_NAME_BYTES])
{
    STEK_ENSURE_REF(key);
    STEK_ENSURE_REF(name);
    STEK_ENSURE(stek_secret_len(key) == STEK_TICKET_KEY_BYTES, STEK_ERR_INVALID_ARG);
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    static const char label[] = STEK_TICKET_NAME_LABEL;
    if (HMAC(EVP_sha256(), stek_secret_cdata(key), (int)STEK_TICKET_KEY_BYTES,
             (const unsigned char *)label, sizeof(label) - 1, mac, &len) == NULL ||
        len < STEK_TICKET_NAME_BYTES)
        STEK_BAIL(STEK_ERR_CRYPTO, "HMAC-SHA256 failed");
    memcpy(name, mac, STEK_TICKET_NAME_BYTES);
    return STEK_OK;
}
