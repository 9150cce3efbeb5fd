/*
 * The metrics registry and the text exposition format 0.0.4
 * (https://prometheus.io/docs/instrumenting/exposition_formats/): per
 * family a "# HELP" and a "# TYPE" line, then its samples
 * `name{label="value",...} value`; counters end in _total, durations are
 * in seconds, histograms are cumulative _bucket{le=...} series ending in
 * le="+Inf", then _sum and _count.
 *
 * Event counters are relaxed atomics: a scrape may see one counter a
 * moment ahead of another, never a torn value.
 */
#include "metrics.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit.h"
#include "fleet.h"
#include "keyset.h"
#include "state.h"
#include "stek_p11.h"

#define N_CODES 17 /* gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED) */
_Static_assert(GRPC_STATUS_UNAUTHENTICATED == N_CODES - 1, "code_names follows grpc/status.h");

static const char *const code_names[N_CODES] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

/* The C_* functions pkcs11/ calls; anything else is counted as "other". */
static const char *const hsm_calls[] = {
    "C_CloseSession",
    "C_CreateObject",
    "C_DeriveKey",
    "C_DestroyObject",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_FindObjectsInit",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_GetAttributeValue",
    "C_GetSessionInfo",
    "C_GetSlotList",
    "C_GetTokenInfo",
    "C_Login",
    "C_Logout",
    "C_OpenSession",
    "C_SetAttributeValue",
    "C_Sign",
    "C_SignInit",
    "C_UnwrapKey",
    "C_WrapKey",
    "other",
};
#define N_HSM_CALLS (sizeof(hsm_calls) / sizeof(hsm_calls[0]))

/* Bucket bounds: SoftHSM answers in microseconds, network HSMs in milliseconds. */
static const struct {
    uint64_t ns;
    const char *le;
} bounds[] = {
    {100000, "0.0001"},  {250000, "0.00025"}, {500000, "0.0005"},  {1000000, "0.001"},
    {2500000, "0.0025"}, {5000000, "0.005"},  {10000000, "0.01"},  {25000000, "0.025"},
    {50000000, "0.05"},  {100000000, "0.1"},  {250000000, "0.25"}, {500000000, "0.5"},
    {1000000000, "1"},   {2500000000, "2.5"}, {5000000000, "5"},
};
#define N_BOUNDS (sizeof(bounds) / sizeof(bounds[0]))

typedef struct histogram {
    atomic_ulong buckets[N_BOUNDS + 1]; /* not cumulative; the last is above every bound */
    atomic_ullong sum_ns;
    atomic_ulong failures;
} histogram;

struct stekd_metrics {
    atomic_ulong counters[STEKD_M_COUNTERS];
    atomic_ulong fetches[N_CODES + 1]; /* the last: a code outside 0..16 */
    atomic_ulong watches[N_CODES + 1];
    atomic_ulong reports[N_CODES + 1];
    histogram hsm[N_HSM_CALLS];
    struct {
        stekd_metrics_collector fn;
        void *arg;
    } collectors[STEKD_METRICS_COLLECTORS];
    size_t n_collectors;
};

struct stekd_metrics_out {
    FILE *f;
};

stek_status stekd_metrics_new(stekd_metrics **out)
{
    STEK_ENSURE_REF(out);
    /* calloc's zero bytes are valid initial values of these lock-free atomics. */
    *out = calloc(1, sizeof(**out));
    STEK_ENSURE(*out != NULL, STEK_ERR_NOMEM);
    return STEK_OK;
}

void stekd_metrics_free(stekd_metrics *m)
{
    free(m);
}

/* ---- events ------------------------------------------------------------- */

void stekd_metrics_count(stekd_metrics *m, stekd_metric_counter c)
{
    if (m != NULL && c < STEKD_M_COUNTERS)
        atomic_fetch_add_explicit(&m->counters[c], 1, memory_order_relaxed);
}

static size_t code_index(int code)
{
    return code >= 0 && code < N_CODES ? (size_t)code : N_CODES;
}

void stekd_metrics_fetch_done(stekd_metrics *m, int code)
{
    if (m != NULL)
        atomic_fetch_add_explicit(&m->fetches[code_index(code)], 1, memory_order_relaxed);
}

void stekd_metrics_watch_done(stekd_metrics *m, int code)
{
    if (m != NULL)
        atomic_fetch_add_explicit(&m->watches[code_index(code)], 1, memory_order_relaxed);
}

void stekd_metrics_report_done(stekd_metrics *m, int code)
{
    if (m != NULL)
        atomic_fetch_add_explicit(&m->reports[code_index(code)], 1, memory_order_relaxed);
}

void stekd_metrics_hsm_call(void *arg, const char *call, uint64_t ns, bool ok)
{
    stekd_metrics *m = arg;
    if (m == NULL || call == NULL)
        return;
    size_t i = 0;
    while (i < N_HSM_CALLS - 1 && strcmp(hsm_calls[i], call) != 0)
        i++;
    size_t b = 0;
    while (b < N_BOUNDS && ns > bounds[b].ns)
        b++;
    histogram *h = &m->hsm[i];
    atomic_fetch_add_explicit(&h->buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, ns, memory_order_relaxed);
    if (!ok)
        atomic_fetch_add_explicit(&h->failures, 1, memory_order_relaxed);
}

/* ---- writing ------------------------------------------------------------ */

stek_status stekd_metrics_add_collector(stekd_metrics *m, stekd_metrics_collector fn, void *arg)
{
    STEK_ENSURE(m != NULL && fn != NULL, STEK_ERR_INVALID_ARG);
    STEK_ENSURE(m->n_collectors < STEKD_METRICS_COLLECTORS, STEK_ERR_NOMEM);
    m->collectors[m->n_collectors].fn = fn;
    m->collectors[m->n_collectors].arg = arg;
    m->n_collectors++;
    return STEK_OK;
}

/* Writes s escaped: in HELP text only \ and newline are, in label values also ". */
static void put_escaped(FILE *f, const char *s, bool quote)
{
    for (; *s != '\0'; s++) {
        if (*s == '\\')
            fputs("\\\\", f);
        else if (*s == '\n')
            fputs("\\n", f);
        else if (quote && *s == '"')
            fputs("\\\"", f);
        else
            fputc(*s, f);
    }
}

void stekd_metrics_family(stekd_metrics_out *o, const char *name, const char *type,
                          const char *help)
{
    fprintf(o->f, "# HELP %s ", name);
    put_escaped(o->f, help, false);
    fprintf(o->f, "\n# TYPE %s %s\n", name, type);
}

static void put_value(FILE *f, double v)
{
    if (isnan(v))
        fputs("NaN", f);
    else if (isinf(v))
        fputs(v > 0 ? "+Inf" : "-Inf", f);
    else if (v == floor(v) && v > -1e15 && v < 1e15)
        fprintf(f, "%.0f", v); /* counts and epochs print as integers */
    else
        fprintf(f, "%.15g", v); /* durations: nanoseconds over days stay exact */
}

void stekd_metrics_sample(stekd_metrics_out *o, const char *name, const char *const *labels,
                          double value)
{
    fputs(name, o->f);
    if (labels != NULL && labels[0] != NULL) {
        fputc('{', o->f);
        for (size_t i = 0; labels[i] != NULL && labels[i + 1] != NULL; i += 2) {
            fprintf(o->f, "%s%s=\"", i > 0 ? "," : "", labels[i]);
            put_escaped(o->f, labels[i + 1], true);
            fputc('"', o->f);
        }
        fputc('}', o->f);
    }
    fputc(' ', o->f);
    put_value(o->f, value);
    fputc('\n', o->f);
}

/* A counter family over every gRPC code, so rates start from zero. */
static void put_codes(stekd_metrics_out *o, const char *name, const char *help,
                      atomic_ulong *counts)
{
    stekd_metrics_family(o, name, "counter", help);
    for (size_t i = 0; i <= N_CODES; i++) {
        unsigned long n = atomic_load_explicit(&counts[i], memory_order_relaxed);
        if (i == N_CODES && n == 0)
            continue; /* codes outside the enum: only when some were seen */
        const char *l[] = {"code", i < N_CODES ? code_names[i] : "OTHER", NULL};
        stekd_metrics_sample(o, name, l, (double)n);
    }
}

static void put_hsm(stekd_metrics *m, stekd_metrics_out *o)
{
    static const char *const hname = "stekd_hsm_call_duration_seconds";
    stekd_metrics_family(o, hname, "histogram",
                         "Duration of PKCS#11 calls to the HSM, by function (functions called "
                         "at least once).");
    for (size_t i = 0; i < N_HSM_CALLS; i++) {
        histogram *h = &m->hsm[i];
        unsigned long cum = 0;
        unsigned long counts[N_BOUNDS + 1];
        for (size_t b = 0; b <= N_BOUNDS; b++) {
            counts[b] = atomic_load_explicit(&h->buckets[b], memory_order_relaxed);
            cum += counts[b];
        }
        if (cum == 0)
            continue;
        /* _count is the +Inf bucket by construction, however calls race the scrape. */
        cum = 0;
        for (size_t b = 0; b <= N_BOUNDS; b++) {
            cum += counts[b];
            const char *l[] = {"call", hsm_calls[i], "le", b < N_BOUNDS ? bounds[b].le : "+Inf",
                               NULL};
            stekd_metrics_sample(o, "stekd_hsm_call_duration_seconds_bucket", l, (double)cum);
        }
        const char *l[] = {"call", hsm_calls[i], NULL};
        double sum = (double)atomic_load_explicit(&h->sum_ns, memory_order_relaxed) / 1e9;
        stekd_metrics_sample(o, "stekd_hsm_call_duration_seconds_sum", l, sum);
        stekd_metrics_sample(o, "stekd_hsm_call_duration_seconds_count", l, (double)cum);
    }
    stekd_metrics_family(o, "stekd_hsm_call_failures_total", "counter",
                         "PKCS#11 calls that did not return CKR_OK, by function (functions "
                         "called at least once).");
    for (size_t i = 0; i < N_HSM_CALLS; i++) {
        histogram *h = &m->hsm[i];
        bool used = false;
        for (size_t b = 0; b <= N_BOUNDS && !used; b++)
            used = atomic_load_explicit(&h->buckets[b], memory_order_relaxed) != 0;
        if (!used)
            continue;
        const char *l[] = {"call", hsm_calls[i], NULL};
        stekd_metrics_sample(o, "stekd_hsm_call_failures_total", l,
                             (double)atomic_load_explicit(&h->failures, memory_order_relaxed));
    }
}

stek_status stekd_metrics_render(stekd_metrics *m, char **text, size_t *len)
{
    STEK_ENSURE(m != NULL && text != NULL && len != NULL, STEK_ERR_INVALID_ARG);
    *text = NULL;
    *len = 0;
    stekd_metrics_out o = {open_memstream(text, len)};
    STEK_ENSURE(o.f != NULL, STEK_ERR_NOMEM);

    put_codes(&o, "stekd_fetches_total", "GetKeySet calls answered, by gRPC status.", m->fetches);
    put_codes(&o, "stekd_watch_streams_total",
              "WatchKeySet streams ended (refused, ended by stekd, or CANCELLED by the host), by "
              "gRPC status.",
              m->watches);
    put_codes(&o, "stekd_fleet_reports_total",
              "ReportStatus calls (hosts reporting what they hold) answered, by gRPC status.",
              m->reports);
    stekd_metrics_family(&o, "stekd_request_signatures_rejected_total", "counter",
                         "Key-set requests whose signature did not verify against the client "
                         "certificate.");
    stekd_metrics_sample(&o, "stekd_request_signatures_rejected_total", NULL,
                         (double)atomic_load(&m->counters[STEKD_M_SIGNATURES_REJECTED]));
    put_hsm(m, &o);
    for (size_t i = 0; i < m->n_collectors; i++)
        m->collectors[i].fn(m->collectors[i].arg, &o);

    bool failed = ferror(o.f) != 0;
    if (fclose(o.f) != 0 || failed) {
        free(*text);
        *text = NULL;
        *len = 0;
        STEK_BAIL(STEK_ERR_NOMEM, "rendering metrics");
    }
    return STEK_OK;
}

/* ---- the service collector ---------------------------------------------- */

typedef struct group_row {
    const stekd_group_cfg *cfg;
    stekd_view *v;
    stekd_group_stats stats;
    unsigned long hsm_tickets, hsm_chains;
} group_row;

static void put_gauge(stekd_metrics_out *o, const char *name, const char *help, double v)
{
    stekd_metrics_family(o, name, "gauge", help);
    stekd_metrics_sample(o, name, NULL, v);
}

static void put_counter(stekd_metrics_out *o, const char *name, const char *help, double v)
{
    stekd_metrics_family(o, name, "counter", help);
    stekd_metrics_sample(o, name, NULL, v);
}

/* Counts each group's ticket and chain keys in the token (one listing per scrape). */
static bool count_hsm_keys(stek_p11 *p11, group_row *rows, size_t n)
{
    stek_p11_object_info *objs = NULL;
    size_t count = 0;
    if (stek_p11_list(p11, &objs, &count) != STEK_OK)
        return false;
    for (size_t i = 0; i < count; i++) {
        for (size_t g = 0; g < n; g++) {
            if (strcmp(objs[i].group, rows[g].cfg->name) != 0)
                continue;
            if (objs[i].kind == STEK_P11_KIND_TICKET)
                rows[g].hsm_tickets++;
            else if (objs[i].kind == STEK_P11_KIND_CHAIN)
                rows[g].hsm_chains++;
        }
    }
    free(objs);
    return true;
}

static void put_groups(const stekd_metrics_sources *s, stekd_metrics_out *o, int64_t now)
{
    const stekd_config *cfg = s->h->cfg;
    size_t n = cfg->n_groups;
    group_row *rows = calloc(n ? n : 1, sizeof(*rows));
    if (rows == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        rows[i].cfg = &cfg->groups[i];
        rows[i].v = stekd_state_view(s->h->state, rows[i].cfg->name);
        if (!stekd_state_group_stats(s->h->state, rows[i].cfg->name, &rows[i].stats))
            memset(&rows[i].stats, 0, sizeof(rows[i].stats));
    }
    bool listed = count_hsm_keys(s->h->p11, rows, n);

    stekd_metrics_family(o, "stekd_group_available", "gauge",
                         "1 when the group's keys are being served, 0 while it answers "
                         "UNAVAILABLE.");
    for (size_t i = 0; i < n; i++) {
        const char *l[] = {"group", rows[i].cfg->name, NULL};
        stekd_metrics_sample(o, "stekd_group_available", l,
                             rows[i].v != NULL && rows[i].v->available);
    }
    static const struct {
        const char *name, *help;
        int what;
    } view_families[] = {
        {"stekd_group_generation", "The group's current generation (groups being served).", 0},
        {"stekd_group_epoch", "The group's current epoch (groups being served).", 1},
        {"stekd_group_keys_served",
         "Keys in each set served: next, current and the decrypt window (groups being served).", 2},
    };
    for (size_t f = 0; f < sizeof(view_families) / sizeof(view_families[0]); f++) {
        stekd_metrics_family(o, view_families[f].name, "gauge", view_families[f].help);
        for (size_t i = 0; i < n; i++) {
            const stekd_view *v = rows[i].v;
            if (v == NULL || !v->available)
                continue;
            const char *l[] = {"group", rows[i].cfg->name, NULL};
            double val = view_families[f].what == 0   ? (double)v->generation
                         : view_families[f].what == 1 ? (double)v->epoch
                                                      : (double)v->n_keys;
            stekd_metrics_sample(o, view_families[f].name, l, val);
        }
    }
    if (listed) {
        stekd_metrics_family(o, "stekd_group_hsm_keys", "gauge",
                             "Keys of the group in the HSM token, every generation, by kind "
                             "(ticket or chain).");
        for (size_t i = 0; i < n; i++) {
            const char *lt[] = {"group", rows[i].cfg->name, "kind", "ticket", NULL};
            const char *lc[] = {"group", rows[i].cfg->name, "kind", "chain", NULL};
            stekd_metrics_sample(o, "stekd_group_hsm_keys", lt, (double)rows[i].hsm_tickets);
            stekd_metrics_sample(o, "stekd_group_hsm_keys", lc, (double)rows[i].hsm_chains);
        }
    }
    stekd_metrics_family(o, "stekd_group_next_rotation_seconds", "gauge",
                         "Seconds until the group's next epoch starts.");
    for (size_t i = 0; i < n; i++) {
        const char *l[] = {"group", rows[i].cfg->name, NULL};
        int64_t next = stek_sched_next_rotation(&rows[i].cfg->sched, now);
        stekd_metrics_sample(o, "stekd_group_next_rotation_seconds", l,
                             (double)(next > now ? next - now : 0));
    }
    stekd_metrics_family(o, "stekd_group_schedule_jumps_refused_total", "counter",
                         "Times the group's schedule started refusing to advance past "
                         "schedule.max_jump epochs (each an ALARM; see stekctl advance).");
    for (size_t i = 0; i < n; i++) {
        const char *l[] = {"group", rows[i].cfg->name, NULL};
        stekd_metrics_sample(o, "stekd_group_schedule_jumps_refused_total", l,
                             (double)rows[i].stats.jumps_refused);
    }
    stekd_metrics_family(o, "stekd_group_schedule_jump_refused", "gauge",
                         "1 while the group's schedule refuses a jump.");
    for (size_t i = 0; i < n; i++) {
        const char *l[] = {"group", rows[i].cfg->name, NULL};
        stekd_metrics_sample(o, "stekd_group_schedule_jump_refused", l, rows[i].stats.refusing);
    }
    for (size_t i = 0; i < n; i++)
        stekd_view_unref(rows[i].v);
    free(rows);
}

/* From the hosts' reports: every configured group gets every series, so
 * an alert on zero hosts or on lagging ones works from the first scrape. */
static void put_fleet(const stekd_metrics_sources *s, stekd_metrics_out *o, int64_t now)
{
    const stekd_config *cfg = s->h->cfg;
    stekd_fleet_summary *sums = calloc(cfg->n_groups ? cfg->n_groups : 1, sizeof(*sums));
    if (sums == NULL)
        return;
    for (size_t i = 0; i < cfg->n_groups; i++) {
        stekd_fleet_group g;
        if (stekd_handle_fleet_group(s->h, cfg->groups[i].name, now, &g))
            stekd_fleet_summarize(s->h->fleet, &g, now, &sums[i]);
    }
    stekd_metrics_family(o, "stekd_fleet_hosts", "gauge",
                         "Hosts that reported for the group, by state: converged (holding the "
                         "group's current epoch) or lagging (behind it, or silent).");
    for (size_t i = 0; i < cfg->n_groups; i++) {
        const char *lc[] = {"group", cfg->groups[i].name, "state", "converged", NULL};
        const char *ll[] = {"group", cfg->groups[i].name, "state", "lagging", NULL};
        stekd_metrics_sample(o, "stekd_fleet_hosts", lc, (double)sums[i].converged);
        stekd_metrics_sample(o, "stekd_fleet_hosts", ll, (double)sums[i].lagging);
    }
    stekd_metrics_family(o, "stekd_fleet_hosts_by_epoch", "gauge",
                         "Hosts by the epoch they hold as current, relative to the group's "
                         "current epoch (older: further behind, an older generation, or no "
                         "key yet).");
    for (size_t i = 0; i < cfg->n_groups; i++) {
        for (int b = 0; b < STEKD_FLEET_OFFSETS; b++) {
            const char *l[] = {"group", cfg->groups[i].name, "epoch_offset",
                               stekd_fleet_offset_label((stekd_fleet_offset)b), NULL};
            stekd_metrics_sample(o, "stekd_fleet_hosts_by_epoch", l, (double)sums[i].by_offset[b]);
        }
    }
    free(sums);
    stekd_fleet_stats fs;
    stekd_fleet_get_stats(s->h->fleet, &fs);
    put_gauge(o, "stekd_fleet_table_hosts",
              "Hosts' reports kept, every group (at most fleet.max_hosts).", (double)fs.hosts);
    put_counter(o, "stekd_fleet_evictions_total",
                "Hosts' reports dropped to make room for a new host (fleet.max_hosts).",
                (double)fs.evicted);
    put_counter(o, "stekd_fleet_expirations_total",
                "Hosts' reports dropped after fleet.expire without a newer one.",
                (double)fs.expired);
}

void stekd_metrics_collect_service(void *arg, stekd_metrics_out *o)
{
    const stekd_metrics_sources *s = arg;
    const stekd_handler *h = s->h;
    int64_t now = stekd_now();

    stekd_metrics_family(o, "stekd_build_info", "gauge", "stekd's version, as a label.");
    const char *l[] = {"version", STEKD_VERSION, NULL};
    stekd_metrics_sample(o, "stekd_build_info", l, 1);
    put_gauge(o, "stekd_start_time_seconds", "When stekd started, in Unix seconds.",
              (double)s->started_at);
    put_gauge(o, "stekd_serving",
              "1 when the health service answers SERVING: every group served, none behind "
              "its schedule.",
              stekd_state_serving(h->state, now, NULL, 0));
    /* A real probe of the token at each scrape: the views only change at refreshes. */
    put_gauge(o, "stekd_hsm_up", "1 when the HSM token answered a probe at this scrape.",
              stek_p11_ping(h->p11) == STEK_OK);
    stek_p11_stats ps;
    stek_p11_get_stats(h->p11, &ps);
    put_counter(o, "stekd_hsm_reconnects_total",
                "Times the HSM module was re-initialized after the token was lost.",
                (double)ps.reconnects);

    put_groups(s, o, now);
    put_fleet(s, o, now);

    stekd_rpc_stats rs = {0};
    if (s->rpc != NULL)
        stekd_rpc_get_stats(s->rpc, &rs);
    put_gauge(o, "stekd_watch_streams_open", "Open WatchKeySet streams.", (double)rs.watchers);
    put_counter(o, "stekd_watch_sets_sent_total",
                "Key sets sent on watch streams (the first of each stream included).",
                (double)rs.sets_sent);
    put_counter(o, "stekd_watch_heartbeats_sent_total", "Heartbeats sent on watch streams.",
                (double)rs.heartbeats_sent);
    put_counter(o, "stekd_watch_sets_staged_total",
                "Sets built for watch streams ahead of a rotation.", (double)rs.sets_staged);
    put_counter(o, "stekd_watch_staged_sent_total",
                "Sets sent at a rotation that had been built ahead of it.", (double)rs.staged_sent);

    stekd_cache_stats cs;
    stekd_cache_get_stats(h->cache, &cs);
    put_counter(o, "stekd_wrap_cache_hits_total",
                "Key sets answered from the wrap cache (no HSM call).", (double)cs.hits);
    put_counter(o, "stekd_wrap_cache_misses_total",
                "Key sets wrapped and signed in the HSM because the cache had none.",
                (double)cs.misses);
    put_counter(o, "stekd_wrap_cache_evictions_total",
                "Wrap cache entries evicted to make room (limits.wrap_cache_entries).",
                (double)cs.evictions);
    put_gauge(o, "stekd_wrap_cache_entries", "Key sets in the wrap cache.", (double)cs.entries);

    if (h->audit != NULL) {
        stekd_audit_stats as;
        stekd_audit_get_stats(h->audit, &as);
        put_counter(o, "stekd_audit_lines_total", "Lines written to the audit log.",
                    (double)as.lines);
        put_counter(o, "stekd_audit_write_errors_total",
                    "Audit lines lost to a failed write (disk full, file removed, ...).",
                    (double)as.errors);
    }
}
