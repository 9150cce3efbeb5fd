/*
 * Key set building and caching. The signed bytes are produced once here and
 * never re-serialized anywhere: hosts verify exactly what the HSM signed.
 */
#include "keyset.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

#include "log.h"
#include "stek/v1/stek.pb-c.h"

#define NS 1000000000ULL

static uint64_t ns(int64_t s)
{
    return s <= 0 ? 0 : (uint64_t)s * NS;
}

void stekd_keyset_unref(stekd_keyset *ks)
{
    if (ks != NULL && atomic_fetch_sub(&ks->refs, 1) == 1)
        free(ks);
}

/* Serializes the signed content; *out is freed with free(). */
static stek_status pack_signed(const stekd_view *v, const stekd_keyset_req *r, int64_t now,
                               const uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                               uint8_t (*blobs)[STEK_WRAPPED_KEY_BYTES], uint8_t **out,
                               size_t *out_len)
{
    Stek__V1__Key *keys = calloc(v->n_keys ? v->n_keys : 1, sizeof(*keys));
    Stek__V1__Key **key_ptrs = calloc(v->n_keys ? v->n_keys : 1, sizeof(*key_ptrs));
    stek_status st = STEK_OK;
    STEK_ENSURE_GOTO(keys != NULL && key_ptrs != NULL, STEK_ERR_NOMEM);
    for (size_t i = 0; i < v->n_keys; i++) {
        stek__v1__key__init(&keys[i]);
        stek_key_times t;
        stek_sched_key_times(&v->cfg->sched, v->keys[i].epoch, &t);
        /* States follow the view's epoch, not the clock: a set built between
         * an epoch boundary and the next refresh stays internally consistent
         * (one CURRENT, one NEXT); hosts switch on the key times anyway. */
        uint64_t e = v->keys[i].epoch;
        stek_key_state state = e == v->epoch + 1 ? STEK_KEY_NEXT
                               : e == v->epoch   ? STEK_KEY_CURRENT
                                                 : STEK_KEY_DECRYPT_ONLY;
        keys[i].name.data = (uint8_t *)v->keys[i].name;
        keys[i].name.len = STEK_TICKET_NAME_BYTES;
        keys[i].epoch = v->keys[i].epoch;
        keys[i].state = (Stek__V1__KeyState)state;
        keys[i].not_before = ns(t.not_before);
        keys[i].encrypt_until = ns(t.encrypt_until);
        keys[i].decrypt_until = ns(t.decrypt_until);
        keys[i].wrapped.data = blobs[i];
        keys[i].wrapped.len = STEK_WRAPPED_KEY_BYTES;
        key_ptrs[i] = &keys[i];
    }
    Stek__V1__SignedKeySet s = STEK__V1__SIGNED_KEY_SET__INIT;
    s.context = (char *)STEK_SET_CONTEXT;
    s.kdf_profile = STEK_KDF_PROFILE;
    s.group = (char *)v->cfg->name;
    s.generation = v->generation;
    s.issued_at = ns(now);
    s.host_identity = (char *)r->identity;
    s.host_eph_pub.data = (uint8_t *)r->eph_pub;
    s.host_eph_pub.len = STEK_P256_POINT_BYTES;
    s.nonce.data = (uint8_t *)r->nonce;
    s.nonce.len = r->nonce_len;
    s.hsm_eph_pub.data = (uint8_t *)hsm_pub;
    s.hsm_eph_pub.len = STEK_P256_POINT_BYTES;
    s.n_keys = v->n_keys;
    s.keys = key_ptrs;
    s.generation_start = ns(v->gen_start);
    *out_len = stek__v1__signed_key_set__get_packed_size(&s);
    *out = malloc(*out_len);
    STEK_ENSURE_GOTO(*out != NULL, STEK_ERR_NOMEM);
    stek__v1__signed_key_set__pack(&s, *out);
done:
    free(keys);
    free(key_ptrs);
    return st;
}

stek_status stekd_keyset_build(stek_p11 *p11, const stekd_view *v, const stekd_keyset_req *r,
                               int64_t now, stekd_keyset **out)
{
    STEK_ENSURE(p11 && v && r && out && r->identity && r->eph_pub && r->nonce,
                STEK_ERR_INVALID_ARG);
    STEK_ENSURE(v->available && v->n_keys > 0, STEK_ERR_INVALID_ARG);
    *out = NULL;
    stek_status st = STEK_OK;
    uint64_t *epochs = calloc(v->n_keys, sizeof(*epochs));
    uint8_t(*blobs)[STEK_WRAPPED_KEY_BYTES] = calloc(v->n_keys, STEK_WRAPPED_KEY_BYTES);
    uint8_t hsm_pub[STEK_P256_POINT_BYTES];
    uint8_t *signed_set = NULL;
    size_t signed_len = 0;
    STEK_ENSURE_GOTO(epochs != NULL && blobs != NULL, STEK_ERR_NOMEM);
    for (size_t i = 0; i < v->n_keys; i++)
        epochs[i] = v->keys[i].epoch;

    STEK_GUARD_GOTO(stek_p11_wrap_tickets(p11, v->cfg->name, v->generation, r->eph_pub,
                                          STEK_P256_POINT_BYTES, epochs, v->n_keys, hsm_pub,
                                          blobs));
    STEK_GUARD_GOTO(pack_signed(v, r, now, hsm_pub, blobs, &signed_set, &signed_len));
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    STEK_GUARD_GOTO(stek_p11_sign(p11, signed_set, signed_len, sig, &sig_len));

    Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
    ks.signed_set.data = signed_set;
    ks.signed_set.len = signed_len;
    ks.signature.data = sig;
    ks.signature.len = sig_len;
    size_t len = stek__v1__key_set__get_packed_size(&ks);
    stekd_keyset *k = malloc(sizeof(*k) + len);
    STEK_ENSURE_GOTO(k != NULL, STEK_ERR_NOMEM);
    atomic_init(&k->refs, 1);
    k->built_at = now;
    k->version = v->version;
    k->len = stek__v1__key_set__pack(&ks, k->msg);
    *out = k;
done:
    free(epochs);
    free(blobs);
    free(signed_set);
    return st;
}

/* ---- the cache ---------------------------------------------------------- */

typedef struct entry {
    uint8_t key[SHA256_DIGEST_LENGTH];
    stekd_keyset *ks; /* NULL: free slot */
} entry;

/*
 * A ring of `capacity` entries: inserts go to the next slot, evicting what
 * was there (the oldest insert). Lookups scan a small hash index.
 */
struct stekd_cache {
    pthread_mutex_t mu;
    entry *ring;
    size_t capacity, next, entries;
    size_t *index; /* open addressing over ring positions + 1 (0 = empty) */
    size_t index_size;
    unsigned long hits, misses, evictions;
};

static void cache_key(const stekd_view *v, const stekd_keyset_req *r, uint8_t out[32])
{
    uint8_t ver[8];
    for (int i = 0; i < 8; i++)
        ver[i] = (uint8_t)(v->version >> (56 - 8 * i));
    /* Separators: names cannot contain NUL, so fields cannot run together. */
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(md, v->cfg->name, strlen(v->cfg->name) + 1) != 1 ||
        EVP_DigestUpdate(md, r->identity, strlen(r->identity) + 1) != 1 ||
        EVP_DigestUpdate(md, r->eph_pub, STEK_P256_POINT_BYTES) != 1 ||
        EVP_DigestUpdate(md, &r->nonce_len, sizeof(r->nonce_len)) != 1 ||
        EVP_DigestUpdate(md, r->nonce, r->nonce_len) != 1 ||
        EVP_DigestUpdate(md, ver, sizeof(ver)) != 1 || EVP_DigestFinal_ex(md, out, NULL) != 1)
        memset(out, 0, 32); /* an all-zero key only ever misses */
    EVP_MD_CTX_free(md);
}

static size_t slot_of(const stekd_cache *c, const uint8_t key[32])
{
    size_t h = 0;
    memcpy(&h, key, sizeof(h));
    return h % c->index_size;
}

/* Index position holding key, or the empty position where it would go. */
static size_t index_find(const stekd_cache *c, const uint8_t key[32], bool *found)
{
    size_t i = slot_of(c, key);
    for (;;) {
        size_t r = c->index[i];
        if (r == 0) {
            *found = false;
            return i;
        }
        if (memcmp(c->ring[r - 1].key, key, 32) == 0) {
            *found = true;
            return i;
        }
        i = (i + 1) % c->index_size;
    }
}

/* Removes index position i and re-seats the cluster behind it. */
static void index_remove(stekd_cache *c, size_t i)
{
    c->index[i] = 0;
    for (size_t j = (i + 1) % c->index_size; c->index[j] != 0; j = (j + 1) % c->index_size) {
        size_t r = c->index[j];
        c->index[j] = 0;
        bool found;
        size_t k = index_find(c, c->ring[r - 1].key, &found);
        c->index[k] = r;
    }
}

stek_status stekd_cache_new(size_t capacity, stekd_cache **out)
{
    STEK_ENSURE_REF(out);
    STEK_ENSURE(capacity > 0 && capacity < (1u << 24), STEK_ERR_INVALID_ARG);
    stekd_cache *c = calloc(1, sizeof(*c));
    STEK_ENSURE(c != NULL, STEK_ERR_NOMEM);
    c->capacity = capacity;
    c->index_size = capacity * 2 + 1; /* load factor <= 1/2 */
    c->ring = calloc(capacity, sizeof(*c->ring));
    c->index = calloc(c->index_size, sizeof(*c->index));
    pthread_mutex_init(&c->mu, NULL);
    if (c->ring == NULL || c->index == NULL) {
        stekd_cache_free(c);
        STEK_BAIL(STEK_ERR_NOMEM, "cache of %zu", capacity);
    }
    *out = c;
    return STEK_OK;
}

void stekd_cache_free(stekd_cache *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; c->ring && i < c->capacity; i++)
        stekd_keyset_unref(c->ring[i].ks);
    free(c->ring);
    free(c->index);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static void cache_put(stekd_cache *c, const uint8_t key[32], stekd_keyset *ks)
{
    pthread_mutex_lock(&c->mu);
    bool found;
    size_t at = index_find(c, key, &found);
    if (found) { /* a concurrent builder won: replace its set */
        entry *e = &c->ring[c->index[at] - 1];
        stekd_keyset_unref(e->ks);
        atomic_fetch_add(&ks->refs, 1);
        e->ks = ks;
        pthread_mutex_unlock(&c->mu);
        return;
    }
    entry *slot = &c->ring[c->next];
    if (slot->ks != NULL) {
        bool old_found;
        size_t old_at = index_find(c, slot->key, &old_found);
        if (old_found)
            index_remove(c, old_at);
        stekd_keyset_unref(slot->ks);
        c->evictions++;
        c->entries--;
    }
    memcpy(slot->key, key, 32);
    atomic_fetch_add(&ks->refs, 1);
    slot->ks = ks;
    at = index_find(c, key, &found);
    c->index[at] = c->next + 1;
    c->next = (c->next + 1) % c->capacity;
    c->entries++;
    pthread_mutex_unlock(&c->mu);
}

stek_status stekd_cache_get(stekd_cache *c, stek_p11 *p11, const stekd_view *v,
                            const stekd_keyset_req *r, int64_t now, stekd_keyset **out)
{
    STEK_ENSURE(c && v && r && out, STEK_ERR_INVALID_ARG);
    uint8_t key[32];
    cache_key(v, r, key);
    pthread_mutex_lock(&c->mu);
    bool found;
    size_t at = index_find(c, key, &found);
    if (found) {
        stekd_keyset *ks = c->ring[c->index[at] - 1].ks;
        if (now - ks->built_at < STEKD_KEYSET_MAX_AGE_S && now >= ks->built_at) {
            atomic_fetch_add(&ks->refs, 1);
            c->hits++;
            pthread_mutex_unlock(&c->mu);
            *out = ks;
            return STEK_OK;
        }
    }
    c->misses++;
    pthread_mutex_unlock(&c->mu);

    /* Build outside the lock: HSM calls take milliseconds. */
    STEK_GUARD(stekd_keyset_build(p11, v, r, now, out));
    cache_put(c, key, *out);
    return STEK_OK;
}

void stekd_cache_get_stats(stekd_cache *c, stekd_cache_stats *out)
{
    pthread_mutex_lock(&c->mu);
    out->hits = c->hits;
    out->misses = c->misses;
    out->evictions = c->evictions;
    out->entries = c->entries;
    pthread_mutex_unlock(&c->mu);
}
