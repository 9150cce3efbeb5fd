#include "reqsig.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/rsa.h>

/* Each field is framed by a u32be length but kept to what a request can carry. */
#define REQSIG_FIELD_MAX 65535u
#define REQSIG_CTX_LEN (sizeof(STEK_REQ_CONTEXT) - 1)
#define REQSIG_PSS_SALT 32
#define REQSIG_RSA_MIN_BITS 2048
/* RSA-8192 is the largest modulus whose signature fits STEK_REQSIG_MAX_BYTES. */
#define REQSIG_RSA_MAX_BITS 8192

/* Records an OpenSSL failure with its reason, then empties the queue. */
static stek_status crypto_fail(const char *what)
{
    unsigned long e = ERR_peek_last_error();
    const char *why = e != 0 ? ERR_reason_error_string(e) : NULL;
    stek_status st = stek_error_set(STEK_ERR_CRYPTO, "%s: %s", what, why ? why : "failed");
    ERR_clear_error();
    return st;
}

static void put_u32be(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint8_t *put_field(uint8_t *p, const uint8_t *data, size_t len)
{
    put_u32be(p, len);
    p += 4;
    /* memcpy with a NULL source is undefined even for zero bytes. */
    if (len > 0)
        memcpy(p, data, len);
    return p + len;
}

static stek_status field_check(const char *what, const void *data, size_t len)
{
    if (data == NULL && len > 0)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: %s is NULL with length %zu", what, len);
    if (len > REQSIG_FIELD_MAX)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: %s of %zu bytes is over %u", what, len,
                  REQSIG_FIELD_MAX);
    return STEK_OK;
}

stek_status stek_reqsig_input(const char *group, const uint8_t *eph_pub, size_t eph_len,
                              const uint8_t *nonce, size_t nonce_len, uint8_t **msg, size_t *len)
{
    STEK_ENSURE_REF(msg);
    STEK_ENSURE_REF(len);
    *msg = NULL;
    *len = 0;
    STEK_ENSURE_REF(group);
    /* strnlen: an unterminated giant string stops at the limit, not at a crash later. */
    size_t group_len = strnlen(group, REQSIG_FIELD_MAX + 1);
    STEK_GUARD(field_check("group", group, group_len));
    STEK_GUARD(field_check("eph_pub", eph_pub, eph_len));
    STEK_GUARD(field_check("nonce", nonce, nonce_len));

    /* Each field is at most 2^16 bytes, so the sum cannot overflow size_t. */
    size_t total = REQSIG_CTX_LEN + 3 * 4 + group_len + eph_len + nonce_len;
    uint8_t *buf = malloc(total);
    STEK_ENSURE(buf != NULL, STEK_ERR_NOMEM);
    uint8_t *p = buf;
    memcpy(p, STEK_REQ_CONTEXT, REQSIG_CTX_LEN);
    p += REQSIG_CTX_LEN;
    p = put_field(p, (const uint8_t *)group, group_len);
    p = put_field(p, eph_pub, eph_len);
    p = put_field(p, nonce, nonce_len);
    STEK_ENSURE((size_t)(p - buf) == total, STEK_ERR_INTERNAL);
    *msg = buf;
    *len = total;
    return STEK_OK;
}

/*
 * The certificate key types a request may be signed with: EC on P-256 or
 * P-384 (named curves only) and RSA from 2048 to 8192 bits. RSA-PSS-only
 * keys (id-RSASSA-PSS in the certificate) carry their own parameter
 * restrictions and are not accepted; neither are Ed25519, DSA or others.
 * Sets *is_rsa.
 */
static stek_status key_check(EVP_PKEY *key, int *is_rsa)
{
    int id = EVP_PKEY_get_base_id(key);
    if (id == EVP_PKEY_RSA) {
        int bits = EVP_PKEY_get_bits(key);
        if (bits < REQSIG_RSA_MIN_BITS || bits > REQSIG_RSA_MAX_BITS)
            STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: RSA key of %d bits outside %d..%d", bits,
                      REQSIG_RSA_MIN_BITS, REQSIG_RSA_MAX_BITS);
        *is_rsa = 1;
        return STEK_OK;
    }
    if (id == EVP_PKEY_EC) {
        char name[64];
        size_t name_len = 0;
        if (EVP_PKEY_get_group_name(key, name, sizeof(name), &name_len) != 1) {
            /* An explicit-parameters key has no name: not a curve we accept. */
            ERR_clear_error();
            STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: EC key without a named curve");
        }
        int nid = OBJ_sn2nid(name);
        if (nid != NID_X9_62_prime256v1 && nid != NID_secp384r1)
            STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: EC curve %s is not P-256 or P-384", name);
        *is_rsa = 0;
        return STEK_OK;
    }
    STEK_BAIL(STEK_ERR_INVALID_ARG, "reqsig: unsupported key type %s",
              OBJ_nid2sn(id) != NULL ? OBJ_nid2sn(id) : "unknown");
}

/* RSASSA-PSS, MGF1-SHA-256, a fixed 32-byte salt: the same on both sides. */
static int set_pss(EVP_PKEY_CTX *pctx)
{
    return EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) == 1 &&
           EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, REQSIG_PSS_SALT) == 1;
}

stek_status stek_reqsig_sign(EVP_PKEY *key, const char *group, const uint8_t *eph_pub,
                             size_t eph_len, const uint8_t *nonce, size_t nonce_len, uint8_t **sig,
                             size_t *sig_len)
{
    stek_status st = STEK_OK;
    EVP_MD_CTX *mctx = NULL;
    EVP_PKEY_CTX *pctx = NULL; /* owned by mctx */
    uint8_t *msg = NULL, *out = NULL;
    size_t msg_len = 0, out_len = 0;
    int is_rsa = 0;

    STEK_ENSURE_REF(sig);
    STEK_ENSURE_REF(sig_len);
    *sig = NULL;
    *sig_len = 0;
    STEK_ENSURE_REF(key);
    STEK_GUARD(key_check(key, &is_rsa));
    STEK_GUARD(stek_reqsig_input(group, eph_pub, eph_len, nonce, nonce_len, &msg, &msg_len));

    mctx = EVP_MD_CTX_new();
    if (mctx == NULL || EVP_DigestSignInit_ex(mctx, &pctx, "SHA256", NULL, NULL, key, NULL) != 1)
        STEK_GUARD_GOTO(crypto_fail("EVP_DigestSignInit_ex"));
    if (is_rsa && !set_pss(pctx))
        STEK_GUARD_GOTO(crypto_fail("RSA-PSS parameters"));
    /* A NULL buffer asks for the largest size; ECDSA's DER may come out shorter. */
    if (EVP_DigestSign(mctx, NULL, &out_len, msg, msg_len) != 1)
        STEK_GUARD_GOTO(crypto_fail("EVP_DigestSign(size)"));
    STEK_ENSURE_GOTO(out_len > 0 && out_len <= STEK_REQSIG_MAX_BYTES, STEK_ERR_INTERNAL);
    out = malloc(out_len);
    STEK_ENSURE_GOTO(out != NULL, STEK_ERR_NOMEM);
    if (EVP_DigestSign(mctx, out, &out_len, msg, msg_len) != 1)
        STEK_GUARD_GOTO(crypto_fail("EVP_DigestSign"));
    *sig = out;
    *sig_len = out_len;
    out = NULL;

done:
    EVP_MD_CTX_free(mctx);
    free(out);
    free(msg);
    return st;
}

stek_status stek_reqsig_verify(EVP_PKEY *pub, const char *group, const uint8_t *eph_pub,
                               size_t eph_len, const uint8_t *nonce, size_t nonce_len,
                               const uint8_t *sig, size_t sig_len)
{
    stek_status st = STEK_OK;
    EVP_MD_CTX *mctx = NULL;
    EVP_PKEY_CTX *pctx = NULL; /* owned by mctx */
    uint8_t *msg = NULL;
    size_t msg_len = 0;
    int is_rsa = 0;

    STEK_ENSURE_REF(pub);
    /* A NULL, empty signature is what an unset bytes field decodes to: it just fails. */
    STEK_ENSURE(sig != NULL || sig_len == 0, STEK_ERR_INVALID_ARG);
    STEK_GUARD(key_check(pub, &is_rsa));
    STEK_GUARD(stek_reqsig_input(group, eph_pub, eph_len, nonce, nonce_len, &msg, &msg_len));
    if (sig_len == 0 || sig_len > STEK_REQSIG_MAX_BYTES)
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, "reqsig: signature of %zu bytes", sig_len);

    mctx = EVP_MD_CTX_new();
    if (mctx == NULL || EVP_DigestVerifyInit_ex(mctx, &pctx, "SHA256", NULL, NULL, pub, NULL) != 1)
        STEK_GUARD_GOTO(crypto_fail("EVP_DigestVerifyInit_ex"));
    /* An explicit salt length: OpenSSL's default (auto) would accept any. */
    if (is_rsa && !set_pss(pctx))
        STEK_GUARD_GOTO(crypto_fail("RSA-PSS parameters"));
    /* 0 is a bad signature, < 0 a malformed one: both are a failed check, not an error. */
    if (EVP_DigestVerify(mctx, sig, sig_len, msg, msg_len) != 1) {
        ERR_clear_error();
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, "reqsig: the request signature does not verify");
    }

done:
    EVP_MD_CTX_free(mctx);
    free(msg);
    return st;
}
