/*
 * libstek's keyring: what the ticket callback reads. Private to libstek.
 *
 * A stek_ring is an immutable snapshot of every installed ticket key, of
 * one or several groups: metadata with CLOCK_BOOTTIME deadlines, and the
 * key material (name | hmac | aes, STEK_RING_ENTRY_BYTES per key) in one
 * locked, dump-excluded stek_secret. The background thread builds a new
 * snapshot for every change (a set accepted, a key expired) and publishes
 * it by pointer swap; the ticket callback reads the current one with no
 * lock, no allocation and no system call.
 *
 * Reclamation (why not liburcu): a retired snapshot is freed only after a
 * grace period, with a two-counter scheme on C11 atomics (seq_cst):
 *
 *   reader:  p = phase; active[p]++; r = current; ...use r...; active[p]--
 *   writer:  old = swap(current, new);
 *            phase ^= 1; wait until active[old phase] == 0;
 *            phase ^= 1; wait until active[other phase] == 0;
 *            cleanse and free old.
 *
 * A reader that loaded `old` incremented its counter before the swap (its
 * load of `current` follows its increment in the single total order), so
 * whichever of the two counters it used cannot be seen at zero until it has
 * decremented. Flipping the phase before each wait keeps new readers off
 * the counter being drained, so the writer is not starved by a steady
 * stream of handshakes; each wait lasts about one callback (microseconds).
 * This is the two-phase grace period of userspace RCU in 30 lines. It is
 * chosen over liburcu-bp because ThreadSanitizer understands C11 atomics
 * (the client must pass TSan) but not liburcu's hand-rolled barriers, urcu-bp
 * allocates on a thread's first read-side section (the callback must never
 * allocate), and it adds no package. The price is two atomic RMWs on a shared
 * cache line per callback, which is small against a handshake.
 *
 * Threads: any number of readers on any threads; one writer at a time
 * (publish, and the peek before a build, are called by the client's
 * background threads, one per group, serialized by the client's write
 * mutex; and by stek_keyring_free once they have stopped). A build for one
 * group copies every other group's keys from the previous snapshot.
 */
#ifndef STEK_CLIENT_KEYRING_H
#define STEK_CLIENT_KEYRING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "accept.h"
#include "kek.h"
#include "secret.h"
#include "status.h"

#define STEK_RING_NAME_BYTES STEK_TICKET_NAME_BYTES /* 16 */
#define STEK_RING_HMAC_BYTES 32
#define STEK_RING_AES_BYTES 32
#define STEK_RING_ENTRY_BYTES STEK_ACCEPT_ENTRY_BYTES /* name | hmac | aes = 80 */
/* Groups one snapshot holds (one listener serving several groups by SNI). */
#define STEK_RING_MAX_GROUPS 16
/* Names remembered after their key left, to count misses by cause. */
#define STEK_RING_GONE_MAX 64

/* One installed key. Deadlines are CLOCK_BOOTTIME nanoseconds. */
typedef struct stek_ring_key {
    uint64_t epoch;
    uint32_t group;    /* index into the snapshot's groups */
    int64_t enc_from;  /* starts encrypting (not_before) */
    int64_t enc_until; /* stops being CURRENT (encrypt_until) */
    int64_t dec_until; /* unusable from then on (decrypt_until) */
} stek_ring_key;

typedef struct stek_ring_group {
    char name[STEK_GROUP_MAX_BYTES + 1];
    uint64_t generation;
    uint64_t current_epoch; /* the CURRENT epoch of the newest set accepted */
    size_t first, count;    /* its keys: keys[first .. first+count), ascending epochs */
} stek_ring_group;

typedef enum stek_ring_gone_why {
    STEK_RING_GONE_EXPIRED = 1,      /* past its decrypt deadline, or dropped by the service */
    STEK_RING_GONE_OTHER_GENERATION, /* its group moved to a new generation */
} stek_ring_gone_why;

typedef struct stek_ring_gone {
    uint8_t name[STEK_RING_NAME_BYTES];
    uint8_t why; /* stek_ring_gone_why */
} stek_ring_gone;

/* An immutable snapshot. Fields are read-only for everyone but keyring.c. */
typedef struct stek_ring {
    uint64_t seq; /* publish sequence number, 1.. */
    size_t n_groups;
    stek_ring_group groups[STEK_RING_MAX_GROUPS];
    size_t n_keys;
    stek_ring_key *keys; /* grouped by group, ascending epochs within a group */
    uint32_t *by_name;   /* indices into keys, sorted by name (binary search) */
    /* n_keys * STEK_RING_ENTRY_BYTES; NULL when n_keys == 0 */
    stek_secret *material;
    size_t n_gone; /* newest first */
    stek_ring_gone gone[STEK_RING_GONE_MAX];
} stek_ring;

/* One group's keys as accepted, with deadlines: the input of a build. */
/* The longest a key that was never held as `next` waits before it
 * encrypts (stek_ring_build). */
#define STEK_RING_UNSEEN_GRACE_NS (10LL * 1000000000LL)

typedef struct stek_ring_input {
    const char *group;
    uint64_t generation;
    uint64_t current_epoch;
    size_t n_keys;
    const stek_ring_key *keys; /* group fields are ignored */
    const uint8_t *entries;    /* n_keys * STEK_RING_ENTRY_BYTES */
} stek_ring_input;

/*
 * Computes the CLOCK_BOOTTIME deadlines of set's keys into keys[0..n_keys):
 * for each wall-clock time t of a key (not_before, encrypt_until,
 * decrypt_until), deadline = boot_now + t - max(issued_at, wall_now), i.e.
 * boot_now + min(t - issued_at, t - wall_now): neither a stale issued_at nor
 * a wall clock running behind can stretch a key's life. All in ns. Returns
 * STEK_OK or STEK_ERR_INVALID_ARG. Saturates instead of overflowing.
 */
STEK_MUST_USE stek_status stek_ring_deadlines(const stek_accepted_set *set, int64_t boot_now,
                                              int64_t wall_now, stek_ring_key *keys);

/*
 * Builds a new snapshot from prev (may be NULL) and an update (may be NULL:
 * a republish). The update replaces its group's keys (a new group is
 * added); other groups' keys are copied from prev. Keys whose dec_until <=
 * boot_now are left out. The names of keys that leave are remembered (with
 * prev's remembered names) as expired, or as another generation when their
 * group's generation changed. A key of the update that is already due to
 * encrypt, that prev did not hold, while prev held keys of the same
 * generation, starts encrypting min(half its epoch, STEK_RING_UNSEEN_GRACE_NS)
 * after boot_now instead, when an older key that prev held still decrypts
 * then: peers that have not fetched the set yet can decrypt that one only.
 * seq is prev's + 1. Returns STEK_OK and *out
 * (stek_ring_free); STEK_ERR_INVALID_ARG for a bad input (bad group name,
 * more than STEK_RING_MAX_GROUPS groups, unsorted epochs);
 * STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stek_ring_build(const stek_ring *prev, const stek_ring_input *update,
                                          int64_t boot_now, stek_ring **out);

/* Cleanses the key material and frees. NULL is a no-op. */
void stek_ring_free(stek_ring *r);

/* The group's index, or -1. */
int stek_ring_group_index(const stek_ring *r, const char *group);

/* Key i's entry: name | hmac | aes. */
static inline const uint8_t *stek_ring_entry(const stek_ring *r, size_t i)
{
    return stek_secret_cdata(r->material) + i * STEK_RING_ENTRY_BYTES;
}

/*
 * The key to encrypt with for group g at boot_now: the newest key whose
 * encrypt window has started and that can still decrypt. *stale is false
 * when that key is CURRENT (now < enc_until), true when its encrypt window
 * has passed (no newer set arrived: the service is unreachable). Returns
 * its index, or -1 when the group has no usable key.
 */
long stek_ring_encrypt_key(const stek_ring *r, uint32_t g, int64_t boot_now, bool *stale);

typedef enum stek_ring_lookup {
    STEK_RING_FOUND_CURRENT = 0, /* the key encrypt would use now */
    STEK_RING_FOUND_OTHER,       /* decrypts, but the ticket should be renewed */
    STEK_RING_MISS_UNKNOWN,      /* a name never seen (another service, a forgery) */
    STEK_RING_MISS_EXPIRED,      /* a name past its decrypt deadline */
    STEK_RING_MISS_OTHER_GENERATION,
} stek_ring_lookup;

/* Looks up a ticket key name at boot_now; *index is set when found. */
stek_ring_lookup stek_ring_decrypt_key(const stek_ring *r, const uint8_t name[STEK_RING_NAME_BYTES],
                                       int64_t boot_now, long *index);

/* ---- publication ------------------------------------------------------------- */

typedef struct stek_keyring stek_keyring;

/* Test hook: called with each retired snapshot after its material has been
 * cleansed and before it is unmapped. */
typedef void (*stek_keyring_retire_hook)(void *arg, const stek_ring *retired);

/* Returns STEK_OK and an empty keyring (current snapshot NULL), or STEK_ERR_NOMEM. */
STEK_MUST_USE stek_status stek_keyring_new(stek_keyring **out);

/* Retires the current snapshot and frees. No reader may be left. NULL is a no-op. */
void stek_keyring_free(stek_keyring *kr);

/*
 * Read side: returns the current snapshot (may be NULL) valid until
 * stek_keyring_read_end(kr, *slot). Lock-free, wait-free, no allocation.
 */
const stek_ring *stek_keyring_read_begin(stek_keyring *kr, unsigned *slot);
void stek_keyring_read_end(stek_keyring *kr, unsigned slot);

/*
 * The current snapshot for the writer itself (no read section needed: only
 * the writer frees snapshots).
 */
const stek_ring *stek_keyring_peek(const stek_keyring *kr);

/*
 * Publishes r (takes it; may be NULL), waits for a grace period, then
 * cleanses and frees the previous snapshot. One writer at a time.
 */
void stek_keyring_publish(stek_keyring *kr, stek_ring *r);

/* Installs a retire hook (tests). */
void stek_keyring_set_retire_hook(stek_keyring *kr, stek_keyring_retire_hook fn, void *arg);

/* CLOCK_BOOTTIME and CLOCK_REALTIME in ns. */
int64_t stek_boottime_ns(void);
int64_t stek_walltime_ns(void);

#endif
