/*
 * Generation records: a private token data object per (group, generation)
 * holding the generation's start time, so every replica reads the same
 * signed start time from the HSM and no replica keeps local state.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "p11_internal.h"

static CK_BBOOL yes = CK_TRUE;
static CK_OBJECT_CLASS data_class = CKO_DATA;
static const char application[] = "stek";

static stek_status gen_label(char out[STEK_P11_LABEL_MAX], const char *group, uint32_t gen)
{
    return p11_label(out, "gen", group, gen);
}

static stek_status find_records(p11_sess *s, const char *label, CK_OBJECT_HANDLE **h, size_t *n)
{
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &data_class, sizeof(data_class)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    return p11_find(s, q, 2, h, n);
}

stek_status stek_p11_generation_record(stek_p11 *p11, const char *group, uint32_t generation,
                                       int64_t start)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE(start >= 0, STEK_ERR_INVALID_ARG);
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(gen_label(label, group, generation));
    uint8_t value[8];
    for (int i = 0; i < 8; i++)
        value[i] = (uint8_t)((uint64_t)start >> (56 - 8 * i));

    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE *h = NULL;
    size_t n = 0;
    STEK_GUARD_GOTO(find_records(&s, label, &h, &n));
    if (n > 0)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "generation %u of %s is already recorded",
                       (unsigned)generation, group);
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &data_class, sizeof(data_class)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_APPLICATION, (void *)application, sizeof(application) - 1},
        {CKA_LABEL, label, strlen(label)},
        {CKA_VALUE, value, sizeof(value)},
    };
    CK_OBJECT_HANDLE obj;
    STEK_GUARD_GOTO(P11_CALL(p11, C_CreateObject, s.h, t, 6, &obj));
    stek_log(STEK_LOG_INFO, "pkcs11", "recorded %s, start %lld", label, (long long)start);
done:
    free(h);
    return p11_sess_done(&s, st);
}

static int cmp_gen(const void *a, const void *b)
{
    const stek_p11_generation *x = a, *y = b;
    return (x->generation > y->generation) - (x->generation < y->generation);
}

stek_status stek_p11_generation_list(stek_p11 *p11, const char *group, stek_p11_generation **out,
                                     size_t *count)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(out);
    STEK_ENSURE_REF(count);
    *out = NULL;
    *count = 0;
    STEK_GUARD(stek_group_name_check(group));
    char prefix[STEK_P11_LABEL_MAX];
    int plen = snprintf(prefix, sizeof(prefix), "stek:gen:%s:", group);
    STEK_ENSURE(plen > 0 && plen < (int)sizeof(prefix), STEK_ERR_INVALID_ARG);

    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE *h = NULL;
    size_t n = 0, k = 0;
    stek_p11_generation *gens = NULL;
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &data_class, sizeof(data_class)},
        {CKA_APPLICATION, (void *)application, sizeof(application) - 1},
    };
    STEK_GUARD_GOTO(p11_find(&s, q, 2, &h, &n));
    if (n > 0) {
        gens = calloc(n, sizeof(*gens));
        STEK_ENSURE_GOTO(gens != NULL, STEK_ERR_NOMEM);
    }
    for (size_t i = 0; i < n; i++) {
        char label[STEK_P11_LABEL_MAX] = {0};
        uint8_t value[8];
        CK_ULONG llen = sizeof(label) - 1, vlen = sizeof(value);
        if (p11_get_attr(&s, h[i], CKA_LABEL, label, &llen) != STEK_OK ||
            p11_get_attr(&s, h[i], CKA_VALUE, value, &vlen) != STEK_OK || vlen != 8)
            continue;
        label[llen] = '\0';
        if (strncmp(label, prefix, (size_t)plen) != 0)
            continue;
        char *end = NULL;
        unsigned long g = strtoul(label + plen, &end, 10);
        if (end == label + plen || *end != '\0' || g > UINT32_MAX)
            continue;
        uint64_t v = 0;
        for (int j = 0; j < 8; j++)
            v = (v << 8) | value[j];
        gens[k].generation = (uint32_t)g;
        gens[k].start = (int64_t)v;
        k++;
    }
    if (k > 1)
        qsort(gens, k, sizeof(*gens), cmp_gen);
    *out = k > 0 ? gens : NULL;
    *count = k;
    if (k > 0)
        gens = NULL;
done:
    free(gens);
    free(h);
    return p11_sess_done(&s, st);
}

stek_status p11_generation_record_destroy(p11_sess *s, const char *group, uint32_t generation)
{
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(gen_label(label, group, generation));
    CK_OBJECT_HANDLE *h = NULL;
    size_t n = 0;
    STEK_GUARD(find_records(s, label, &h, &n));
    stek_status st = STEK_OK;
    for (size_t i = 0; i < n && st == STEK_OK; i++)
        st = p11_destroy(s, h[i]);
    free(h);
    return st;
}
