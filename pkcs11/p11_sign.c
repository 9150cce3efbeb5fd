/*
 * The service signing key: ECDSA P-256 in the token. The HSM signs a
 * SHA-256 digest computed here (SoftHSM 2.6 offers CKM_ECDSA on a digest);
 * the raw r||s is re-encoded as DER so hosts verify with stock OpenSSL.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include "log.h"
#include "p11_internal.h"

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;

static stek_status find_signing(p11_sess *s, CK_OBJECT_CLASS cls, CK_OBJECT_HANDLE *h)
{
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, P11_LABEL_SIGNING, sizeof(P11_LABEL_SIGNING) - 1},
    };
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    STEK_GUARD(p11_find(s, q, 2, &objs, &n));
    stek_status st = STEK_OK;
    if (n == 0)
        st = stek_error_set(STEK_ERR_NOT_FOUND, "no signing key (run stekctl init)");
    else if (n > 1)
        st = stek_error_set(STEK_ERR_HSM, "%zu signing keys in the token; expected one", n);
    else
        *h = objs[0];
    free(objs);
    return st;
}

stek_status stek_p11_signing_key_create(stek_p11 *p11)
{
    STEK_ENSURE_REF(p11);
    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE h;
    st = find_signing(&s, CKO_PRIVATE_KEY, &h);
    if (st == STEK_OK || st == STEK_ERR_HSM)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "a signing key already exists");
    STEK_ENSURE_GOTO(st == STEK_ERR_NOT_FOUND, st);

    CK_ATTRIBUTE pub_t[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &no, sizeof(no)},
        {CKA_VERIFY, &yes, sizeof(yes)},
        {CKA_EC_PARAMS, (void *)p11_p256_oid, sizeof(p11_p256_oid)},
        {CKA_LABEL, P11_LABEL_SIGNING, sizeof(P11_LABEL_SIGNING) - 1},
    };
    CK_ATTRIBUTE priv_t[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
        {CKA_DERIVE, &no, sizeof(no)},
        {CKA_LABEL, P11_LABEL_SIGNING, sizeof(P11_LABEL_SIGNING) - 1},
    };
    CK_MECHANISM m = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pub, priv;
    STEK_GUARD_GOTO(P11_CALL(p11, C_GenerateKeyPair, s.h, &m, pub_t, 5, priv_t, 7, &pub, &priv));
    stek_log(STEK_LOG_INFO, "pkcs11", "created service signing key (ECDSA P-256)");
done:
    return p11_sess_done(&s, st);
}

/* r||s (32 + 32 bytes) to a DER ECDSA-Sig-Value. */
static stek_status raw_to_der(const uint8_t rs[64], uint8_t *der, size_t *der_len)
{
    stek_status st = STEK_OK;
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(rs, 32, NULL), *sv = BN_bin2bn(rs + 32, 32, NULL);
    STEK_ENSURE_GOTO(sig != NULL && r != NULL && sv != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(ECDSA_SIG_set0(sig, r, sv) == 1, STEK_ERR_CRYPTO);
    r = sv = NULL; /* owned by sig now */
    int n = i2d_ECDSA_SIG(sig, NULL);
    STEK_ENSURE_GOTO(n > 0 && n <= STEK_P11_SIGNATURE_MAX_BYTES, STEK_ERR_CRYPTO);
    unsigned char *p = der;
    STEK_ENSURE_GOTO(i2d_ECDSA_SIG(sig, &p) == n, STEK_ERR_CRYPTO);
    *der_len = (size_t)n;
done:
    BN_free(r);
    BN_free(sv);
    ECDSA_SIG_free(sig);
    return st;
}

stek_status stek_p11_sign(stek_p11 *p11, const uint8_t *msg, size_t msg_len,
                          uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES], size_t *sig_len)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE(msg != NULL || msg_len == 0, STEK_ERR_INVALID_ARG);
    STEK_ENSURE_REF(sig);
    STEK_ENSURE_REF(sig_len);
    uint8_t digest[SHA256_DIGEST_LENGTH];
    SHA256(msg, msg_len, digest);

    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE h;
    uint8_t rs[64];
    CK_ULONG rs_len = sizeof(rs);
    CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
    STEK_GUARD_GOTO(find_signing(&s, CKO_PRIVATE_KEY, &h));
    STEK_GUARD_GOTO(P11_CALL(p11, C_SignInit, s.h, &m, h));
    STEK_GUARD_GOTO(P11_CALL(p11, C_Sign, s.h, digest, sizeof(digest), rs, &rs_len));
    STEK_ENSURE_GOTO(rs_len == sizeof(rs), STEK_ERR_HSM);
    STEK_GUARD_GOTO(raw_to_der(rs, sig, sig_len));
done:
    return p11_sess_done(&s, st);
}

static stek_status point_to_pem(const uint8_t pt[STEK_P256_POINT_BYTES], char **pem)
{
    stek_status st = STEK_OK;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;
    BIO *bio = NULL;
    STEK_ENSURE_GOTO(bld != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) == 1,
        STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt,
                                                      STEK_P256_POINT_BYTES) == 1,
                     STEK_ERR_CRYPTO);
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    STEK_ENSURE_GOTO(params != NULL && ctx != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(EVP_PKEY_fromdata_init(ctx) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1,
                     STEK_ERR_CRYPTO);
    bio = BIO_new(BIO_s_mem());
    STEK_ENSURE_GOTO(bio != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(PEM_write_bio_PUBKEY(bio, pkey) == 1, STEK_ERR_CRYPTO);
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    STEK_ENSURE_GOTO(len > 0, STEK_ERR_CRYPTO);
    *pem = calloc(1, (size_t)len + 1);
    STEK_ENSURE_GOTO(*pem != NULL, STEK_ERR_NOMEM);
    memcpy(*pem, data, (size_t)len);
done:
    BIO_free(bio);
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return st;
}

stek_status stek_p11_signing_pubkey_pem(stek_p11 *p11, char **pem)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(pem);
    *pem = NULL;
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE h;
    uint8_t pt[STEK_P256_POINT_BYTES];
    STEK_GUARD_GOTO(find_signing(&s, CKO_PUBLIC_KEY, &h));
    STEK_GUARD_GOTO(p11_read_ec_point(&s, h, pt));
done:
    STEK_GUARD(p11_sess_done(&s, st));
    return point_to_pem(pt, pem);
}
