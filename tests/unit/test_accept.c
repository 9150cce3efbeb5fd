/*
 * client/accept.c without a server: the test plays the service. It signs
 * with its own EC key (the "service key"), wraps keys with OpenSSL under a
 * KEK computed from the documented derivation (ECDH with an OpenSSL "HSM"
 * ephemeral key, stek_kek_iv, the label blocks, AES-256-CBC), names them
 * with HMAC-SHA256, and packs the protobuf itself. Then every check of
 * accept.h must fire for its own reason, and no bytes may crash it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "accept.h"
#include "fx.h"
#include "stek/v1/stek.pb-c.h"

#define GROUP "edge"
#define IDENTITY "uri:spiffe://fleet/edge/a"
#define P_S 60
#define L_S 180 /* three past epochs */
#define NOW INT64_C(1700000030)
#define OWN_EPOCH ((uint64_t)(NOW / P_S))
#define NS UINT64_C(1000000000)
#define MAX_KEYS 8

static EVP_PKEY *service_key, *other_service_key, *ed_service_key;
static EVP_PKEY *hsm_key; /* the "HSM" ephemeral key of every set */
static uint8_t hsm_pub[STEK_P256_POINT_BYTES];
static stek_host_eph *eph, *other_eph;
static uint8_t eph_pub[STEK_P256_POINT_BYTES], other_eph_pub[STEK_P256_POINT_BYTES];
static uint8_t nonce[16], other_nonce[16];
static const stek_sched sched = {.origin = 0, .epoch_s = P_S, .lifetime_s = L_S};

/* ---- the service, played by OpenSSL ---------------------------------------- */

typedef struct spec {
    const char *context;
    uint32_t kdf_profile;
    const char *group;
    uint64_t generation;
    uint64_t generation_start; /* ns */
    const char *identity;
    const uint8_t *host_pub; /* wrapped to, and echoed */
    const uint8_t *nonce;
    size_t nonce_len;
    uint64_t current_epoch;
    size_t n_past;
    bool next;
    int64_t time_shift_s; /* added to every key time: times off their epochs */
    int bad_name;         /* index of a key whose name is wrong, or -1 */
    int bad_blob;         /* index of a key whose blob is tampered, or -1 */
    EVP_PKEY *signer;
    void (*mutate)(Stek__V1__SignedKeySet *s); /* last touch before signing */
} spec;

static spec valid_spec(void)
{
    spec s = {
        .context = "stek-set-v1",
        .kdf_profile = 1,
        .group = GROUP,
        .generation = 1,
        .generation_start = (uint64_t)(NOW - 86400) * NS,
        .identity = IDENTITY,
        .host_pub = eph_pub,
        .nonce = nonce,
        .nonce_len = sizeof(nonce),
        .current_epoch = OWN_EPOCH,
        .n_past = 3,
        .next = true,
        .bad_name = -1,
        .bad_blob = -1,
        .signer = service_key,
    };
    return s;
}

static stek_accept_ctx valid_ctx(void)
{
    static EVP_PKEY *pins[1];
    pins[0] = service_key;
    stek_accept_ctx c = {
        .service_pubs = pins,
        .n_service_pubs = 1,
        .identity = IDENTITY,
        .eph = eph,
        .nonce = nonce,
        .nonce_len = sizeof(nonce),
        .group = GROUP,
        .sched = &sched,
        .now = NOW,
        .generation_hwm = 0,
    };
    return c;
}

static EVP_PKEY *point_key(const uint8_t *pt)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)"P-256", 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pt, 65),
        OSSL_PARAM_construct_end(),
    };
    EVP_PKEY *k = NULL;
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    assert_non_null(c);
    assert_int_equal(EVP_PKEY_fromdata_init(c), 1);
    assert_int_equal(EVP_PKEY_fromdata(c, &k, EVP_PKEY_PUBLIC_KEY, params), 1);
    EVP_PKEY_CTX_free(c);
    return k;
}

/* The HSM side of kek.h: Z = ECDH, KEK = AES-256-CBC(Z, iv, label blocks). */
static void service_kek(const uint8_t host_pub[65], const char *group, uint32_t gen,
                        uint8_t kek[32])
{
    uint8_t z[32], iv[STEK_KEK_IV_BYTES], labels[STEK_KEK_LABEL_BYTES];
    size_t zlen = sizeof(z);
    EVP_PKEY *peer = point_key(host_pub);
    EVP_PKEY_CTX *d = EVP_PKEY_CTX_new_from_pkey(NULL, hsm_key, NULL);
    assert_non_null(d);
    assert_int_equal(EVP_PKEY_derive_init(d), 1);
    assert_int_equal(EVP_PKEY_derive_set_peer(d, peer), 1);
    assert_int_equal(EVP_PKEY_derive(d, z, &zlen), 1);
    assert_int_equal(zlen, 32);
    EVP_PKEY_CTX_free(d);
    EVP_PKEY_free(peer);

    assert_int_equal(stek_kek_iv(hsm_pub, host_pub, group, gen, iv), STEK_OK);
    stek_kek_label_blocks(labels);
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    assert_non_null(c);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_cbc(), NULL, z, iv), 1);
    assert_int_equal(EVP_CIPHER_CTX_set_padding(c, 0), 1);
    assert_int_equal(EVP_EncryptUpdate(c, kek, &o1, labels, sizeof(labels)), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, kek + o1, &o2), 1);
    assert_int_equal(o1 + o2, 32);
    EVP_CIPHER_CTX_free(c);
    OPENSSL_cleanse(z, sizeof(z));
}

static void wrap(const uint8_t kek[32], const uint8_t key[80], uint8_t blob[88])
{
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    assert_non_null(c);
    EVP_CIPHER_CTX_set_flags(c, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_wrap_pad(), NULL, kek, NULL), 1);
    assert_int_equal(EVP_EncryptUpdate(c, blob, &o1, key, 80), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, blob + o1, &o2), 1);
    assert_int_equal(o1 + o2, 88);
    EVP_CIPHER_CTX_free(c);
}

static void name_of(const uint8_t key[80], uint8_t name[16])
{
    uint8_t mac[32];
    unsigned int len = 0;
    assert_non_null(HMAC(EVP_sha256(), key, 80, (const uint8_t *)"stek-name-v1", 12, mac, &len));
    memcpy(name, mac, 16);
}

static size_t sign(EVP_PKEY *k, const uint8_t *data, size_t len, uint8_t *sig, size_t cap)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    assert_non_null(md);
    bool ed = EVP_PKEY_is_a(k, "ED25519");
    assert_int_equal(EVP_DigestSignInit(md, NULL, ed ? NULL : EVP_sha256(), NULL, k), 1);
    size_t n = cap;
    assert_int_equal(EVP_DigestSign(md, sig, &n, data, len), 1);
    EVP_MD_CTX_free(md);
    return n;
}

/* Packs a KeySet around signed bytes; *out is malloc'd. */
static void pack_keyset(const uint8_t *signed_set, size_t slen, const uint8_t *sig, size_t sig_len,
                        uint8_t **out, size_t *out_len)
{
    Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
    ks.signed_set.data = (uint8_t *)signed_set;
    ks.signed_set.len = slen;
    ks.signature.data = (uint8_t *)sig;
    ks.signature.len = sig_len;
    *out_len = stek__v1__key_set__get_packed_size(&ks);
    *out = malloc(*out_len);
    assert_non_null(*out);
    assert_int_equal(stek__v1__key_set__pack(&ks, *out), *out_len);
}

/* Signs arbitrary bytes as a set and packs the KeySet. */
static void sign_and_pack(EVP_PKEY *signer, const uint8_t *signed_set, size_t slen, uint8_t **out,
                          size_t *out_len)
{
    uint8_t sig[256];
    size_t sig_len = sign(signer, signed_set, slen, sig, sizeof(sig));
    pack_keyset(signed_set, slen, sig, sig_len, out, out_len);
}

/*
 * Builds a KeySet per spec. keys[i] gets the raw 80-byte key of entry i
 * (may be NULL); returns the number of keys.
 */
static size_t build(const spec *sp, uint8_t (*keys)[80], uint8_t **out, size_t *out_len)
{
    size_t n = sp->n_past + 1 + (sp->next ? 1 : 0);
    assert_true(n <= MAX_KEYS);
    uint8_t raw[MAX_KEYS][80], names[MAX_KEYS][16], blobs[MAX_KEYS][88], kek[32];
    Stek__V1__Key k[MAX_KEYS], *kp[MAX_KEYS];
    service_kek(sp->host_pub, sp->group, (uint32_t)sp->generation, kek);
    for (size_t i = 0; i < n; i++) {
        uint64_t e = sp->current_epoch - sp->n_past + i;
        assert_int_equal(RAND_bytes(raw[i], 80), 1);
        name_of(raw[i], names[i]);
        wrap(kek, raw[i], blobs[i]);
        if ((int)i == sp->bad_name)
            names[i][3] ^= 0x40;
        if ((int)i == sp->bad_blob)
            blobs[i][40] ^= 0x01;
        stek__v1__key__init(&k[i]);
        k[i].name.data = names[i];
        k[i].name.len = 16;
        k[i].epoch = e;
        k[i].state = i < sp->n_past    ? STEK__V1__KEY_STATE__KEY_STATE_DECRYPT_ONLY
                     : i == sp->n_past ? STEK__V1__KEY_STATE__KEY_STATE_CURRENT
                                       : STEK__V1__KEY_STATE__KEY_STATE_NEXT;
        int64_t nb = (int64_t)e * P_S + sp->time_shift_s;
        k[i].not_before = (uint64_t)nb * NS;
        k[i].encrypt_until = (uint64_t)(nb + P_S) * NS;
        k[i].decrypt_until = (uint64_t)(nb + P_S + L_S) * NS;
        k[i].wrapped.data = blobs[i];
        k[i].wrapped.len = 88;
        kp[i] = &k[i];
        if (keys != NULL)
            memcpy(keys[i], raw[i], 80);
    }
    Stek__V1__SignedKeySet s = STEK__V1__SIGNED_KEY_SET__INIT;
    s.context = (char *)sp->context;
    s.kdf_profile = sp->kdf_profile;
    s.group = (char *)sp->group;
    s.generation = sp->generation;
    s.issued_at = (uint64_t)NOW * NS;
    s.host_identity = (char *)sp->identity;
    s.host_eph_pub.data = (uint8_t *)sp->host_pub;
    s.host_eph_pub.len = 65;
    s.nonce.data = (uint8_t *)sp->nonce;
    s.nonce.len = sp->nonce_len;
    s.hsm_eph_pub.data = hsm_pub;
    s.hsm_eph_pub.len = 65;
    s.n_keys = n;
    s.keys = kp;
    s.generation_start = sp->generation_start;
    if (sp->mutate != NULL)
        sp->mutate(&s);
    size_t slen = stek__v1__signed_key_set__get_packed_size(&s);
    uint8_t *buf = malloc(slen);
    assert_non_null(buf);
    assert_int_equal(stek__v1__signed_key_set__pack(&s, buf), slen);
    sign_and_pack(sp->signer, buf, slen, out, out_len);
    free(buf);
    OPENSSL_cleanse(raw, sizeof(raw));
    OPENSSL_cleanse(kek, sizeof(kek));
    return n;
}

/* Runs stek_accept on a spec'd set and asserts the rejection reason. */
static void expect_reject_ctx(const spec *sp, const stek_accept_ctx *c, stek_reject want)
{
    uint8_t *msg = NULL;
    size_t len = 0;
    build(sp, NULL, &msg, &len);
    stek_accepted_set *set = (stek_accepted_set *)&set; /* must be reset to NULL */
    stek_reject why = STEK_REJECT_COUNT;
    bool hb = true;
    stek_status st = stek_accept(c, msg, len, &set, &why, &hb);
    if (why != want)
        fprintf(stderr, "got %s (%s), want %s\n", stek_reject_name(why), stek_error_detail(),
                stek_reject_name(want));
    assert_int_equal(st, STEK_ERR_VERIFY);
    assert_int_equal(why, want);
    assert_null(set);
    assert_false(hb);
    assert_non_null(strstr(stek_error_detail(), stek_reject_name(want)));
    free(msg);
}

static void expect_reject(const spec *sp, stek_reject want)
{
    stek_accept_ctx c = valid_ctx();
    expect_reject_ctx(sp, &c, want);
}

/* Accepts; returns the set (caller frees). */
static stek_accepted_set *expect_accept_ctx(const spec *sp, const stek_accept_ctx *c,
                                            uint8_t (*keys)[80], size_t *n)
{
    uint8_t *msg = NULL;
    size_t len = 0;
    size_t nk = build(sp, keys, &msg, &len);
    if (n != NULL)
        *n = nk;
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_COUNT;
    bool hb = true;
    stek_status st = stek_accept(c, msg, len, &set, &why, &hb);
    if (st != STEK_OK)
        fprintf(stderr, "rejected: %s: %s\n", stek_reject_name(why), stek_error_detail());
    assert_int_equal(st, STEK_OK);
    assert_int_equal(why, STEK_REJECT_NONE);
    assert_false(hb);
    assert_non_null(set);
    free(msg);
    return set;
}

static void expect_accept(const spec *sp)
{
    stek_accept_ctx c = valid_ctx();
    stek_accepted_set_free(expect_accept_ctx(sp, &c, NULL, NULL));
}

/* ---- fixture ------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    size_t len = 0;
    service_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    other_service_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ed_service_key = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    hsm_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (!service_key || !other_service_key || !ed_service_key || !hsm_key ||
        EVP_PKEY_get_octet_string_param(hsm_key, OSSL_PKEY_PARAM_PUB_KEY, hsm_pub, sizeof(hsm_pub),
                                        &len) != 1 ||
        len != 65)
        return -1;
    if (stek_host_eph_generate(&eph) != STEK_OK || stek_host_eph_public(eph, eph_pub) != STEK_OK ||
        stek_host_eph_generate(&other_eph) != STEK_OK ||
        stek_host_eph_public(other_eph, other_eph_pub) != STEK_OK)
        return -1;
    if (RAND_bytes(nonce, sizeof(nonce)) != 1 || RAND_bytes(other_nonce, sizeof(other_nonce)) != 1)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    EVP_PKEY_free(service_key);
    EVP_PKEY_free(other_service_key);
    EVP_PKEY_free(ed_service_key);
    EVP_PKEY_free(hsm_key);
    stek_host_eph_free(eph);
    stek_host_eph_free(other_eph);
    return 0;
}

/* ---- acceptance ------------------------------------------------------------------ */

/* A valid set: metadata as signed, entries name | K[16:48] | K[48:80]. */
static void test_accept_valid(void **state)
{
    (void)state;
    spec sp = valid_spec();
    stek_accept_ctx c = valid_ctx();
    uint8_t keys[MAX_KEYS][80];
    size_t n = 0;
    stek_accepted_set *set = expect_accept_ctx(&sp, &c, keys, &n);
    assert_int_equal(set->n_keys, n);
    assert_int_equal(n, 5);
    assert_string_equal(set->group, GROUP);
    assert_string_equal(set->identity, IDENTITY);
    assert_int_equal(set->generation, 1);
    assert_int_equal(set->generation_start, (NOW - 86400) * (int64_t)NS);
    assert_int_equal(set->issued_at, NOW * (int64_t)NS);
    assert_int_equal(set->current, 3);
    assert_int_equal(set->current_epoch, OWN_EPOCH);
    for (size_t i = 0; i < n; i++) {
        const stek_accepted_key *k = &set->keys[i];
        uint64_t e = OWN_EPOCH - 3 + i;
        assert_int_equal(k->epoch, e);
        assert_int_equal(k->state, i < 3    ? STEK_KEY_DECRYPT_ONLY
                                   : i == 3 ? STEK_KEY_CURRENT
                                            : STEK_KEY_NEXT);
        assert_int_equal(k->not_before, (int64_t)(e * P_S * NS));
        assert_int_equal(k->encrypt_until, (int64_t)((e + 1) * P_S * NS));
        assert_int_equal(k->decrypt_until, (int64_t)(((e + 1) * P_S + L_S) * NS));
        const uint8_t *entry = stek_accepted_entry(set, i);
        assert_non_null(entry);
        uint8_t name[16];
        name_of(keys[i], name);
        assert_memory_equal(entry, name, 16);
        assert_memory_equal(entry + 16, keys[i] + 16, 64);
    }
    assert_null(stek_accepted_entry(set, n));
    stek_accepted_set_free(set);
    OPENSSL_cleanse(keys, sizeof(keys));
}

/* Acceptance variants: no schedule, any identity, several pins, Ed25519, +-1 epoch. */
static void test_accept_variants(void **state)
{
    (void)state;
    spec sp = valid_spec();
    stek_accept_ctx c = valid_ctx();

    c.sched = NULL; /* T0 and P from the set */
    stek_accepted_set_free(expect_accept_ctx(&sp, &c, NULL, NULL));

    c = valid_ctx();
    c.identity = NULL;
    stek_accepted_set *set = expect_accept_ctx(&sp, &c, NULL, NULL);
    assert_string_equal(set->identity, IDENTITY);
    stek_accepted_set_free(set);

    /* Replicas with separate HSMs: the set verifies under the second pin. */
    EVP_PKEY *pins[] = {other_service_key, service_key};
    c = valid_ctx();
    c.service_pubs = pins;
    c.n_service_pubs = 2;
    stek_accepted_set_free(expect_accept_ctx(&sp, &c, NULL, NULL));

    EVP_PKEY *ed_pin[] = {ed_service_key};
    c.service_pubs = ed_pin;
    c.n_service_pubs = 1;
    sp.signer = ed_service_key;
    stek_accepted_set_free(expect_accept_ctx(&sp, &c, NULL, NULL));

    sp = valid_spec();
    sp.current_epoch = OWN_EPOCH + 1; /* a replica a little ahead */
    expect_accept(&sp);
    sp.current_epoch = OWN_EPOCH - 1; /* or behind */
    expect_accept(&sp);

    /* No NEXT key, no past keys. */
    sp = valid_spec();
    sp.next = false;
    sp.n_past = 0;
    expect_accept(&sp);

    /* The same generation as the high-water mark needs no start time. */
    sp = valid_spec();
    sp.generation = 4;
    sp.generation_start = 0;
    c = valid_ctx();
    c.generation_hwm = 4;
    c.current_epoch_hwm = OWN_EPOCH;
    stek_accepted_set_free(expect_accept_ctx(&sp, &c, NULL, NULL));
    /* A start within the clock slack is not "in the future". */
    sp = valid_spec();
    sp.generation_start = (uint64_t)(NOW + STEK_ACCEPT_CLOCK_SLACK_S) * NS;
    expect_accept(&sp);
}

static void test_heartbeat(void **state)
{
    (void)state;
    Stek__V1__Heartbeat hb = STEK__V1__HEARTBEAT__INIT;
    hb.sent_at = (uint64_t)NOW * NS;
    hb.interval = 30 * NS;
    Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
    ks.heartbeat = &hb;
    uint8_t buf[64];
    size_t len = stek__v1__key_set__pack(&ks, buf);
    stek_accept_ctx c = valid_ctx();
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_COUNT;
    bool is_hb = false;
    assert_int_equal(stek_accept(&c, buf, len, &set, &why, &is_hb), STEK_OK);
    assert_true(is_hb);
    assert_null(set);
    assert_int_equal(why, STEK_REJECT_NONE);

    /* A heartbeat carrying a signed set is neither. */
    uint8_t sig[4] = {1, 2, 3, 4};
    ks.signature.data = sig;
    ks.signature.len = sizeof(sig);
    len = stek__v1__key_set__pack(&ks, buf);
    assert_int_equal(stek_accept(&c, buf, len, &set, &why, &is_hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_MALFORMED);
    assert_false(is_hb);
}

/* ---- one test per reason ----------------------------------------------------------- */

/* Every single-bit change of signed_set or of the signature is caught. */
static void test_reject_tampered_signed_set(void **state)
{
    (void)state;
    spec sp = valid_spec();
    uint8_t *msg = NULL;
    size_t len = 0;
    build(&sp, NULL, &msg, &len);
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    stek_accept_ctx c = valid_ctx();
    for (int part = 0; part < 2; part++) {
        ProtobufCBinaryData *b = part == 0 ? &ks->signed_set : &ks->signature;
        for (size_t i = 0; i < b->len; i++) {
            uint8_t bit = (uint8_t)(1u << (i % 8));
            b->data[i] ^= bit;
            uint8_t *m = NULL;
            size_t mlen = 0;
            pack_keyset(ks->signed_set.data, ks->signed_set.len, ks->signature.data,
                        ks->signature.len, &m, &mlen);
            stek_accepted_set *set = NULL;
            stek_reject why = STEK_REJECT_NONE;
            bool hb = false;
            assert_int_equal(stek_accept(&c, m, mlen, &set, &why, &hb), STEK_ERR_VERIFY);
            assert_int_equal(why, STEK_REJECT_SIGNATURE);
            assert_null(set);
            free(m);
            b->data[i] ^= bit;
        }
    }
    stek__v1__key_set__free_unpacked(ks, NULL);
    free(msg);
}

static void test_reject_other_service_key(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.signer = other_service_key;
    expect_reject(&sp, STEK_REJECT_SIGNATURE);
    sp.signer = ed_service_key;
    expect_reject(&sp, STEK_REJECT_SIGNATURE);
    /* An unsigned set (empty signature). */
    sp = valid_spec();
    uint8_t *msg = NULL;
    size_t len = 0;
    build(&sp, NULL, &msg, &len);
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    uint8_t *m = NULL;
    size_t mlen = 0;
    pack_keyset(ks->signed_set.data, ks->signed_set.len, NULL, 0, &m, &mlen);
    stek_accept_ctx c = valid_ctx();
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    assert_int_equal(stek_accept(&c, m, mlen, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_SIGNATURE);
    free(m);
    stek__v1__key_set__free_unpacked(ks, NULL);
    free(msg);
}

/* Signature first: a set with a broken blob AND a bad signature is a SIGNATURE reject. */
static void test_signature_before_unwrap(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.bad_blob = 2;
    sp.signer = other_service_key;
    expect_reject(&sp, STEK_REJECT_SIGNATURE);
}

static void test_reject_context(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.context = "stek-req-v1";
    expect_reject(&sp, STEK_REJECT_CONTEXT);
    sp.context = "";
    expect_reject(&sp, STEK_REJECT_CONTEXT);
    sp = valid_spec();
    sp.kdf_profile = 2;
    expect_reject(&sp, STEK_REJECT_CONTEXT);
}

static void test_reject_identity(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.identity = "uri:spiffe://fleet/edge/b";
    expect_reject(&sp, STEK_REJECT_IDENTITY);
    sp.identity = "dns:spiffe://fleet/edge/a"; /* same text, other type */
    expect_reject(&sp, STEK_REJECT_IDENTITY);
    /* NULL in the context accepts any identity, but never none. */
    sp.identity = "";
    stek_accept_ctx c = valid_ctx();
    c.identity = NULL;
    expect_reject_ctx(&sp, &c, STEK_REJECT_IDENTITY);

    /* A list (every SAN of the host's certificate): one of them, or rejected. */
    const char *mine[] = {"uri:spiffe://fleet/edge/x", IDENTITY, "dns:a.example"};
    c = valid_ctx();
    c.identity = NULL;
    c.identities = mine;
    c.n_identities = 3;
    sp = valid_spec();
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    uint8_t *msg = NULL;
    size_t len = 0;
    bool hb = true;
    build(&sp, NULL, &msg, &len);
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_OK);
    assert_non_null(set);
    assert_string_equal(set->identity, IDENTITY);
    stek_accepted_set_free(set);
    free(msg);
    sp.identity = "uri:spiffe://fleet/edge/b";
    expect_reject_ctx(&sp, &c, STEK_REJECT_IDENTITY);
    sp.identity = "dns:spiffe://fleet/edge/x"; /* same text, other type */
    expect_reject_ctx(&sp, &c, STEK_REJECT_IDENTITY);
}

/* The certificate's SANs, typed as stekd names identities: URIs first. */
static void test_cert_identities(void **state)
{
    (void)state;
    char dir[FX_PATH_MAX];
    assert_int_equal(fx_tmpdir("accept", dir, sizeof(dir)), 0);
    fx_ca ca;
    assert_int_equal(fx_ca_create(&ca, dir), 0);
    const char *uris[] = {"spiffe://fleet/edge/a", "spiffe://fleet/edge/alias", NULL};
    const char *dns[] = {"a.example", NULL};
    fx_cert_opts o = {.name = "both", .uri_sans = uris, .dns_sans = dns};
    fx_cert both, none;
    assert_int_equal(fx_cert_issue(&ca, &o, &both), 0);
    fx_cert_opts on = {.name = "none"};
    assert_int_equal(fx_cert_issue(&ca, &on, &none), 0);

    char *ids[STEK_MAX_CERT_IDENTITIES];
    size_t n = 99;
    assert_int_equal(stek_cert_identities(both.cert_path, ids, &n), STEK_OK);
    assert_int_equal(n, 3);
    assert_string_equal(ids[0], "uri:spiffe://fleet/edge/a");
    assert_string_equal(ids[1], "uri:spiffe://fleet/edge/alias");
    assert_string_equal(ids[2], "dns:a.example");
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    /* No URI or DNS SAN: not a host certificate stekd would serve. */
    assert_int_equal(stek_cert_identities(none.cert_path, ids, &n), STEK_ERR_CONFIG);
    assert_int_equal(n, 0);
    assert_int_equal(stek_cert_identities(both.key_path, ids, &n), STEK_ERR_CRYPTO);
    assert_int_equal(stek_cert_identities("/nonexistent/cert.pem", ids, &n), STEK_ERR_IO);
    fx_ca_free(&ca);
    assert_int_equal(fx_rmtree(dir), 0);
}

static void test_reject_eph_key(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.host_pub = other_eph_pub;
    expect_reject(&sp, STEK_REJECT_EPH_KEY);
}

static void test_reject_nonce(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.nonce = other_nonce;
    expect_reject(&sp, STEK_REJECT_NONCE);
    sp.nonce = nonce;
    sp.nonce_len = 15; /* a prefix of ours */
    expect_reject(&sp, STEK_REJECT_NONCE);
}

static void test_reject_group(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.group = "other";
    expect_reject(&sp, STEK_REJECT_GROUP);
    sp.group = "edg";
    expect_reject(&sp, STEK_REJECT_GROUP);
}

static void test_reject_epoch(void **state)
{
    (void)state;
    spec sp = valid_spec();
    stek_accept_ctx no_sched = valid_ctx();
    no_sched.sched = NULL;

    sp.current_epoch = OWN_EPOCH + 1000; /* far future, times following it */
    expect_reject(&sp, STEK_REJECT_EPOCH);
    expect_reject_ctx(&sp, &no_sched, STEK_REJECT_EPOCH);
    sp.current_epoch = OWN_EPOCH + 2;
    expect_reject(&sp, STEK_REJECT_EPOCH);
    expect_reject_ctx(&sp, &no_sched, STEK_REJECT_EPOCH);
    sp.current_epoch = OWN_EPOCH - 2;
    expect_reject(&sp, STEK_REJECT_EPOCH);
    expect_reject_ctx(&sp, &no_sched, STEK_REJECT_EPOCH);

    /* A far-future epoch number with times of today: off our schedule, and
     * without one its T0 would be negative. */
    sp.current_epoch = OWN_EPOCH + 100000000;
    sp.time_shift_s = -100000000LL * P_S;
    expect_reject(&sp, STEK_REJECT_EPOCH);
    expect_reject_ctx(&sp, &no_sched, STEK_REJECT_EPOCH);

    /* The right epoch with times one epoch off our schedule. */
    sp = valid_spec();
    sp.time_shift_s = P_S;
    expect_reject(&sp, STEK_REJECT_EPOCH);
}

static void test_reject_rollback(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.generation = 2;
    stek_accept_ctx c = valid_ctx();
    c.generation_hwm = 3;
    expect_reject_ctx(&sp, &c, STEK_REJECT_ROLLBACK);
    /* An older set of the current generation replayed. */
    sp.generation = 3;
    sp.current_epoch = OWN_EPOCH - 1;
    c.current_epoch_hwm = OWN_EPOCH;
    expect_reject_ctx(&sp, &c, STEK_REJECT_ROLLBACK);
}

static void test_reject_generation_start(void **state)
{
    (void)state;
    spec sp = valid_spec();
    stek_accept_ctx c = valid_ctx();
    c.generation_hwm = 1;
    sp.generation = 2;
    sp.generation_start = 0;
    expect_reject_ctx(&sp, &c, STEK_REJECT_GENERATION_START);
    sp.generation_start = (uint64_t)(NOW + STEK_ACCEPT_CLOCK_SLACK_S + 1) * NS;
    expect_reject_ctx(&sp, &c, STEK_REJECT_GENERATION_START);
    /* No high-water mark yet: every generation is new. */
    sp.generation = 1;
    c.generation_hwm = 0;
    sp.generation_start = 0;
    expect_reject_ctx(&sp, &c, STEK_REJECT_GENERATION_START);
}

static void test_reject_unwrap(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.bad_blob = 4; /* tampered, then signed: only the KWP check sees it */
    expect_reject(&sp, STEK_REJECT_UNWRAP);
    sp.bad_blob = 0;
    expect_reject(&sp, STEK_REJECT_UNWRAP);
}

static void bad_hsm_point(Stek__V1__SignedKeySet *s)
{
    static uint8_t pt[65];
    memcpy(pt, s->hsm_eph_pub.data, 65);
    pt[64] ^= 1; /* off the curve */
    s->hsm_eph_pub.data = pt;
}

static void test_reject_unwrap_bad_point(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.mutate = bad_hsm_point;
    expect_reject(&sp, STEK_REJECT_UNWRAP);
}

static void test_reject_name(void **state)
{
    (void)state;
    spec sp = valid_spec();
    sp.bad_name = 3;
    expect_reject(&sp, STEK_REJECT_NAME);
}

/* ---- malformed content, signed ------------------------------------------------------ */

static void two_current(Stek__V1__SignedKeySet *s)
{
    s->keys[2]->state = STEK__V1__KEY_STATE__KEY_STATE_CURRENT;
}
static void no_current(Stek__V1__SignedKeySet *s)
{
    s->keys[3]->state = STEK__V1__KEY_STATE__KEY_STATE_DECRYPT_ONLY;
}
static void unknown_state(Stek__V1__SignedKeySet *s)
{
    s->keys[1]->state = (Stek__V1__KeyState)7;
}
static void unspecified_state(Stek__V1__SignedKeySet *s)
{
    s->keys[0]->state = STEK__V1__KEY_STATE__KEY_STATE_UNSPECIFIED;
}
static void short_name(Stek__V1__SignedKeySet *s)
{
    s->keys[0]->name.len = 15;
}
static void short_blob(Stek__V1__SignedKeySet *s)
{
    s->keys[0]->wrapped.len = 80;
}
static void unsorted(Stek__V1__SignedKeySet *s)
{
    Stek__V1__Key *t = s->keys[0];
    s->keys[0] = s->keys[1];
    s->keys[1] = t;
}
static void next_before_current(Stek__V1__SignedKeySet *s)
{
    s->keys[2]->state = STEK__V1__KEY_STATE__KEY_STATE_NEXT;
}
static void no_keys(Stek__V1__SignedKeySet *s)
{
    s->n_keys = 0;
}
static void gen_zero(Stek__V1__SignedKeySet *s)
{
    s->generation = 0;
}
static void gen_huge(Stek__V1__SignedKeySet *s)
{
    s->generation = UINT64_C(1) << 32;
}
static void no_issued_at(Stek__V1__SignedKeySet *s)
{
    s->issued_at = 0;
}
static void times_reversed(Stek__V1__SignedKeySet *s)
{
    s->keys[4]->decrypt_until = s->keys[4]->not_before;
}
static void time_overflow(Stek__V1__SignedKeySet *s)
{
    s->keys[4]->decrypt_until = UINT64_MAX;
}
static void next_gap(Stek__V1__SignedKeySet *s)
{
    s->keys[4]->epoch += 1;
}
static void past_key_shifted(Stek__V1__SignedKeySet *s)
{
    s->keys[0]->not_before += NS;
    s->keys[0]->encrypt_until += NS;
}

static void test_reject_malformed_content(void **state)
{
    (void)state;
    void (*const mutations[])(Stek__V1__SignedKeySet *) = {
        two_current, no_current,   unknown_state,       unspecified_state, short_name,
        short_blob,  unsorted,     next_before_current, no_keys,           gen_zero,
        gen_huge,    no_issued_at, times_reversed,      time_overflow,     next_gap,
    };
    for (size_t i = 0; i < sizeof(mutations) / sizeof(mutations[0]); i++) {
        spec sp = valid_spec();
        sp.mutate = mutations[i];
        expect_reject(&sp, STEK_REJECT_MALFORMED);
    }
    /* Without a schedule, keys must still follow one (T0, P); with one, ours. */
    spec sp = valid_spec();
    sp.mutate = past_key_shifted;
    expect_reject(&sp, STEK_REJECT_EPOCH);
    stek_accept_ctx c = valid_ctx();
    c.sched = NULL;
    expect_reject_ctx(&sp, &c, STEK_REJECT_MALFORMED);

    /* Signed bytes that are no SignedKeySet at all. */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    uint8_t *m = NULL;
    size_t mlen = 0;
    sign_and_pack(service_key, junk, sizeof(junk), &m, &mlen);
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    assert_int_equal(stek_accept(&c, m, mlen, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_MALFORMED);
    free(m);
}

static void test_reject_garbage(void **state)
{
    (void)state;
    stek_accept_ctx c = valid_ctx();
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02};
    assert_int_equal(stek_accept(&c, garbage, sizeof(garbage), &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_MALFORMED);
    assert_int_equal(stek_accept(&c, NULL, 0, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_MALFORMED);
    assert_int_equal(stek_accept(&c, garbage, 0, &set, &why, &hb), STEK_ERR_VERIFY);
    assert_int_equal(why, STEK_REJECT_MALFORMED);
    assert_null(set);
}

/* Bad contexts are the caller's error, not a rejection. */
static void test_bad_context(void **state)
{
    (void)state;
    spec sp = valid_spec();
    uint8_t *msg = NULL;
    size_t len = 0;
    build(&sp, NULL, &msg, &len);
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_COUNT;
    bool hb = false;

    stek_accept_ctx c = valid_ctx();
    c.n_service_pubs = 0;
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    assert_int_equal(why, STEK_REJECT_NONE);

    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    assert_non_null(rsa);
    assert_non_null(p384);
    EVP_PKEY *bad_pins[][1] = {{rsa}, {p384}, {NULL}};
    for (size_t i = 0; i < 3; i++) {
        c = valid_ctx();
        c.service_pubs = bad_pins[i];
        assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    }
    EVP_PKEY_free(rsa);
    EVP_PKEY_free(p384);

    c = valid_ctx();
    c.nonce_len = 8;
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    c = valid_ctx();
    c.group = "Edge!";
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    c = valid_ctx();
    c.eph = NULL;
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    c = valid_ctx();
    c.now = -1;
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    c = valid_ctx();
    stek_sched bad = {.origin = 0, .epoch_s = 0, .lifetime_s = 0};
    c.sched = &bad;
    assert_int_equal(stek_accept(&c, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    c = valid_ctx();
    assert_int_equal(stek_accept(&c, msg, len, NULL, &why, &hb), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_accept(NULL, msg, len, &set, &why, &hb), STEK_ERR_INVALID_ARG);
    assert_null(set);
    free(msg);

    assert_string_equal(stek_reject_name(STEK_REJECT_NONCE), "STEK_REJECT_NONCE");
    assert_string_equal(stek_reject_name(STEK_REJECT_COUNT), "STEK_REJECT_UNKNOWN");
    for (int r = 0; r < STEK_REJECT_COUNT; r++)
        assert_non_null(strstr(stek_reject_name((stek_reject)r), "STEK_REJECT_"));
}

/* ---- robustness ------------------------------------------------------------------------ */

static void must_not_accept(const stek_accept_ctx *c, const uint8_t *m, size_t len)
{
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    stek_status st = stek_accept(c, m, len, &set, &why, &hb);
    assert_null(set);
    if (st == STEK_OK) {
        assert_true(hb); /* random bytes can spell a heartbeat; nothing else */
    } else {
        assert_int_equal(st, STEK_ERR_VERIFY);
        assert_true(why == STEK_REJECT_MALFORMED || why == STEK_REJECT_SIGNATURE);
    }
}

static void test_random_and_truncated(void **state)
{
    (void)state;
    stek_accept_ctx c = valid_ctx();
    uint8_t buf[1024];
    for (int i = 0; i < 2000; i++) {
        uint16_t r = 0;
        assert_int_equal(RAND_bytes((uint8_t *)&r, sizeof(r)), 1);
        size_t len = r % sizeof(buf);
        assert_int_equal(RAND_bytes(buf, sizeof(buf)), 1);
        if (i % 2 == 1 && len > 2) {
            /* Start like a KeySet: field 1, a plausible length. */
            buf[0] = 0x0a;
            buf[1] = (uint8_t)(len - 2 < 127 ? len - 2 : 127);
        }
        must_not_accept(&c, buf, len);
    }

    spec sp = valid_spec();
    uint8_t *msg = NULL;
    size_t len = 0;
    build(&sp, NULL, &msg, &len);
    for (size_t n = 0; n < len; n++) {
        /* A copy of exactly n bytes, so ASan sees any read past the end. */
        uint8_t *p = malloc(n > 0 ? n : 1);
        assert_non_null(p);
        memcpy(p, msg, n);
        must_not_accept(&c, p, n);
        free(p);
    }
    free(msg);
}

/* Random changes to the signed content, re-signed: the parser behind the signature holds. */
static void test_mutated_signed_content(void **state)
{
    (void)state;
    stek_accept_ctx c = valid_ctx();
    spec sp = valid_spec();
    uint8_t *msg = NULL;
    size_t len = 0;
    build(&sp, NULL, &msg, &len);
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    const size_t slen = ks->signed_set.len;
    uint8_t *mut = malloc(slen);
    assert_non_null(mut);
    int accepted = 0;
    for (int i = 0; i < 1000; i++) {
        memcpy(mut, ks->signed_set.data, slen);
        uint8_t r[8];
        assert_int_equal(RAND_bytes(r, sizeof(r)), 1);
        int flips = 1 + r[0] % 4;
        for (int f = 0; f < flips; f++) {
            size_t at = ((size_t)r[1 + f] << 8 | r[5 - (f % 4)]) % slen;
            mut[at] = r[(f + 2) % 8];
        }
        size_t cut = i % 5 == 0 ? slen - (size_t)(r[7] % 32) : slen; /* sometimes truncate */
        uint8_t *m = NULL;
        size_t mlen = 0;
        sign_and_pack(service_key, mut, cut, &m, &mlen);
        stek_accepted_set *set = NULL;
        stek_reject why = STEK_REJECT_NONE;
        bool hb = false;
        stek_status st = stek_accept(&c, m, mlen, &set, &why, &hb);
        if (st == STEK_OK) {
            accepted++; /* a change to a field no check covers (e.g. issued_at) */
            stek_accepted_set_free(set);
        } else {
            assert_int_equal(st, STEK_ERR_VERIFY);
            assert_true(why != STEK_REJECT_NONE && why != STEK_REJECT_SIGNATURE &&
                        why < STEK_REJECT_COUNT);
            assert_null(set);
        }
        free(m);
    }
    fprintf(stderr, "mutated signed content: %d of 1000 accepted\n", accepted);
    free(mut);
    stek__v1__key_set__free_unpacked(ks, NULL);
    free(msg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_valid),
        cmocka_unit_test(test_accept_variants),
        cmocka_unit_test(test_heartbeat),
        cmocka_unit_test(test_reject_tampered_signed_set),
        cmocka_unit_test(test_reject_other_service_key),
        cmocka_unit_test(test_signature_before_unwrap),
        cmocka_unit_test(test_reject_context),
        cmocka_unit_test(test_reject_identity),
        cmocka_unit_test(test_cert_identities),
        cmocka_unit_test(test_reject_eph_key),
        cmocka_unit_test(test_reject_nonce),
        cmocka_unit_test(test_reject_group),
        cmocka_unit_test(test_reject_epoch),
        cmocka_unit_test(test_reject_rollback),
        cmocka_unit_test(test_reject_generation_start),
        cmocka_unit_test(test_reject_unwrap),
        cmocka_unit_test(test_reject_unwrap_bad_point),
        cmocka_unit_test(test_reject_name),
        cmocka_unit_test(test_reject_malformed_content),
        cmocka_unit_test(test_reject_garbage),
        cmocka_unit_test(test_bad_context),
        cmocka_unit_test(test_random_and_truncated),
        cmocka_unit_test(test_mutated_signed_content),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
