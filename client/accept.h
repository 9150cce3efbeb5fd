/*
 * Host-side acceptance of a stek.v1.KeySet (DESIGN.md, "Acceptance on the
 * host"; docs/protocol.md, "What a host must check"). Private to libstek.
 *
 * stek_accept runs the checks in this order, and stops at the first failure:
 *
 *   1. parse the KeySet; a heartbeat is reported as such, not an error;
 *   2. verify `signature` over `signed_set` exactly as received, with the
 *      pinned service key(s); nothing is parsed, let alone unwrapped, before
 *      this succeeds, so a host is never a parser or decryption oracle for
 *      unsigned bytes;
 *   3. parse the SignedKeySet: context "stek-set-v1" and kdf_profile 1;
 *   4. group, identity, host_eph_pub and nonce are ours;
 *   5. key list well formed: 1..STEK_ACCEPT_MAX_KEYS keys, ascending epochs,
 *      DECRYPT_ONLY keys, exactly one CURRENT, at most one NEXT (= CURRENT+1),
 *      16-byte names, 88-byte blobs, times that follow one (T0, P);
 *   6. the CURRENT epoch is within +-1 of our own computation;
 *   7. generation: not below the high-water mark; a newer one carries a
 *      generation_start that is set and not in the future;
 *   8. derive the KEK, unwrap every key, recompute every name.
 *
 * Every rejection returns STEK_ERR_VERIFY, sets *why, records a detail
 * (stek_error_detail) that names the reason and never a secret, and leaves
 * nothing allocated. Other statuses (STEK_ERR_INVALID_ARG for a bad
 * context, STEK_ERR_NOMEM, STEK_ERR_CRYPTO) are local failures with
 * *why == STEK_REJECT_NONE. No input bytes make it crash or read out of
 * bounds (tests/unit/test_accept.c feeds random and truncated messages).
 *
 * Thread safety: stek_accept keeps no state; concurrent calls are safe as
 * long as they do not share an output.
 */
#ifndef STEK_CLIENT_ACCEPT_H
#define STEK_CLIENT_ACCEPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "hostwrap.h"
#include "kek.h"
#include "schedule.h"
#include "secret.h"
#include "status.h"

#define STEK_SET_CONTEXT_V1 "stek-set-v1"
#define STEK_KDF_PROFILE_V1 1
/* A generation_start up to this far ahead of our clock is still "not in the future". */
#define STEK_ACCEPT_CLOCK_SLACK_S 60
/*
 * More keys than any sane schedule keeps (ceil(L/P) + 2; L = 18 h at
 * P = 1 min is 1082). Bounds the locked buffer: 4096 * 80 bytes = 320 KiB.
 */
#define STEK_ACCEPT_MAX_KEYS 4096
/* One installed ticket key: name(16) | hmac(32) | aes(32), OpenSSL's order. */
#define STEK_ACCEPT_ENTRY_BYTES STEK_TICKET_KEY_BYTES

typedef struct stek_accept_ctx {
    /*
     * The pinned service signing keys: public EC P-256 keys (ECDSA,
     * SHA-256, DER signatures) or Ed25519 keys. The set must verify under
     * one of them: replicas with separate HSMs have separate signing keys.
     * At least one; any other key type is STEK_ERR_INVALID_ARG.
     */
    EVP_PKEY *const *service_pubs;
    size_t n_service_pubs;
    /*
     * The typed identity this host expects, "uri:<SAN>" or "dns:<SAN>",
     * compared byte for byte. NULL accepts whichever identity the service
     * matched (the host may not know which of its SANs the policy picks),
     * but the set must still name one: an empty host_identity is
     * STEK_REJECT_IDENTITY either way.
     */
    const char *identity;
    /*
     * Or, when n_identities > 0 (and identity is NULL): the set's identity
     * must be one of these, typed the same way. A host passes every URI
     * and DNS SAN of its certificate: the service picks the first one its
     * policy allows, which the host cannot know.
     */
    const char *const *identities;
    size_t n_identities;
    const stek_host_eph *eph; /* our ephemeral key: the set must be wrapped to it */
    const uint8_t *nonce;     /* the nonce of our request, 16..64 bytes */
    size_t nonce_len;
    const char *group; /* must pass stek_group_name_check */
    /*
     * The group's schedule, to compute our own epoch from `now`. Optional:
     * when NULL, T0 and P come from the set's CURRENT key (P = encrypt_until
     * - not_before, T0 = not_before - e*P, which must not be negative) and
     * every key must follow them. That still rejects a far-future epoch
     * whose times follow its number, and key times more than one epoch from
     * our clock, but an epoch number inflated together with an earlier T0
     * would pass. So a client pins the (T0, P) of the first set it accepts
     * (or its configuration) and passes it here afterwards. When given, the
     * keys' not_before and encrypt_until must match it (decrypt_until is not
     * compared: L may change on the server).
     */
    const stek_sched *sched;
    int64_t now;             /* our wall-clock time, Unix seconds */
    uint64_t generation_hwm; /* persisted high-water mark; 0 = none */
    /*
     * Optional (0 = none): the CURRENT epoch of the newest set already
     * accepted in generation `generation_hwm`. A set of that generation
     * whose CURRENT epoch is lower is an older set replayed:
     * STEK_REJECT_ROLLBACK.
     */
    uint64_t current_epoch_hwm;
} stek_accept_ctx;

typedef enum stek_reject {
    STEK_REJECT_NONE = 0,
    STEK_REJECT_MALFORMED,        /* not a KeySet / SignedKeySet, or out of contract */
    STEK_REJECT_SIGNATURE,        /* no pinned key verifies signed_set */
    STEK_REJECT_CONTEXT,          /* context is not "stek-set-v1", or unknown kdf_profile */
    STEK_REJECT_IDENTITY,         /* made for another host identity, or none */
    STEK_REJECT_EPH_KEY,          /* wrapped to another ephemeral key */
    STEK_REJECT_NONCE,            /* answers another request */
    STEK_REJECT_GROUP,            /* another group's keys */
    STEK_REJECT_EPOCH,            /* CURRENT epoch more than +-1 from ours, or off our schedule */
    STEK_REJECT_ROLLBACK,         /* generation (or epoch) below the high-water mark */
    STEK_REJECT_GENERATION_START, /* newer generation without a start, or one in the future */
    STEK_REJECT_UNWRAP,           /* KEK derivation or RFC 5649 integrity check failed */
    STEK_REJECT_NAME,             /* a name is not the HMAC name of its unwrapped key */
    STEK_REJECT_COUNT
} stek_reject;

/* One accepted key's metadata; its material is entry i of the set's secret. */
typedef struct stek_accepted_key {
    uint64_t epoch;
    stek_key_state state; /* NEXT, CURRENT or DECRYPT_ONLY, as of issued_at */
    int64_t not_before;   /* Unix ns */
    int64_t encrypt_until;
    int64_t decrypt_until;
} stek_accepted_key;

/*
 * An accepted set. Read-only for its users; freed (and cleansed) with
 * stek_accepted_set_free.
 */
typedef struct stek_accepted_set {
    char group[STEK_GROUP_MAX_BYTES + 1];
    char *identity;           /* the set's host_identity (malloc'd) */
    uint64_t generation;      /* >= 1 */
    int64_t generation_start; /* Unix ns; 0 = absent (only when not newer than the hwm) */
    int64_t issued_at;        /* Unix ns, > 0: the base of CLOCK_BOOTTIME deadlines */
    uint64_t current_epoch;   /* the CURRENT key's epoch */
    size_t current;           /* index of the CURRENT key */
    size_t n_keys;            /* 1..STEK_ACCEPT_MAX_KEYS, ascending epochs */
    stek_accepted_key *keys;  /* n_keys entries */
    /*
     * n_keys * STEK_ACCEPT_ENTRY_BYTES in one locked, dump-excluded buffer:
     * entry i is name | K[16:48] (hmac) | K[48:80] (aes) of keys[i], where
     * name is the set's (verified) HMAC name. Use stek_accepted_entry.
     */
    stek_secret *material;
} stek_accepted_set;

/*
 * Checks msg (a serialized stek.v1.KeySet as received) against c.
 *
 *   - Accepted: returns STEK_OK, *out (free with stek_accepted_set_free),
 *     *heartbeat = false, *why = STEK_REJECT_NONE.
 *   - Heartbeat: returns STEK_OK, *out = NULL, *heartbeat = true. It is
 *     unsigned, so it proves liveness only; nothing in it is used.
 *   - Rejected: returns STEK_ERR_VERIFY, *why set, *out = NULL.
 *   - STEK_ERR_INVALID_ARG for a bad context (no pinned key, a key that is
 *     neither EC P-256 nor Ed25519, no eph, a bad group or nonce length,
 *     `now` out of range, an invalid sched) or NULL outputs;
 *     STEK_ERR_NOMEM / STEK_ERR_CRYPTO for local failures.
 *
 * msg may be NULL when len is 0 (that is MALFORMED). why and heartbeat may
 * not be NULL.
 */
STEK_MUST_USE stek_status stek_accept(const stek_accept_ctx *c, const uint8_t *msg, size_t len,
                                      stek_accepted_set **out, stek_reject *why, bool *heartbeat);

/* Cleanses the key material and frees everything. NULL is a no-op. */
void stek_accepted_set_free(stek_accepted_set *s);

/* Most identities taken from one certificate. */
#define STEK_MAX_CERT_IDENTITIES 32

/*
 * The typed identities of the PEM certificate at cert_pem_path, as the
 * service names a set's host_identity: "uri:<SAN>" for each URI SAN, then
 * "dns:<SAN>" for each DNS SAN. Returns STEK_OK with out[0..*n) malloc'd
 * (free each); STEK_ERR_IO (unreadable), STEK_ERR_CRYPTO (not a PEM
 * certificate), STEK_ERR_CONFIG (no URI or DNS SAN, or more than
 * STEK_MAX_CERT_IDENTITIES), STEK_ERR_NOMEM. On error nothing is left
 * allocated.
 */
STEK_MUST_USE stek_status stek_cert_identities(const char *cert_pem_path,
                                               char *out[STEK_MAX_CERT_IDENTITIES], size_t *n);

/* Entry i (i < s->n_keys): STEK_ACCEPT_ENTRY_BYTES bytes, name | hmac | aes. */
const uint8_t *stek_accepted_entry(const stek_accepted_set *s, size_t i);

/* The constant name of a reason ("STEK_REJECT_NONCE"); never NULL. */
const char *stek_reject_name(stek_reject r);

#endif
