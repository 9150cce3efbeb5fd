/*
 * stekd's metrics registry, rendered in the Prometheus text exposition
 * format 0.0.4 (metrics_http.c serves it on /metrics).
 *
 * Two kinds of sources:
 *   - events counted where they happen (fetch and watch statuses, rejected
 *     request signatures, HSM call latencies): relaxed atomics only, no
 *     lock on any request path;
 *   - collectors, called at scrape time, that read what other modules
 *     already keep (group views, the wrap cache, watch streams, the audit
 *     log, the hosts' reports: hosts by epoch held and lagging hosts). A
 *     later module may add its own collector.
 *
 * Nothing here ever sees key material or key names: metrics carry group
 * names, epochs, counts and durations.
 */
#ifndef STEK_SERVER_METRICS_H
#define STEK_SERVER_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "handler.h"
#include "rpc.h"
#include "status.h"

typedef struct stekd_metrics stekd_metrics;

/* Makes an empty registry. Returns STEK_OK and *out, or STEK_ERR_NOMEM. */
STEK_MUST_USE stek_status stekd_metrics_new(stekd_metrics **out);

/* Frees the registry. The HTTP server and every observer must be gone. NULL is a no-op. */
void stekd_metrics_free(stekd_metrics *m);

/* ---- events (thread-safe, lock-free; m may be NULL: metrics off) ------- */

typedef enum stekd_metric_counter {
    STEKD_M_SIGNATURES_REJECTED, /* key-set requests whose signature did not verify */
    STEKD_M_COUNTERS
} stekd_metric_counter;

void stekd_metrics_count(stekd_metrics *m, stekd_metric_counter c);

/* A GetKeySet call answered with gRPC status `code`. */
void stekd_metrics_fetch_done(stekd_metrics *m, int code);

/* A WatchKeySet stream ended with `code` (refused at start, ended by the
 * server, or CANCELLED when the host went away). */
void stekd_metrics_watch_done(stekd_metrics *m, int code);

/* A ReportStatus call answered with `code`. */
void stekd_metrics_report_done(stekd_metrics *m, int code);

/* One C_* call: a stek_p11_call_observer; arg is the registry. */
void stekd_metrics_hsm_call(void *m, const char *call, uint64_t ns, bool ok);

/* ---- collectors (scrape time) ------------------------------------------ */

typedef struct stekd_metrics_out stekd_metrics_out; /* a scrape being written */

typedef void (*stekd_metrics_collector)(void *arg, stekd_metrics_out *o);

/*
 * Adds a collector, called in order at every scrape. Only before the
 * registry is first rendered (the list is not locked). Returns STEK_OK, or
 * STEK_ERR_NOMEM when the fixed table of STEKD_METRICS_COLLECTORS is full.
 */
#define STEKD_METRICS_COLLECTORS 8
STEK_MUST_USE stek_status stekd_metrics_add_collector(stekd_metrics *m, stekd_metrics_collector fn,
                                                      void *arg);

/*
 * Starts a metric family: "# HELP" and "# TYPE" lines. type is "counter"
 * (name ends in _total), "gauge" or "histogram". All samples of a family
 * follow its header, before the next family.
 */
void stekd_metrics_family(stekd_metrics_out *o, const char *name, const char *type,
                          const char *help);

/*
 * One sample: name (the family's name, or for a histogram its _bucket,
 * _sum or _count), labels as NULL-terminated name/value pairs (NULL: none;
 * values are escaped here), and the value.
 */
void stekd_metrics_sample(stekd_metrics_out *o, const char *name, const char *const *labels,
                          double value);

/*
 * Renders every event family and then every collector. Returns STEK_OK
 * with *text (NUL-terminated, free()) and *len, or STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stekd_metrics_render(stekd_metrics *m, char **text, size_t *len);

/*
 * The service's own collector: groups (generation, epoch, keys, next
 * rotation, refused jumps, and from the hosts' reports, hosts by state and
 * by epoch held), the HSM (a probe per scrape, reconnects), the wrap
 * cache, watch streams and the audit log. arg is a
 * stekd_metrics_sources that outlives the registry's HTTP server.
 */
typedef struct stekd_metrics_sources {
    const stekd_handler *h;
    stekd_rpc *rpc;
    int64_t started_at; /* Unix seconds */
} stekd_metrics_sources;

void stekd_metrics_collect_service(void *arg, stekd_metrics_out *o);

#endif
