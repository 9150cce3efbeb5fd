/*
 * The key schedule as stekd runs it: for every configured group, keep the
 * HSM's keys `next`, `current` and the decrypt window derived ahead of need,
 * destroy keys past their window, and publish an immutable view of what may
 * be served. The HSM is the only state: a restarted stekd rebuilds the same
 * views from the token, so no epoch is skipped or duplicated and no key is
 * re-created after its destruction (the ratchet cannot go back).
 *
 * A replica never advances a chain more than max_jump epochs past the
 * newest chain key on its clock's word alone: it marks the group
 * unavailable, logs an alarm, and destroys nothing until `stekctl advance`.
 */
#ifndef STEK_SERVER_STATE_H
#define STEK_SERVER_STATE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "stek_p11.h"

typedef struct stekd_key {
    uint64_t epoch;
    uint8_t name[STEK_TICKET_NAME_BYTES];
} stekd_key;

/* What may be served for one group: immutable once published, refcounted. */
typedef struct stekd_view {
    atomic_int refs;
    const stekd_group_cfg *cfg;
    bool available; /* false: UNAVAILABLE to hosts, with `why` */
    char why[192];  /* for the status details and logs; never a secret */
    uint32_t generation;
    int64_t gen_start; /* Unix seconds */
    uint64_t epoch;    /* the current epoch */
    uint64_t version;  /* changes whenever anything above or below changes */
    /*
     * The view epoch + 1 will publish, as far as the token says now (same
     * generation, window moved by one, K(epoch + 2) as its next key), for
     * building watch streams' sets ahead of the boundary. Never published
     * itself (version 0, staged NULL). Owned by this view. NULL when this
     * view is unavailable or K(epoch + 2) is not in the token.
     */
    struct stekd_view *staged;
    size_t n_keys;
    stekd_key keys[]; /* ascending epochs, the last one is `next` */
} stekd_view;

typedef struct stekd_state stekd_state;

/* Called after a group's view changed (a rotation, a new generation, the
 * HSM coming or going). Runs on the refreshing thread; must not block. */
typedef void (*stekd_state_listener)(void *arg, const char *group);

/*
 * Makes the state for cfg's groups over p11 (both outlive it). Views start
 * unavailable until the first refresh. Returns STEK_OK and *out (free with
 * stekd_state_free) or STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stekd_state_new(const stekd_config *cfg, stek_p11 *p11,
                                          stekd_state **out);

void stekd_state_free(stekd_state *st);

void stekd_state_set_listener(stekd_state *st, stekd_state_listener fn, void *arg);

/*
 * Brings every group up to time `now` (derive ahead, destroy expired,
 * publish). Safe to call from one thread at a time. Returns the Unix time
 * at which the next refresh is due (the earliest next rotation).
 */
int64_t stekd_state_refresh(stekd_state *st, int64_t now);

/* The current view of `group` (a reference: release with stekd_view_unref),
 * or NULL when the group is not configured. Thread-safe. */
stekd_view *stekd_state_view(stekd_state *st, const char *group);

/* True when every group's view is available. */
bool stekd_state_all_available(stekd_state *st);

/*
 * Seconds a group's view may trail the clock's epoch before the schedule
 * counts as behind: the scheduler refreshes a few ms past each boundary and
 * at least every second, so only a stuck refresh (a hung HSM call) exceeds it.
 */
#define STEKD_BEHIND_GRACE_S 2

/*
 * The health service's answer: true when every group's view is available
 * (the HSM answered its last refresh, the schedule was not refused) and no
 * view's epoch trails the epoch at now - STEKD_BEHIND_GRACE_S. Otherwise
 * false, with the first reason in why (if not NULL; never a secret).
 */
bool stekd_state_serving(stekd_state *st, int64_t now, char *why, size_t why_len);

typedef struct stekd_group_stats {
    unsigned long jumps_refused; /* times a refresh started refusing a jump (alarms raised) */
    bool refusing;               /* the last refresh refused one */
} stekd_group_stats;

/* Counters of `group`; false when it is not configured. Thread-safe, lock-free. */
bool stekd_state_group_stats(stekd_state *st, const char *group, stekd_group_stats *out);

void stekd_view_unref(stekd_view *v);

/*
 * True when a and b would serve the same set contents: availability,
 * generation, epoch and keys (not the version, not `staged`). A set built
 * from a staged view may be sent once a published view is the same as it.
 */
bool stekd_view_same(const stekd_view *a, const stekd_view *b);

/*
 * The service clock: wall time plus an offset only tests set, through the
 * environment variable STEKD_TEST_CLOCK_OFFSET (seconds, may be negative),
 * read once at start. Production never sets it.
 */
int64_t stekd_now(void);

/* The same clock in milliseconds. */
int64_t stekd_now_ms(void);

#endif
