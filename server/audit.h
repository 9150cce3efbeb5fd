/*
 * The audit log: one JSON object per line for every key set served (a
 * GetKeySet answer, and each set sent on a watch stream), naming who got
 * which epochs of which group. The format is documented in docs/stekd.md.
 *
 * A line never holds key material or key names: only the host's typed SAN,
 * its address and certificate fingerprint, the group, the generation and
 * epoch numbers.
 *
 * The file is opened O_APPEND (mode 0640 when created) and each line is one
 * writev, so concurrent lines never interleave and logrotate's copy or
 * rename both work; SIGHUP makes stekd reopen it (stekd_audit_reopen).
 */
#ifndef STEK_SERVER_AUDIT_H
#define STEK_SERVER_AUDIT_H

#include <stdint.h>

#include "status.h"

typedef struct stekd_audit stekd_audit;

/*
 * Opens (creating it 0640 if needed) path for appending. Returns STEK_OK
 * and *out (free with stekd_audit_close), or STEK_ERR_IO with the reason.
 */
STEK_MUST_USE stek_status stekd_audit_open(const char *path, stekd_audit **out);

/*
 * Reopens the same path (after logrotate moved the file). On failure the
 * old file stays in use and STEK_ERR_IO is returned. Thread-safe.
 */
STEK_MUST_USE stek_status stekd_audit_reopen(stekd_audit *a);

/* Closes the file. NULL is a no-op. */
void stekd_audit_close(stekd_audit *a);

#define STEKD_AUDIT_FP_BYTES 32 /* SHA-256 */

/* One key set served. Strings are borrowed; cert_sha256 is STEKD_AUDIT_FP_BYTES. */
typedef struct stekd_audit_set {
    const char *event;    /* "get", "watch_open" or "watch_update" */
    const char *identity; /* the typed SAN the group's policy allowed ("uri:...") */
    const char *peer;     /* the gRPC peer address ("ipv4:10.0.0.7:51234"), or NULL */
    const uint8_t *cert_sha256;
    const char *group;
    uint32_t generation;
    uint64_t epoch_first, epoch_last, epoch_current;
} stekd_audit_set;

/*
 * Appends the line for s. Thread-safe. A failed write is counted and
 * logged (once until writes succeed again); serving goes on. NULL a is a
 * no-op.
 */
void stekd_audit_keyset(stekd_audit *a, const stekd_audit_set *s);

typedef struct stekd_audit_stats {
    unsigned long lines;  /* lines written whole */
    unsigned long errors; /* lines lost to a failed or short write */
} stekd_audit_stats;

void stekd_audit_get_stats(stekd_audit *a, stekd_audit_stats *out);

#endif
