/*
 * Building signed key sets for one host, and the bounded cache that makes a
 * reconnecting host cost no HSM call.
 *
 * A set is the group's view wrapped to the host's ephemeral key (in the HSM),
 * serialized once as a stek.v1.SignedKeySet, signed in the HSM, and kept as
 * the packed stek.v1.KeySet ready to send. The cache key is (group, host
 * identity, eph_pub, nonce, view version). Entries expire after
 * STEKD_KEYSET_MAX_AGE_S: a set's issued_at is the base of the host's expiry
 * deadlines, so an old set must not be handed out again.
 */
#ifndef STEK_SERVER_KEYSET_H
#define STEK_SERVER_KEYSET_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "state.h"
#include "stek_p11.h"

#define STEKD_KEYSET_MAX_AGE_S 30

/*
 * How long sets built one after another may share the HSM ephemeral key
 * (stek_p11_set_eph_reuse_ms). Each host still gets its own KEK: Z and the
 * KEK's context both take the host's point. The window bounds how long the
 * HSM holds a private key that, with a host's ephemeral key, opens its
 * blobs; the host holds its own for hours.
 */
#define STEKD_HSM_EPH_REUSE_MS 1000
#define STEK_SET_CONTEXT "stek-set-v1"

typedef struct stekd_keyset {
    atomic_int refs;
    int64_t built_at; /* stekd_now() when built */
    uint64_t version; /* the view version it was built from */
    size_t len;
    uint8_t msg[]; /* a packed stek.v1.KeySet */
} stekd_keyset;

/* Who the set is for; eph_pub must have passed stek_p256_point_check. */
typedef struct stekd_keyset_req {
    const char *identity; /* "uri:..." or "dns:...", the SAN that matched */
    const uint8_t *eph_pub;
    const uint8_t *nonce;
    size_t nonce_len;
} stekd_keyset_req;

/*
 * Wraps the view's keys to r->eph_pub and signs the set. Returns STEK_OK and
 * *out (release with stekd_keyset_unref); the view must be available.
 * HSM errors pass through (STEK_ERR_HSM_UNAVAILABLE, ...).
 */
STEK_MUST_USE stek_status stekd_keyset_build(stek_p11 *p11, const stekd_view *v,
                                             const stekd_keyset_req *r, int64_t now,
                                             stekd_keyset **out);

void stekd_keyset_unref(stekd_keyset *ks);

typedef struct stekd_cache stekd_cache;

/* A cache of at most `capacity` sets, evicting the oldest insert. */
STEK_MUST_USE stek_status stekd_cache_new(size_t capacity, stekd_cache **out);
void stekd_cache_free(stekd_cache *c);

/*
 * The cached set for (v, r) if one younger than STEKD_KEYSET_MAX_AGE_S exists,
 * else builds, caches and returns a new one. *out is a reference.
 */
STEK_MUST_USE stek_status stekd_cache_get(stekd_cache *c, stek_p11 *p11, const stekd_view *v,
                                          const stekd_keyset_req *r, int64_t now,
                                          stekd_keyset **out);

typedef struct stekd_cache_stats {
    unsigned long hits, misses, evictions;
    size_t entries;
} stekd_cache_stats;

void stekd_cache_get_stats(stekd_cache *c, stekd_cache_stats *out);

#endif
