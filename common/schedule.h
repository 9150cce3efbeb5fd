/*
 * Epoch arithmetic of the key schedule (DESIGN.md, "Key schedule"), shared by
 * stekd (what to derive, serve and destroy) and hosts (is a set's current
 * epoch within one of my own?). Pure functions of the group's parameters and
 * a time; no clock is read here. Times are Unix seconds.
 *
 *   epoch e covers [T0 + e*P, T0 + (e+1)*P)
 *   K(e) is NEXT during epoch e-1 (decrypt-only), CURRENT during e,
 *   DECRYPT_ONLY until T0 + (e+1)*P + L, then EXPIRED.
 */
#ifndef STEK_COMMON_SCHEDULE_H
#define STEK_COMMON_SCHEDULE_H

#include <stdint.h>

#include "status.h"

typedef struct stek_sched {
    int64_t origin;      /* T0, Unix seconds */
    uint64_t epoch_s;    /* P, > 0 */
    uint64_t lifetime_s; /* L, the decrypt lifetime after a key's epoch ends */
} stek_sched;

typedef enum stek_key_state {
    STEK_KEY_NEXT = 1, /* values match stek.v1.KeyState */
    STEK_KEY_CURRENT = 2,
    STEK_KEY_DECRYPT_ONLY = 3,
    STEK_KEY_EXPIRED = 4, /* never sent */
} stek_key_state;

typedef struct stek_key_times {
    int64_t not_before;    /* T0 + e*P: starts encrypting */
    int64_t encrypt_until; /* T0 + (e+1)*P */
    int64_t decrypt_until; /* T0 + (e+1)*P + L */
} stek_key_times;

/*
 * Checks the parameters: 0 <= T0 <= 2200-01-01Z, 1 s <= P <= 30 days,
 * L <= 30 days. Returns STEK_OK or STEK_ERR_INVALID_ARG. Times that would
 * overflow (only for absurd epochs) saturate at INT64_MAX, "never". The
 * functions below that return no status treat invalid parameters safely:
 * state EXPIRED, key times 0, no past epochs, next rotation INT64_MAX.
 */
STEK_MUST_USE stek_status stek_sched_check(const stek_sched *s);

/*
 * The epoch containing time t. STEK_ERR_INVALID_ARG when t < T0 or the
 * parameters are invalid.
 */
STEK_MUST_USE stek_status stek_sched_epoch_at(const stek_sched *s, int64_t t, uint64_t *epoch);

/* The times of K(e). */
void stek_sched_key_times(const stek_sched *s, uint64_t e, stek_key_times *out);

/* The state of K(e) at time t (t may be before T0: then everything is NEXT or later). */
stek_key_state stek_sched_state(const stek_sched *s, uint64_t e, int64_t t);

/* ceil(L / P): how many past epochs a key set keeps besides next and current. */
uint64_t stek_sched_past_epochs(const stek_sched *s);

/*
 * The key set at epoch e: epochs *first .. *last inclusive, where
 * *last = e + 1 (next) and *first = e - ceil(L/P), floored at `floor_epoch`
 * (a generation's first epoch: nothing before it exists). The window is
 * empty (*first > *last) when floor_epoch > e + 1.
 */
void stek_sched_window(const stek_sched *s, uint64_t e, uint64_t floor_epoch, uint64_t *first,
                       uint64_t *last);

/*
 * How far ahead of the current epoch e a group's chain key is kept: at
 * e + 3. Then K(e+1), the next key, exists, and so does K(e+2), the next key
 * of the set that epoch e+1 will serve. stekd builds each watch stream's set
 * for e+1 before the boundary from it, so that a rotation only sends
 * (server/rpc.c). K(e+2) is served to no host before epoch e+1 starts.
 */
#define STEK_SCHED_CHAIN_LEAD 3

/* The start of the epoch after the one containing t: the next rotation. */
int64_t stek_sched_next_rotation(const stek_sched *s, int64_t t);

#endif
