/*
 * Object helpers shared by the key modules: finding, attribute reads,
 * destruction, labels and ids, and the derive chokepoint that forces
 * CKA_SENSITIVE.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "p11_internal.h"

/* 1.2.840.10045.3.1.7 (prime256v1) as DER. */
const CK_BYTE p11_p256_oid[10] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

static CK_BBOOL ck_true = CK_TRUE;

CK_ULONG p11_force_sensitive(const CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_ATTRIBUTE *out)
{
    bool seen = false;
    for (CK_ULONG i = 0; i < n; i++) {
        out[i] = tmpl[i];
        if (out[i].type == CKA_SENSITIVE) {
            out[i].pValue = &ck_true;
            out[i].ulValueLen = sizeof(ck_true);
            seen = true;
        }
    }
    if (!seen) {
        out[n].type = CKA_SENSITIVE;
        out[n].pValue = &ck_true;
        out[n].ulValueLen = sizeof(ck_true);
        n++;
    }
    return n;
}

#define TEMPLATE_MAX 32

stek_status p11_derive(p11_sess *s, CK_MECHANISM *mech, CK_OBJECT_HANDLE base,
                       const CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *out)
{
    STEK_ENSURE(n < TEMPLATE_MAX, STEK_ERR_INVALID_ARG);
    CK_ATTRIBUTE forced[TEMPLATE_MAX];
    CK_ULONG m = p11_force_sensitive(tmpl, n, forced);
    stek_status st = P11_CALL(s->p11, C_DeriveKey, s->h, mech, base, forced, m, out);
    p11_sess_note(s, st);
    return st;
}

stek_status p11_find(p11_sess *s, const CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE **objs,
                     size_t *count)
{
    STEK_ENSURE_REF(objs);
    STEK_ENSURE_REF(count);
    *objs = NULL;
    *count = 0;
    stek_p11 *p11 = s->p11;
    stek_status st = P11_CALL(p11, C_FindObjectsInit, s->h, (CK_ATTRIBUTE_PTR)tmpl, n);
    p11_sess_note(s, st);
    STEK_GUARD(st);

    CK_OBJECT_HANDLE *all = NULL;
    size_t have = 0, cap = 0;
    for (;;) {
        CK_OBJECT_HANDLE batch[64];
        CK_ULONG got = 0;
        STEK_GUARD_GOTO(P11_CALL(p11, C_FindObjects, s->h, batch, 64, &got));
        if (got == 0)
            break;
        if (have + got > cap) {
            size_t ncap = cap ? cap * 2 : 64;
            while (ncap < have + got)
                ncap *= 2;
            CK_OBJECT_HANDLE *grown = realloc(all, ncap * sizeof(*all));
            STEK_ENSURE_GOTO(grown != NULL, STEK_ERR_NOMEM);
            all = grown;
            cap = ncap;
        }
        memcpy(all + have, batch, got * sizeof(*batch));
        have += got;
    }
done:;
    stek_status fst = P11_CALL(p11, C_FindObjectsFinal, s->h);
    if (st == STEK_OK)
        st = fst;
    /* SoftHSM answers finds on a vanished token with nothing at all: an
     * empty result is only trusted once the token is known to be there. */
    if (st == STEK_OK && have == 0 && !p11_token_present(s))
        st =
            stek_error_set(STEK_ERR_HSM_UNAVAILABLE, "token '%s' is not present", p11->token_label);
    p11_sess_note(s, st);
    if (st != STEK_OK) {
        free(all);
        return st;
    }
    *objs = all;
    *count = have;
    return STEK_OK;
}

stek_status p11_get_attr(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type, void *buf,
                         CK_ULONG *len)
{
    CK_ATTRIBUTE a = {type, buf, *len};
    stek_status st = P11_CALL(s->p11, C_GetAttributeValue, s->h, obj, &a, 1);
    p11_sess_note(s, st);
    STEK_GUARD(st);
    *len = a.ulValueLen;
    return STEK_OK;
}

bool p11_get_bool(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type)
{
    CK_BBOOL v = CK_FALSE;
    CK_ULONG len = sizeof(v);
    if (p11_get_attr(s, obj, type, &v, &len) != STEK_OK || len != sizeof(v))
        return false;
    return v == CK_TRUE;
}

stek_status p11_destroy(p11_sess *s, CK_OBJECT_HANDLE obj)
{
    stek_status st = P11_CALL(s->p11, C_DestroyObject, s->h, obj);
    /* Another process (a racing replica) may have destroyed it first. */
    if (st == STEK_ERR_NOT_FOUND)
        st = STEK_OK;
    p11_sess_note(s, st);
    return st;
}

stek_status p11_label(char out[STEK_P11_LABEL_MAX], const char *kind, const char *group,
                      uint32_t generation)
{
    STEK_GUARD(stek_group_name_check(group));
    int n = snprintf(out, STEK_P11_LABEL_MAX, "stek:%s:%s:%u", kind, group, (unsigned)generation);
    STEK_ENSURE(n > 0 && n < STEK_P11_LABEL_MAX, STEK_ERR_INVALID_ARG);
    return STEK_OK;
}

stek_status p11_make_id(uint64_t epoch, uint8_t id[P11_ID_BYTES])
{
    for (int i = 0; i < 8; i++)
        id[i] = (uint8_t)(epoch >> (56 - 8 * i));
    STEK_ENSURE(RAND_bytes(id + 8, 8) == 1, STEK_ERR_CRYPTO);
    return STEK_OK;
}

uint64_t p11_id_epoch(const uint8_t id[P11_ID_BYTES])
{
    uint64_t e = 0;
    for (int i = 0; i < 8; i++)
        e = (e << 8) | id[i];
    return e;
}

stek_status p11_read_ec_point(p11_sess *s, CK_OBJECT_HANDLE pub, uint8_t out[STEK_P256_POINT_BYTES])
{
    /* CKA_EC_POINT is a DER OCTET STRING wrapping the point (04 41 04 X Y). */
    uint8_t der[80];
    CK_ULONG len = sizeof(der);
    STEK_GUARD(p11_get_attr(s, pub, CKA_EC_POINT, der, &len));
    if (len == STEK_P256_POINT_BYTES + 2 && der[0] == 0x04 && der[1] == STEK_P256_POINT_BYTES) {
        memcpy(out, der + 2, STEK_P256_POINT_BYTES);
    } else if (len == STEK_P256_POINT_BYTES) {
        memcpy(out, der, STEK_P256_POINT_BYTES); /* some modules return it raw */
    } else {
        STEK_BAIL(STEK_ERR_HSM, "CKA_EC_POINT has unexpected length %lu", (unsigned long)len);
    }
    return stek_p256_point_check(out, STEK_P256_POINT_BYTES);
}
