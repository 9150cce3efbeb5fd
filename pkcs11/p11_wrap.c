/*
 * Per-host wrapping inside the HSM (kek.h has the byte contract):
 *   1. an ephemeral P-256 key pair (session objects);
 *   2. Z = ECDH1_DERIVE(CKD_NULL) with the host's ephemeral point;
 *   3. KEK = AES_CBC_ENCRYPT_DATA(Z, iv = SHA-256(ctx)[0:16], label blocks);
 *   4. blob = AES_KEY_WRAP_PAD(KEK, K) for each ticket key.
 * Every intermediate is a sensitive, non-extractable session object,
 * destroyed before return, so no plaintext key ever exists outside the HSM.
 */
#include <stdlib.h>
#include <string.h>

#include "p11_chain.h"
#include "p11_internal.h"

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;
static CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
static CK_KEY_TYPE aes_type = CKK_AES;
static CK_ULONG aes256_len = 32;

static stek_status eph_keypair(p11_sess *s, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv)
{
    CK_ATTRIBUTE pub_t[] = {
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_EC_PARAMS, (void *)p11_p256_oid, sizeof(p11_p256_oid)},
    };
    CK_ATTRIBUTE priv_t[] = {
        {CKA_TOKEN, &no, sizeof(no)},       {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)}, {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_DERIVE, &yes, sizeof(yes)},    {CKA_SIGN, &no, sizeof(no)},
    };
    CK_MECHANISM m = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    stek_status st = P11_CALL(s->p11, C_GenerateKeyPair, s->h, &m, pub_t, 2, priv_t, 6, pub, priv);
    p11_sess_note(s, st);
    return st;
}

/* A session-only AES-256 secret: used for Z (derive) and the KEK (wrap). */
static CK_ULONG session_aes_template(CK_ATTRIBUTE *t, bool for_wrap)
{
    CK_ATTRIBUTE a[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_KEY_TYPE, &aes_type, sizeof(aes_type)},
        {CKA_VALUE_LEN, &aes256_len, sizeof(aes256_len)},
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_DERIVE, for_wrap ? &no : &yes, sizeof(yes)},
        {CKA_WRAP, for_wrap ? &yes : &no, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
    };
    memcpy(t, a, sizeof(a));
    return sizeof(a) / sizeof(a[0]);
}

static stek_status derive_kek(p11_sess *s, CK_OBJECT_HANDLE eph_priv, const uint8_t *host_pub,
                              const uint8_t *hsm_pub, const char *group, uint32_t generation,
                              CK_OBJECT_HANDLE *z, CK_OBJECT_HANDLE *kek)
{
    CK_ATTRIBUTE t[12];
    CK_ULONG n = session_aes_template(t, false);
    CK_ECDH1_DERIVE_PARAMS ecdh = {CKD_NULL, 0, NULL, STEK_P256_POINT_BYTES, (CK_BYTE_PTR)host_pub};
    CK_MECHANISM m = {CKM_ECDH1_DERIVE, &ecdh, sizeof(ecdh)};
    STEK_GUARD(p11_derive(s, &m, eph_priv, t, n, z));

    CK_AES_CBC_ENCRYPT_DATA_PARAMS cbc;
    uint8_t label[STEK_KEK_LABEL_BYTES];
    STEK_GUARD(stek_kek_iv(hsm_pub, host_pub, group, generation, cbc.iv));
    stek_kek_label_blocks(label);
    cbc.pData = label;
    cbc.length = sizeof(label);
    CK_MECHANISM cm = {CKM_AES_CBC_ENCRYPT_DATA, &cbc, sizeof(cbc)};
    n = session_aes_template(t, true);
    return p11_derive(s, &cm, *z, t, n, kek);
}

stek_status stek_p11_wrap_tickets(stek_p11 *p11, const char *group, uint32_t generation,
                                  const uint8_t *host_pub, size_t host_pub_len,
                                  const uint64_t *epochs, size_t n_epochs,
                                  uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                                  uint8_t (*blobs)[STEK_WRAPPED_KEY_BYTES])
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(hsm_pub);
    STEK_ENSURE(n_epochs == 0 || (epochs != NULL && blobs != NULL), STEK_ERR_INVALID_ARG);
    /* Check the point here, not in the HSM: modules differ in what they accept. */
    STEK_GUARD(stek_p256_point_check(host_pub, host_pub_len));
    STEK_GUARD(stek_group_name_check(group));

    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE z = CK_INVALID_HANDLE, kek = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE *handles = NULL;

    STEK_GUARD_GOTO(eph_keypair(&s, &pub, &priv));
    STEK_GUARD_GOTO(p11_read_ec_point(&s, pub, hsm_pub));
    STEK_GUARD_GOTO(derive_kek(&s, priv, host_pub, hsm_pub, group, generation, &z, &kek));

    STEK_GUARD_GOTO(p11_tickets_resolve(&s, group, generation, epochs, n_epochs, &handles));
    for (size_t i = 0; i < n_epochs; i++) {
        CK_MECHANISM m = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
        CK_ULONG len = STEK_WRAPPED_KEY_BYTES;
        STEK_GUARD_GOTO(P11_CALL(p11, C_WrapKey, s.h, &m, kek, handles[i], blobs[i], &len));
        STEK_ENSURE_GOTO(len == STEK_WRAPPED_KEY_BYTES, STEK_ERR_HSM);
    }
done:
    p11_sess_note(&s, st);
    /* Destroy the ephemeral objects now rather than at session close:
     * pooled sessions live long. */
    CK_OBJECT_HANDLE eph[] = {kek, z, priv, pub};
    for (size_t i = 0; i < sizeof(eph) / sizeof(eph[0]); i++)
        if (eph[i] != CK_INVALID_HANDLE)
            STEK_IGNORE(p11_destroy(&s, eph[i]));
    free(handles);
    return p11_sess_done(&s, st);
}
