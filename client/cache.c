/*
 * The sealed cache file (cache.h; proto/stek_cache.proto).
 */
#include "cache.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/kdf.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "atomic_file.h"
#include "kek.h"
#include "stek_cache.pb-c.h"

#define CACHE_FORMAT "stek-cache"
#define CACHE_VERSION 1
#define CACHE_INFO "stek-cache-v1"
#define DATA_KEY_BYTES 32
#define GCM_NONCE_BYTES 12
#define GCM_TAG_BYTES 16
#define RSA_MIN_BITS 2048
#define RSA_MAX_BITS 16384
/* The unpacked plaintext lives in locked chunks of this size (or one chunk
 * per larger allocation), at most ARENA_MAX_CHUNKS of them. */
#define ARENA_CHUNK_BYTES (64u * 1024)
#define ARENA_MAX_CHUNKS 128

typedef Stek__Cache__V1__CacheFile CacheFile;
typedef Stek__Cache__V1__CacheHeader CacheHeader;
typedef Stek__Cache__V1__CachePlaintext CachePlaintext;
typedef Stek__Cache__V1__CachedGroup CachedGroup;
typedef Stek__Cache__V1__CachedKey CachedKey;

/* Records an OpenSSL failure with its reason, then empties the queue. */
static stek_status crypto_fail(const char *what)
{
    unsigned long e = ERR_peek_last_error();
    const char *why = e != 0 ? ERR_reason_error_string(e) : NULL;
    stek_status st = stek_error_set(STEK_ERR_CRYPTO, "%s: %s", what, why ? why : "failed");
    ERR_clear_error();
    return st;
}

/* A rejection: STEK_ERR_VERIFY with *why and a detail. */
#define REJECT_GOTO(reason, ...)                                                                   \
    do {                                                                                           \
        *why = (reason);                                                                           \
        STEK_BAIL_GOTO(STEK_ERR_VERIFY, __VA_ARGS__);                                              \
    } while (0)

const char *stek_cache_reject_name(stek_cache_reject r)
{
    static const char *const names[] = {
        [STEK_CACHE_OK] = "STEK_CACHE_OK",
        [STEK_CACHE_UNREADABLE] = "STEK_CACHE_UNREADABLE",
        [STEK_CACHE_CORRUPT] = "STEK_CACHE_CORRUPT",
        [STEK_CACHE_TAMPERED] = "STEK_CACHE_TAMPERED",
        [STEK_CACHE_FOREIGN] = "STEK_CACHE_FOREIGN",
        [STEK_CACHE_STALE] = "STEK_CACHE_STALE",
    };
    if ((unsigned)r < sizeof(names) / sizeof(names[0]) && names[r] != NULL)
        return names[r];
    return "STEK_CACHE_UNKNOWN";
}

void stek_cache_contents_free(stek_cache_contents *c)
{
    if (c == NULL)
        return;
    stek_secret_free(c->material); /* cleanses */
    free(c->keys);
    free(c);
}

static stek_status contents_new(size_t n_keys, stek_cache_contents **out)
{
    stek_status st = STEK_OK;
    stek_cache_contents *c = calloc(1, sizeof(*c));
    STEK_ENSURE(c != NULL, STEK_ERR_NOMEM);
    if (n_keys > 0) {
        c->keys = calloc(n_keys, sizeof(*c->keys));
        STEK_ENSURE_GOTO(c->keys != NULL, STEK_ERR_NOMEM);
        STEK_GUARD_GOTO(stek_secret_new(n_keys * STEK_RING_ENTRY_BYTES, &c->material));
    }
    c->n_keys = n_keys;
    *out = c;
    c = NULL;
done:
    stek_cache_contents_free(c);
    return st;
}

/* ---- keys --------------------------------------------------------------------------- */

/* The kind of seal a public key makes; STEK_ERR_INVALID_ARG for other keys. */
static stek_status seal_kind_of(EVP_PKEY *pub, Stek__Cache__V1__SealKind *kind)
{
    if (EVP_PKEY_is_a(pub, "EC")) {
        char name[64];
        size_t len = 0;
        if (EVP_PKEY_get_group_name(pub, name, sizeof(name), &len) != 1 ||
            OBJ_sn2nid(name) != NID_X9_62_prime256v1) {
            ERR_clear_error();
            STEK_BAIL(STEK_ERR_INVALID_ARG, "sealing key: an EC key must be on P-256");
        }
        *kind = STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256;
        return STEK_OK;
    }
    if (EVP_PKEY_is_a(pub, "RSA")) {
        int bits = EVP_PKEY_get_bits(pub);
        if (bits < RSA_MIN_BITS || bits > RSA_MAX_BITS)
            STEK_BAIL(STEK_ERR_INVALID_ARG, "sealing key: RSA key of %d bits outside %d..%d", bits,
                      RSA_MIN_BITS, RSA_MAX_BITS);
        *kind = STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_RSA_OAEP_SHA256;
        return STEK_OK;
    }
    STEK_BAIL(STEK_ERR_INVALID_ARG, "sealing key: neither EC P-256 nor RSA");
}

stek_status stek_cache_sealing_public(EVP_PKEY *priv, EVP_PKEY **pub)
{
    STEK_ENSURE_REF(pub);
    *pub = NULL;
    STEK_ENSURE_REF(priv);
    /* Through SubjectPublicKeyInfo: a plain provider key with the public
     * half only, whatever the private key is (a token key through the
     * pkcs11 engine included). */
    unsigned char *der = NULL;
    int n = i2d_PUBKEY(priv, &der);
    if (n <= 0)
        return crypto_fail("i2d_PUBKEY(sealing key)");
    const unsigned char *p = der;
    EVP_PKEY *k = d2i_PUBKEY(NULL, &p, n);
    OPENSSL_free(der);
    if (k == NULL)
        return crypto_fail("d2i_PUBKEY(sealing key)");
    Stek__Cache__V1__SealKind kind;
    stek_status st = seal_kind_of(k, &kind);
    if (st != STEK_OK) {
        EVP_PKEY_free(k);
        return st;
    }
    *pub = k;
    return STEK_OK;
}

stek_status stek_cache_host_id(const char *cert_pem_path, uint8_t out[STEK_CACHE_HOST_ID_BYTES])
{
    STEK_ENSURE_REF(cert_pem_path);
    STEK_ENSURE_REF(out);
    FILE *f = fopen(cert_pem_path, "re");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", cert_pem_path, strerror(errno));
    X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (x == NULL) {
        ERR_clear_error();
        STEK_BAIL(STEK_ERR_CRYPTO, "%s: no PEM certificate", cert_pem_path);
    }
    unsigned char *der = NULL;
    int n = i2d_X509(x, &der);
    X509_free(x);
    unsigned int len = 0;
    int ok = n > 0 && EVP_Digest(der, (size_t)n, out, &len, EVP_sha256(), NULL) == 1 &&
             len == STEK_CACHE_HOST_ID_BYTES;
    OPENSSL_free(der);
    if (!ok)
        return crypto_fail("SHA-256 of the host certificate");
    return STEK_OK;
}

/* ---- contents <-> keyring ------------------------------------------------------------- */

/* a + b - c, saturated to [INT64_MIN, INT64_MAX]. */
static int64_t add_sub_sat(int64_t a, int64_t b, int64_t c)
{
    __int128 v = (__int128)a + b - c;
    if (v > INT64_MAX)
        return INT64_MAX;
    if (v < INT64_MIN)
        return INT64_MIN;
    return (int64_t)v;
}

stek_status stek_cache_from_ring(const stek_ring *r, int64_t boot_now, int64_t wall_now,
                                 const uint8_t host_id[STEK_CACHE_HOST_ID_BYTES],
                                 stek_cache_contents **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE_REF(host_id);
    const size_t n_keys = r != NULL ? r->n_keys : 0;
    stek_cache_contents *c = NULL;
    STEK_GUARD(contents_new(n_keys, &c));
    memcpy(c->host_id, host_id, STEK_CACHE_HOST_ID_BYTES);
    c->written_at = wall_now;
    for (size_t g = 0; r != NULL && g < r->n_groups; g++) {
        const stek_ring_group *rg = &r->groups[g];
        stek_cache_group *cg = &c->groups[c->n_groups++];
        memcpy(cg->name, rg->name, sizeof(cg->name));
        cg->generation = rg->generation;
        cg->current_epoch = rg->current_epoch;
        cg->first = rg->first;
        cg->count = rg->count;
    }
    for (size_t i = 0; i < n_keys; i++) {
        const stek_ring_key *k = &r->keys[i];
        c->keys[i] = (stek_cache_key){
            .epoch = k->epoch,
            .not_before = add_sub_sat(wall_now, k->enc_from, boot_now),
            .encrypt_until = add_sub_sat(wall_now, k->enc_until, boot_now),
            .decrypt_until = add_sub_sat(wall_now, k->dec_until, boot_now),
        };
    }
    if (n_keys > 0)
        memcpy(stek_secret_data(c->material), stek_ring_entry(r, 0),
               n_keys * STEK_RING_ENTRY_BYTES);
    *out = c;
    return STEK_OK;
}

stek_status stek_cache_deadlines(const stek_cache_contents *c, size_t g, int64_t boot_now,
                                 int64_t wall_now, stek_ring_key *keys)
{
    STEK_ENSURE_REF(c);
    STEK_ENSURE(g < c->n_groups, STEK_ERR_INVALID_ARG);
    const stek_cache_group *cg = &c->groups[g];
    STEK_ENSURE(cg->first <= c->n_keys && cg->count <= c->n_keys - cg->first, STEK_ERR_INVALID_ARG);
    STEK_ENSURE(cg->count == 0 || keys != NULL, STEK_ERR_INVALID_ARG);
    /* The later of the two is the conservative base, as for a set's issued_at. */
    const int64_t base = c->written_at > wall_now ? c->written_at : wall_now;
    for (size_t i = 0; i < cg->count; i++) {
        const stek_cache_key *k = &c->keys[cg->first + i];
        keys[i] = (stek_ring_key){
            .epoch = k->epoch,
            .group = 0,
            .enc_from = add_sub_sat(boot_now, k->not_before, base),
            .enc_until = add_sub_sat(boot_now, k->encrypt_until, base),
            .dec_until = add_sub_sat(boot_now, k->decrypt_until, base),
        };
    }
    return STEK_OK;
}

/* ---- locked memory for protobuf-c --------------------------------------------------------- */

/*
 * A bump allocator over locked chunks: protobuf-c copies every bytes field
 * of the unpacked plaintext (the keys) into memory from its allocator, so
 * that memory must be locked and cleansed too. free is a no-op; the whole
 * arena is cleansed and unmapped at once.
 */
typedef struct arena {
    stek_secret *chunks[ARENA_MAX_CHUNKS];
    size_t n;
    size_t used; /* bytes used in chunks[n - 1] */
} arena;

static void *arena_alloc(void *data, size_t size)
{
    arena *a = data;
    if (size > STEK_SECRET_MAX_BYTES)
        return NULL;
    size = (size + 15) & ~(size_t)15; /* max_align_t */
    if (size == 0)
        size = 16;
    if (a->n > 0 && size <= stek_secret_len(a->chunks[a->n - 1]) - a->used) {
        void *p = stek_secret_data(a->chunks[a->n - 1]) + a->used;
        a->used += size;
        return p;
    }
    if (a->n == ARENA_MAX_CHUNKS)
        return NULL;
    stek_secret *s = NULL;
    if (stek_secret_new(size > ARENA_CHUNK_BYTES ? size : ARENA_CHUNK_BYTES, &s) != STEK_OK)
        return NULL;
    a->chunks[a->n++] = s;
    a->used = size;
    return stek_secret_data(s);
}

static void arena_free(void *data, void *p)
{
    (void)data;
    (void)p;
}

static void arena_release(arena *a)
{
    for (size_t i = 0; i < a->n; i++)
        stek_secret_free(a->chunks[i]);
    a->n = 0;
}

/* ---- plaintext ------------------------------------------------------------------------------- */

static ProtobufCBinaryData bin(const uint8_t *p, size_t len)
{
    return (ProtobufCBinaryData){.len = len, .data = (uint8_t *)p};
}

/* Serializes c into a locked buffer. */
static stek_status plaintext_pack(const stek_cache_contents *c, stek_secret **out)
{
    stek_status st = STEK_OK;
    CachedGroup *groups = NULL, **group_ptrs = NULL;
    CachedKey *keys = NULL, **key_ptrs = NULL;
    STEK_ENSURE(c->n_groups <= STEK_RING_MAX_GROUPS, STEK_ERR_INVALID_ARG);
    STEK_ENSURE(c->n_keys == 0 ||
                    (c->keys != NULL && c->material != NULL &&
                     stek_secret_len(c->material) >= c->n_keys * STEK_RING_ENTRY_BYTES),
                STEK_ERR_INVALID_ARG);
    groups = calloc(c->n_groups + 1, sizeof(*groups));
    group_ptrs = calloc(c->n_groups + 1, sizeof(*group_ptrs));
    keys = calloc(c->n_keys + 1, sizeof(*keys));
    key_ptrs = calloc(c->n_keys + 1, sizeof(*key_ptrs));
    STEK_ENSURE_GOTO(groups != NULL && group_ptrs != NULL && keys != NULL && key_ptrs != NULL,
                     STEK_ERR_NOMEM);
    for (size_t i = 0; i < c->n_keys; i++) {
        const uint8_t *e = stek_secret_cdata(c->material) + i * STEK_RING_ENTRY_BYTES;
        stek__cache__v1__cached_key__init(&keys[i]);
        keys[i].name = bin(e, STEK_RING_NAME_BYTES);
        keys[i].hmac_key = bin(e + STEK_RING_NAME_BYTES, STEK_RING_HMAC_BYTES);
        keys[i].aes_key = bin(e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES, STEK_RING_AES_BYTES);
        keys[i].epoch = c->keys[i].epoch;
        keys[i].not_before = c->keys[i].not_before;
        keys[i].encrypt_until = c->keys[i].encrypt_until;
        keys[i].decrypt_until = c->keys[i].decrypt_until;
        key_ptrs[i] = &keys[i];
    }
    for (size_t g = 0; g < c->n_groups; g++) {
        const stek_cache_group *cg = &c->groups[g];
        STEK_ENSURE_GOTO(cg->first <= c->n_keys && cg->count <= c->n_keys - cg->first,
                         STEK_ERR_INVALID_ARG);
        stek__cache__v1__cached_group__init(&groups[g]);
        groups[g].name = (char *)cg->name;
        groups[g].generation = cg->generation;
        groups[g].current_epoch = cg->current_epoch;
        groups[g].schedule_origin = cg->sched.origin;
        groups[g].epoch_seconds = cg->sched.epoch_s;
        groups[g].lifetime_seconds = cg->sched.lifetime_s;
        groups[g].n_keys = cg->count;
        groups[g].keys = cg->count > 0 ? &key_ptrs[cg->first] : NULL;
        group_ptrs[g] = &groups[g];
    }
    CachePlaintext pt = STEK__CACHE__V1__CACHE_PLAINTEXT__INIT;
    pt.host_identity = bin(c->host_id, sizeof(c->host_id));
    pt.written_at = c->written_at;
    pt.n_groups = c->n_groups;
    pt.groups = group_ptrs;
    size_t len = stek__cache__v1__cache_plaintext__get_packed_size(&pt);
    if (len == 0 || len > STEK_SECRET_MAX_BYTES)
        STEK_BAIL_GOTO(STEK_ERR_NOMEM, "cache plaintext of %zu bytes over %u", len,
                       STEK_SECRET_MAX_BYTES);
    STEK_GUARD_GOTO(stek_secret_new(len, out));
    size_t n = stek__cache__v1__cache_plaintext__pack(&pt, stek_secret_data(*out));
    if (n != len) {
        stek_secret_free(*out);
        *out = NULL;
        STEK_BAIL_GOTO(STEK_ERR_INTERNAL, "packed %zu of %zu bytes", n, len);
    }
done:
    free(groups);
    free(group_ptrs);
    free(keys);
    free(key_ptrs);
    return st;
}

/* Where a group of the file goes: its index in x, or -1 when not ours. */
static long expected_group(const stek_cache_expect *x, const char *name)
{
    for (size_t i = 0; i < x->n_groups; i++)
        if (strcmp(x->groups[i], name) == 0)
            return (long)i;
    return -1;
}

static bool key_ok(const CachedKey *k)
{
    return k->name.len == STEK_RING_NAME_BYTES && k->hmac_key.len == STEK_RING_HMAC_BYTES &&
           k->aes_key.len == STEK_RING_AES_BYTES && k->not_before <= k->encrypt_until &&
           k->encrypt_until <= k->decrypt_until;
}

/*
 * Parses and checks an authentic plaintext against x, keeping the live keys
 * of x's groups. The unpacked message lives in the locked arena.
 */
static stek_status plaintext_unpack(const stek_secret *pt, const stek_cache_expect *x,
                                    stek_cache_contents **out, stek_cache_reject *why)
{
    stek_status st = STEK_OK;
    arena a = {0};
    ProtobufCAllocator alloc = {.alloc = arena_alloc, .free = arena_free, .allocator_data = &a};
    stek_cache_contents *c = NULL;
    CachePlaintext *m = stek__cache__v1__cache_plaintext__unpack(&alloc, stek_secret_len(pt),
                                                                 stek_secret_cdata(pt));
    if (m == NULL)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "the sealed contents do not parse");
    if (m->host_identity.len != STEK_CACHE_HOST_ID_BYTES)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "host identity of %zu bytes", m->host_identity.len);
    if (!stek_ct_equal(m->host_identity.data, x->host_id, STEK_CACHE_HOST_ID_BYTES))
        REJECT_GOTO(STEK_CACHE_FOREIGN, "written for another host certificate");
    if (m->n_groups > STEK_RING_MAX_GROUPS)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "%zu groups", m->n_groups);

    /* Check everything, and count what is ours and still live. */
    const int64_t base = m->written_at > x->wall_now ? m->written_at : x->wall_now;
    size_t live = 0;
    for (size_t g = 0; g < m->n_groups; g++) {
        const CachedGroup *cg = m->groups[g];
        if (cg->name == NULL || stek_group_name_check(cg->name) != STEK_OK)
            REJECT_GOTO(STEK_CACHE_CORRUPT, "group %zu: bad name", g);
        for (size_t h = 0; h < g; h++)
            if (strcmp(m->groups[h]->name, cg->name) == 0)
                REJECT_GOTO(STEK_CACHE_CORRUPT, "group %s twice", cg->name);
        if (cg->generation == 0 || cg->n_keys > STEK_ACCEPT_MAX_KEYS)
            REJECT_GOTO(STEK_CACHE_CORRUPT, "group %s: generation %llu, %zu keys", cg->name,
                        (unsigned long long)cg->generation, cg->n_keys);
        for (size_t i = 0; i < cg->n_keys; i++) {
            if (!key_ok(cg->keys[i]) || (i > 0 && cg->keys[i - 1]->epoch >= cg->keys[i]->epoch))
                REJECT_GOTO(STEK_CACHE_CORRUPT, "group %s: key %zu malformed", cg->name, i);
        }
        long e = expected_group(x, cg->name);
        if (e < 0)
            continue; /* a group this client no longer serves */
        if (cg->generation < x->generation_hwm[e])
            REJECT_GOTO(STEK_CACHE_STALE,
                        "group %s: generation %llu is below the high-water mark %llu", cg->name,
                        (unsigned long long)cg->generation,
                        (unsigned long long)x->generation_hwm[e]);
        for (size_t i = 0; i < cg->n_keys; i++)
            live += cg->keys[i]->decrypt_until > base;
    }
    if (live == 0)
        REJECT_GOTO(STEK_CACHE_STALE, "no key of our groups is still within its decrypt window");

    STEK_GUARD_GOTO(contents_new(live, &c));
    memcpy(c->host_id, m->host_identity.data, STEK_CACHE_HOST_ID_BYTES);
    c->written_at = m->written_at;
    uint8_t *mat = stek_secret_data(c->material);
    size_t n = 0;
    for (size_t g = 0; g < m->n_groups; g++) {
        const CachedGroup *cg = m->groups[g];
        if (expected_group(x, cg->name) < 0)
            continue;
        stek_cache_group *out_g = &c->groups[c->n_groups++];
        snprintf(out_g->name, sizeof(out_g->name), "%s", cg->name);
        out_g->generation = cg->generation;
        out_g->current_epoch = cg->current_epoch;
        out_g->sched = (stek_sched){.origin = cg->schedule_origin,
                                    .epoch_s = cg->epoch_seconds,
                                    .lifetime_s = cg->lifetime_seconds};
        out_g->first = n;
        for (size_t i = 0; i < cg->n_keys; i++) {
            const CachedKey *k = cg->keys[i];
            if (k->decrypt_until <= base)
                continue; /* past its window: never installed */
            c->keys[n] = (stek_cache_key){.epoch = k->epoch,
                                          .not_before = k->not_before,
                                          .encrypt_until = k->encrypt_until,
                                          .decrypt_until = k->decrypt_until};
            uint8_t *e = mat + n * STEK_RING_ENTRY_BYTES;
            memcpy(e, k->name.data, STEK_RING_NAME_BYTES);
            memcpy(e + STEK_RING_NAME_BYTES, k->hmac_key.data, STEK_RING_HMAC_BYTES);
            memcpy(e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES, k->aes_key.data,
                   STEK_RING_AES_BYTES);
            n++;
        }
        out_g->count = n - out_g->first;
    }
    STEK_ENSURE_GOTO(n == live, STEK_ERR_INTERNAL);
    *out = c;
    c = NULL;
done:
    if (m != NULL)
        stek__cache__v1__cache_plaintext__free_unpacked(m, &alloc);
    arena_release(&a); /* cleanses every copied key */
    stek_cache_contents_free(c);
    return st;
}

/* ---- sealing ------------------------------------------------------------------------------------
 */

/* Z = ECDH(priv, peer), 32 bytes, into a locked buffer. */
static stek_status ecdh(EVP_PKEY *priv, EVP_PKEY *peer, stek_secret **z)
{
    stek_status st = STEK_OK;
    size_t len = 0;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
    if (ctx == NULL || EVP_PKEY_derive_init(ctx) != 1 || EVP_PKEY_derive_set_peer(ctx, peer) != 1 ||
        EVP_PKEY_derive(ctx, NULL, &len) != 1)
        STEK_GUARD_GOTO(crypto_fail("ECDH setup"));
    STEK_ENSURE_GOTO(len == STEK_ECDH_Z_BYTES, STEK_ERR_CRYPTO);
    STEK_GUARD_GOTO(stek_secret_new(len, z));
    if (EVP_PKEY_derive(ctx, stek_secret_data(*z), &len) != 1 || len != STEK_ECDH_Z_BYTES) {
        stek_secret_free(*z);
        *z = NULL;
        STEK_GUARD_GOTO(crypto_fail("ECDH"));
    }
done:
    EVP_PKEY_CTX_free(ctx);
    return st;
}

/* The data key from Z: HKDF-SHA256(Z, info "stek-cache-v1" || eph || sealing point). */
static stek_status hkdf(const stek_secret *z, const uint8_t eph[STEK_P256_POINT_BYTES],
                        const uint8_t seal[STEK_P256_POINT_BYTES], stek_secret **key)
{
    stek_status st = STEK_OK;
    uint8_t info[sizeof(CACHE_INFO) - 1 + 2 * STEK_P256_POINT_BYTES];
    memcpy(info, CACHE_INFO, sizeof(CACHE_INFO) - 1);
    memcpy(info + sizeof(CACHE_INFO) - 1, eph, STEK_P256_POINT_BYTES);
    memcpy(info + sizeof(CACHE_INFO) - 1 + STEK_P256_POINT_BYTES, seal, STEK_P256_POINT_BYTES);
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *kctx = kdf != NULL ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)stek_secret_cdata(z),
                                          stek_secret_len(z)),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, sizeof(info)),
        OSSL_PARAM_construct_end(),
    };
    if (kctx == NULL)
        STEK_GUARD_GOTO(crypto_fail("EVP_KDF HKDF"));
    STEK_GUARD_GOTO(stek_secret_new(DATA_KEY_BYTES, key));
    if (EVP_KDF_derive(kctx, stek_secret_data(*key), DATA_KEY_BYTES, params) != 1) {
        stek_secret_free(*key);
        *key = NULL;
        STEK_GUARD_GOTO(crypto_fail("HKDF"));
    }
done:
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return st;
}

/* The uncompressed point of a (provider) EC key. */
static stek_status ec_point(EVP_PKEY *k, uint8_t out[STEK_P256_POINT_BYTES])
{
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, out,
                                        STEK_P256_POINT_BYTES, &len) != 1)
        return crypto_fail("EC public point");
    STEK_ENSURE(len == STEK_P256_POINT_BYTES && out[0] == 0x04, STEK_ERR_CRYPTO);
    return STEK_OK;
}

static stek_status rsa_oaep_ctx(EVP_PKEY *k, bool encrypt, EVP_PKEY_CTX **out)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, k, NULL);
    bool ok = ctx != NULL &&
              (encrypt ? EVP_PKEY_encrypt_init(ctx) : EVP_PKEY_decrypt_init(ctx)) == 1 &&
              EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
              EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) == 1 &&
              EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1;
    if (!ok) {
        EVP_PKEY_CTX_free(ctx);
        return crypto_fail("RSA-OAEP setup");
    }
    *out = ctx;
    return STEK_OK;
}

/*
 * Makes the header's key fields and the data key for a new file: an
 * ephemeral ECDH, or a random key wrapped with RSA-OAEP. *eph_or_wrapped
 * (malloc'd) is what the header carries.
 */
static stek_status make_data_key(EVP_PKEY *pub, Stek__Cache__V1__SealKind kind, stek_secret **key,
                                 uint8_t **eph_or_wrapped, size_t *len)
{
    stek_status st = STEK_OK;
    EVP_PKEY *eph = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    stek_secret *z = NULL;
    uint8_t *buf = NULL;
    if (kind == STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256) {
        uint8_t seal[STEK_P256_POINT_BYTES];
        buf = malloc(STEK_P256_POINT_BYTES);
        STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
        eph = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        if (eph == NULL)
            STEK_GUARD_GOTO(crypto_fail("EVP_PKEY_Q_keygen(P-256)"));
        STEK_GUARD_GOTO(ec_point(eph, buf));
        STEK_GUARD_GOTO(ec_point(pub, seal));
        STEK_GUARD_GOTO(ecdh(eph, pub, &z));
        STEK_GUARD_GOTO(hkdf(z, buf, seal, key));
        *len = STEK_P256_POINT_BYTES;
    } else {
        size_t out_len = 0;
        STEK_GUARD_GOTO(stek_secret_new(DATA_KEY_BYTES, key));
        if (RAND_priv_bytes(stek_secret_data(*key), DATA_KEY_BYTES) != 1)
            STEK_GUARD_GOTO(crypto_fail("RAND_priv_bytes"));
        STEK_GUARD_GOTO(rsa_oaep_ctx(pub, true, &ctx));
        if (EVP_PKEY_encrypt(ctx, NULL, &out_len, stek_secret_cdata(*key), DATA_KEY_BYTES) != 1)
            STEK_GUARD_GOTO(crypto_fail("RSA-OAEP size"));
        buf = malloc(out_len);
        STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
        if (EVP_PKEY_encrypt(ctx, buf, &out_len, stek_secret_cdata(*key), DATA_KEY_BYTES) != 1)
            STEK_GUARD_GOTO(crypto_fail("RSA-OAEP"));
        *len = out_len;
    }
    *eph_or_wrapped = buf;
    buf = NULL;
done:
    if (st != STEK_OK) {
        stek_secret_free(*key);
        *key = NULL;
    }
    free(buf);
    stek_secret_free(z);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(eph);
    return st;
}

/*
 * The data key of an existing file, with the private key. Any failure that
 * the file's bytes can cause is a rejection (TAMPERED): a point off the
 * curve, a wrapped key that does not unwrap, a key of the other kind.
 */
static stek_status open_data_key(EVP_PKEY *priv, const CacheHeader *h, stek_secret **key,
                                 stek_cache_reject *why)
{
    stek_status st = STEK_OK;
    EVP_PKEY *pub = NULL, *peer = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    stek_secret *z = NULL, *raw = NULL;
    Stek__Cache__V1__SealKind mine;
    STEK_GUARD_GOTO(stek_cache_sealing_public(priv, &pub));
    STEK_GUARD_GOTO(seal_kind_of(pub, &mine));
    if (h->seal != mine)
        REJECT_GOTO(STEK_CACHE_TAMPERED, "sealed for another kind of sealing key");
    if (mine == STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256) {
        uint8_t seal[STEK_P256_POINT_BYTES];
        if (h->ephemeral_public.len != STEK_P256_POINT_BYTES ||
            stek_p256_point_check(h->ephemeral_public.data, h->ephemeral_public.len) != STEK_OK)
            REJECT_GOTO(STEK_CACHE_TAMPERED, "the ephemeral key is not a P-256 point");
        STEK_GUARD_GOTO(ec_point(pub, seal));
        peer = EVP_PKEY_new();
        if (peer == NULL || EVP_PKEY_copy_parameters(peer, pub) != 1 ||
            EVP_PKEY_set1_encoded_public_key(peer, h->ephemeral_public.data,
                                             h->ephemeral_public.len) != 1)
            STEK_GUARD_GOTO(crypto_fail("ephemeral key"));
        STEK_GUARD_GOTO(ecdh(priv, peer, &z));
        STEK_GUARD_GOTO(hkdf(z, h->ephemeral_public.data, seal, key));
    } else {
        size_t len = (size_t)EVP_PKEY_get_size(priv);
        STEK_ENSURE_GOTO(len >= DATA_KEY_BYTES && len <= RSA_MAX_BITS / 8, STEK_ERR_CRYPTO);
        STEK_GUARD_GOTO(rsa_oaep_ctx(priv, false, &ctx));
        STEK_GUARD_GOTO(stek_secret_new(len, &raw));
        if (h->wrapped_key.len == 0 ||
            EVP_PKEY_decrypt(ctx, stek_secret_data(raw), &len, h->wrapped_key.data,
                             h->wrapped_key.len) != 1 ||
            len != DATA_KEY_BYTES) {
            ERR_clear_error();
            REJECT_GOTO(STEK_CACHE_TAMPERED,
                        "the data key does not unwrap: altered, or another sealing key");
        }
        STEK_GUARD_GOTO(stek_secret_new(DATA_KEY_BYTES, key));
        memcpy(stek_secret_data(*key), stek_secret_cdata(raw), DATA_KEY_BYTES);
    }
done:
    stek_secret_free(raw);
    stek_secret_free(z);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(peer);
    EVP_PKEY_free(pub);
    return st;
}

/* AES-256-GCM over in (in_len), AAD aad; out gets in_len bytes and the tag. */
static stek_status gcm_seal(const stek_secret *key, const uint8_t *nonce, const uint8_t *aad,
                            size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out)
{
    stek_status st = STEK_OK;
    EVP_CIPHER *gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, m = 0;
    if (gcm == NULL || ctx == NULL ||
        EVP_EncryptInit_ex2(ctx, gcm, stek_secret_cdata(key), nonce, NULL) != 1 ||
        EVP_EncryptUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1 ||
        EVP_EncryptUpdate(ctx, out, &n, in, (int)in_len) != 1 ||
        EVP_EncryptFinal_ex(ctx, out + n, &m) != 1 || (size_t)(n + m) != in_len ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, GCM_TAG_BYTES, out + in_len) != 1)
        st = crypto_fail("AES-256-GCM seal");
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_free(gcm);
    return st;
}

/* The inverse: STEK_ERR_VERIFY (TAMPERED) when the tag does not match. */
static stek_status gcm_open(const stek_secret *key, const uint8_t *nonce, const uint8_t *aad,
                            size_t aad_len, const uint8_t *in, size_t in_len, stek_secret *out,
                            stek_cache_reject *why)
{
    stek_status st = STEK_OK;
    EVP_CIPHER *gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    const size_t len = in_len - GCM_TAG_BYTES;
    int n = 0, m = 0;
    if (gcm == NULL || ctx == NULL ||
        EVP_DecryptInit_ex2(ctx, gcm, stek_secret_cdata(key), nonce, NULL) != 1 ||
        EVP_DecryptUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1 ||
        EVP_DecryptUpdate(ctx, stek_secret_data(out), &n, in, (int)len) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, GCM_TAG_BYTES, (void *)(in + len)) != 1)
        STEK_GUARD_GOTO(crypto_fail("AES-256-GCM open"));
    if (EVP_DecryptFinal_ex(ctx, stek_secret_data(out) + n, &m) != 1) {
        ERR_clear_error();
        stek_cleanse(stek_secret_data(out), stek_secret_len(out));
        REJECT_GOTO(STEK_CACHE_TAMPERED,
                    "the seal does not verify: altered, or sealed under another key");
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_free(gcm);
    return st;
}

stek_status stek_cache_write(const char *path, EVP_PKEY *sealing_pub, const stek_cache_contents *c)
{
    stek_status st = STEK_OK;
    stek_secret *pt = NULL, *key = NULL;
    uint8_t *eph_or_wrapped = NULL, *hdr = NULL, *ct = NULL, *file = NULL;
    size_t ew_len = 0, hdr_len = 0, file_len = 0;
    uint8_t nonce[GCM_NONCE_BYTES];
    Stek__Cache__V1__SealKind kind;
    STEK_ENSURE_REF(path);
    STEK_ENSURE_REF(sealing_pub);
    STEK_ENSURE_REF(c);
    STEK_GUARD(seal_kind_of(sealing_pub, &kind));
    STEK_GUARD_GOTO(plaintext_pack(c, &pt));
    STEK_GUARD_GOTO(make_data_key(sealing_pub, kind, &key, &eph_or_wrapped, &ew_len));
    if (RAND_bytes(nonce, sizeof(nonce)) != 1)
        STEK_GUARD_GOTO(crypto_fail("RAND_bytes"));

    CacheHeader h = STEK__CACHE__V1__CACHE_HEADER__INIT;
    h.format = (char *)CACHE_FORMAT;
    h.version = CACHE_VERSION;
    h.seal = kind;
    if (kind == STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256)
        h.ephemeral_public = bin(eph_or_wrapped, ew_len);
    else
        h.wrapped_key = bin(eph_or_wrapped, ew_len);
    h.nonce = bin(nonce, sizeof(nonce));
    hdr_len = stek__cache__v1__cache_header__get_packed_size(&h);
    hdr = malloc(hdr_len);
    STEK_ENSURE_GOTO(hdr != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(stek__cache__v1__cache_header__pack(&h, hdr) == hdr_len, STEK_ERR_INTERNAL);

    const size_t ct_len = stek_secret_len(pt) + GCM_TAG_BYTES;
    ct = malloc(ct_len);
    STEK_ENSURE_GOTO(ct != NULL, STEK_ERR_NOMEM);
    STEK_GUARD_GOTO(
        gcm_seal(key, nonce, hdr, hdr_len, stek_secret_cdata(pt), stek_secret_len(pt), ct));

    CacheFile f = STEK__CACHE__V1__CACHE_FILE__INIT;
    f.header = bin(hdr, hdr_len);
    f.ciphertext = bin(ct, ct_len);
    file_len = stek__cache__v1__cache_file__get_packed_size(&f);
    file = malloc(file_len);
    STEK_ENSURE_GOTO(file != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(stek__cache__v1__cache_file__pack(&f, file) == file_len, STEK_ERR_INTERNAL);
    STEK_GUARD_GOTO(stek_file_replace(path, file, file_len));
done:
    stek_secret_free(pt);
    stek_secret_free(key);
    free(eph_or_wrapped);
    free(hdr);
    free(ct);
    free(file);
    return st;
}

/* The whole file, at most STEK_CACHE_MAX_FILE_BYTES. */
static stek_status read_file(const char *path, uint8_t **out, size_t *len, stek_cache_reject *why)
{
    stek_status st = STEK_OK;
    uint8_t *buf = NULL;
    size_t got = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            STEK_BAIL(STEK_ERR_NOT_FOUND, "%s: no cache file", path);
        *why = STEK_CACHE_UNREADABLE;
        STEK_BAIL(STEK_ERR_VERIFY, "open %s: %s", path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
        REJECT_GOTO(STEK_CACHE_UNREADABLE, "%s: not a regular file", path);
    if (sb.st_size <= 0 || (uint64_t)sb.st_size > STEK_CACHE_MAX_FILE_BYTES)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "%s: %lld bytes", path, (long long)sb.st_size);
    buf = malloc((size_t)sb.st_size);
    STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
    while (got < (size_t)sb.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)sb.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            REJECT_GOTO(STEK_CACHE_UNREADABLE, "read %s: %s", path, strerror(errno));
        if (n == 0)
            break;
        got += (size_t)n;
    }
    *out = buf;
    *len = got;
    buf = NULL;
done:
    close(fd);
    free(buf);
    return st;
}

stek_status stek_cache_read(const char *path, EVP_PKEY *sealing_priv, const stek_cache_expect *x,
                            stek_cache_contents **out, stek_cache_reject *why)
{
    stek_status st = STEK_OK;
    uint8_t *file = NULL;
    size_t len = 0;
    CacheFile *f = NULL;
    CacheHeader *h = NULL;
    stek_secret *key = NULL, *pt = NULL;
    STEK_ENSURE_REF(why);
    *why = STEK_CACHE_OK;
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(path != NULL && sealing_priv != NULL && x != NULL && x->host_id != NULL &&
                    (x->n_groups == 0 || (x->groups != NULL && x->generation_hwm != NULL)),
                STEK_ERR_INVALID_ARG);

    STEK_GUARD_GOTO(read_file(path, &file, &len, why));
    f = stek__cache__v1__cache_file__unpack(NULL, len, file);
    if (f == NULL)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "not a cache file, or truncated");
    h = stek__cache__v1__cache_header__unpack(NULL, f->header.len, f->header.data);
    if (h == NULL || h->format == NULL || strcmp(h->format, CACHE_FORMAT) != 0)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "not a cache file, or truncated");
    if (h->version != CACHE_VERSION)
        REJECT_GOTO(STEK_CACHE_CORRUPT, "format version %u, not %u", h->version, CACHE_VERSION);
    if (h->nonce.len != GCM_NONCE_BYTES || f->ciphertext.len <= GCM_TAG_BYTES ||
        f->ciphertext.len - GCM_TAG_BYTES > STEK_SECRET_MAX_BYTES ||
        (h->seal != STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_ECDH_P256_HKDF_SHA256 &&
         h->seal != STEK__CACHE__V1__SEAL_KIND__SEAL_KIND_RSA_OAEP_SHA256))
        REJECT_GOTO(STEK_CACHE_CORRUPT, "malformed header or truncated contents");

    STEK_GUARD_GOTO(open_data_key(sealing_priv, h, &key, why));
    STEK_GUARD_GOTO(stek_secret_new(f->ciphertext.len - GCM_TAG_BYTES, &pt));
    STEK_GUARD_GOTO(gcm_open(key, h->nonce.data, f->header.data, f->header.len, f->ciphertext.data,
                             f->ciphertext.len, pt, why));
    STEK_GUARD_GOTO(plaintext_unpack(pt, x, out, why));
done:
    stek_secret_free(pt);
    stek_secret_free(key);
    stek__cache__v1__cache_header__free_unpacked(h, NULL);
    stek__cache__v1__cache_file__free_unpacked(f, NULL);
    free(file);
    return st;
}
