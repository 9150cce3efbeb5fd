/*
 * libstek's sealed cache reader (client/cache.c, stek_cache_read) with a
 * fixed sealing key (EC P-256, fuzz_derived_key("sealing")) and fixed expectations: a host
 * id, a clock, and two groups with their high-water marks.
 *
 * The first byte picks the mode, the rest is the input:
 *   0  the bytes are the file: container, header, data key, AES-GCM;
 *   1  the bytes are the plaintext: the harness seals them as a writer
 *      would (ECDH with an ephemeral key of this process, HKDF-SHA-256,
 *      AES-256-GCM with the header as additional data, proto/stek_cache.proto),
 *      so mutations reach the inner parser and its checks instead of
 *      stopping at the GCM tag.
 * The input goes through a real file, as stek_cache_read only reads paths.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include "cache.h"
#include "fuzz.h"
#include "stek_cache.pb-c.h"

#define NOW_NS INT64_C(1700000030000000000)
#define NS INT64_C(1000000000)
#define MODES 2

static EVP_PKEY *sealing_key;
static uint8_t header[256];
static size_t header_len;
static uint8_t data_key[32];
static const uint8_t gcm_nonce[12] = "stek-fuzz-nc";
static const uint8_t host_id[STEK_CACHE_HOST_ID_BYTES] = {0x11, 0x22, 0x33};
static const char *const groups[] = {"edge", "b"};
static const uint64_t hwm[] = {0, 5};
static char path[512];

static void point_of(EVP_PKEY *k, uint8_t out[65])
{
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, out, 65, &len) !=
            1 ||
        len != 65)
        fuzz_fail("EC point");
}

/* The writer's side of the seal, done once: the header and the data key. */
static void init(void)
{
    if (sealing_key != NULL)
        return;
    sealing_key = fuzz_derived_key("sealing", false);
    EVP_PKEY *eph = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    uint8_t eph_pt[65], seal_pt[65], z[32], info[13 + 130];
    size_t zlen = sizeof(z);
    if (eph == NULL)
        fuzz_fail("keygen");
    point_of(eph, eph_pt);
    point_of(sealing_key, seal_pt);
    EVP_PKEY_CTX *d = EVP_PKEY_CTX_new_from_pkey(NULL, eph, NULL);
    if (d == NULL || EVP_PKEY_derive_init(d) != 1 ||
        EVP_PKEY_derive_set_peer(d, sealing_key) != 1 || EVP_PKEY_derive(d, z, &zlen) != 1)
        fuzz_fail("ECDH");
    EVP_PKEY_CTX_free(d);
    memcpy(info, "stek-cache-v1", 13);
    memcpy(info + 13, eph_pt, 65);
    memcpy(info + 13 + 65, seal_pt, 65);
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *kctx = kdf != NULL ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, z, zlen),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, sizeof(info)),
        OSSL_PARAM_construct_end(),
    };
    if (kctx == NULL || EVP_KDF_derive(kctx, data_key, sizeof(data_key), params) != 1)
        fuzz_fail("HKDF");
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    OPENSSL_cleanse(z, sizeof(z));
    EVP_PKEY_free(eph);

    Stek__Cache__V1__CacheHeader h = STEK__CACHE__V1__CACHE_HEADER__INIT;
    h.format = (char *)"stek-cache";
    h.version = 1;
    h.seal = STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256;
    h.ephemeral_public = (ProtobufCBinaryData){65, eph_pt};
    h.nonce = (ProtobufCBinaryData){sizeof(gcm_nonce), (uint8_t *)gcm_nonce};
    header_len = stek__cache__v1__cache_header__get_packed_size(&h);
    if (header_len > sizeof(header))
        fuzz_fail("header size");
    stek__cache__v1__cache_header__pack(&h, header);
}

/* Seals pt into a cache file (*out malloc'd). */
static void seal(const uint8_t *pt, size_t len, uint8_t **out, size_t *out_len)
{
    uint8_t *ct = malloc(len + 16);
    int n = 0, m = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (ct == NULL || c == NULL ||
        EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, data_key, gcm_nonce) != 1 ||
        EVP_EncryptUpdate(c, NULL, &n, header, (int)header_len) != 1 ||
        EVP_EncryptUpdate(c, ct, &n, pt, (int)len) != 1 ||
        EVP_EncryptFinal_ex(c, ct + n, &m) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, ct + len) != 1)
        fuzz_fail("AES-256-GCM");
    EVP_CIPHER_CTX_free(c);
    Stek__Cache__V1__CacheFile f = STEK__CACHE__V1__CACHE_FILE__INIT;
    f.header = (ProtobufCBinaryData){header_len, header};
    f.ciphertext = (ProtobufCBinaryData){len + 16, ct};
    *out_len = stek__cache__v1__cache_file__get_packed_size(&f);
    *out = malloc(*out_len);
    if (*out == NULL)
        fuzz_fail("out of memory");
    stek__cache__v1__cache_file__pack(&f, *out);
    free(ct);
}

/* Reads the file back and checks the contract of cache.h. */
static void read_check(const uint8_t *file, size_t len)
{
    fuzz_write_file("keys.cache", file, len, path);
    stek_cache_expect x = {.host_id = host_id,
                           .wall_now = NOW_NS,
                           .n_groups = 2,
                           .groups = groups,
                           .generation_hwm = hwm};
    stek_cache_contents *c = NULL;
    stek_cache_reject why = STEK_CACHE_REJECT_COUNT;
    stek_status st = stek_cache_read(path, sealing_key, &x, &c, &why);
    if (fuzz_verbose())
        fprintf(stderr, "cache: %s %s\n", stek_status_name(st), stek_cache_reject_name(why));
    if (st == STEK_ERR_VERIFY) {
        if (c != NULL || why == STEK_CACHE_OK || why >= STEK_CACHE_REJECT_COUNT)
            fuzz_fail("a rejection broke the contract");
        return;
    }
    if (st != STEK_OK) {
        /* An empty file is CORRUPT, and the file is there: NOT_FOUND is wrong too. */
        if (st != STEK_ERR_NOMEM && st != STEK_ERR_CRYPTO)
            fuzz_fail("stek_cache_read: %s: %s", stek_status_name(st), stek_error_detail());
        return;
    }
    if (c == NULL || why != STEK_CACHE_OK || c->n_keys < 1 || c->n_groups > 2 ||
        memcmp(c->host_id, host_id, sizeof(host_id)) != 0 ||
        stek_secret_len(c->material) != c->n_keys * STEK_RING_ENTRY_BYTES)
        fuzz_fail("accepted contents are not well formed");
    size_t total = 0;
    for (size_t g = 0; g < c->n_groups; g++) {
        const stek_cache_group *cg = &c->groups[g];
        size_t gi = strcmp(cg->name, "edge") == 0 ? 0 : strcmp(cg->name, "b") == 0 ? 1 : 2;
        if (gi > 1 || cg->generation < hwm[gi] || cg->first != total ||
            cg->count > c->n_keys - total)
            fuzz_fail("accepted group %zu is not one expected, or its keys are out of range", g);
        for (size_t i = cg->first; i < cg->first + cg->count; i++) {
            if (c->keys[i].decrypt_until <= NOW_NS)
                fuzz_fail("accepted a key past its decrypt deadline");
            if (i > cg->first && c->keys[i].epoch <= c->keys[i - 1].epoch)
                fuzz_fail("accepted epochs are not ascending");
        }
        total += cg->count;
    }
    if (total != c->n_keys)
        fuzz_fail("keys outside every group");
    stek_cache_contents_free(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init();
    if (size < 1)
        return 0;
    if (data[0] % MODES == 0) {
        read_check(data + 1, size - 1);
    } else {
        uint8_t *file = NULL;
        size_t len = 0;
        seal(data + 1, size - 1, &file, &len);
        read_check(file, len);
        free(file);
    }
    return 0;
}

/* ---- seeds ------------------------------------------------------------------------------ */

/* A plaintext: group edge (generation 1, 3 keys, one expired), b (5), other (1). */
static size_t plaintext(const uint8_t *hid, int64_t written_at, uint64_t gen_b, uint8_t *out,
                        size_t cap)
{
    uint8_t mat[6][80];
    Stek__Cache__V1__CachedKey k[6], *kp[6];
    const uint64_t cur = (uint64_t)(NOW_NS / NS / 60);
    for (size_t i = 0; i < 6; i++) {
        for (size_t j = 0; j < 80; j++)
            mat[i][j] = (uint8_t)(i * 13 + j);
        stek__cache__v1__cached_key__init(&k[i]);
        k[i].name = (ProtobufCBinaryData){16, mat[i]};
        k[i].hmac_key = (ProtobufCBinaryData){32, mat[i] + 16};
        k[i].aes_key = (ProtobufCBinaryData){32, mat[i] + 48};
        const uint64_t e = cur - 2 + (i % 3);
        k[i].epoch = e;
        k[i].not_before = (int64_t)e * 60 * NS;
        k[i].encrypt_until = (int64_t)(e + 1) * 60 * NS;
        k[i].decrypt_until = (int64_t)(e + 1) * 60 * NS + (i % 3 == 0 ? 0 : 180 * NS);
        kp[i] = &k[i];
    }
    Stek__Cache__V1__CachedGroup g[3], *gp[3];
    const char *names[3] = {"edge", "b", "other"};
    const uint64_t gens[3] = {1, gen_b, 1};
    for (size_t i = 0; i < 3; i++) {
        stek__cache__v1__cached_group__init(&g[i]);
        g[i].name = (char *)names[i];
        g[i].generation = gens[i];
        g[i].current_epoch = cur;
        g[i].epoch_seconds = i == 0 ? 60 : 0;
        g[i].lifetime_seconds = i == 0 ? 180 : 0;
        g[i].n_keys = i == 2 ? 0 : 3;
        g[i].keys = kp + 3 * (i % 2);
        gp[i] = &g[i];
    }
    Stek__Cache__V1__CachePlaintext p = STEK__CACHE__V1__CACHE_PLAINTEXT__INIT;
    p.host_identity = (ProtobufCBinaryData){STEK_CACHE_HOST_ID_BYTES, (uint8_t *)hid};
    p.written_at = written_at;
    p.n_groups = 3;
    p.groups = gp;
    size_t len = stek__cache__v1__cache_plaintext__get_packed_size(&p);
    if (len > cap)
        fuzz_fail("seed too large");
    stek__cache__v1__cache_plaintext__pack(&p, out);
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
    uint8_t pt[2048], *file = NULL;
    size_t len = 0;
    size_t n = plaintext(host_id, NOW_NS - 10 * NS, 5, pt, sizeof(pt));
    emit_mode(emit, "plain-accepted", 1, pt, n);
    seal(pt, n, &file, &len);
    emit_mode(emit, "file-accepted", 0, file, len);
    file[len - 5] ^= 0x01; /* in the GCM tag */
    emit_mode(emit, "file-tampered", 0, file, len);
    free(file);
    n = plaintext(host_id, NOW_NS, 4, pt, sizeof(pt));
    emit_mode(emit, "plain-below-hwm", 1, pt, n);
    const uint8_t other[STEK_CACHE_HOST_ID_BYTES] = {0x99};
    n = plaintext(other, NOW_NS, 5, pt, sizeof(pt));
    emit_mode(emit, "plain-foreign-host", 1, pt, n);
    emit_mode(emit, "file-empty", 0, (const uint8_t *)"", 0);
}
