/*
 * Fleet convergence telemetry: the latest ReportStatus of every host, per
 * (group, host identity), bounded and expiring, and how each host stands
 * against its group's schedule: converged, or lagging and since when.
 *
 * The table is a hash table over (group, identity) threaded on a list in
 * order of last report, both under one mutex: a report, a lookup and an
 * eviction are O(1). It holds at most max_hosts entries; a report from a
 * new host when it is full evicts the host that reported least recently
 * (a report is never refused for room). Entries whose last report is older
 * than `expire` are dropped at the next report or query.
 *
 * Judging a host (stekd_fleet_judge) against its group's current epoch E
 * and generation N, with P the epoch length and G a grace (the rotation
 * jitter plus STEKD_FLEET_GRACE_S, the time a healthy host needs to get
 * the new set and report it):
 *   - behind: its reported generation is older than N, or its CURRENT
 *     epoch is below E, for longer than G. It fell behind when the epoch
 *     it holds ended (or when generation N started);
 *   - silent: its last report is older than min(P, its report interval)
 *     + G: a stopped host. It fell behind at its last report;
 *   - lagging = behind or silent, "since" the earlier of the two times;
 *     converged otherwise (its reported epoch is E: a host a moment ahead
 *     of this replica counts as converged too).
 *
 * Nothing here holds key material: key names (16 bytes, in every ticket
 * anyway) and counters only. Names never leave stekd: queries only say
 * whether a host holds the group's current and next keys.
 */
#ifndef STEK_SERVER_FLEET_H
#define STEK_SERVER_FLEET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kek.h"
#include "schedule.h"
#include "status.h"

#define STEKD_FLEET_MAX_NAMES 64 /* key names in one report */
#define STEKD_FLEET_PEER_MAX 96  /* a connection address, "ipv6:[...]:port" */
#define STEKD_FLEET_IDENTITY_MAX 600
/* Seconds a healthy host may take, past the rotation jitter, to get a new
 * set and report it. */
#define STEKD_FLEET_GRACE_S 2
/* A report interval outside 1..3600 s is refused (INVALID_ARGUMENT). */
#define STEKD_FLEET_MAX_INTERVAL_S 3600

typedef struct stekd_fleet_counters {
    uint64_t tickets_issued, tickets_stale, tickets_resumed, tickets_renewed;
    uint64_t miss_unknown, miss_expired, miss_other_generation, miss_other_group, miss_bad_mac;
    uint64_t no_key_encrypts;
} stekd_fleet_counters;

/* One host's report, as validated (the group and identity from the request check). */
typedef struct stekd_fleet_report {
    const char *group;
    const char *identity; /* "uri:..." or "dns:...", < STEKD_FLEET_IDENTITY_MAX bytes */
    const char *peer;     /* the connection's address, for display; may be "" */
    uint64_t generation;  /* 0: the host holds nothing yet */
    uint64_t current_epoch;
    const uint8_t (*names)[STEK_TICKET_NAME_BYTES]; /* ascending epochs */
    size_t n_names;                                 /* <= STEKD_FLEET_MAX_NAMES */
    stekd_fleet_counters counters;
    uint32_t interval_s; /* 1..STEKD_FLEET_MAX_INTERVAL_S */
} stekd_fleet_report;

/* Where a group stands now: what its hosts are judged against. */
typedef struct stekd_fleet_group {
    const char *name;
    stek_sched sched;
    uint64_t epoch;      /* the group's current epoch */
    uint64_t generation; /* 0: unknown (the HSM is unavailable): epochs alone are compared */
    int64_t gen_start;   /* Unix seconds; 0 when unknown */
    bool have_names;     /* current_name and next_name are known */
    uint8_t current_name[STEK_TICKET_NAME_BYTES], next_name[STEK_TICKET_NAME_BYTES];
    uint64_t grace_s; /* the rotation jitter (rounded up) + STEKD_FLEET_GRACE_S */
} stekd_fleet_group;

/* Hosts by epoch held, relative to the group's current epoch. */
typedef enum stekd_fleet_offset {
    STEKD_FLEET_OFFSET_0,     /* the current epoch (or a moment ahead) */
    STEKD_FLEET_OFFSET_M1,    /* one epoch behind */
    STEKD_FLEET_OFFSET_M2,    /* two */
    STEKD_FLEET_OFFSET_OLDER, /* more, or an older generation, or nothing */
    STEKD_FLEET_OFFSETS
} stekd_fleet_offset;

/* The label of an offset bucket: "0", "-1", "-2", "older". */
const char *stekd_fleet_offset_label(stekd_fleet_offset o);

typedef struct stekd_fleet_verdict {
    bool lagging;
    bool behind, silent;
    bool same_generation; /* offset is meaningful */
    int64_t offset;       /* host epoch - group epoch, when same_generation */
    stekd_fleet_offset bucket;
    int64_t since; /* Unix seconds when lagging, else 0 */
} stekd_fleet_verdict;

/*
 * Judges one host (see the top of this file): its reported generation and
 * epoch, its first and last report and its report interval, at now. Pure.
 */
void stekd_fleet_judge(const stekd_fleet_group *g, uint64_t generation, uint64_t epoch,
                       int64_t first_report, int64_t last_report, uint32_t interval_s, int64_t now,
                       stekd_fleet_verdict *out);

typedef struct stekd_fleet stekd_fleet;

/*
 * Makes an empty table of at most max_hosts (1..1000000) entries that
 * expire expire_s (> 0) after their last report. Returns STEK_OK and
 * *out; STEK_ERR_INVALID_ARG; STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stekd_fleet_new(size_t max_hosts, uint64_t expire_s, stekd_fleet **out);

/* Frees the table. NULL is a no-op. */
void stekd_fleet_free(stekd_fleet *f);

/*
 * Files a validated report at time now (Unix seconds), replacing the
 * host's previous one (its first report time is kept). Thread-safe.
 * Returns STEK_OK; STEK_ERR_INVALID_ARG for a report out of contract;
 * STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stekd_fleet_put(stekd_fleet *f, const stekd_fleet_report *r, int64_t now);

typedef struct stekd_fleet_summary {
    size_t hosts, converged, lagging;
    size_t by_offset[STEKD_FLEET_OFFSETS];
} stekd_fleet_summary;

/* Counts g's hosts at now (expired entries dropped first). Thread-safe. */
void stekd_fleet_summarize(stekd_fleet *f, const stekd_fleet_group *g, int64_t now,
                           stekd_fleet_summary *out);

/*
 * The JSON document of g's hosts at now (GET /fleet?group=G, which
 * `stekctl fleet` reads): the group's generation and epoch, and per host
 * its identity, address, generation, epoch and offset, state, lagging
 * reasons and since when, report times, keys held, whether it holds the
 * current and next keys, counters and resumption hit ratio. Hosts sorted
 * by identity. Returns STEK_OK with *out (NUL-terminated, free()) and
 * *len; STEK_ERR_NOMEM. Thread-safe.
 */
STEK_MUST_USE stek_status stekd_fleet_json(stekd_fleet *f, const stekd_fleet_group *g, int64_t now,
                                           char **out, size_t *len);

typedef struct stekd_fleet_stats {
    size_t hosts;     /* entries now, every group */
    uint64_t evicted; /* dropped to make room (max_hosts) */
    uint64_t expired; /* dropped after `expire` without a report */
} stekd_fleet_stats;

void stekd_fleet_get_stats(stekd_fleet *f, stekd_fleet_stats *out);

#endif
