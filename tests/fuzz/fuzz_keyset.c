/*
 * libstek's acceptance of a key set (client/accept.c, stek_accept): decoding,
 * signature check, every field check, KEK derivation, unwrap and names,
 * against a fixed context: the pinned service key fuzz_derived_key("service"), this
 * process's ephemeral key, a fixed nonce, group, identity, schedule and
 * clock.
 *
 * A signature check stops mutated bytes at step 2 of accept.h, so the first
 * byte picks how far the harness helps (the rest is the message):
 *   0  a KeySet as received: parsed, signature checked, and so on;
 *   1  a SignedKeySet, which the harness signs with the pinned key and packs
 *      into a KeySet: every later check sees mutated fields;
 *   2  a SignedKeySet template: the harness plays the service, as
 *      tests/unit/test_accept.c does: it puts this process's ephemeral key
 *      and the HSM's point in, wraps each key whose `wrapped` is 80 raw
 *      bytes under the KEK of the set's group and generation, names each
 *      key with an empty name, then signs. Mutations then reach the
 *      unwrap and name checks, and an accepted set must hold exactly the
 *      key bytes that were wrapped.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "accept.h"
#include "fuzz.h"
#include "stek/v1/stek.pb-c.h"

#define GROUP "edge"
#define IDENTITY "uri:spiffe://fleet/edge/fuzz"
#define P_S 60
#define L_S 180
#define NOW INT64_C(1700000030)
#define NS UINT64_C(1000000000)
#define MODES 3
#define TEMPLATE_MAX_KEYS 64

static EVP_PKEY *service_key, *hsm_key;
static EVP_PKEY *pins[1];
static stek_host_eph *eph;
static uint8_t eph_pub[STEK_P256_POINT_BYTES], hsm_pub[STEK_P256_POINT_BYTES];
static uint8_t z[32]; /* ECDH(hsm, eph): fixed for the process */
static const uint8_t nonce[16] = "stek-fuzz-nonce";
static const stek_sched sched = {.origin = 0, .epoch_s = P_S, .lifetime_s = L_S};

static void init(void)
{
    if (service_key != NULL)
        return;
    service_key = fuzz_derived_key("service", true);
    hsm_key = fuzz_derived_key("hsm", false);
    pins[0] = service_key;
    if (stek_host_eph_generate(&eph) != STEK_OK || stek_host_eph_public(eph, eph_pub) != STEK_OK)
        fuzz_fail("eph: %s", stek_error_detail());
    size_t len = sizeof(hsm_pub);
    if (EVP_PKEY_get_octet_string_param(hsm_key, "encoded-pub-key", hsm_pub, len, &len) != 1)
        fuzz_fail("hsm point");
    /* The HSM side of the ECDH, with the host's point as its peer. */
    EVP_PKEY *peer = EVP_PKEY_new();
    EVP_PKEY_CTX *d = EVP_PKEY_CTX_new_from_pkey(NULL, hsm_key, NULL);
    size_t zlen = sizeof(z);
    if (peer == NULL || EVP_PKEY_copy_parameters(peer, hsm_key) != 1 ||
        EVP_PKEY_set1_encoded_public_key(peer, eph_pub, sizeof(eph_pub)) != 1 || d == NULL ||
        EVP_PKEY_derive_init(d) != 1 || EVP_PKEY_derive_set_peer(d, peer) != 1 ||
        EVP_PKEY_derive(d, z, &zlen) != 1 || zlen != sizeof(z))
        fuzz_fail("ECDH");
    EVP_PKEY_CTX_free(d);
    EVP_PKEY_free(peer);
}

static stek_accept_ctx ctx(void)
{
    return (stek_accept_ctx){
        .service_pubs = pins,
        .n_service_pubs = 1,
        .identity = IDENTITY,
        .eph = eph,
        .nonce = nonce,
        .nonce_len = sizeof(nonce),
        .group = GROUP,
        .sched = &sched,
        .now = NOW,
        .generation_hwm = 1,
    };
}

/* Signs bytes as a set and packs the KeySet (*out malloc'd). */
static void sign_pack(const uint8_t *set, size_t len, uint8_t **out, size_t *out_len)
{
    uint8_t sig[64];
    size_t sig_len = sizeof(sig);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestSignInit(md, NULL, NULL, NULL, service_key) != 1 ||
        EVP_DigestSign(md, sig, &sig_len, set, len) != 1)
        fuzz_fail("Ed25519 sign");
    EVP_MD_CTX_free(md);
    Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
    ks.signed_set = (ProtobufCBinaryData){len, (uint8_t *)set};
    ks.signature = (ProtobufCBinaryData){sig_len, sig};
    *out_len = stek__v1__key_set__get_packed_size(&ks);
    *out = malloc(*out_len ? *out_len : 1);
    if (*out == NULL)
        fuzz_fail("out of memory");
    stek__v1__key_set__pack(&ks, *out);
}

/* KEK = AES-256-CBC(Z, iv(group, generation), label blocks): kek.h's derivation. */
static bool service_kek(const char *group, uint32_t gen, uint8_t kek[32])
{
    uint8_t iv[STEK_KEK_IV_BYTES], labels[STEK_KEK_LABEL_BYTES];
    if (stek_kek_iv(hsm_pub, eph_pub, group, gen, iv) != STEK_OK)
        return false;
    stek_kek_label_blocks(labels);
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    bool ok = c != NULL && EVP_EncryptInit_ex(c, EVP_aes_256_cbc(), NULL, z, iv) == 1 &&
              EVP_CIPHER_CTX_set_padding(c, 0) == 1 &&
              EVP_EncryptUpdate(c, kek, &o1, labels, sizeof(labels)) == 1 &&
              EVP_EncryptFinal_ex(c, kek + o1, &o2) == 1 && o1 + o2 == 32;
    EVP_CIPHER_CTX_free(c);
    return ok;
}

static void wrap(const uint8_t kek[32], const uint8_t key[80], uint8_t blob[88])
{
    int o1 = 0, o2 = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL)
        fuzz_fail("out of memory");
    EVP_CIPHER_CTX_set_flags(c, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    if (EVP_EncryptInit_ex(c, EVP_aes_256_wrap_pad(), NULL, kek, NULL) != 1 ||
        EVP_EncryptUpdate(c, blob, &o1, key, 80) != 1 ||
        EVP_EncryptFinal_ex(c, blob + o1, &o2) != 1 || o1 + o2 != 88)
        fuzz_fail("AES key wrap");
    EVP_CIPHER_CTX_free(c);
}

static void name_of(const uint8_t key[80], uint8_t name[16])
{
    uint8_t mac[32];
    unsigned int len = 0;
    if (HMAC(EVP_sha256(), key, 80, (const uint8_t *)STEK_TICKET_NAME_LABEL,
             sizeof(STEK_TICKET_NAME_LABEL) - 1, mac, &len) == NULL)
        fuzz_fail("HMAC");
    memcpy(name, mac, 16);
}

/*
 * Runs stek_accept and checks its contract (accept.h). raw, when not NULL,
 * holds the n_raw keys the harness wrapped: an accepted set of that many
 * keys must carry exactly their hmac and aes halves.
 */
static void accept_one(const uint8_t *msg, size_t len, uint8_t (*raw)[80], size_t n_raw)
{
    stek_accept_ctx c = ctx();
    stek_accepted_set *set = (stek_accepted_set *)&set;
    stek_reject why = STEK_REJECT_COUNT;
    bool hb = true;
    stek_status st = stek_accept(&c, msg, len, &set, &why, &hb);
    if (fuzz_verbose())
        fprintf(stderr, "accept: %s %s%s\n", stek_status_name(st), stek_reject_name(why),
                hb ? " (heartbeat)" : "");
    if (st == STEK_ERR_VERIFY) {
        if (set != NULL || why == STEK_REJECT_NONE || why >= STEK_REJECT_COUNT || hb)
            fuzz_fail("a rejection broke the contract (why %d)", (int)why);
        return;
    }
    if (st != STEK_OK) {
        /* The context is valid: only local failures may remain. */
        if (st != STEK_ERR_NOMEM && st != STEK_ERR_CRYPTO)
            fuzz_fail("stek_accept: %s: %s", stek_status_name(st), stek_error_detail());
        return;
    }
    if (hb) {
        if (set != NULL)
            fuzz_fail("a heartbeat came with a set");
        return;
    }
    if (set == NULL || why != STEK_REJECT_NONE)
        fuzz_fail("accepted without a set");
    if (set->n_keys < 1 || set->n_keys > STEK_ACCEPT_MAX_KEYS || set->current >= set->n_keys ||
        set->keys[set->current].state != STEK_KEY_CURRENT ||
        set->keys[set->current].epoch != set->current_epoch || strcmp(set->group, GROUP) != 0 ||
        set->identity == NULL || strcmp(set->identity, IDENTITY) != 0 ||
        stek_secret_len(set->material) != set->n_keys * STEK_ACCEPT_ENTRY_BYTES)
        fuzz_fail("an accepted set is not well formed");
    for (size_t i = 1; i < set->n_keys; i++)
        if (set->keys[i].epoch <= set->keys[i - 1].epoch)
            fuzz_fail("accepted epochs are not ascending");
    if (raw != NULL && n_raw == set->n_keys)
        for (size_t i = 0; i < n_raw; i++) {
            const uint8_t *e = stek_accepted_entry(set, i);
            uint8_t name[16];
            name_of(raw[i], name);
            if (memcmp(e, name, 16) != 0 || memcmp(e + 16, raw[i] + 16, 64) != 0)
                fuzz_fail("accepted key %zu differs from the key wrapped", i);
        }
    stek_accepted_set_free(set);
}

/* Mode 2: the service's part done by the harness on a parsed template. */
static void template_accept(const uint8_t *b, size_t n)
{
    Stek__V1__SignedKeySet *s = stek__v1__signed_key_set__unpack(NULL, n, b);
    if (s == NULL)
        return;
    uint8_t(*raw)[80] = calloc(TEMPLATE_MAX_KEYS, 80);
    uint8_t(*blobs)[88] = calloc(TEMPLATE_MAX_KEYS, 88);
    uint8_t(*names)[16] = calloc(TEMPLATE_MAX_KEYS, 16);
    uint8_t kek[32];
    uint8_t *set = NULL, *msg = NULL;
    size_t n_raw = 0, len = 0;
    if (raw == NULL || blobs == NULL || names == NULL)
        fuzz_fail("out of memory");
    ProtobufCBinaryData old_host = s->host_eph_pub, old_hsm = s->hsm_eph_pub;
    s->host_eph_pub = (ProtobufCBinaryData){sizeof(eph_pub), eph_pub};
    s->hsm_eph_pub = (ProtobufCBinaryData){sizeof(hsm_pub), hsm_pub};
    bool have_kek = s->group != NULL && s->n_keys <= TEMPLATE_MAX_KEYS &&
                    service_kek(s->group, (uint32_t)s->generation, kek);
    ProtobufCBinaryData old_wrapped[TEMPLATE_MAX_KEYS], old_name[TEMPLATE_MAX_KEYS];
    size_t touched = have_kek ? s->n_keys : 0;
    for (size_t i = 0; i < touched; i++) {
        Stek__V1__Key *k = s->keys[i];
        old_wrapped[i] = k->wrapped;
        old_name[i] = k->name;
        if (k->wrapped.len == 80) {
            memcpy(raw[i], k->wrapped.data, 80);
            wrap(kek, raw[i], blobs[i]);
            k->wrapped = (ProtobufCBinaryData){88, blobs[i]};
            n_raw++;
        }
        if (k->name.len == 0 && old_wrapped[i].len == 80) {
            name_of(raw[i], names[i]);
            k->name = (ProtobufCBinaryData){16, names[i]};
        }
    }
    len = stek__v1__signed_key_set__get_packed_size(s);
    set = malloc(len ? len : 1);
    if (set == NULL)
        fuzz_fail("out of memory");
    stek__v1__signed_key_set__pack(s, set);
    sign_pack(set, len, &msg, &len);
    accept_one(msg, len, n_raw == s->n_keys ? raw : NULL, n_raw);
    /* Give protobuf-c back its own pointers before it frees. */
    for (size_t i = 0; i < touched; i++) {
        s->keys[i]->wrapped = old_wrapped[i];
        s->keys[i]->name = old_name[i];
    }
    s->host_eph_pub = old_host;
    s->hsm_eph_pub = old_hsm;
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    OPENSSL_cleanse(raw, TEMPLATE_MAX_KEYS * 80);
    OPENSSL_cleanse(kek, sizeof(kek));
    free(raw);
    free(blobs);
    free(names);
    free(set);
    free(msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init();
    if (size < 1)
        return 0;
    const uint8_t *b = data + 1;
    const size_t n = size - 1;
    uint8_t *msg = NULL;
    size_t len = 0;
    switch (data[0] % MODES) {
    case 0:
        accept_one(b, n, NULL, 0);
        break;
    case 1:
        sign_pack(b, n, &msg, &len);
        accept_one(msg, len, NULL, 0);
        free(msg);
        break;
    default:
        template_accept(b, n);
        break;
    }
    return 0;
}

/* ---- seeds ------------------------------------------------------------------------------ */

typedef struct tspec {
    uint64_t generation;
    uint64_t generation_start_s; /* 0: absent */
    size_t n_past;
    bool next;
    bool raw_names; /* names left empty for the harness (mode 2); else random */
} tspec;

/* A SignedKeySet per t, keys as 80 raw bytes in `wrapped` (the template form). */
static size_t template_set(const tspec *t, uint8_t *out, size_t cap)
{
    const uint64_t cur = (uint64_t)(NOW / P_S);
    const size_t n = t->n_past + 1 + (t->next ? 1 : 0);
    uint8_t raw[8][80], names[8][16];
    Stek__V1__Key k[8], *kp[8];
    for (size_t i = 0; i < n; i++) {
        const uint64_t e = cur - t->n_past + i;
        for (size_t j = 0; j < 80; j++)
            raw[i][j] = (uint8_t)(e * 31 + j * 7 + 1);
        memset(names[i], (int)(0x40 + i), 16);
        stek__v1__key__init(&k[i]);
        k[i].name = (ProtobufCBinaryData){t->raw_names ? 0 : 16, names[i]};
        k[i].epoch = e;
        k[i].state = i < t->n_past    ? STEK__V1__KEY_STATE__KEY_STATE_DECRYPT_ONLY
                     : i == t->n_past ? STEK__V1__KEY_STATE__KEY_STATE_CURRENT
                                      : STEK__V1__KEY_STATE__KEY_STATE_NEXT;
        k[i].not_before = e * P_S * NS;
        k[i].encrypt_until = (e + 1) * P_S * NS;
        k[i].decrypt_until = ((e + 1) * P_S + L_S) * NS;
        k[i].wrapped = (ProtobufCBinaryData){80, raw[i]};
        kp[i] = &k[i];
    }
    Stek__V1__SignedKeySet s = STEK__V1__SIGNED_KEY_SET__INIT;
    s.context = (char *)STEK_SET_CONTEXT_V1;
    s.kdf_profile = STEK_KDF_PROFILE_V1;
    s.group = (char *)GROUP;
    s.generation = t->generation;
    s.generation_start = t->generation_start_s * NS;
    s.issued_at = (uint64_t)NOW * NS;
    s.host_identity = (char *)IDENTITY;
    s.host_eph_pub = (ProtobufCBinaryData){sizeof(eph_pub), eph_pub};
    s.nonce = (ProtobufCBinaryData){sizeof(nonce), (uint8_t *)nonce};
    s.hsm_eph_pub = (ProtobufCBinaryData){sizeof(hsm_pub), hsm_pub};
    s.n_keys = n;
    s.keys = kp;
    size_t len = stek__v1__signed_key_set__get_packed_size(&s);
    if (len > cap)
        fuzz_fail("seed too large");
    stek__v1__signed_key_set__pack(&s, out);
    return len;
}

static void emit_mode(fuzz_emit_fn emit, const char *name, uint8_t mode, const uint8_t *b, size_t n)
{
    uint8_t buf[4096];
    if (n + 1 > sizeof(buf))
        fuzz_fail("seed too large");
    buf[0] = mode;
    memcpy(buf + 1, b, n);
    emit(name, buf, n + 1);
}

void fuzz_seeds(fuzz_emit_fn emit)
{
    init();
    uint8_t set[2048], *msg = NULL;
    size_t len = 0;
    tspec full = {.generation = 1, .n_past = 3, .next = true, .raw_names = true};
    size_t n = template_set(&full, set, sizeof(set));
    emit_mode(emit, "template-accepted", 2, set, n);
    tspec one = {.generation = 1, .n_past = 0, .next = false, .raw_names = true};
    n = template_set(&one, set, sizeof(set));
    emit_mode(emit, "template-current-only", 2, set, n);
    tspec gen2 = {.generation = 2,
                  .generation_start_s = (uint64_t)NOW - 3600,
                  .n_past = 1,
                  .next = true,
                  .raw_names = true};
    n = template_set(&gen2, set, sizeof(set));
    emit_mode(emit, "template-new-generation", 2, set, n);
    tspec named = full;
    named.raw_names = false;
    n = template_set(&named, set, sizeof(set));
    emit_mode(emit, "template-bad-names", 2, set, n);
    /* Signed as they are: stopped at the ephemeral key (made per process). */
    emit_mode(emit, "signed-by-harness", 1, set, n);
    sign_pack(set, n, &msg, &len);
    emit_mode(emit, "keyset-signed", 0, msg, len);
    msg[len - 3] ^= 0x01; /* inside the signature */
    emit_mode(emit, "keyset-bad-signature", 0, msg, len);
    free(msg);
    Stek__V1__Heartbeat hb = STEK__V1__HEARTBEAT__INIT;
    hb.sent_at = (uint64_t)NOW * NS;
    hb.interval = 30;
    Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
    ks.heartbeat = &hb;
    len = stek__v1__key_set__pack(&ks, set);
    emit_mode(emit, "keyset-heartbeat", 0, set, len);
}
