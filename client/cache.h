/*
 * libstek's sealed cache (stek_options_set_cache): the installed ticket keys,
 * sealed under a host-local key and written to a file, so that a process
 * restarted while every stekd replica is down resumes tickets. Private to
 * libstek. The format is proto/stek_cache.proto.
 *
 * Sealing uses only the public half of the sealing key, so writing never
 * touches a token:
 *   - EC P-256: an ephemeral P-256 key per file; Z = ECDH(ephemeral,
 *     sealing key); key = HKDF-SHA256(Z, info "stek-cache-v1" ||
 *     ephemeral point || sealing point);
 *   - RSA >= 2048: a random key per file, wrapped with RSA-OAEP (SHA-256,
 *     MGF1-SHA-256).
 * Then AES-256-GCM with a random 12-byte nonce, whose additional data is the
 * serialized header exactly as stored (format, version, kind, ephemeral point
 * or wrapped key, nonce): no header field can change unnoticed. Unsealing
 * needs the private key (EVP_PKEY_derive / EVP_PKEY_decrypt, which the
 * pkcs11 engine runs in the token).
 *
 * The plaintext, the unpacked plaintext message (through a protobuf-c
 * allocator on locked memory) and the data key live in locked memory
 * (secret.h) and are cleansed before they are freed. Nothing here logs; the
 * details (stek_error_detail) never hold key bytes.
 *
 * Threads: no shared state; concurrent calls are safe when they share no
 * output (an EVP_PKEY is used read-only, but one key should not be used by
 * two calls at once when it lives in a token).
 */
#ifndef STEK_CLIENT_CACHE_H
#define STEK_CLIENT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "keyring.h"
#include "schedule.h"
#include "secret.h"
#include "status.h"

/* SHA-256 of the host certificate (the leaf, DER). */
#define STEK_CACHE_HOST_ID_BYTES 32
/* The largest cache file read; a larger one is corrupt. */
#define STEK_CACHE_MAX_FILE_BYTES (2u * 1024 * 1024)

/* Why a cache file was rejected. */
typedef enum stek_cache_reject {
    STEK_CACHE_OK = 0,
    STEK_CACHE_UNREADABLE, /* exists but cannot be read (permissions, I/O) */
    STEK_CACHE_CORRUPT,    /* not a cache file of ours, truncated, or does not parse */
    STEK_CACHE_TAMPERED,   /* does not unseal: altered, or sealed under another key */
    STEK_CACHE_FOREIGN,    /* made for another host certificate */
    STEK_CACHE_STALE,      /* below a group's high-water mark, or no key still live */
    STEK_CACHE_REJECT_COUNT
} stek_cache_reject;

/* One cached key; times are wall-clock Unix ns. */
typedef struct stek_cache_key {
    uint64_t epoch;
    int64_t not_before;
    int64_t encrypt_until;
    int64_t decrypt_until;
} stek_cache_key;

typedef struct stek_cache_group {
    char name[STEK_GROUP_MAX_BYTES + 1];
    uint64_t generation;
    uint64_t current_epoch;
    stek_sched sched;    /* as pinned by the writer; all zero when not pinned */
    size_t first, count; /* its keys: keys[first .. first+count), ascending epochs */
} stek_cache_group;

/* What a cache file holds, in memory. */
typedef struct stek_cache_contents {
    uint8_t host_id[STEK_CACHE_HOST_ID_BYTES];
    int64_t written_at; /* wall-clock Unix ns */
    size_t n_groups;
    stek_cache_group groups[STEK_RING_MAX_GROUPS];
    size_t n_keys;
    stek_cache_key *keys;
    /* n_keys * STEK_RING_ENTRY_BYTES, name | hmac | aes per key, locked;
     * NULL when n_keys == 0. */
    stek_secret *material;
} stek_cache_contents;

/* What a reader expects of a file. */
typedef struct stek_cache_expect {
    const uint8_t *host_id; /* STEK_CACHE_HOST_ID_BYTES: ours */
    int64_t wall_now;       /* Unix ns */
    /* The reader's groups and their persisted high-water marks (0 = none).
     * Groups of the file that are not among them are left out. */
    size_t n_groups;
    const char *const *groups;
    const uint64_t *generation_hwm;
} stek_cache_expect;

/* The constant name of a reason ("STEK_CACHE_TAMPERED"); never NULL. */
const char *stek_cache_reject_name(stek_cache_reject r);

/*
 * Checks a sealing private key (EC P-256, or RSA of at least 2048 bits; a
 * key in a token included) and returns a copy of its public half alone,
 * which seals without touching the token. Returns STEK_OK and *pub
 * (EVP_PKEY_free); STEK_ERR_INVALID_ARG for another kind of key;
 * STEK_ERR_CRYPTO.
 */
STEK_MUST_USE stek_status stek_cache_sealing_public(EVP_PKEY *priv, EVP_PKEY **pub);

/*
 * SHA-256 of the first certificate in the PEM file (the host's leaf).
 * Returns STEK_OK; STEK_ERR_IO when the file cannot be read;
 * STEK_ERR_CRYPTO when it holds no certificate.
 */
STEK_MUST_USE stek_status stek_cache_host_id(const char *cert_pem_path,
                                             uint8_t out[STEK_CACHE_HOST_ID_BYTES]);

/*
 * The contents for a keyring snapshot r (may be NULL: no keys): every
 * group and every key, the CLOCK_BOOTTIME deadlines turned into wall-clock
 * times (wall_now + deadline - boot_now), written_at = wall_now, host_id
 * copied, schedules zero (the caller fills them in). Returns STEK_OK and
 * *out (stek_cache_contents_free); STEK_ERR_NOMEM; STEK_ERR_INVALID_ARG.
 */
STEK_MUST_USE stek_status stek_cache_from_ring(const stek_ring *r, int64_t boot_now,
                                               int64_t wall_now,
                                               const uint8_t host_id[STEK_CACHE_HOST_ID_BYTES],
                                               stek_cache_contents **out);

/*
 * The CLOCK_BOOTTIME deadlines of group g's keys into keys[0 .. count): for
 * each wall-clock time t, boot_now + t - max(written_at, wall_now), so that
 * neither a wall clock set back nor one running behind stretches a key's
 * life (as stek_ring_deadlines does for a set). Saturates. Returns STEK_OK
 * or STEK_ERR_INVALID_ARG.
 */
STEK_MUST_USE stek_status stek_cache_deadlines(const stek_cache_contents *c, size_t g,
                                               int64_t boot_now, int64_t wall_now,
                                               stek_ring_key *keys);

/*
 * Seals c under sealing_pub (from stek_cache_sealing_public) and replaces
 * the file at path atomically, mode 0600 (atomic_file.h). Returns STEK_OK;
 * STEK_ERR_INVALID_ARG (bad contents, a key of another kind); STEK_ERR_NOMEM
 * (the plaintext must fit one locked buffer, STEK_SECRET_MAX_BYTES);
 * STEK_ERR_CRYPTO; STEK_ERR_IO.
 */
STEK_MUST_USE stek_status stek_cache_write(const char *path, EVP_PKEY *sealing_pub,
                                           const stek_cache_contents *c);

/*
 * Reads the file at path, unseals it with sealing_priv and checks it
 * against x:
 *   - STEK_OK, *out (stek_cache_contents_free) holding only the groups of x,
 *     and of those only the keys still live (decrypt_until after
 *     max(written_at, wall_now)); at least one key; *why = STEK_CACHE_OK;
 *   - STEK_ERR_NOT_FOUND: there is no such file (normal at a first start);
 *   - STEK_ERR_VERIFY: rejected, *why says why and the detail says what,
 *     never with key bytes;
 *   - STEK_ERR_INVALID_ARG, STEK_ERR_NOMEM, STEK_ERR_CRYPTO: local
 *     failures, *why = STEK_CACHE_OK.
 * No file content makes it crash or read out of bounds.
 */
STEK_MUST_USE stek_status stek_cache_read(const char *path, EVP_PKEY *sealing_priv,
                                          const stek_cache_expect *x, stek_cache_contents **out,
                                          stek_cache_reject *why);

/* Cleanses the key material and frees. NULL is a no-op. */
void stek_cache_contents_free(stek_cache_contents *c);

#endif
