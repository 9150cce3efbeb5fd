/*
 * The fleet table and the judgement of hosts (fleet.h). Entries are
 * allocated per host (its identity inline, its key names apart), so the
 * table costs memory for the hosts it holds, not for max_hosts; only the
 * bucket array is sized up front.
 */
#include "fleet.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

typedef struct entry {
    struct entry *hnext;         /* hash chain */
    struct entry *older, *newer; /* the list in order of last report */
    uint64_t hash;
    int64_t first_report, last_report;
    uint64_t generation, current_epoch;
    stekd_fleet_counters counters;
    uint32_t interval_s;
    size_t n_names, cap_names;
    uint8_t (*names)[STEK_TICKET_NAME_BYTES];
    char peer[STEKD_FLEET_PEER_MAX];
    char group[STEK_GROUP_MAX_BYTES + 1];
    char identity[]; /* NUL-terminated */
} entry;

struct stekd_fleet {
    pthread_mutex_t mu;
    entry **buckets;
    size_t mask; /* buckets - 1, a power of two minus one */
    entry *oldest, *newest;
    size_t n, max;
    uint64_t expire_s;
    uint64_t evicted, expired;
};

const char *stekd_fleet_offset_label(stekd_fleet_offset o)
{
    static const char *const labels[STEKD_FLEET_OFFSETS] = {"0", "-1", "-2", "older"};
    return (unsigned)o < STEKD_FLEET_OFFSETS ? labels[o] : "older";
}

/* ---- judging ------------------------------------------------------------ */

static int64_t clamp_diff(uint64_t a, uint64_t b)
{
    if (a >= b)
        return a - b > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)(a - b);
    return b - a > (uint64_t)INT64_MAX ? -INT64_MAX : -(int64_t)(b - a);
}

void stekd_fleet_judge(const stekd_fleet_group *g, uint64_t generation, uint64_t epoch,
                       int64_t first_report, int64_t last_report, uint32_t interval_s, int64_t now,
                       stekd_fleet_verdict *out)
{
    memset(out, 0, sizeof(*out));
    bool behind_known = false;
    int64_t behind_since = 0;
    if (generation == 0) {
        /* Holds nothing yet: behind since it first reported so. */
        out->bucket = STEKD_FLEET_OFFSET_OLDER;
        behind_known = true;
        behind_since = first_report;
    } else if (g->generation != 0 && generation < g->generation) {
        out->bucket = STEKD_FLEET_OFFSET_OLDER;
        behind_known = true;
        behind_since = g->gen_start > 0 ? g->gen_start : first_report;
    } else if (g->generation != 0 && generation > g->generation) {
        /* A generation this replica has not seen yet: the replica is the
         * one behind, not the host. */
        out->bucket = STEKD_FLEET_OFFSET_0;
    } else {
        out->same_generation = true;
        out->offset = clamp_diff(epoch, g->epoch);
        out->bucket = out->offset >= 0    ? STEKD_FLEET_OFFSET_0
                      : out->offset == -1 ? STEKD_FLEET_OFFSET_M1
                      : out->offset == -2 ? STEKD_FLEET_OFFSET_M2
                                          : STEKD_FLEET_OFFSET_OLDER;
        if (out->offset < 0) {
            /* It fell behind when the epoch it holds as current ended. */
            stek_key_times t;
            stek_sched_key_times(&g->sched, epoch, &t);
            behind_known = true;
            behind_since = t.encrypt_until;
        }
    }
    const int64_t grace = (int64_t)g->grace_s;
    out->behind = behind_known && now - behind_since >= grace;

    /* A healthy host reports after each set (one per epoch) and every
     * interval: silence longer than the shorter of the two is a stop. */
    uint64_t window = g->sched.epoch_s;
    if (interval_s > 0 && interval_s < window)
        window = interval_s;
    out->silent = now - last_report > (int64_t)window + grace;

    out->lagging = out->behind || out->silent;
    if (out->behind)
        out->since = behind_since;
    if (out->silent && (!out->behind || last_report < out->since))
        out->since = last_report;
}

/* ---- the table ---------------------------------------------------------- */

stek_status stekd_fleet_new(size_t max_hosts, uint64_t expire_s, stekd_fleet **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(max_hosts >= 1 && max_hosts <= 1000000 && expire_s > 0, STEK_ERR_INVALID_ARG);
    stekd_fleet *f = calloc(1, sizeof(*f));
    STEK_ENSURE(f != NULL, STEK_ERR_NOMEM);
    size_t nb = 16;
    while (nb < max_hosts)
        nb <<= 1;
    f->buckets = calloc(nb, sizeof(*f->buckets));
    if (f->buckets == NULL) {
        free(f);
        STEK_BAIL(STEK_ERR_NOMEM, "fleet table of %zu buckets", nb);
    }
    f->mask = nb - 1;
    f->max = max_hosts;
    f->expire_s = expire_s;
    pthread_mutex_init(&f->mu, NULL);
    *out = f;
    return STEK_OK;
}

static void entry_free(entry *e)
{
    free(e->names);
    free(e);
}

void stekd_fleet_free(stekd_fleet *f)
{
    if (f == NULL)
        return;
    for (entry *e = f->oldest; e != NULL;) {
        entry *next = e->newer;
        entry_free(e);
        e = next;
    }
    free(f->buckets);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

/* FNV-1a over group, a zero byte and identity: keys come from configured
 * group names and CA-issued certificates, so no keyed hash is needed. */
static uint64_t key_hash(const char *group, const char *identity)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (const char *p = group;; p++) {
        h = (h ^ (uint8_t)*p) * UINT64_C(1099511628211);
        if (*p == '\0')
            break;
    }
    for (const char *p = identity; *p != '\0'; p++)
        h = (h ^ (uint8_t)*p) * UINT64_C(1099511628211);
    return h;
}

static entry *find(const stekd_fleet *f, uint64_t h, const char *group, const char *identity)
{
    for (entry *e = f->buckets[h & f->mask]; e != NULL; e = e->hnext)
        if (e->hash == h && strcmp(e->group, group) == 0 && strcmp(e->identity, identity) == 0)
            return e;
    return NULL;
}

static void list_unlink(stekd_fleet *f, entry *e)
{
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        f->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        f->newest = e->older;
    e->older = e->newer = NULL;
}

static void list_append(stekd_fleet *f, entry *e)
{
    e->older = f->newest;
    e->newer = NULL;
    if (f->newest != NULL)
        f->newest->newer = e;
    else
        f->oldest = e;
    f->newest = e;
}

/* Takes e out of the table and frees it. Under mu. */
static void remove_entry(stekd_fleet *f, entry *e)
{
    entry **pp = &f->buckets[e->hash & f->mask];
    while (*pp != NULL && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp == e)
        *pp = e->hnext;
    list_unlink(f, e);
    f->n--;
    entry_free(e);
}

/* Drops entries past `expire`, oldest first. Under mu. */
static void expire_locked(stekd_fleet *f, int64_t now)
{
    while (f->oldest != NULL && now - f->oldest->last_report >= (int64_t)f->expire_s) {
        remove_entry(f, f->oldest);
        f->expired++;
    }
}

stek_status stekd_fleet_put(stekd_fleet *f, const stekd_fleet_report *r, int64_t now)
{
    STEK_ENSURE(f != NULL && r != NULL && r->group != NULL && r->identity != NULL,
                STEK_ERR_INVALID_ARG);
    STEK_ENSURE(strlen(r->group) <= STEK_GROUP_MAX_BYTES &&
                    strlen(r->identity) < STEKD_FLEET_IDENTITY_MAX &&
                    r->n_names <= STEKD_FLEET_MAX_NAMES && (r->names != NULL || r->n_names == 0),
                STEK_ERR_INVALID_ARG);
    const uint64_t h = key_hash(r->group, r->identity);
    stek_status st = STEK_OK;
    pthread_mutex_lock(&f->mu);
    expire_locked(f, now);
    entry *e = find(f, h, r->group, r->identity);
    if (e == NULL) {
        if (f->n >= f->max) {
            remove_entry(f, f->oldest);
            f->evicted++;
        }
        size_t id_len = strlen(r->identity);
        e = calloc(1, sizeof(*e) + id_len + 1);
        STEK_ENSURE_GOTO(e != NULL, STEK_ERR_NOMEM);
        e->hash = h;
        memcpy(e->identity, r->identity, id_len + 1);
        snprintf(e->group, sizeof(e->group), "%s", r->group);
        e->first_report = now;
        e->hnext = f->buckets[h & f->mask];
        f->buckets[h & f->mask] = e;
        f->n++;
    } else {
        list_unlink(f, e);
    }
    list_append(f, e);
    if (r->n_names > e->cap_names) {
        void *p = realloc(e->names, r->n_names * sizeof(*e->names));
        if (p == NULL) {
            /* Keep the entry, without names, rather than lose the report. */
            e->n_names = 0;
            st = stek_error_set(STEK_ERR_NOMEM, "fleet: %zu key names", r->n_names);
        } else {
            e->names = p;
            e->cap_names = r->n_names;
        }
    }
    if (st == STEK_OK) {
        if (r->n_names > 0)
            memcpy(e->names, r->names, r->n_names * sizeof(*e->names));
        e->n_names = r->n_names;
    }
    e->last_report = now;
    e->generation = r->generation;
    e->current_epoch = r->current_epoch;
    e->counters = r->counters;
    e->interval_s = r->interval_s;
    snprintf(e->peer, sizeof(e->peer), "%s", r->peer != NULL ? r->peer : "");
done:
    pthread_mutex_unlock(&f->mu);
    return st;
}

static void judge_entry(const stekd_fleet_group *g, const entry *e, int64_t now,
                        stekd_fleet_verdict *v)
{
    stekd_fleet_judge(g, e->generation, e->current_epoch, e->first_report, e->last_report,
                      e->interval_s, now, v);
}

void stekd_fleet_summarize(stekd_fleet *f, const stekd_fleet_group *g, int64_t now,
                           stekd_fleet_summary *out)
{
    memset(out, 0, sizeof(*out));
    if (f == NULL || g == NULL)
        return;
    pthread_mutex_lock(&f->mu);
    expire_locked(f, now);
    for (const entry *e = f->oldest; e != NULL; e = e->newer) {
        if (strcmp(e->group, g->name) != 0)
            continue;
        stekd_fleet_verdict v;
        judge_entry(g, e, now, &v);
        out->hosts++;
        if (v.lagging)
            out->lagging++;
        else
            out->converged++;
        out->by_offset[v.bucket]++;
    }
    pthread_mutex_unlock(&f->mu);
}

void stekd_fleet_get_stats(stekd_fleet *f, stekd_fleet_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (f == NULL)
        return;
    pthread_mutex_lock(&f->mu);
    out->hosts = f->n;
    out->evicted = f->evicted;
    out->expired = f->expired;
    pthread_mutex_unlock(&f->mu);
}

/* ---- JSON --------------------------------------------------------------- */

static bool holds(const entry *e, const uint8_t name[STEK_TICKET_NAME_BYTES])
{
    for (size_t i = 0; i < e->n_names; i++)
        if (memcmp(e->names[i], name, STEK_TICKET_NAME_BYTES) == 0)
            return true;
    return false;
}

static int by_identity(const void *a, const void *b)
{
    const entry *x = *(const entry *const *)a, *y = *(const entry *const *)b;
    return strcmp(x->identity, y->identity);
}

/* Adds key: value and tells whether both exist (json-c takes val). */
static bool put(json_object *o, const char *key, json_object *val)
{
    return val != NULL && json_object_object_add(o, key, val) == 0;
}

static bool put_u64(json_object *o, const char *key, uint64_t v)
{
    /* json-c holds int64: counters and epochs stay far below 2^63. */
    return put(o, key, json_object_new_int64(v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v));
}

static bool put_null(json_object *o, const char *key)
{
    return json_object_object_add(o, key, NULL) == 0;
}

static json_object *counters_json(const stekd_fleet_counters *k)
{
    json_object *o = json_object_new_object();
    if (o == NULL)
        return NULL;
    bool ok = put_u64(o, "tickets_issued", k->tickets_issued) &&
              put_u64(o, "tickets_stale", k->tickets_stale) &&
              put_u64(o, "tickets_resumed", k->tickets_resumed) &&
              put_u64(o, "tickets_renewed", k->tickets_renewed) &&
              put_u64(o, "miss_unknown", k->miss_unknown) &&
              put_u64(o, "miss_expired", k->miss_expired) &&
              put_u64(o, "miss_other_generation", k->miss_other_generation) &&
              put_u64(o, "miss_other_group", k->miss_other_group) &&
              put_u64(o, "miss_bad_mac", k->miss_bad_mac) &&
              put_u64(o, "no_key_encrypts", k->no_key_encrypts);
    if (!ok) {
        json_object_put(o);
        return NULL;
    }
    return o;
}

static json_object *host_json(const stekd_fleet_group *g, const entry *e, int64_t now,
                              stekd_fleet_verdict *v)
{
    judge_entry(g, e, now, v);
    json_object *o = json_object_new_object();
    if (o == NULL)
        return NULL;
    const stekd_fleet_counters *k = &e->counters;
    /* Resumption hit ratio: tickets that resumed over tickets offered that
     * were ours to judge. Full handshakes without a ticket are not misses. */
    uint64_t hits = k->tickets_resumed + k->tickets_renewed;
    uint64_t tries = hits + k->miss_unknown + k->miss_expired + k->miss_other_generation +
                     k->miss_other_group + k->miss_bad_mac;
    bool names_known = g->have_names && v->same_generation;
    bool ok =
        put(o, "identity", json_object_new_string(e->identity)) &&
        put(o, "peer", json_object_new_string(e->peer)) &&
        put(o, "state", json_object_new_string(v->lagging ? "lagging" : "converged")) &&
        put(o, "behind", json_object_new_boolean(v->behind)) &&
        put(o, "silent", json_object_new_boolean(v->silent)) &&
        (v->lagging ? put(o, "lagging_since", json_object_new_int64(v->since))
                    : put_null(o, "lagging_since")) &&
        put_u64(o, "generation", e->generation) && put_u64(o, "epoch", e->current_epoch) &&
        (v->same_generation ? put(o, "epoch_offset", json_object_new_int64(v->offset))
                            : put_null(o, "epoch_offset")) &&
        put(o, "epoch_bucket", json_object_new_string(stekd_fleet_offset_label(v->bucket))) &&
        put(o, "first_report", json_object_new_int64(e->first_report)) &&
        put(o, "last_report", json_object_new_int64(e->last_report)) &&
        put_u64(o, "report_interval_s", e->interval_s) && put_u64(o, "keys_held", e->n_names) &&
        (names_known
             ? put(o, "holds_current_key", json_object_new_boolean(holds(e, g->current_name)))
             : put_null(o, "holds_current_key")) &&
        (names_known ? put(o, "holds_next_key", json_object_new_boolean(holds(e, g->next_name)))
                     : put_null(o, "holds_next_key")) &&
        (tries > 0
             ? put(o, "resumption_hit_ratio", json_object_new_double((double)hits / (double)tries))
             : put_null(o, "resumption_hit_ratio")) &&
        put(o, "counters", counters_json(k));
    if (!ok) {
        json_object_put(o);
        return NULL;
    }
    return o;
}

stek_status stekd_fleet_json(stekd_fleet *f, const stekd_fleet_group *g, int64_t now, char **out,
                             size_t *len)
{
    STEK_ENSURE(f != NULL && g != NULL && out != NULL && len != NULL, STEK_ERR_INVALID_ARG);
    *out = NULL;
    *len = 0;
    stek_status st = STEK_OK;
    const entry **rows = NULL;
    json_object *doc = json_object_new_object(), *hosts = json_object_new_array();
    pthread_mutex_lock(&f->mu);
    expire_locked(f, now);
    size_t n = 0;
    rows = calloc(f->n ? f->n : 1, sizeof(*rows));
    STEK_ENSURE_GOTO(doc != NULL && hosts != NULL && rows != NULL, STEK_ERR_NOMEM);
    for (const entry *e = f->oldest; e != NULL; e = e->newer)
        if (strcmp(e->group, g->name) == 0)
            rows[n++] = e;
    qsort(rows, n, sizeof(*rows), by_identity);
    size_t converged = 0, lagging = 0;
    for (size_t i = 0; i < n; i++) {
        stekd_fleet_verdict v;
        json_object *h = host_json(g, rows[i], now, &v);
        STEK_ENSURE_GOTO(h != NULL, STEK_ERR_NOMEM);
        if (json_object_array_add(hosts, h) != 0) {
            json_object_put(h);
            STEK_BAIL_GOTO(STEK_ERR_NOMEM, "fleet: JSON array");
        }
        if (v.lagging)
            lagging++;
        else
            converged++;
    }
    stek_key_times t;
    stek_sched_key_times(&g->sched, g->epoch, &t);
    bool ok = put(doc, "group", json_object_new_string(g->name)) &&
              (g->generation != 0 ? put_u64(doc, "generation", g->generation)
                                  : put_null(doc, "generation")) &&
              put_u64(doc, "epoch", g->epoch) &&
              put(doc, "epoch_started", json_object_new_int64(t.not_before)) &&
              put_u64(doc, "epoch_seconds", g->sched.epoch_s) &&
              put_u64(doc, "grace_seconds", g->grace_s) &&
              put(doc, "now", json_object_new_int64(now)) && put_u64(doc, "hosts_total", n) &&
              put_u64(doc, "converged", converged) && put_u64(doc, "lagging", lagging);
    STEK_ENSURE_GOTO(ok, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(json_object_object_add(doc, "hosts", hosts) == 0, STEK_ERR_NOMEM);
    hosts = NULL; /* doc owns it */
done:
    pthread_mutex_unlock(&f->mu);
    free(rows);
    if (st == STEK_OK) {
        size_t text_len = 0;
        const char *text =
            json_object_to_json_string_length(doc, JSON_C_TO_STRING_PLAIN, &text_len);
        *out = text != NULL ? malloc(text_len + 2) : NULL;
        if (*out == NULL) {
            st = stek_error_set(STEK_ERR_NOMEM, "fleet: JSON text");
        } else {
            memcpy(*out, text, text_len);
            (*out)[text_len] = '\n';
            (*out)[text_len + 1] = '\0';
            *len = text_len + 1;
        }
    }
    json_object_put(hosts);
    json_object_put(doc);
    return st;
}
