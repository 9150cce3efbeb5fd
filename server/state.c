/*
 * Group state: one refresh brings a group's keys in the HSM up to the clock
 * and publishes the view hosts are served from.
 */
#include "state.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

/* Epochs per ratchet call when a fresh generation catches up (as stekctl
 * advance does): each call costs the square of its length. */
#define RATCHET_SLICE 16

typedef struct group_slot {
    const stekd_group_cfg *cfg;
    stekd_view *view; /* guarded by stekd_state.mu */
    /* Names never change for (g, n, e): remember them across refreshes. */
    uint32_t names_gen;
    size_t n_names;
    stekd_key *names;
    bool alarmed; /* the refused-jump alarm was logged for this situation */
    /* For metrics, read by other threads: alarms raised, and refusing now. */
    atomic_ulong jumps_refused;
    atomic_bool refusing;
} group_slot;

struct stekd_state {
    const stekd_config *cfg;
    stek_p11 *p11;
    pthread_mutex_t mu;
    group_slot *groups;
    size_t n_groups;
    uint64_t next_version;
    stekd_state_listener listener;
    void *listener_arg;
};

static int64_t offset_s;
static pthread_once_t offset_once = PTHREAD_ONCE_INIT;

static void read_offset(void)
{
    const char *v = getenv("STEKD_TEST_CLOCK_OFFSET");
    offset_s = v ? strtoll(v, NULL, 10) : 0;
    if (offset_s != 0)
        stek_log(STEK_LOG_WARN, "stekd", "test clock offset of %lld s is in effect",
                 (long long)offset_s);
}

int64_t stekd_now(void)
{
    return stekd_now_ms() / 1000;
}

int64_t stekd_now_ms(void)
{
    pthread_once(&offset_once, read_offset);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((int64_t)ts.tv_sec + offset_s) * 1000 + ts.tv_nsec / 1000000;
}

void stekd_view_unref(stekd_view *v)
{
    if (v != NULL && atomic_fetch_sub(&v->refs, 1) == 1) {
        stekd_view_unref(v->staged);
        free(v);
    }
}

static stekd_view *view_new(const stekd_group_cfg *cfg, size_t n_keys)
{
    stekd_view *v = calloc(1, sizeof(*v) + n_keys * sizeof(stekd_key));
    if (v == NULL)
        return NULL;
    atomic_init(&v->refs, 1);
    v->cfg = cfg;
    v->n_keys = n_keys;
    return v;
}

/* An available view of generation n at epoch e serving keys[0..count). */
static stekd_view *window_view(const stekd_group_cfg *cfg, uint32_t n, int64_t gen_start,
                               uint64_t e, const stekd_key *keys, size_t count)
{
    stekd_view *v = view_new(cfg, count);
    if (v == NULL)
        return NULL;
    v->available = true;
    v->generation = n;
    v->gen_start = gen_start;
    v->epoch = e;
    memcpy(v->keys, keys, count * sizeof(stekd_key));
    return v;
}

stek_status stekd_state_new(const stekd_config *cfg, stek_p11 *p11, stekd_state **out)
{
    STEK_ENSURE_REF(cfg);
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(out);
    stekd_state *st = calloc(1, sizeof(*st));
    STEK_ENSURE(st != NULL, STEK_ERR_NOMEM);
    st->cfg = cfg;
    st->p11 = p11;
    pthread_mutex_init(&st->mu, NULL);
    st->groups = calloc(cfg->n_groups ? cfg->n_groups : 1, sizeof(*st->groups));
    st->n_groups = cfg->n_groups;
    bool ok = st->groups != NULL;
    for (size_t i = 0; ok && i < cfg->n_groups; i++) {
        st->groups[i].cfg = &cfg->groups[i];
        st->groups[i].view = view_new(&cfg->groups[i], 0);
        ok = st->groups[i].view != NULL;
        if (ok)
            snprintf(st->groups[i].view->why, sizeof(st->groups[i].view->why),
                     "group %s: keys not loaded yet", cfg->groups[i].name);
    }
    if (!ok) {
        stekd_state_free(st);
        STEK_BAIL(STEK_ERR_NOMEM, "group state");
    }
    *out = st;
    return STEK_OK;
}

void stekd_state_free(stekd_state *st)
{
    if (st == NULL)
        return;
    for (size_t i = 0; st->groups && i < st->n_groups; i++) {
        stekd_view_unref(st->groups[i].view);
        free(st->groups[i].names);
    }
    free(st->groups);
    pthread_mutex_destroy(&st->mu);
    free(st);
}

void stekd_state_set_listener(stekd_state *st, stekd_state_listener fn, void *arg)
{
    pthread_mutex_lock(&st->mu);
    st->listener = fn;
    st->listener_arg = arg;
    pthread_mutex_unlock(&st->mu);
}

stekd_view *stekd_state_view(stekd_state *st, const char *group)
{
    stekd_view *v = NULL;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < st->n_groups; i++) {
        if (strcmp(st->groups[i].cfg->name, group) == 0) {
            v = st->groups[i].view;
            atomic_fetch_add(&v->refs, 1);
            break;
        }
    }
    pthread_mutex_unlock(&st->mu);
    return v;
}

bool stekd_state_all_available(stekd_state *st)
{
    bool all = true;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < st->n_groups; i++)
        all = all && st->groups[i].view->available;
    pthread_mutex_unlock(&st->mu);
    return all;
}

bool stekd_state_serving(stekd_state *st, int64_t now, char *why, size_t why_len)
{
    bool serving = true;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; serving && i < st->n_groups; i++) {
        const stekd_view *v = st->groups[i].view;
        uint64_t due = 0;
        if (!v->available) {
            serving = false;
            if (why != NULL)
                snprintf(why, why_len, "%s", v->why);
        } else if (stek_sched_epoch_at(&v->cfg->sched, now - STEKD_BEHIND_GRACE_S, &due) ==
                       STEK_OK &&
                   v->epoch < due) {
            serving = false;
            if (why != NULL)
                snprintf(why, why_len, "group %s: the schedule is behind (epoch %llu, due %llu)",
                         v->cfg->name, (unsigned long long)v->epoch, (unsigned long long)due);
        }
    }
    pthread_mutex_unlock(&st->mu);
    return serving;
}

bool stekd_state_group_stats(stekd_state *st, const char *group, stekd_group_stats *out)
{
    for (size_t i = 0; i < st->n_groups; i++) {
        if (strcmp(st->groups[i].cfg->name, group) == 0) {
            out->jumps_refused = atomic_load(&st->groups[i].jumps_refused);
            out->refusing = atomic_load(&st->groups[i].refusing);
            return true;
        }
    }
    return false;
}

bool stekd_view_same(const stekd_view *a, const stekd_view *b)
{
    return a->available == b->available && a->generation == b->generation && a->epoch == b->epoch &&
           a->gen_start == b->gen_start && a->n_keys == b->n_keys &&
           memcmp(a->keys, b->keys, a->n_keys * sizeof(stekd_key)) == 0 &&
           (a->available || strcmp(a->why, b->why) == 0);
}

static bool same_staged(const stekd_view *a, const stekd_view *b)
{
    return a == NULL ? b == NULL : b != NULL && stekd_view_same(a, b);
}

static void publish(stekd_state *st, group_slot *g, stekd_view *v)
{
    pthread_mutex_lock(&st->mu);
    bool changed = !stekd_view_same(g->view, v);
    if (changed) {
        v->version = ++st->next_version;
        stekd_view_unref(g->view);
        g->view = v;
    } else if (!same_staged(g->view->staged, v->staged)) {
        /* Only what comes next changed (K(e+2) appeared): the served set did
         * not, so no new version and no watcher owes a set. */
        v->version = g->view->version;
        stekd_view_unref(g->view);
        g->view = v;
        v = NULL;
    }
    stekd_state_listener fn = st->listener;
    void *arg = st->listener_arg;
    pthread_mutex_unlock(&st->mu);
    if (!changed) {
        stekd_view_unref(v); /* NULL when it replaced the published view */
        return;
    }
    if (v->available)
        stek_log(STEK_LOG_INFO, "stekd", "group %s: generation %u, epoch %llu, %zu keys",
                 v->cfg->name, (unsigned)v->generation, (unsigned long long)v->epoch, v->n_keys);
    else
        stek_log(STEK_LOG_WARN, "stekd", "%s", v->why);
    if (fn != NULL)
        fn(arg, v->cfg->name);
}

static void publish_unavailable(stekd_state *st, group_slot *g, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Publishes an empty, unavailable view; the reason is prefixed with the group. */
static void publish_unavailable(stekd_state *st, group_slot *g, const char *fmt, ...)
{
    stekd_view *v = view_new(g->cfg, 0);
    if (v == NULL)
        return;
    int n = snprintf(v->why, sizeof(v->why), "group %s: ", g->cfg->name);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(v->why))
        vsnprintf(v->why + n, sizeof(v->why) - (size_t)n, fmt, ap);
    va_end(ap);
    publish(st, g, v);
}

/* Looks up or computes the names of epochs first..last of generation n. */
static stek_status load_names(stekd_state *st, group_slot *g, uint32_t n, uint64_t first,
                              uint64_t last)
{
    size_t count = (size_t)(last - first + 1);
    if (g->names_gen == n && g->n_names == count && g->names[0].epoch == first)
        return STEK_OK;
    stekd_key *keys = calloc(count, sizeof(*keys));
    uint64_t *missing = calloc(count, sizeof(*missing));
    uint8_t(*names)[STEK_TICKET_NAME_BYTES] = calloc(count, STEK_TICKET_NAME_BYTES);
    stek_status status = STEK_OK;
    size_t n_missing = 0;
    if (keys == NULL || missing == NULL || names == NULL) {
        status = stek_error_set(STEK_ERR_NOMEM, "names");
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        keys[i].epoch = first + i;
        bool known = false;
        for (size_t j = 0; g->names_gen == n && j < g->n_names; j++) {
            if (g->names[j].epoch == keys[i].epoch) {
                memcpy(keys[i].name, g->names[j].name, STEK_TICKET_NAME_BYTES);
                known = true;
                break;
            }
        }
        if (!known)
            missing[n_missing++] = keys[i].epoch;
    }
    if (n_missing > 0) {
        status = stek_p11_ticket_names(st->p11, g->cfg->name, n, missing, n_missing, names);
        if (status != STEK_OK)
            goto done;
        for (size_t i = 0, m = 0; i < count && m < n_missing; i++)
            if (keys[i].epoch == missing[m])
                memcpy(keys[i].name, names[m++], STEK_TICKET_NAME_BYTES);
    }
    free(g->names);
    g->names = keys;
    g->n_names = count;
    g->names_gen = n;
    keys = NULL;
done:
    free(keys);
    free(missing);
    free(names);
    return status;
}

static bool oldest_ticket(stekd_state *st, const char *group, uint32_t n, uint64_t *oldest);

/*
 * Names of epochs *first..last into g->names. A replica seeded from another
 * HSM's chain key mid-generation holds no keys below that key's epoch: then
 * *first moves up to its oldest key (current, epoch e, and next must exist;
 * the decrypt window fills in).
 */
static stek_status load_window(stekd_state *st, group_slot *g, uint32_t n, uint64_t e,
                               uint64_t *first, uint64_t last)
{
    stek_status status = load_names(st, g, n, *first, last);
    uint64_t oldest = 0;
    if (status == STEK_ERR_NOT_FOUND && oldest_ticket(st, g->cfg->name, n, &oldest) &&
        oldest > *first && oldest <= e) {
        *first = oldest;
        status = load_names(st, g, n, *first, last);
    }
    return status;
}

/* The oldest ticket key of (g, n) in the token. */
static bool oldest_ticket(stekd_state *st, const char *group, uint32_t n, uint64_t *oldest)
{
    stek_p11_object_info *o = NULL;
    size_t count = 0;
    if (stek_p11_list(st->p11, &o, &count) != STEK_OK)
        return false;
    bool found = false;
    for (size_t i = 0; i < count; i++) {
        if (o[i].kind == STEK_P11_KIND_TICKET && o[i].generation == n &&
            strcmp(o[i].group, group) == 0 && (!found || o[i].epoch < *oldest)) {
            *oldest = o[i].epoch;
            found = true;
        }
    }
    free(o);
    return found;
}

/*
 * Whether this token holds no ticket key of generation n yet: a generation
 * that `stekctl group add`, `rekey` or `import-chain` has just made, whose
 * chain key still sits at the epoch it was made or exported at.
 */
static stek_status generation_fresh(stekd_state *st, const char *group, uint32_t n, bool *fresh)
{
    stek_p11_object_info *o = NULL;
    size_t count = 0;
    STEK_GUARD(stek_p11_list(st->p11, &o, &count));
    *fresh = true;
    for (size_t i = 0; i < count && *fresh; i++)
        if (o[i].kind == STEK_P11_KIND_TICKET && o[i].generation == n &&
            strcmp(o[i].group, group) == 0)
            *fresh = false;
    free(o);
    return STEK_OK;
}

/* One group's refresh. Returns the Unix time of its next rotation. */
static int64_t refresh_group(stekd_state *st, group_slot *g, int64_t now)
{
    const stekd_group_cfg *cfg = g->cfg;
    const stek_sched *s = &cfg->sched;
    int64_t next = stek_sched_next_rotation(s, now);
    uint64_t e;
    if (stek_sched_epoch_at(s, now, &e) != STEK_OK) {
        publish_unavailable(st, g, "the schedule has not started (origin in the future)");
        return next;
    }

    stek_p11_generation *gens = NULL;
    size_t n_gens = 0;
    stek_status status = stek_p11_generation_list(st->p11, cfg->name, &gens, &n_gens);
    if (status != STEK_OK || n_gens == 0) {
        free(gens);
        publish_unavailable(st, g, "%s",
                            status != STEK_OK ? stek_error_detail()
                                              : "not initialized (run stekctl group add)");
        return next;
    }
    uint32_t n = gens[n_gens - 1].generation;
    int64_t gen_start = gens[n_gens - 1].start;
    free(gens);
    uint64_t gen_first = 0;
    if (stek_sched_epoch_at(s, gen_start, &gen_first) != STEK_OK)
        gen_first = 0;

    uint64_t newest = 0;
    status = stek_p11_chain_newest(st->p11, cfg->name, n, &newest);
    if (status != STEK_OK) {
        publish_unavailable(st, g, "%s", stek_error_detail());
        return next;
    }
    /* K(e+1), the next key, must exist, and K(e+2) for building the next
     * epoch's sets ahead (schedule.h): the chain must reach e+3. */
    uint64_t target = e + STEK_SCHED_CHAIN_LEAD;
    if (target > newest) {
        /*
         * max_jump guards keys hosts may be using: a clock run ahead must
         * not ratchet them away. A generation with no ticket key in this
         * token has none in use here (just made by stekctl, or seeded into
         * this replica), so it advances to the schedule however far that
         * is: otherwise an epoch boundary between a rekey and the next
         * refresh would leave the group refused.
         */
        bool fresh = false;
        if (target - newest > st->cfg->max_jump &&
            generation_fresh(st, cfg->name, n, &fresh) != STEK_OK) {
            publish_unavailable(st, g, "%s", stek_error_detail());
            return next;
        }
        if (fresh)
            stek_log(STEK_LOG_INFO, "stekd",
                     "group %s: generation %u has no key yet; advancing its chain %llu epochs",
                     cfg->name, (unsigned)n, (unsigned long long)(target - newest));
        if (target - newest > st->cfg->max_jump && !fresh) {
            char why[160];
            snprintf(why, sizeof(why),
                     "refusing to advance %llu epochs past the newest chain key (max_jump %u); "
                     "check this replica's clock, then run stekctl advance",
                     (unsigned long long)(target - newest), st->cfg->max_jump);
            if (!g->alarmed) {
                stek_log(STEK_LOG_ERROR, "stekd", "ALARM group %s: %s", cfg->name, why);
                atomic_fetch_add(&g->jumps_refused, 1);
            }
            g->alarmed = true;
            atomic_store(&g->refusing, true);
            publish_unavailable(st, g, "%s", why);
            return next;
        }
        /* In slices, dropping what falls out of the window as it goes: one
         * long ratchet call costs the square of its length, and a long jump
         * would otherwise fill the token with keys already expired. */
        uint64_t win_first, win_last;
        stek_sched_window(s, e, gen_first, &win_first, &win_last);
        for (uint64_t at = newest; at < target && status == STEK_OK;) {
            uint64_t to = target - at > RATCHET_SLICE ? at + RATCHET_SLICE : target;
            status = stek_p11_ratchet_advance(st->p11, cfg->name, n, to);
            unsigned dropped = 0;
            if (status == STEK_OK && to < target)
                status = stek_p11_ticket_destroy_before(st->p11, cfg->name, n, win_first, &dropped);
            at = to;
        }
        if (status != STEK_OK) {
            publish_unavailable(st, g, "%s", stek_error_detail());
            return next;
        }
    }
    g->alarmed = false;
    atomic_store(&g->refusing, false);

    uint64_t first, last, window_first;
    stek_sched_window(s, e, gen_first, &first, &last);
    window_first = first;
    /* An older generation's keys stop being served the moment a newer one
     * exists; `stekctl rekey` destroys them. The names run one past the
     * window, to K(e+2), for the staged view; without K(e+2) (not expected
     * after the ratchet above) the view is served without one. */
    status = load_window(st, g, n, e, &first, last + 1);
    bool staged = status == STEK_OK;
    if (status == STEK_ERR_NOT_FOUND)
        status = load_window(st, g, n, e, &first, last);
    if (status != STEK_OK) {
        publish_unavailable(st, g, "%s", stek_error_detail());
        return next;
    }

    stekd_view *v = window_view(cfg, n, gen_start, e, g->names, (size_t)(last - first + 1));
    if (v == NULL)
        return next;
    if (staged) {
        /* What epoch e+1 will publish: its window, from this one's first
         * key at the earliest (a seeded replica's), to K(e+2). */
        uint64_t sfirst, slast;
        stek_sched_window(s, e + 1, gen_first, &sfirst, &slast);
        if (sfirst < first)
            sfirst = first;
        v->staged = window_view(cfg, n, gen_start, e + 1, g->names + (sfirst - first),
                                (size_t)(slast - sfirst + 1));
    }
    publish(st, g, v);

    /*
     * Keys past the window go from the HSM, right after the view that no
     * longer names them is out: a build that took the previous view and
     * finds its oldest key gone then sees a newer view to build from
     * (stekd_handle_keyset). Hosts drop such keys on their own.
     */
    unsigned destroyed = 0;
    status = stek_p11_ticket_destroy_before(st->p11, cfg->name, n, window_first, &destroyed);
    if (status != STEK_OK)
        publish_unavailable(st, g, "%s", stek_error_detail());
    else if (destroyed > 0)
        stek_log(STEK_LOG_INFO, "stekd", "group %s: destroyed %u expired key(s) below epoch %llu",
                 cfg->name, destroyed, (unsigned long long)window_first);
    return next;
}

int64_t stekd_state_refresh(stekd_state *st, int64_t now)
{
    int64_t next = now + 3600;
    for (size_t i = 0; i < st->n_groups; i++) {
        int64_t t = refresh_group(st, &st->groups[i], now);
        if (t < next)
            next = t;
    }
    return next;
}
