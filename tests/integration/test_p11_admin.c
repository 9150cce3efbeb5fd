/*
 * Housekeeping on a real SoftHSM token: listing (never values), transport
 * keys, chain export/import within one token, the SO login dance, and the
 * exact counts of the destroy calls.
 *
 * Export/import here goes from the token to itself: the chain key of a
 * generation is exported, the generation destroyed, and the blob imported
 * back; the ratchet must then give the same ticket keys as before (compared
 * by the HSM's own key check values). Determinism across two tokens is
 * tested in test_p11_chain.
 *
 * The tests run in order and share one token; each uses its own group.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "fx.h"
#include "p11_internal.h"
#include "stek_p11.h"

/* assert_int_equal on a status; on a mismatch it names both and the detail. */
#define assert_status(expr, want)                                                                  \
    do {                                                                                           \
        stek_status st_ = (expr);                                                                  \
        stek_status want_ = (want);                                                                \
        if (st_ != want_)                                                                          \
            print_error("%s\n  got %s, want %s: %s\n", #expr, stek_status_name(st_),               \
                        stek_status_name(want_), stek_error_detail());                             \
        assert_int_equal(st_, want_);                                                              \
    } while (0)

#define BAD_SO_PIN_ENV "STEK_ADMIN_TEST_BAD_SO_PIN"

static fx_token tok;
static stek_p11 *p11;

/* An RSA-2048 SPKI made by OpenSSL, for imports that never get exported to. */
static uint8_t *ossl_rsa_spki;
static size_t ossl_rsa_spki_len;

/* The SPKI of transport key "t1", made by the token in test_transport_create. */
static uint8_t *t1_spki;
static size_t t1_spki_len;

/* ---- helpers --------------------------------------------------------- */

static stek_status open_handle(const char *so_pin_env, const char *so_pin_file, stek_p11 **out)
{
    stek_p11_config cfg = {
        .module_path = tok.module,
        .token_label = tok.label,
        .pin_env = tok.pin_env,
        .so_pin_env = so_pin_env,
        .so_pin_file = so_pin_file,
    };
    return stek_p11_open(&cfg, out);
}

/*
 * One handle at a time: two handles in a process share the module, and
 * closing one finalizes it under the other. Tests that need another
 * configuration close the shared handle and reopen it afterwards.
 */
static bool p11_is_default; /* p11 was opened with the default configuration */

static void reopen_default(void)
{
    stek_p11_close(p11);
    p11 = NULL;
    p11_is_default = false;
    assert_status(open_handle(tok.so_pin_env, NULL, &p11), STEK_OK);
    p11_is_default = true;
}

/* Opens p11 with another SO PIN source; reopen_default() or the next setup undoes it. */
static void reopen_with(const char *so_pin_env, const char *so_pin_file)
{
    stek_p11_close(p11);
    p11 = NULL;
    p11_is_default = false;
    assert_status(open_handle(so_pin_env, so_pin_file, &p11), STEK_OK);
}

/* Per-test setup: a failed test that changed the handle does not leak into the next. */
static int ensure_default(void **state)
{
    (void)state;
    if (unsetenv(BAD_SO_PIN_ENV) != 0)
        return -1;
    if (p11_is_default && p11 != NULL)
        return 0;
    stek_p11_close(p11);
    p11 = NULL;
    if (open_handle(tok.so_pin_env, NULL, &p11) != STEK_OK)
        return -1;
    p11_is_default = true;
    return 0;
}

static uint8_t *der_spki(EVP_PKEY *k, size_t *len)
{
    unsigned char *der = NULL;
    int n = i2d_PUBKEY(k, &der);
    assert_true(n > 0);
    uint8_t *out = malloc((size_t)n);
    assert_non_null(out);
    memcpy(out, der, (size_t)n);
    OPENSSL_free(der);
    *len = (size_t)n;
    return out;
}

static int group_setup(void **state)
{
    (void)state;
    if (fx_token_create(&tok, "stek-test") != 0)
        return -1;
    stek_status st = open_handle(tok.so_pin_env, NULL, &p11);
    if (st != STEK_OK) {
        fprintf(stderr, "stek_p11_open: %s: %s\n", stek_status_name(st), stek_error_detail());
        return -1;
    }
    p11_is_default = true;
    EVP_PKEY *rsa = EVP_RSA_gen(2048);
    if (rsa == NULL)
        return -1;
    unsigned char *der = NULL;
    int n = i2d_PUBKEY(rsa, &der);
    EVP_PKEY_free(rsa);
    if (n <= 0)
        return -1;
    ossl_rsa_spki = malloc((size_t)n);
    if (ossl_rsa_spki == NULL)
        return -1;
    memcpy(ossl_rsa_spki, der, (size_t)n);
    ossl_rsa_spki_len = (size_t)n;
    OPENSSL_free(der);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    stek_p11_close(p11);
    p11 = NULL;
    free(ossl_rsa_spki);
    free(t1_spki);
    return fx_token_destroy(&tok) == 0 ? 0 : -1;
}

/* Lists the token; the caller frees *objs. */
static size_t list(stek_p11_object_info **objs)
{
    size_t n = 0;
    *objs = NULL;
    assert_status(stek_p11_list(p11, objs, &n), STEK_OK);
    return n;
}

/* How many listed objects have this label. */
static size_t count_label(const char *label)
{
    stek_p11_object_info *objs;
    size_t n = list(&objs), c = 0;
    for (size_t i = 0; i < n; i++)
        c += strcmp(objs[i].label, label) == 0;
    free(objs);
    return c;
}

static size_t count_kind(stek_p11_kind kind)
{
    stek_p11_object_info *objs;
    size_t n = list(&objs), c = 0;
    for (size_t i = 0; i < n; i++)
        c += objs[i].kind == kind;
    free(objs);
    return c;
}

/* Number of chain (or ticket) keys of (g,n) in the listing. */
static size_t count_keys(stek_p11_kind kind, const char *group, uint32_t gen)
{
    stek_p11_object_info *objs;
    size_t n = list(&objs), c = 0;
    for (size_t i = 0; i < n; i++)
        c += objs[i].kind == kind && strcmp(objs[i].group, group) == 0 && objs[i].generation == gen;
    free(objs);
    return c;
}

/* Makes a token object the schedule did not make (test-only C_* calls). */
static void create_foreign(void)
{
    CK_BBOOL yes = CK_TRUE;
    CK_OBJECT_CLASS data_cls = CKO_DATA;
    const char value[] = "not a key";
    CK_ATTRIBUTE data_t[] = {
        {CKA_CLASS, &data_cls, sizeof(data_cls)},  {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},          {CKA_LABEL, (void *)"foreign", 7},
        {CKA_VALUE, (void *)value, sizeof(value)},
    };
    CK_ULONG len32 = 32;
    CK_ATTRIBUTE aes_t[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},     {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)}, {CKA_VALUE_LEN, &len32, sizeof(len32)},
        {CKA_LABEL, (void *)"foreign", 7},
    };
    /* A look-alike: stek's label shape, but a CKA_ID stek never makes. */
    CK_BYTE short_id[4] = {0, 0, 0, 7};
    CK_ATTRIBUTE fake_t[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_VALUE_LEN, &len32, sizeof(len32)},
        {CKA_LABEL, (void *)"stek:chain:lst:9", 16},
        {CKA_ID, short_id, sizeof(short_id)},
    };
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h;
    p11_sess s;
    assert_status(p11_sess_get(p11, &s), STEK_OK);
    stek_status st = P11_CALL(p11, C_CreateObject, s.h, data_t, 5, &h);
    stek_status st2 = P11_CALL(p11, C_GenerateKey, s.h, &gen, aes_t, 5, &h);
    stek_status st3 = P11_CALL(p11, C_GenerateKey, s.h, &gen, fake_t, 6, &h);
    assert_status(p11_sess_done(&s, STEK_OK), STEK_OK);
    assert_status(st, STEK_OK);
    assert_status(st2, STEK_OK);
    assert_status(st3, STEK_OK);
}

/* CKA_VALUE of every object with this label is refused (the one read allowed). */
static void assert_value_refused(const char *label)
{
    CK_ATTRIBUTE q[] = {{CKA_LABEL, (void *)label, strlen(label)}};
    p11_sess s;
    assert_status(p11_sess_get(p11, &s), STEK_OK);
    CK_OBJECT_HANDLE *objs = NULL;
    size_t n = 0;
    stek_status st = p11_find(&s, q, 1, &objs, &n);
    size_t refused = 0;
    for (size_t i = 0; st == STEK_OK && i < n; i++) {
        uint8_t buf[128];
        CK_ATTRIBUTE a = {CKA_VALUE, buf, sizeof(buf)};
        stek_status vst = P11_CALL(p11, C_GetAttributeValue, s.h, objs[i], &a, 1);
        if (vst != STEK_OK && strstr(stek_error_detail(), "CKR_ATTRIBUTE_SENSITIVE") != NULL &&
            a.ulValueLen == CK_UNAVAILABLE_INFORMATION)
            refused++;
        memset(buf, 0, sizeof(buf));
    }
    free(objs);
    assert_status(p11_sess_done(&s, st), STEK_OK);
    assert_true(n > 0);
    assert_int_equal(refused, n);
}

static void kcvs(const char *group, uint32_t gen, uint64_t from, size_t n,
                 uint8_t out[][STEK_P11_KCV_BYTES])
{
    for (size_t i = 0; i < n; i++)
        assert_status(stek_p11_ticket_check_value(p11, group, gen, from + i, out[i]), STEK_OK);
}

/* ---- listing --------------------------------------------------------- */

static void test_list(void **state)
{
    (void)state;
    assert_status(stek_p11_root_create(p11, "lst", 4, 50), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "lst", 4, 53), STEK_OK);
    assert_status(stek_p11_signing_key_create(p11), STEK_OK);
    create_foreign();

    stek_p11_object_info *objs;
    size_t n = list(&objs);
    size_t chains = 0, tickets = 0, sign_priv = 0, sign_pub = 0, foreign = 0, lookalike = 0;
    bool seen_epoch[3] = {false, false, false};
    for (size_t i = 0; i < n; i++) {
        const stek_p11_object_info *o = &objs[i];
        switch (o->kind) {
        case STEK_P11_KIND_CHAIN:
            chains++;
            assert_string_equal(o->label, "stek:chain:lst:4");
            assert_string_equal(o->group, "lst");
            assert_int_equal(o->generation, 4);
            assert_int_equal(o->epoch, 53);
            assert_true(o->token);
            assert_true(o->sensitive);
            assert_true(o->always_sensitive);
            assert_true(o->wrap_with_trusted);
            assert_true(o->derive);
            assert_false(o->is_private_key);
            assert_false(o->is_public_key);
            break;
        case STEK_P11_KIND_TICKET:
            tickets++;
            assert_string_equal(o->label, "stek:ticket:lst:4");
            assert_string_equal(o->group, "lst");
            assert_int_equal(o->generation, 4);
            assert_true(o->epoch >= 50 && o->epoch <= 52);
            seen_epoch[o->epoch - 50] = true;
            assert_true(o->token);
            assert_true(o->sensitive);
            assert_false(o->derive);
            assert_false(o->is_private_key);
            break;
        case STEK_P11_KIND_SIGNING:
            assert_string_equal(o->label, "stek:signing");
            assert_string_equal(o->group, "");
            if (o->is_private_key) {
                sign_priv++;
                assert_true(o->sensitive);
                assert_false(o->extractable);
                assert_true(o->never_extractable);
            } else {
                assert_true(o->is_public_key);
                sign_pub++;
            }
            break;
        case STEK_P11_KIND_OTHER:
            if (strcmp(o->label, "foreign") == 0)
                foreign++;
            else if (strcmp(o->label, "stek:chain:lst:9") == 0)
                lookalike++;
            assert_string_equal(o->group, "");
            break;
        default:
            fail_msg("unexpected kind %s for %s", stek_p11_kind_name(o->kind), o->label);
        }
    }
    free(objs);
    assert_int_equal(chains, 1);
    assert_int_equal(tickets, 3);
    assert_true(seen_epoch[0] && seen_epoch[1] && seen_epoch[2]);
    assert_int_equal(sign_priv, 1);
    assert_int_equal(sign_pub, 1);
    assert_int_equal(foreign, 2);   /* the data object and the AES key */
    assert_int_equal(lookalike, 1); /* stek's label, not stek's CKA_ID */
    assert_int_equal(n, 1 + 3 + 2 + 3);

    assert_string_equal(stek_p11_kind_name(STEK_P11_KIND_CHAIN), "chain");
    assert_string_equal(stek_p11_kind_name(STEK_P11_KIND_TICKET), "ticket");
    assert_string_equal(stek_p11_kind_name(STEK_P11_KIND_SIGNING), "signing");
    assert_string_equal(stek_p11_kind_name(STEK_P11_KIND_TRANSPORT), "transport");
    assert_string_equal(stek_p11_kind_name(STEK_P11_KIND_OTHER), "other");

    /* Bad arguments. */
    size_t cnt = 0;
    assert_status(stek_p11_list(NULL, &objs, &cnt), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_list(p11, NULL, &cnt), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_list(p11, &objs, NULL), STEK_ERR_INVALID_ARG);
}

/* ---- transport keys -------------------------------------------------- */

static void test_transport_create(void **state)
{
    (void)state;
    assert_status(stek_p11_transport_create(p11, "t1", &t1_spki, &t1_spki_len), STEK_OK);
    assert_non_null(t1_spki);
    const unsigned char *p = t1_spki;
    EVP_PKEY *k = d2i_PUBKEY(NULL, &p, (long)t1_spki_len);
    assert_non_null(k);
    assert_ptr_equal(p, t1_spki + t1_spki_len); /* nothing trailing */
    assert_int_equal(EVP_PKEY_get_base_id(k), EVP_PKEY_RSA);
    assert_int_equal(EVP_PKEY_get_bits(k), 2048);
    EVP_PKEY_free(k);

    /* The private half is a token object; the public half was not kept. */
    stek_p11_object_info *objs;
    size_t n = list(&objs), found = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(objs[i].label, "stek:transport:t1") != 0)
            continue;
        found++;
        assert_int_equal(objs[i].kind, STEK_P11_KIND_TRANSPORT);
        assert_true(objs[i].is_private_key);
        assert_true(objs[i].token);
        assert_true(objs[i].sensitive);
        assert_false(objs[i].extractable);
    }
    free(objs);
    assert_int_equal(found, 1);

    uint8_t *spki = NULL;
    size_t spki_len = 0;
    assert_status(stek_p11_transport_create(p11, "t1", &spki, &spki_len), STEK_ERR_EXISTS);
    assert_null(spki);
    assert_int_equal(count_label("stek:transport:t1"), 1);

    /* Bad ids and arguments. */
    assert_status(stek_p11_transport_create(p11, "T 1", &spki, &spki_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_create(p11, "", &spki, &spki_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_create(p11, NULL, &spki, &spki_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_create(p11, "t9", NULL, &spki_len), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_create(p11, "t9", &spki, NULL), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_create(NULL, "t9", &spki, &spki_len), STEK_ERR_INVALID_ARG);
    assert_null(spki);
    assert_int_equal(count_label("stek:transport:t9"), 0);
}

static void test_import_bad_spki(void **state)
{
    (void)state;
    size_t before = count_kind(STEK_P11_KIND_TRANSPORT);

    uint8_t garbage[300];
    assert_int_equal(RAND_bytes(garbage, sizeof(garbage)), 1);
    assert_status(stek_p11_transport_import(p11, "bad", garbage, sizeof(garbage), false),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_import(p11, "bad", garbage, sizeof(garbage), true),
                  STEK_ERR_INVALID_ARG);

    /* A well-formed SPKI of the wrong algorithm. */
    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(ec);
    size_t ec_len = 0;
    uint8_t *ec_spki = der_spki(ec, &ec_len);
    EVP_PKEY_free(ec);
    assert_status(stek_p11_transport_import(p11, "bad", ec_spki, ec_len, false),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_import(p11, "bad", ec_spki, ec_len, true),
                  STEK_ERR_INVALID_ARG);
    free(ec_spki);

    /* RSA, but too small. */
    EVP_PKEY *small = EVP_RSA_gen(1024);
    assert_non_null(small);
    size_t small_len = 0;
    uint8_t *small_spki = der_spki(small, &small_len);
    EVP_PKEY_free(small);
    assert_status(stek_p11_transport_import(p11, "bad", small_spki, small_len, false),
                  STEK_ERR_INVALID_ARG);
    free(small_spki);

    /* A good SPKI, truncated, or with a trailing byte. */
    assert_status(
        stek_p11_transport_import(p11, "bad", ossl_rsa_spki, ossl_rsa_spki_len - 1, false),
        STEK_ERR_INVALID_ARG);
    uint8_t *longer = malloc(ossl_rsa_spki_len + 1);
    assert_non_null(longer);
    memcpy(longer, ossl_rsa_spki, ossl_rsa_spki_len);
    longer[ossl_rsa_spki_len] = 0;
    assert_status(stek_p11_transport_import(p11, "bad", longer, ossl_rsa_spki_len + 1, false),
                  STEK_ERR_INVALID_ARG);
    free(longer);
    assert_status(stek_p11_transport_import(p11, "bad", ossl_rsa_spki, 0, false),
                  STEK_ERR_INVALID_ARG);

    /* NULLs and a bad id. */
    assert_status(stek_p11_transport_import(p11, "bad", NULL, 10, false), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_import(p11, NULL, ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_import(p11, "Bad!", ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_transport_import(NULL, "bad", ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_ERR_INVALID_ARG);

    /* Nothing was created. */
    assert_int_equal(count_label("stek:transport:bad"), 0);
    assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), before);
}

/* An untrusted transport key cannot wrap a chain key, and is gone afterwards. */
static void test_untrusted_export(void **state)
{
    (void)state;
    assert_status(stek_p11_root_create(p11, "unt", 1, 7), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "unt", 1, 8), STEK_OK);

    assert_status(stek_p11_transport_import(p11, "u1", ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_OK);
    assert_int_equal(count_label("stek:transport:u1"), 1);
    assert_status(stek_p11_transport_import(p11, "u1", ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_ERR_EXISTS);
    stek_p11_object_info *objs;
    size_t n = list(&objs);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(objs[i].label, "stek:transport:u1") == 0) {
            assert_int_equal(objs[i].kind, STEK_P11_KIND_TRANSPORT);
            assert_true(objs[i].is_public_key);
            assert_false(objs[i].trusted);
        }
    }
    free(objs);

    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    assert_status(stek_p11_chain_export(p11, "unt", 1, "u1", blob, &blob_len, &epoch),
                  STEK_ERR_NOT_WRAPPABLE);
    assert_non_null(strstr(stek_error_detail(), "CKR_KEY_NOT_WRAPPABLE"));
    /* Single use: the imported key was destroyed by the failed export. */
    assert_int_equal(count_label("stek:transport:u1"), 0);
    assert_status(stek_p11_chain_export(p11, "unt", 1, "u1", blob, &blob_len, &epoch),
                  STEK_ERR_NOT_FOUND);
    /* The chain is untouched. */
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    assert_int_equal(newest, 8);
}

/* The SO PIN from a file works too; a failed export still consumes the key. */
static void test_trusted_import_so_pin_file(void **state)
{
    (void)state;
    reopen_with(NULL, tok.so_pin_file);
    assert_status(stek_p11_transport_import(p11, "fp", ossl_rsa_spki, ossl_rsa_spki_len, true),
                  STEK_OK);
    stek_p11_object_info *objs;
    size_t n = list(&objs), found = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(objs[i].label, "stek:transport:fp") == 0) {
            found++;
            assert_int_equal(objs[i].kind, STEK_P11_KIND_TRANSPORT);
            assert_true(objs[i].is_public_key);
            assert_true(objs[i].trusted);
            assert_true(objs[i].token);
        }
    }
    free(objs);
    assert_int_equal(found, 1);
    /* Back to user operations after the SO dance. */
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    assert_status(stek_p11_ping(p11), STEK_OK);
    /* Export of a group with no chain: not found, and the key is consumed. */
    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    assert_status(stek_p11_chain_export(p11, "nochain", 1, "fp", blob, &blob_len, &epoch),
                  STEK_ERR_NOT_FOUND);
    assert_int_equal(count_label("stek:transport:fp"), 0);
    reopen_default();
}

static void test_so_pin_wrong(void **state)
{
    (void)state;
    const char *bad = "0123456789abcdef-wrong";
    assert_string_not_equal(bad, tok.so_pin);
    assert_int_equal(setenv(BAD_SO_PIN_ENV, bad, 1), 0);
    reopen_with(BAD_SO_PIN_ENV, NULL);

    stek_p11_stats before, after;
    stek_p11_get_stats(p11, &before);
    assert_status(stek_p11_transport_import(p11, "wso", ossl_rsa_spki, ossl_rsa_spki_len, true),
                  STEK_ERR_PIN_INCORRECT);
    stek_p11_get_stats(p11, &after);
    /* One user re-login to restore the session, no more. */
    assert_int_equal(after.login_calls, before.login_calls + 1);

    /* The user session is back: user operations work on this handle. */
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    assert_int_equal(newest, 8);
    assert_status(stek_p11_ping(p11), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "unt", 1, 9), STEK_OK);
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    assert_int_equal(newest, 9);
    /* Nothing was created, and an untrusted import still works. */
    assert_int_equal(count_label("stek:transport:wso"), 0);
    assert_status(stek_p11_transport_import(p11, "wso", ossl_rsa_spki, ossl_rsa_spki_len, false),
                  STEK_OK);
    assert_int_equal(count_label("stek:transport:wso"), 1);
    /* Consume it (a missing chain destroys it too). */
    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    assert_status(stek_p11_chain_export(p11, "nochain", 1, "wso", blob, &blob_len, &epoch),
                  STEK_ERR_NOT_FOUND);
    assert_int_equal(count_label("stek:transport:wso"), 0);

    assert_int_equal(unsetenv(BAD_SO_PIN_ENV), 0);
    reopen_default();
}

static void test_so_pin_missing(void **state)
{
    (void)state;
    reopen_with(NULL, NULL);
    assert_status(stek_p11_transport_import(p11, "nso", ossl_rsa_spki, ossl_rsa_spki_len, true),
                  STEK_ERR_PIN_MISSING);
    assert_int_equal(count_label("stek:transport:nso"), 0);
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    /* A named variable that is not set is missing too. */
    assert_null(getenv(BAD_SO_PIN_ENV));
    reopen_with(BAD_SO_PIN_ENV, NULL);
    assert_status(stek_p11_transport_import(p11, "nso", ossl_rsa_spki, ossl_rsa_spki_len, true),
                  STEK_ERR_PIN_MISSING);
    assert_int_equal(count_label("stek:transport:nso"), 0);
    assert_status(stek_p11_chain_newest(p11, "unt", 1, &newest), STEK_OK);
    reopen_default();
}

/* ---- export and import within one token ----------------------------- */

static uint8_t exp_blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
static size_t exp_blob_len;

static void test_export_import_round_trip(void **state)
{
    (void)state;
    assert_non_null(t1_spki); /* from test_transport_create */
    assert_status(stek_p11_root_create(p11, "exp", 1, 10), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "exp", 1, 12), STEK_OK);
    uint64_t e = 0;
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &e), STEK_OK);
    assert_int_equal(e, 12);

    /* Source side: trust the transport key (SO PIN), export the chain key. */
    assert_status(stek_p11_transport_import(p11, "t1", t1_spki, t1_spki_len, true), STEK_OK);
    assert_int_equal(count_label("stek:transport:t1"), 2); /* target private + source public */
    uint64_t exported = 0;
    assert_status(stek_p11_chain_export(p11, "exp", 1, "t1", exp_blob, &exp_blob_len, &exported),
                  STEK_OK);
    assert_int_equal(exported, e);
    assert_int_equal(exp_blob_len, 256);
    /* The imported public key is single use: only the private half is left. */
    stek_p11_object_info *objs;
    size_t n = list(&objs), left = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(objs[i].label, "stek:transport:t1") == 0) {
            left++;
            assert_true(objs[i].is_private_key);
        }
    }
    free(objs);
    assert_int_equal(left, 1);

    /* Record K(E), K(E+1), K(E+2) by their check values, then drop the generation. */
    assert_status(stek_p11_ratchet_advance(p11, "exp", 1, e + 3), STEK_OK);
    uint8_t want[3][STEK_P11_KCV_BYTES], got[3][STEK_P11_KCV_BYTES];
    kcvs("exp", 1, e, 3, want);
    assert_memory_not_equal(want[0], want[1], STEK_P11_KCV_BYTES);
    assert_memory_not_equal(want[1], want[2], STEK_P11_KCV_BYTES);
    unsigned destroyed = 0;
    /* R(E+3) and the tickets 10..14. */
    assert_status(stek_p11_generation_destroy(p11, "exp", 1, &destroyed), STEK_OK);
    assert_int_equal(destroyed, 1 + 5);
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &newest), STEK_ERR_NOT_FOUND);
    assert_status(stek_p11_ticket_check_value(p11, "exp", 1, e, got[0]), STEK_ERR_NOT_FOUND);

    /* Target side: unwrap into R(exp,1,E); the transport private key goes. */
    assert_status(stek_p11_chain_import(p11, "exp", 1, e, "t1", exp_blob, exp_blob_len), STEK_OK);
    assert_int_equal(count_label("stek:transport:t1"), 0);
    assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), 0);
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &newest), STEK_OK);
    assert_int_equal(newest, e);

    /* The imported chain key has a locally made one's attributes. */
    n = list(&objs);
    size_t chains = 0;
    for (size_t i = 0; i < n; i++) {
        if (objs[i].kind != STEK_P11_KIND_CHAIN || strcmp(objs[i].group, "exp") != 0)
            continue;
        chains++;
        assert_int_equal(objs[i].generation, 1);
        assert_int_equal(objs[i].epoch, e);
        assert_true(objs[i].token);
        assert_true(objs[i].sensitive);
        assert_true(objs[i].wrap_with_trusted);
        assert_true(objs[i].derive);
    }
    free(objs);
    assert_int_equal(chains, 1);
    assert_value_refused("stek:chain:exp:1");

    /* Same chain key, same schedule: identical ticket keys, by the HSM's HMAC. */
    assert_status(stek_p11_ratchet_advance(p11, "exp", 1, e + 3), STEK_OK);
    kcvs("exp", 1, e, 3, got);
    for (int i = 0; i < 3; i++)
        assert_memory_equal(want[i], got[i], STEK_P11_KCV_BYTES);
    assert_value_refused("stek:ticket:exp:1");
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "exp", 1), 1);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "exp", 1), 3);
}

/* Import onto a chain already at or past the blob's epoch: refused. */
static void test_import_exists(void **state)
{
    (void)state;
    assert_true(exp_blob_len > 0); /* from test_export_import_round_trip */
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &newest), STEK_OK);
    assert_int_equal(newest, 15);

    const uint64_t at[] = {12, 15}; /* past, and equal to the newest */
    const char *ids[] = {"t2", "t3"};
    for (int i = 0; i < 2; i++) {
        uint8_t *spki = NULL;
        size_t spki_len = 0;
        assert_status(stek_p11_transport_create(p11, ids[i], &spki, &spki_len), STEK_OK);
        free(spki);
        assert_status(stek_p11_chain_import(p11, "exp", 1, at[i], ids[i], exp_blob, exp_blob_len),
                      STEK_ERR_EXISTS);
        /* The transport key is single use, whatever the outcome. */
        assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), 0);
    }
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &newest), STEK_OK);
    assert_int_equal(newest, 15);
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "exp", 1), 1);

    /* No transport key with that id: not found. */
    assert_status(stek_p11_chain_import(p11, "exp", 7, 1, "none", exp_blob, exp_blob_len),
                  STEK_ERR_NOT_FOUND);
    /* Bad blob sizes and arguments are refused before the token. */
    assert_status(stek_p11_chain_import(p11, "exp", 7, 1, "none", exp_blob, 0),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_chain_import(p11, "exp", 7, 1, "none", exp_blob,
                                        STEK_P11_CHAIN_BLOB_MAX_BYTES + 1),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_chain_import(p11, "exp", 7, 1, "none", NULL, 256), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_chain_import(p11, "Exp", 7, 1, "none", exp_blob, exp_blob_len),
                  STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_chain_newest(p11, "exp", 7, &newest), STEK_ERR_NOT_FOUND);
}

/* A damaged blob never becomes a chain key. */
static void test_import_corrupt_blob(void **state)
{
    (void)state;
    /* A fresh, genuine blob for transport key t4 (the chain is at 15 now). */
    uint8_t *spki = NULL;
    size_t spki_len = 0;
    assert_status(stek_p11_transport_create(p11, "t4", &spki, &spki_len), STEK_OK);
    assert_status(stek_p11_transport_import(p11, "t4", spki, spki_len, true), STEK_OK);
    free(spki);
    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    assert_status(stek_p11_chain_export(p11, "exp", 1, "t4", blob, &blob_len, &epoch), STEK_OK);
    assert_int_equal(epoch, 15);
    assert_int_equal(blob_len, 256);

    /* One flipped byte, into a fresh generation (3): refused, nothing created. */
    uint8_t bad[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    memcpy(bad, blob, blob_len);
    bad[100] ^= 0x01;
    stek_status st = stek_p11_chain_import(p11, "exp", 3, epoch, "t4", bad, blob_len);
    print_message("import of a corrupt blob: %s (%s)\n", stek_status_name(st), stek_error_detail());
    assert_int_not_equal(st, STEK_OK);
    assert_int_equal(st, STEK_ERR_VERIFY);
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "exp", 3, &newest), STEK_ERR_NOT_FOUND);
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "exp", 3), 0);
    assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), 0);

    /* Truncated, with a fresh transport key t5. */
    assert_status(stek_p11_transport_create(p11, "t5", &spki, &spki_len), STEK_OK);
    free(spki);
    st = stek_p11_chain_import(p11, "exp", 3, epoch, "t5", blob, 128);
    print_message("import of a truncated blob: %s (%s)\n", stek_status_name(st),
                  stek_error_detail());
    assert_int_not_equal(st, STEK_OK);
    assert_int_equal(st, STEK_ERR_VERIFY);
    assert_status(stek_p11_chain_newest(p11, "exp", 3, &newest), STEK_ERR_NOT_FOUND);
    assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), 0);

    /* Intact, but unwrapped with the wrong transport key (t6). */
    assert_status(stek_p11_transport_create(p11, "t6", &spki, &spki_len), STEK_OK);
    free(spki);
    st = stek_p11_chain_import(p11, "exp", 3, epoch, "t6", blob, blob_len);
    print_message("import with the wrong transport key: %s (%s)\n", stek_status_name(st),
                  stek_error_detail());
    assert_int_not_equal(st, STEK_OK);
    assert_int_equal(st, STEK_ERR_VERIFY);
    assert_status(stek_p11_chain_newest(p11, "exp", 3, &newest), STEK_ERR_NOT_FOUND);
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "exp", 3), 0);
    assert_int_equal(count_kind(STEK_P11_KIND_TRANSPORT), 0);

    /* The source chain is untouched by all of it. */
    assert_status(stek_p11_chain_newest(p11, "exp", 1, &newest), STEK_OK);
    assert_int_equal(newest, 15);
}

/* ---- destroy counts -------------------------------------------------- */

static void test_destroy_counts(void **state)
{
    (void)state;
    assert_status(stek_p11_root_create(p11, "dst", 1, 0), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "dst", 1, 6), STEK_OK); /* K 0..5, R 6 */
    assert_status(stek_p11_root_create(p11, "dst", 2, 0), STEK_OK);
    assert_status(stek_p11_ratchet_advance(p11, "dst", 2, 2), STEK_OK); /* K 0..1, R 2 */
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 1), 6);

    unsigned d = 99;
    assert_status(stek_p11_ticket_destroy_before(p11, "dst", 1, 3, &d), STEK_OK);
    assert_int_equal(d, 3); /* 0, 1, 2 */
    d = 99;
    assert_status(stek_p11_ticket_destroy_before(p11, "dst", 1, 3, &d), STEK_OK);
    assert_int_equal(d, 0);
    bool exists = true;
    assert_status(stek_p11_ticket_exists(p11, "dst", 1, 2, &exists), STEK_OK);
    assert_false(exists);
    assert_status(stek_p11_ticket_exists(p11, "dst", 1, 3, &exists), STEK_OK);
    assert_true(exists);
    /* A NULL counter is allowed. */
    assert_status(stek_p11_ticket_destroy_before(p11, "dst", 1, 4, NULL), STEK_OK);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 1), 2); /* 4, 5 */
    /* Only generation 1 was touched. */
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 2), 2);
    /* An epoch at or below the oldest destroys nothing. */
    d = 99;
    assert_status(stek_p11_ticket_destroy_before(p11, "dst", 1, 4, &d), STEK_OK);
    assert_int_equal(d, 0);
    /* Ticket destruction leaves the chain alone. */
    uint64_t newest = 0;
    assert_status(stek_p11_chain_newest(p11, "dst", 1, &newest), STEK_OK);
    assert_int_equal(newest, 6);

    d = 99;
    assert_status(stek_p11_generation_destroy(p11, "dst", 1, &d), STEK_OK);
    assert_int_equal(d, 1 + 2); /* R 6, K 4, K 5 */
    d = 99;
    assert_status(stek_p11_generation_destroy(p11, "dst", 1, &d), STEK_OK);
    assert_int_equal(d, 0);
    assert_status(stek_p11_chain_newest(p11, "dst", 1, &newest), STEK_ERR_NOT_FOUND);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 1), 0);
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "dst", 1), 0);

    /* Generation 2 survives generation 1's destruction. */
    assert_status(stek_p11_chain_newest(p11, "dst", 2, &newest), STEK_OK);
    assert_int_equal(newest, 2);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 2), 2);
    d = 99;
    assert_status(stek_p11_generation_destroy(p11, "dst", 2, NULL), STEK_OK);
    assert_status(stek_p11_chain_newest(p11, "dst", 2, &newest), STEK_ERR_NOT_FOUND);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "dst", 2), 0);

    /* A group that never existed: zero, not an error. */
    d = 99;
    assert_status(stek_p11_generation_destroy(p11, "never", 1, &d), STEK_OK);
    assert_int_equal(d, 0);
    d = 99;
    assert_status(stek_p11_ticket_destroy_before(p11, "never", 1, 100, &d), STEK_OK);
    assert_int_equal(d, 0);
    /* Bad group names. */
    assert_status(stek_p11_generation_destroy(p11, "Never", 1, &d), STEK_ERR_INVALID_ARG);
    assert_status(stek_p11_ticket_destroy_before(p11, "", 1, 1, &d), STEK_ERR_INVALID_ARG);

    /* Other groups are untouched by all of the above. */
    assert_int_equal(count_keys(STEK_P11_KIND_CHAIN, "lst", 4), 1);
    assert_int_equal(count_keys(STEK_P11_KIND_TICKET, "lst", 4), 3);
}

/* Generation records: one per (group, generation), listed in order, gone
 * with their generation, and classified as such by the listing. */
static void test_generation_records(void **state)
{
    (void)state;
    stek_p11_generation *g = NULL;
    size_t n = 99;
    assert_int_equal(stek_p11_generation_list(p11, "genrec", &g, &n), STEK_OK);
    assert_int_equal(n, 0);
    assert_null(g);

    assert_int_equal(stek_p11_generation_record(p11, "genrec", 2, 2000), STEK_OK);
    assert_int_equal(stek_p11_generation_record(p11, "genrec", 1, 1000), STEK_OK);
    assert_int_equal(stek_p11_generation_record(p11, "genrec", 1, 1500), STEK_ERR_EXISTS);
    assert_int_equal(stek_p11_generation_record(p11, "genrec2", 7, 7), STEK_OK);
    assert_int_equal(stek_p11_generation_record(p11, "genrec", 3, -1), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_p11_generation_record(p11, "Bad Group", 3, 1), STEK_ERR_INVALID_ARG);

    assert_int_equal(stek_p11_generation_list(p11, "genrec", &g, &n), STEK_OK);
    assert_int_equal(n, 2); /* "genrec2" is another group, not a prefix match */
    assert_int_equal(g[0].generation, 1);
    assert_int_equal(g[0].start, 1000);
    assert_int_equal(g[1].generation, 2);
    assert_int_equal(g[1].start, 2000);
    free(g);

    stek_p11_object_info *o = NULL;
    size_t no = 0, recs = 0;
    assert_int_equal(stek_p11_list(p11, &o, &no), STEK_OK);
    for (size_t i = 0; i < no; i++)
        if (o[i].kind == STEK_P11_KIND_GENERATION && strcmp(o[i].group, "genrec") == 0)
            recs++;
    free(o);
    assert_int_equal(recs, 2);

    assert_int_equal(stek_p11_generation_destroy(p11, "genrec", 1, NULL), STEK_OK);
    assert_int_equal(stek_p11_generation_list(p11, "genrec", &g, &n), STEK_OK);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].generation, 2);
    free(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* Order matters: later tests use objects earlier ones made. */
        cmocka_unit_test_setup(test_list, ensure_default),
        cmocka_unit_test_setup(test_transport_create, ensure_default),
        cmocka_unit_test_setup(test_import_bad_spki, ensure_default),
        cmocka_unit_test_setup(test_untrusted_export, ensure_default),
        cmocka_unit_test_setup(test_trusted_import_so_pin_file, ensure_default),
        cmocka_unit_test_setup(test_so_pin_wrong, ensure_default),
        cmocka_unit_test_setup(test_so_pin_missing, ensure_default),
        cmocka_unit_test_setup(test_export_import_round_trip, ensure_default),
        cmocka_unit_test_setup(test_import_exists, ensure_default),
        cmocka_unit_test_setup(test_import_corrupt_blob, ensure_default),
        cmocka_unit_test_setup(test_destroy_counts, ensure_default),
        cmocka_unit_test_setup(test_generation_records, ensure_default),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
