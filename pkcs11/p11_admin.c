/*
 * Housekeeping: listing objects (never values) and seeding a replica's HSM
 * with a chain key through a single-use, SO-trusted RSA transport key.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#include "log.h"
#include "p11_chain.h"
#include "p11_internal.h"

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;

const char *stek_p11_kind_name(stek_p11_kind kind)
{
    switch (kind) {
    case STEK_P11_KIND_CHAIN:
        return "chain";
    case STEK_P11_KIND_TICKET:
        return "ticket";
    case STEK_P11_KIND_SIGNING:
        return "signing";
    case STEK_P11_KIND_TRANSPORT:
        return "transport";
    case STEK_P11_KIND_GENERATION:
        return "generation";
    default:
        return "other";
    }
}

/* Classifies an object by label; stek's labels are "stek:<kind>:<g>:<n>". */
static void classify(stek_p11_object_info *o, const uint8_t *id, CK_ULONG id_len)
{
    char kind[16], group[STEK_GROUP_MAX_BYTES + 1];
    unsigned gen;
    char tail;
    o->kind = STEK_P11_KIND_OTHER;
    if (strcmp(o->label, P11_LABEL_SIGNING) == 0) {
        o->kind = STEK_P11_KIND_SIGNING;
    } else if (strncmp(o->label, "stek:transport:", 15) == 0) {
        o->kind = STEK_P11_KIND_TRANSPORT;
    } else if (sscanf(o->label, "stek:%15[a-z]:%64[a-z0-9._-]:%u%c", kind, group, &gen, &tail) ==
                   3 &&
               id_len == P11_ID_BYTES) {
        bool chain = strcmp(kind, "chain") == 0, ticket = strcmp(kind, "ticket") == 0;
        if (chain || ticket) {
            o->kind = chain ? STEK_P11_KIND_CHAIN : STEK_P11_KIND_TICKET;
            snprintf(o->group, sizeof(o->group), "%s", group);
            o->generation = gen;
            o->epoch = p11_id_epoch(id);
        }
    } else if (sscanf(o->label, "stek:gen:%64[a-z0-9._-]:%u%c", group, &gen, &tail) == 2) {
        o->kind = STEK_P11_KIND_GENERATION;
        snprintf(o->group, sizeof(o->group), "%s", group);
        o->generation = gen;
    }
}

static void describe(p11_sess *s, CK_OBJECT_HANDLE h, stek_p11_object_info *o)
{
    memset(o, 0, sizeof(*o));
    CK_ULONG len = sizeof(o->label) - 1;
    if (p11_get_attr(s, h, CKA_LABEL, o->label, &len) == STEK_OK && len < sizeof(o->label))
        o->label[len] = '\0';
    else
        o->label[0] = '\0';
    uint8_t id[64];
    CK_ULONG id_len = sizeof(id);
    if (p11_get_attr(s, h, CKA_ID, id, &id_len) != STEK_OK)
        id_len = 0;
    CK_OBJECT_CLASS cls = 0;
    len = sizeof(cls);
    if (p11_get_attr(s, h, CKA_CLASS, &cls, &len) == STEK_OK) {
        o->is_private_key = cls == CKO_PRIVATE_KEY;
        o->is_public_key = cls == CKO_PUBLIC_KEY;
    }
    o->token = p11_get_bool(s, h, CKA_TOKEN);
    o->sensitive = p11_get_bool(s, h, CKA_SENSITIVE);
    o->always_sensitive = p11_get_bool(s, h, CKA_ALWAYS_SENSITIVE);
    o->extractable = p11_get_bool(s, h, CKA_EXTRACTABLE);
    o->never_extractable = p11_get_bool(s, h, CKA_NEVER_EXTRACTABLE);
    o->wrap_with_trusted = p11_get_bool(s, h, CKA_WRAP_WITH_TRUSTED);
    o->trusted = p11_get_bool(s, h, CKA_TRUSTED);
    o->derive = p11_get_bool(s, h, CKA_DERIVE);
    classify(o, id, id_len);
}

stek_status stek_p11_list(stek_p11 *p11, stek_p11_object_info **objs, size_t *count)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(objs);
    STEK_ENSURE_REF(count);
    *objs = NULL;
    *count = 0;
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE *h = NULL;
    size_t n = 0;
    stek_p11_object_info *out = NULL;
    STEK_GUARD_GOTO(p11_find(&s, NULL, 0, &h, &n));
    if (n > 0) {
        out = calloc(n, sizeof(*out));
        STEK_ENSURE_GOTO(out != NULL, STEK_ERR_NOMEM);
        for (size_t i = 0; i < n; i++)
            describe(&s, h[i], &out[i]);
    }
    *objs = out;
    *count = n;
    out = NULL;
done:
    free(out);
    free(h);
    return p11_sess_done(&s, st);
}

/* ------------------------------------------------------------------ */

static stek_status transport_label(char out[STEK_P11_LABEL_MAX], const char *id)
{
    STEK_ENSURE_REF(id);
    /* Same alphabet as group names, so labels stay unambiguous. */
    STEK_GUARD(stek_group_name_check(id));
    snprintf(out, STEK_P11_LABEL_MAX, "stek:transport:%s", id);
    return STEK_OK;
}

static stek_status find_one(p11_sess *s, CK_OBJECT_CLASS cls, const char *label,
                            CK_OBJECT_HANDLE *h, size_t *count)
{
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_OBJECT_HANDLE *objs = NULL;
    STEK_GUARD(p11_find(s, q, 2, &objs, count));
    if (*count > 0)
        *h = objs[0];
    free(objs);
    return STEK_OK;
}

/* DER SubjectPublicKeyInfo from an RSA modulus and exponent. */
static stek_status rsa_spki(const uint8_t *mod, size_t mod_len, const uint8_t *exp, size_t exp_len,
                            uint8_t **spki, size_t *spki_len)
{
    stek_status st = STEK_OK;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;
    BIGNUM *n = BN_bin2bn(mod, (int)mod_len, NULL), *e = BN_bin2bn(exp, (int)exp_len, NULL);
    STEK_ENSURE_GOTO(bld && n && e, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) == 1, STEK_ERR_CRYPTO);
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    STEK_ENSURE_GOTO(params && ctx, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(EVP_PKEY_fromdata_init(ctx) == 1, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1,
                     STEK_ERR_CRYPTO);
    unsigned char *der = NULL;
    int len = i2d_PUBKEY(pkey, &der);
    STEK_ENSURE_GOTO(len > 0, STEK_ERR_CRYPTO);
    *spki = malloc((size_t)len);
    if (*spki != NULL)
        memcpy(*spki, der, (size_t)len);
    OPENSSL_free(der);
    STEK_ENSURE_GOTO(*spki != NULL, STEK_ERR_NOMEM);
    *spki_len = (size_t)len;
done:
    BN_free(n);
    BN_free(e);
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return st;
}

stek_status stek_p11_transport_create(stek_p11 *p11, const char *id, uint8_t **spki,
                                      size_t *spki_len)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(spki);
    STEK_ENSURE_REF(spki_len);
    *spki = NULL;
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(transport_label(label, id));

    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv;
    size_t have = 0;
    STEK_GUARD_GOTO(find_one(&s, CKO_PRIVATE_KEY, label, &priv, &have));
    if (have > 0)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "transport key %s already exists", label);

    CK_ULONG bits = 2048;
    CK_BYTE f4[] = {0x01, 0x00, 0x01};
    CK_ATTRIBUTE pub_t[] = {
        {CKA_TOKEN, &no, sizeof(no)}, /* exported below, then destroyed */
        {CKA_MODULUS_BITS, &bits, sizeof(bits)},
        {CKA_PUBLIC_EXPONENT, f4, sizeof(f4)},
        {CKA_WRAP, &yes, sizeof(yes)},
    };
    CK_ATTRIBUTE priv_t[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},     {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)}, {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_UNWRAP, &yes, sizeof(yes)},    {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},        {CKA_LABEL, label, strlen(label)},
    };
    CK_MECHANISM m = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    STEK_GUARD_GOTO(P11_CALL(p11, C_GenerateKeyPair, s.h, &m, pub_t, 4, priv_t, 8, &pub, &priv));

    uint8_t mod[512], exp[16];
    CK_ULONG mod_len = sizeof(mod), exp_len = sizeof(exp);
    STEK_GUARD_GOTO(p11_get_attr(&s, pub, CKA_MODULUS, mod, &mod_len));
    STEK_GUARD_GOTO(p11_get_attr(&s, pub, CKA_PUBLIC_EXPONENT, exp, &exp_len));
    STEK_GUARD_GOTO(rsa_spki(mod, mod_len, exp, exp_len, spki, spki_len));
    stek_log(STEK_LOG_INFO, "pkcs11", "created transport key %s", label);
done:
    p11_sess_note(&s, st);
    if (pub != CK_INVALID_HANDLE)
        STEK_IGNORE(p11_destroy(&s, pub));
    return p11_sess_done(&s, st);
}

/* Parses a DER SPKI that must be RSA of at least 2048 bits. */
static stek_status spki_rsa(const uint8_t *spki, size_t len, BIGNUM **n, BIGNUM **e)
{
    const unsigned char *p = spki;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)len);
    if (pkey == NULL || p != spki + len) {
        EVP_PKEY_free(pkey);
        STEK_BAIL(STEK_ERR_INVALID_ARG, "transport public key is not a DER SubjectPublicKeyInfo");
    }
    stek_status st = STEK_OK;
    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA || EVP_PKEY_get_bits(pkey) < 2048)
        st = stek_error_set(STEK_ERR_INVALID_ARG, "transport key must be RSA of 2048 bits or more");
    else if (EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, n) != 1 ||
             EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, e) != 1)
        st = stek_error_set(STEK_ERR_CRYPTO, "cannot read the RSA key");
    EVP_PKEY_free(pkey);
    return st;
}

/*
 * Creates the transport public key object. For a trusted one the user is
 * logged out, the SO logs in (only the SO may set CKA_TRUSTED), then the
 * user logs back in. Login state is per token for the whole process, so this
 * runs under the module write lock with no other call in flight.
 */
static stek_status create_transport_pub(stek_p11 *p11, CK_SESSION_HANDLE h, CK_ATTRIBUTE *t,
                                        CK_ULONG nt, bool trusted)
{
    if (!trusted) {
        CK_OBJECT_HANDLE obj;
        return P11_CALL(p11, C_CreateObject, h, t, nt, &obj);
    }
    stek_secret *so_pin = NULL;
    STEK_GUARD(p11_pin_read(p11->so_pin_env, p11->so_pin_file, &so_pin));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE obj;
    STEK_GUARD_GOTO(P11_CALL(p11, C_Logout, h));
    st = P11_CALL(p11, C_Login, h, CKU_SO, stek_secret_data(so_pin),
                  (CK_ULONG)stek_secret_len(so_pin));
    if (st == STEK_OK) {
        st = P11_CALL(p11, C_CreateObject, h, t, nt, &obj);
        stek_status lo = P11_CALL(p11, C_Logout, h);
        if (st == STEK_OK)
            st = lo;
    } else if (st == STEK_ERR_PIN_INCORRECT) {
        st = stek_error_set(STEK_ERR_PIN_INCORRECT, "C_Login(SO): the SO PIN was rejected");
    }
    /* Back to the user whatever happened: the rest of the process needs it. */
    atomic_fetch_add(&p11->login_calls, 1);
    stek_status relog = P11_CALL(p11, C_Login, h, CKU_USER, stek_secret_data(p11->pin),
                                 (CK_ULONG)stek_secret_len(p11->pin));
    if (relog != STEK_OK) {
        atomic_store(&p11->lost, true);
        if (st == STEK_OK)
            st = relog;
    }
done:
    stek_secret_free(so_pin);
    return st;
}

stek_status stek_p11_transport_import(stek_p11 *p11, const char *id, const uint8_t *spki,
                                      size_t spki_len, bool trusted)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(spki);
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(transport_label(label, id));
    BIGNUM *n = NULL, *e = NULL;
    STEK_GUARD(spki_rsa(spki, spki_len, &n, &e));

    stek_status st = STEK_OK;
    uint8_t mod[1024], exp[16];
    int mod_len = BN_bn2bin(n, mod), exp_len = BN_num_bytes(e);
    STEK_ENSURE_GOTO(mod_len > 0 && mod_len <= (int)sizeof(mod), STEK_ERR_INVALID_ARG);
    STEK_ENSURE_GOTO(exp_len > 0 && exp_len <= (int)sizeof(exp), STEK_ERR_INVALID_ARG);
    BN_bn2bin(e, exp);

    CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
    CK_KEY_TYPE kt = CKK_RSA;
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &no, sizeof(no)},
        {CKA_WRAP, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_MODULUS, mod, (CK_ULONG)mod_len},
        {CKA_PUBLIC_EXPONENT, exp, (CK_ULONG)exp_len},
        {CKA_LABEL, label, strlen(label)},
        {CKA_TRUSTED, &yes, sizeof(yes)},
    };
    CK_ULONG nt = sizeof(t) / sizeof(t[0]) - (trusted ? 0 : 1);

    /* Take a session, then hold the module exclusively for the SO dance. */
    p11_sess s;
    STEK_GUARD_GOTO(p11_sess_get_writer(p11, &s));
    CK_OBJECT_HANDLE old;
    size_t have = 0;
    st = find_one(&s, CKO_PUBLIC_KEY, label, &old, &have);
    if (st == STEK_OK && have > 0)
        st = stek_error_set(STEK_ERR_EXISTS, "transport key %s already imported", label);
    CK_SESSION_HANDLE h = s.h;
    /* The session stays open in the pool; the write lock below keeps
     * every other caller off it while the login state changes. */
    STEK_GUARD_GOTO(p11_sess_done(&s, st));

    pthread_rwlock_wrlock(&p11->mod_lock);
    st = create_transport_pub(p11, h, t, nt, trusted);
    pthread_rwlock_unlock(&p11->mod_lock);
    if (st == STEK_OK)
        stek_log(STEK_LOG_INFO, "pkcs11", "imported %s transport key %s",
                 trusted ? "trusted" : "untrusted", label);
done:
    BN_free(n);
    BN_free(e);
    return st;
}

/*
 * Finds the transport key "stek:transport:<id>" of class cls (the imported
 * public half on the source, the private half on the target).
 * STEK_ERR_NOT_FOUND names the label and where it was looked for.
 */
static stek_status find_transport(p11_sess *s, CK_OBJECT_CLASS cls, const char *label,
                                  CK_OBJECT_HANDLE *tk)
{
    size_t have = 0;
    STEK_GUARD(find_one(s, cls, label, tk, &have));
    if (have == 0) {
        *tk = CK_INVALID_HANDLE;
        STEK_BAIL(STEK_ERR_NOT_FOUND, "no transport key %s in this token", label);
    }
    return STEK_OK;
}

/*
 * Transport keys are single use: destroyed once an export or import ran,
 * whether or not it worked. Returns st, or the destroy's failure when st
 * was OK.
 */
static stek_status transport_used_up(p11_sess *s, CK_OBJECT_HANDLE tk, stek_status st)
{
    if (tk == CK_INVALID_HANDLE)
        return st;
    stek_status dst = p11_destroy(s, tk);
    return st == STEK_OK ? dst : st;
}

static CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};

stek_status stek_p11_chain_export(stek_p11 *p11, const char *group, uint32_t generation,
                                  const char *id, uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES],
                                  size_t *blob_len, uint64_t *epoch)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(blob);
    STEK_ENSURE_REF(blob_len);
    STEK_ENSURE_REF(epoch);
    char label[STEK_P11_LABEL_MAX], clabel[STEK_P11_LABEL_MAX];
    STEK_GUARD(transport_label(label, id));
    STEK_GUARD(p11_label(clabel, "chain", group, generation));

    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE tk = CK_INVALID_HANDLE;
    p11_keyobj *chains = NULL;
    size_t nc = 0;
    STEK_GUARD_GOTO(find_transport(&s, CKO_PUBLIC_KEY, label, &tk));
    STEK_GUARD_GOTO(p11_keys_list(&s, clabel, &chains, &nc));
    if (nc == 0)
        STEK_BAIL_GOTO(STEK_ERR_NOT_FOUND, "no chain key %s", clabel);
    /* The newest chain key, lowest CKA_ID among duplicates. */
    size_t i = nc - 1;
    while (i > 0 && chains[i - 1].epoch == chains[nc - 1].epoch)
        i--;

    CK_MECHANISM m = {CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    CK_ULONG len = STEK_P11_CHAIN_BLOB_MAX_BYTES;
    st = P11_CALL(p11, C_WrapKey, s.h, &m, tk, chains[i].h, blob, &len);
    if (st == STEK_ERR_NOT_WRAPPABLE)
        st = stek_error_set(STEK_ERR_NOT_WRAPPABLE,
                            "C_WrapKey: CKR_KEY_NOT_WRAPPABLE: transport key %s is not trusted "
                            "(import it with the SO PIN)",
                            label);
    STEK_GUARD_GOTO(st);
    *blob_len = len;
    *epoch = chains[i].epoch;
    stek_log(STEK_LOG_INFO, "pkcs11", "exported %s epoch %llu to transport key %s", clabel,
             (unsigned long long)*epoch, label);
done:
    p11_sess_note(&s, st);
    st = transport_used_up(&s, tk, st);
    free(chains);
    return p11_sess_done(&s, st);
}

stek_status stek_p11_chain_import(stek_p11 *p11, const char *group, uint32_t generation,
                                  uint64_t epoch, const char *id, const uint8_t *blob,
                                  size_t blob_len)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(blob);
    STEK_ENSURE(blob_len > 0 && blob_len <= STEK_P11_CHAIN_BLOB_MAX_BYTES, STEK_ERR_INVALID_ARG);
    char label[STEK_P11_LABEL_MAX], clabel[STEK_P11_LABEL_MAX];
    STEK_GUARD(transport_label(label, id));
    STEK_GUARD(p11_label(clabel, "chain", group, generation));

    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE tk = CK_INVALID_HANDLE;
    p11_keyobj *chains = NULL;
    size_t nc = 0;
    STEK_GUARD_GOTO(find_transport(&s, CKO_PRIVATE_KEY, label, &tk));
    STEK_GUARD_GOTO(p11_keys_list(&s, clabel, &chains, &nc));
    /* Importing an older chain key would resurrect destroyed epochs. */
    if (nc > 0 && chains[nc - 1].epoch >= epoch)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "%s already at epoch %llu", clabel,
                       (unsigned long long)chains[nc - 1].epoch);

    uint8_t cid[P11_ID_BYTES];
    STEK_GUARD_GOTO(p11_make_id(epoch, cid));
    CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_WRAP_WITH_TRUSTED, &yes, sizeof(yes)},
        {CKA_DERIVE, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_LABEL, clabel, strlen(clabel)},
        {CKA_ID, cid, sizeof(cid)},
    };
    CK_ATTRIBUTE forced[sizeof(t) / sizeof(t[0]) + 1];
    CK_ULONG nt = p11_force_sensitive(t, sizeof(t) / sizeof(t[0]), forced);
    CK_MECHANISM m = {CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    CK_OBJECT_HANDLE out;
    st = P11_CALL(p11, C_UnwrapKey, s.h, &m, tk, (CK_BYTE_PTR)blob, (CK_ULONG)blob_len, forced, nt,
                  &out);
    /* SoftHSM reports a blob that fails OAEP decoding as CKR_GENERAL_ERROR;
     * with the token demonstrably there, that means a damaged or foreign blob. */
    if (st == STEK_ERR_HSM && p11_token_present(&s)) {
        char why[128];
        snprintf(why, sizeof(why), "%s", stek_error_detail());
        st = stek_error_set(STEK_ERR_VERIFY,
                            "%s: the blob is damaged or was made for another transport key", why);
    }
    STEK_GUARD_GOTO(st);
    stek_log(STEK_LOG_INFO, "pkcs11", "imported %s epoch %llu", clabel, (unsigned long long)epoch);
done:
    p11_sess_note(&s, st);
    st = transport_used_up(&s, tk, st);
    free(chains);
    return p11_sess_done(&s, st);
}
