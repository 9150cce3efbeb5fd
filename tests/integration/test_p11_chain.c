/*
 * Group roots and the ratchet on real SoftHSM tokens: forward secrecy,
 * attributes that keep values inside the HSM, trusted-only chain keys,
 * determinism across two tokens, and two processes racing on one chain.
 *
 * Work on a second token, or in racing processes, runs in forked children:
 * SoftHSM reads SOFTHSM2_CONF once per C_Initialize, and a forked child must
 * not inherit an initialized module. Children report through files and
 * their exit status.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fx.h"
#include "hostwrap.h"
#include "p11_chain.h"
#include "p11_internal.h"
#include "stek_p11.h"

static fx_token tok;  /* token A */
static fx_token tokb; /* token B: a second HSM */

static stek_p11_config config_for(const fx_token *t)
{
    stek_p11_config c = {
        .module_path = t->module,
        .token_label = t->label,
        .pin_env = t->pin_env,
        .so_pin_env = t->so_pin_env,
    };
    return c;
}

static stek_p11 *open_token(const fx_token *t)
{
    stek_p11_config c = config_for(t);
    stek_p11 *p11 = NULL;
    if (fx_token_activate(t) != 0 || stek_p11_open(&c, &p11) != STEK_OK) {
        fprintf(stderr, "open %s: %s\n", t->label, stek_error_detail());
        return NULL;
    }
    return p11;
}

static int setup(void **state)
{
    (void)state;
    if (fx_token_create(&tokb, "stek-chain-b") != 0)
        return -1;
    return fx_token_create(&tok, "stek-chain-a"); /* leaves A active */
}

static int teardown(void **state)
{
    (void)state;
    int a = fx_token_destroy(&tokb);
    int b = fx_token_destroy(&tok);
    return a || b;
}

/* Counts the objects of (kind, group, generation); *epoch gets the last one's. */
static size_t count_kind(stek_p11 *p11, stek_p11_kind kind, const char *group, uint32_t gen,
                         uint64_t *epoch)
{
    stek_p11_object_info *o = NULL;
    size_t n = 0, hits = 0;
    assert_int_equal(stek_p11_list(p11, &o, &n), STEK_OK);
    for (size_t i = 0; i < n; i++) {
        if (o[i].kind == kind && strcmp(o[i].group, group) == 0 && o[i].generation == gen) {
            hits++;
            if (epoch)
                *epoch = o[i].epoch;
        }
    }
    free(o);
    return hits;
}

static void test_root_and_ratchet(void **state)
{
    (void)state;
    stek_p11 *p11 = open_token(&tok);
    assert_non_null(p11);
    uint64_t e = 0;
    assert_int_equal(stek_p11_chain_newest(p11, "ratchet", 1, &e), STEK_ERR_NOT_FOUND);
    assert_int_equal(stek_p11_root_create(p11, "ratchet", 1, 100), STEK_OK);
    assert_int_equal(stek_p11_root_create(p11, "ratchet", 1, 200), STEK_ERR_EXISTS);
    assert_int_equal(stek_p11_chain_newest(p11, "ratchet", 1, &e), STEK_OK);
    assert_int_equal(e, 100);

    assert_int_equal(stek_p11_ratchet_advance(p11, "ratchet", 1, 104), STEK_OK);
    assert_int_equal(stek_p11_chain_newest(p11, "ratchet", 1, &e), STEK_OK);
    assert_int_equal(e, 104);
    for (uint64_t k = 100; k < 104; k++) {
        bool exists = false;
        assert_int_equal(stek_p11_ticket_exists(p11, "ratchet", 1, k, &exists), STEK_OK);
        assert_true(exists);
    }
    bool exists = true;
    assert_int_equal(stek_p11_ticket_exists(p11, "ratchet", 1, 104, &exists), STEK_OK);
    assert_false(exists);

    /* Idempotent: the same or an older target changes nothing. */
    assert_int_equal(stek_p11_ratchet_advance(p11, "ratchet", 1, 104), STEK_OK);
    assert_int_equal(stek_p11_ratchet_advance(p11, "ratchet", 1, 101), STEK_OK);
    assert_int_equal(count_kind(p11, STEK_P11_KIND_CHAIN, "ratchet", 1, &e), 1);
    assert_int_equal(e, 104);
    assert_int_equal(count_kind(p11, STEK_P11_KIND_TICKET, "ratchet", 1, NULL), 4);

    /* Keys of distinct epochs are distinct. */
    uint8_t a[STEK_P11_KCV_BYTES], b[STEK_P11_KCV_BYTES];
    assert_int_equal(stek_p11_ticket_check_value(p11, "ratchet", 1, 100, a), STEK_OK);
    assert_int_equal(stek_p11_ticket_check_value(p11, "ratchet", 1, 101, b), STEK_OK);
    assert_memory_not_equal(a, b, sizeof(a));

    assert_int_equal(stek_p11_ratchet_advance(p11, "no-such-group", 1, 5), STEK_ERR_NOT_FOUND);
    assert_int_equal(stek_p11_root_create(p11, "Bad Group", 1, 1), STEK_ERR_INVALID_ARG);
    stek_p11_close(p11);
}

/* All seven input blocks of a step differ, across many (g, n, e). */
static void test_kdf_blocks_distinct(void **state)
{
    (void)state;
    uint8_t t[P11_TICKET_BLOCKS * 16], c[P11_CHAIN_BLOCKS * 16];
    uint8_t t2[P11_TICKET_BLOCKS * 16], c2[P11_CHAIN_BLOCKS * 16];
    const char *groups[] = {"a", "edge", "edge.example-1"};
    for (size_t g = 0; g < 3; g++)
        for (uint32_t n = 0; n < 3; n++)
            for (uint64_t e = 0; e < 50; e++) {
                assert_int_equal(p11_kdf_blocks(groups[g], n, e, t, c), STEK_OK);
                for (int i = 0; i < 7; i++)
                    for (int j = i + 1; j < 7; j++) {
                        const uint8_t *bi = i < 5 ? t + 16 * i : c + 16 * (i - 5);
                        const uint8_t *bj = j < 5 ? t + 16 * j : c + 16 * (j - 5);
                        assert_memory_not_equal(bi, bj, 16);
                    }
            }
    /* Each input changes the blocks. */
    assert_int_equal(p11_kdf_blocks("edge", 1, 7, t, c), STEK_OK);
    assert_int_equal(p11_kdf_blocks("edge", 1, 8, t2, c2), STEK_OK);
    assert_memory_not_equal(t, t2, sizeof(t));
    assert_int_equal(p11_kdf_blocks("edge", 2, 7, t2, c2), STEK_OK);
    assert_memory_not_equal(t, t2, sizeof(t));
    assert_int_equal(p11_kdf_blocks("edgf", 1, 7, t2, c2), STEK_OK);
    assert_memory_not_equal(t, t2, sizeof(t));
    assert_int_equal(p11_kdf_blocks("edge", 1, UINT64_C(1) << 48, t, c), STEK_ERR_INVALID_ARG);
    assert_int_equal(p11_kdf_blocks("", 1, 1, t, c), STEK_ERR_INVALID_ARG);
}

/* HMAC-KCV of a session key derived from base with the epoch's ticket blocks. */
static void kcv_of_rederive(p11_sess *s, CK_OBJECT_HANDLE base, const char *group, uint32_t gen,
                            uint64_t epoch, uint8_t kcv[32], bool *derived)
{
    uint8_t t[P11_TICKET_BLOCKS * 16], c[P11_CHAIN_BLOCKS * 16];
    assert_int_equal(p11_kdf_blocks(group, gen, epoch, t, c), STEK_OK);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG len = 80;
    CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},     {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &len, sizeof(len)}, {CKA_TOKEN, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
    };
    CK_KEY_DERIVATION_STRING_DATA sd = {t, sizeof(t)};
    CK_MECHANISM m = {CKM_AES_ECB_ENCRYPT_DATA, &sd, sizeof(sd)};
    CK_OBJECT_HANDLE k;
    *derived = p11_derive(s, &m, base, tmpl, 5, &k) == STEK_OK;
    if (!*derived)
        return;
    static const char msg[] = "stek-kcv-v1";
    CK_MECHANISM hm = {CKM_SHA256_HMAC, NULL, 0};
    CK_ULONG kl = 32;
    assert_int_equal(P11_CALL(s->p11, C_SignInit, s->h, &hm, k), STEK_OK);
    assert_int_equal(P11_CALL(s->p11, C_Sign, s->h, (CK_BYTE_PTR)msg, sizeof(msg) - 1, kcv, &kl),
                     STEK_OK);
    assert_int_equal(p11_destroy(s, k), STEK_OK);
}

/*
 * Forward secrecy: once the ratchet passed epoch e and K(e) is destroyed,
 * R(e) is gone and no object left in the token re-derives K(e).
 */
static void test_forward_secrecy(void **state)
{
    (void)state;
    stek_p11 *p11 = open_token(&tok);
    assert_non_null(p11);
    assert_int_equal(stek_p11_root_create(p11, "fs", 1, 10), STEK_OK);
    assert_int_equal(stek_p11_ratchet_advance(p11, "fs", 1, 11), STEK_OK);
    uint8_t kcv10[STEK_P11_KCV_BYTES];
    assert_int_equal(stek_p11_ticket_check_value(p11, "fs", 1, 10, kcv10), STEK_OK);

    /* Sanity: the re-derivation used below does reproduce K(10) from R(10)
     * (the check would prove nothing if it could never match). */
    assert_int_equal(stek_p11_generation_destroy(p11, "fs", 1, NULL), STEK_OK);
    assert_int_equal(stek_p11_root_create(p11, "fs", 2, 10), STEK_OK);
    p11_sess s;
    assert_int_equal(p11_sess_get(p11, &s), STEK_OK);
    char label[STEK_P11_LABEL_MAX];
    assert_int_equal(p11_label(label, "chain", "fs", 2), STEK_OK);
    p11_keyobj *keys = NULL;
    size_t nk = 0;
    assert_int_equal(p11_keys_list(&s, label, &keys, &nk), STEK_OK);
    assert_int_equal(nk, 1);
    uint8_t direct[32];
    bool derived = false;
    kcv_of_rederive(&s, keys[0].h, "fs", 2, 10, direct, &derived);
    free(keys);
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    assert_true(derived);
    uint8_t via_ratchet[STEK_P11_KCV_BYTES];
    assert_int_equal(stek_p11_ratchet_advance(p11, "fs", 2, 11), STEK_OK);
    assert_int_equal(stek_p11_ticket_check_value(p11, "fs", 2, 10, via_ratchet), STEK_OK);
    assert_memory_equal(direct, via_ratchet, 32);

    /* Now the real check on generation 2: pass epoch 10, destroy K(10). */
    assert_int_equal(stek_p11_ratchet_advance(p11, "fs", 2, 14), STEK_OK);
    uint64_t e = 0;
    assert_int_equal(count_kind(p11, STEK_P11_KIND_CHAIN, "fs", 2, &e), 1);
    assert_int_equal(e, 14); /* R(10..13) are gone */
    unsigned destroyed = 0;
    assert_int_equal(stek_p11_ticket_destroy_before(p11, "fs", 2, 12, &destroyed), STEK_OK);
    assert_int_equal(destroyed, 2);
    assert_int_equal(stek_p11_ticket_check_value(p11, "fs", 2, 10, kcv10), STEK_ERR_NOT_FOUND);

    /* Every object that can derive at all tries to rebuild K(10); none does. */
    assert_int_equal(p11_sess_get(p11, &s), STEK_OK);
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE q[] = {{CKA_DERIVE, &yes, sizeof(yes)}};
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    assert_int_equal(p11_find(&s, q, 1, &objs, &n), STEK_OK);
    assert_true(n >= 1);
    for (size_t i = 0; i < n; i++) {
        uint8_t k[32];
        kcv_of_rederive(&s, objs[i], "fs", 2, 10, k, &derived);
        if (derived)
            assert_memory_not_equal(k, via_ratchet, 32);
    }
    free(objs);
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    stek_p11_close(p11);
}

/* CKA_VALUE of every ticket and chain key is refused. */
static void test_no_readable_values(void **state)
{
    (void)state;
    stek_p11 *p11 = open_token(&tok);
    assert_non_null(p11);
    assert_int_equal(stek_p11_root_create(p11, "sealed", 1, 0), STEK_OK);
    assert_int_equal(stek_p11_ratchet_advance(p11, "sealed", 1, 3), STEK_OK);

    p11_sess s;
    assert_int_equal(p11_sess_get(p11, &s), STEK_OK);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE q[] = {{CKA_CLASS, &cls, sizeof(cls)}};
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    assert_int_equal(p11_find(&s, q, 1, &objs, &n), STEK_OK);
    assert_true(n >= 4);
    for (size_t i = 0; i < n; i++) {
        uint8_t v[128];
        CK_ULONG len = sizeof(v);
        assert_int_not_equal(p11_get_attr(&s, objs[i], CKA_VALUE, v, &len), STEK_OK);
        assert_non_null(strstr(stek_error_detail(), "CKR_ATTRIBUTE_SENSITIVE"));
        assert_true(p11_get_bool(&s, objs[i], CKA_SENSITIVE));
        assert_true(p11_get_bool(&s, objs[i], CKA_ALWAYS_SENSITIVE));
    }
    free(objs);
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    stek_p11_close(p11);
}

/*
 * SoftHSM honours CKA_SENSITIVE=FALSE in a derive template and then reveals
 * the value; the layer's chokepoint turns it into TRUE.
 */
static void test_nonsensitive_template_forced(void **state)
{
    (void)state;
    CK_BBOOL f = CK_FALSE;
    CK_ATTRIBUTE in[] = {{CKA_SENSITIVE, &f, sizeof(f)}};
    CK_ATTRIBUTE out[2];
    assert_int_equal(p11_force_sensitive(in, 1, out), 1);
    assert_int_equal(*(CK_BBOOL *)out[0].pValue, CK_TRUE);
    assert_int_equal(p11_force_sensitive(in, 0, out), 1); /* appended when absent */
    assert_int_equal(out[0].type, CKA_SENSITIVE);

    stek_p11 *p11 = open_token(&tok);
    assert_non_null(p11);
    assert_int_equal(stek_p11_root_create(p11, "forced", 1, 0), STEK_OK);
    p11_sess s;
    assert_int_equal(p11_sess_get(p11, &s), STEK_OK);
    char label[STEK_P11_LABEL_MAX];
    assert_int_equal(p11_label(label, "chain", "forced", 1), STEK_OK);
    p11_keyobj *keys = NULL;
    size_t nk = 0;
    assert_int_equal(p11_keys_list(&s, label, &keys, &nk), STEK_OK);
    assert_int_equal(nk, 1);

    uint8_t data[16] = "forced-probe-000";
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG len = 16;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},     {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &len, sizeof(len)}, {CKA_TOKEN, &f, sizeof(f)},
        {CKA_SENSITIVE, &f, sizeof(f)},     {CKA_EXTRACTABLE, &yes, sizeof(yes)},
    };
    CK_KEY_DERIVATION_STRING_DATA sd = {data, sizeof(data)};
    CK_MECHANISM m = {CKM_AES_ECB_ENCRYPT_DATA, &sd, sizeof(sd)};
    CK_OBJECT_HANDLE k;
    assert_int_equal(p11_derive(&s, &m, keys[0].h, tmpl, 6, &k), STEK_OK);
    assert_true(p11_get_bool(&s, k, CKA_SENSITIVE));
    uint8_t v[32];
    CK_ULONG vl = sizeof(v);
    assert_int_not_equal(p11_get_attr(&s, k, CKA_VALUE, v, &vl), STEK_OK);
    assert_int_equal(p11_destroy(&s, k), STEK_OK);

    /* Control: the same template sent around the chokepoint is accepted and
     * the value is readable: the pitfall is real on this SoftHSM. */
    CK_OBJECT_HANDLE raw;
    assert_int_equal(P11_CALL(p11, C_DeriveKey, s.h, &m, keys[0].h, tmpl, 6, &raw), STEK_OK);
    assert_false(p11_get_bool(&s, raw, CKA_SENSITIVE));
    vl = sizeof(v);
    assert_int_equal(p11_get_attr(&s, raw, CKA_VALUE, v, &vl), STEK_OK);
    assert_int_equal(p11_destroy(&s, raw), STEK_OK);
    free(keys);
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    stek_p11_close(p11);
}

/* Every chain key, ratcheted ones included, wraps only under a trusted key. */
static void test_chain_keys_trusted_only(void **state)
{
    (void)state;
    stek_p11 *p11 = open_token(&tok);
    assert_non_null(p11);
    assert_int_equal(stek_p11_root_create(p11, "trusted", 1, 0), STEK_OK);
    uint8_t *spki = NULL;
    size_t spki_len = 0;
    assert_int_equal(stek_p11_transport_create(p11, "probe", &spki, &spki_len), STEK_OK);

    for (uint64_t e = 0; e < 4; e++) {
        if (e > 0)
            assert_int_equal(stek_p11_ratchet_advance(p11, "trusted", 1, e), STEK_OK);
        stek_p11_object_info *o = NULL;
        size_t n = 0;
        assert_int_equal(stek_p11_list(p11, &o, &n), STEK_OK);
        for (size_t i = 0; i < n; i++) {
            if (o[i].kind != STEK_P11_KIND_CHAIN)
                continue;
            assert_true(o[i].wrap_with_trusted);
            assert_true(o[i].sensitive);
            assert_true(o[i].derive);
        }
        free(o);

        char id[16];
        snprintf(id, sizeof(id), "untrusted-%u", (unsigned)e);
        uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
        size_t blob_len = 0;
        uint64_t epoch = 0;
        assert_int_equal(stek_p11_transport_import(p11, id, spki, spki_len, false), STEK_OK);
        assert_int_equal(stek_p11_chain_export(p11, "trusted", 1, id, blob, &blob_len, &epoch),
                         STEK_ERR_NOT_WRAPPABLE);
        assert_non_null(strstr(stek_error_detail(), "CKR_KEY_NOT_WRAPPABLE"));
    }
    free(spki);
    stek_p11_close(p11);
}

/* ---- multi-process work ------------------------------------------------ */

/* Runs fn in a forked child and returns its exit code (0 = success). */
static int in_child(int (*fn)(void *), void *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0)
        _exit(fn(arg) == 0 ? 0 : 1);
    if (pid < 0)
        return -1;
    int status = 0;
    if (fx_wait_exit(pid, 120000, &status) != 0)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int write_blob(const char *dir, const char *name, const void *p, size_t n)
{
    char path[FX_PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    size_t w = fwrite(p, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

static int read_blob(const char *dir, const char *name, void *p, size_t n)
{
    char path[FX_PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return -1;
    size_t r = fread(p, 1, n, f);
    fclose(f);
    return r == n ? 0 : -1;
}

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        stek_status st_ = (x);                                                                     \
        if (st_ != STEK_OK) {                                                                      \
            fprintf(stderr, "%s:%d: %s: %s %s\n", __FILE__, __LINE__, #x, stek_status_name(st_),   \
                    stek_error_detail());                                                          \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

enum { DET_FROM = 52, DET_TO = 55, DET_N = DET_TO - DET_FROM };

typedef struct det_out {
    uint8_t kcv[DET_N][STEK_P11_KCV_BYTES];
    uint8_t hsm_pub[STEK_P256_POINT_BYTES];
    uint8_t blobs[DET_N][STEK_WRAPPED_KEY_BYTES];
} det_out;

typedef struct det_spki {
    uint8_t der[1024];
    size_t len;
} det_spki;

static int b_make_transport(void *arg)
{
    (void)arg;
    stek_p11 *p11 = open_token(&tokb);
    det_spki out = {{0}, 0};
    uint8_t *spki = NULL;
    if (p11 == NULL)
        return 1;
    CHECK(stek_p11_transport_create(p11, "seed", &spki, &out.len));
    if (out.len > sizeof(out.der))
        goto fail;
    memcpy(out.der, spki, out.len);
    free(spki);
    stek_p11_close(p11);
    return write_blob(tok.dir, "spki", &out, sizeof(out));
fail:
    free(spki);
    stek_p11_close(p11);
    return 1;
}

static int a_root_and_export(void *arg)
{
    (void)arg;
    stek_p11 *p11 = open_token(&tok);
    det_spki spki;
    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    if (p11 == NULL || read_blob(tok.dir, "spki", &spki, sizeof(spki)) != 0)
        goto fail;
    CHECK(stek_p11_root_create(p11, "det", 1, 50));
    CHECK(stek_p11_ratchet_advance(p11, "det", 1, DET_FROM));
    CHECK(stek_p11_transport_import(p11, "seed", spki.der, spki.len, true));
    CHECK(stek_p11_chain_export(p11, "det", 1, "seed", blob, &blob_len, &epoch));
    if (epoch != DET_FROM || blob_len != 256)
        goto fail;
    stek_p11_close(p11);
    return write_blob(tok.dir, "chain-blob", blob, blob_len);
fail:
    stek_p11_close(p11);
    return 1;
}

/* Derives and wraps DET_FROM..DET_TO-1 for the host key in "host-pub". */
static int derive_and_wrap(const fx_token *t, bool import, const char *out_name)
{
    stek_p11 *p11 = open_token(t);
    det_out out;
    uint8_t host_pub[STEK_P256_POINT_BYTES];
    uint64_t epochs[DET_N];
    if (p11 == NULL || read_blob(tok.dir, "host-pub", host_pub, sizeof(host_pub)) != 0)
        goto fail;
    if (import) {
        uint8_t blob[256];
        if (read_blob(tok.dir, "chain-blob", blob, sizeof(blob)) != 0)
            goto fail;
        CHECK(stek_p11_chain_import(p11, "det", 1, DET_FROM, "seed", blob, sizeof(blob)));
    }
    CHECK(stek_p11_ratchet_advance(p11, "det", 1, DET_TO));
    for (int i = 0; i < DET_N; i++) {
        epochs[i] = DET_FROM + (uint64_t)i;
        CHECK(stek_p11_ticket_check_value(p11, "det", 1, epochs[i], out.kcv[i]));
    }
    CHECK(stek_p11_wrap_tickets(p11, "det", 1, host_pub, sizeof(host_pub), epochs, DET_N,
                                out.hsm_pub, out.blobs));
    stek_p11_close(p11);
    return write_blob(tok.dir, out_name, &out, sizeof(out));
fail:
    stek_p11_close(p11);
    return 1;
}

static int b_import_and_derive(void *arg)
{
    (void)arg;
    return derive_and_wrap(&tokb, true, "out-b");
}

static int a_derive(void *arg)
{
    (void)arg;
    return derive_and_wrap(&tok, false, "out-a");
}

static void unwrap_all(stek_host_eph *eph, const det_out *o, uint8_t keys[DET_N][80])
{
    stek_secret *kek = NULL;
    assert_int_equal(stek_host_kek_derive(eph, o->hsm_pub, sizeof(o->hsm_pub), "det", 1, &kek),
                     STEK_OK);
    for (int i = 0; i < DET_N; i++) {
        stek_secret *k = NULL;
        assert_int_equal(stek_host_unwrap(kek, o->blobs[i], STEK_WRAPPED_KEY_BYTES, &k), STEK_OK);
        memcpy(keys[i], stek_secret_data(k), 80);
        stek_secret_free(k);
    }
    stek_secret_free(kek);
}

/*
 * Two separate tokens seeded with the same chain key via export/import
 * derive byte-identical ticket keys: compared by the HSM-side HMAC and after
 * unwrapping both with one host key.
 */
static void test_determinism_two_tokens(void **state)
{
    (void)state;
    stek_host_eph *eph = NULL;
    uint8_t host_pub[STEK_P256_POINT_BYTES];
    assert_int_equal(stek_host_eph_generate(&eph), STEK_OK);
    assert_int_equal(stek_host_eph_public(eph, host_pub), STEK_OK);
    assert_int_equal(write_blob(tok.dir, "host-pub", host_pub, sizeof(host_pub)), 0);

    assert_int_equal(in_child(b_make_transport, NULL), 0);
    assert_int_equal(in_child(a_root_and_export, NULL), 0);
    assert_int_equal(in_child(b_import_and_derive, NULL), 0);
    assert_int_equal(in_child(a_derive, NULL), 0);

    det_out a, b;
    assert_int_equal(read_blob(tok.dir, "out-a", &a, sizeof(a)), 0);
    assert_int_equal(read_blob(tok.dir, "out-b", &b, sizeof(b)), 0);
    assert_memory_equal(a.kcv, b.kcv, sizeof(a.kcv));
    assert_memory_not_equal(a.hsm_pub, b.hsm_pub, sizeof(a.hsm_pub));

    uint8_t ka[DET_N][80], kb[DET_N][80];
    unwrap_all(eph, &a, ka);
    unwrap_all(eph, &b, kb);
    assert_memory_equal(ka, kb, sizeof(ka));
    for (int i = 0; i < DET_N; i++) {
        /* The HSM's KCV is the HMAC of exactly the unwrapped bytes. */
        uint8_t mac[32];
        unsigned mac_len = 0;
        assert_non_null(
            HMAC(EVP_sha256(), ka[i], 80, (const uint8_t *)"stek-kcv-v1", 11, mac, &mac_len));
        assert_memory_equal(mac, a.kcv[i], 32);
        if (i > 0)
            assert_memory_not_equal(ka[i], ka[i - 1], 80);
    }
    OPENSSL_cleanse(ka, sizeof(ka));
    OPENSSL_cleanse(kb, sizeof(kb));
    stek_host_eph_free(eph);
}

/* ---- races ------------------------------------------------------------- */

enum { RACE_STEPS = 10 };

static int race_root(void *arg)
{
    (void)arg;
    stek_p11 *p11 = open_token(&tok);
    if (p11 == NULL)
        return 1;
    stek_status st = stek_p11_root_create(p11, "race", 1, 0);
    stek_p11_close(p11);
    return st == STEK_OK ? 0 : 1;
}

/*
 * Calls fn until it succeeds, retrying STEK_ERR_HSM_UNAVAILABLE for up to 10 s
 * the way the scheduler will: SoftHSM makes a token unreadable for a moment
 * while another process writes it. Safety is what the test asserts.
 */
#define RETRY_UNAVAILABLE(call)                                                                    \
    do {                                                                                           \
        stek_status rst_;                                                                          \
        for (int i_ = 0; (rst_ = (call)) == STEK_ERR_HSM_UNAVAILABLE && i_ < 1000; i_++) {         \
            unavailable++;                                                                         \
            struct timespec ts_ = {0, 10 * 1000000L};                                              \
            nanosleep(&ts_, NULL);                                                                 \
        }                                                                                          \
        CHECK(rst_);                                                                               \
    } while (0)

/* Steps the chain one epoch at a time and records each new key's KCV. */
static int race_runner(void *arg)
{
    const char *name = arg;
    stek_p11 *p11 = open_token(&tok);
    uint8_t kcv[RACE_STEPS][STEK_P11_KCV_BYTES];
    int unavailable = 0;
    if (p11 == NULL)
        return 1;
    for (uint64_t e = 1; e <= RACE_STEPS; e++) {
        RETRY_UNAVAILABLE(stek_p11_ratchet_advance(p11, "race", 1, e));
        RETRY_UNAVAILABLE(stek_p11_ticket_check_value(p11, "race", 1, e - 1, kcv[e - 1]));
    }
    if (unavailable > 0)
        fprintf(stderr, "%s: token briefly unavailable %d time(s)\n", name, unavailable);
    stek_p11_close(p11);
    return write_blob(tok.dir, name, kcv, sizeof(kcv));
fail:
    stek_p11_close(p11);
    return 1;
}

static int race_final_check(void *arg)
{
    (void)arg;
    stek_p11 *p11 = open_token(&tok);
    if (p11 == NULL)
        return 1;
    uint64_t e = 0;
    size_t chains = 0, tickets = 0;
    stek_p11_object_info *o = NULL;
    size_t n = 0;
    CHECK(stek_p11_list(p11, &o, &n));
    for (size_t i = 0; i < n; i++) {
        if (strcmp(o[i].group, "race") != 0)
            continue;
        if (o[i].kind == STEK_P11_KIND_CHAIN) {
            chains++;
            e = o[i].epoch;
        } else if (o[i].kind == STEK_P11_KIND_TICKET) {
            tickets++;
        }
    }
    free(o);
    stek_p11_close(p11);
    fprintf(stderr, "race: %zu chain key(s) at epoch %llu, %zu ticket keys\n", chains,
            (unsigned long long)e, tickets);
    return chains == 1 && e == RACE_STEPS && tickets == RACE_STEPS ? 0 : 1;
fail:
    stek_p11_close(p11);
    return 1;
}

/*
 * Two processes step the same chain on one token at the same time: one
 * chain key survives, one ticket key per epoch, and both saw identical keys.
 */
static void test_two_processes_race(void **state)
{
    (void)state;
    assert_int_equal(in_child(race_root, NULL), 0);
    fflush(NULL);
    pid_t a = fork();
    if (a == 0)
        _exit(race_runner("race-a"));
    pid_t b = fork();
    if (b == 0)
        _exit(race_runner("race-b"));
    int sa = -1, sb = -1;
    assert_int_equal(fx_wait_exit(a, 120000, &sa), 0);
    assert_int_equal(fx_wait_exit(b, 120000, &sb), 0);
    assert_true(WIFEXITED(sa) && WEXITSTATUS(sa) == 0);
    assert_true(WIFEXITED(sb) && WEXITSTATUS(sb) == 0);

    uint8_t ka[RACE_STEPS][STEK_P11_KCV_BYTES], kb[RACE_STEPS][STEK_P11_KCV_BYTES];
    assert_int_equal(read_blob(tok.dir, "race-a", ka, sizeof(ka)), 0);
    assert_int_equal(read_blob(tok.dir, "race-b", kb, sizeof(kb)), 0);
    assert_memory_equal(ka, kb, sizeof(ka));
    assert_int_equal(in_child(race_final_check, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_root_and_ratchet),
        cmocka_unit_test(test_kdf_blocks_distinct),
        cmocka_unit_test(test_forward_secrecy),
        cmocka_unit_test(test_no_readable_values),
        cmocka_unit_test(test_nonsensitive_template_forced),
        cmocka_unit_test(test_chain_keys_trusted_only),
        cmocka_unit_test(test_determinism_two_tokens),
        cmocka_unit_test(test_two_processes_race),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
