/*
 * The keyring: immutable snapshots of ticket keys and their publication
 * (see keyring.h for the grace-period scheme).
 */
#include "keyring.h"

#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- clocks ------------------------------------------------------------------ */

static int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t stek_boottime_ns(void)
{
    return clock_ns(CLOCK_BOOTTIME);
}

int64_t stek_walltime_ns(void)
{
    return clock_ns(CLOCK_REALTIME);
}

/* ---- deadlines ----------------------------------------------------------------- */

/* a + b - c, saturated to [INT64_MIN, INT64_MAX]. */
static int64_t add_sub_sat(int64_t a, int64_t b, int64_t c)
{
    __int128 v = (__int128)a + b - c;
    if (v > INT64_MAX)
        return INT64_MAX;
    if (v < INT64_MIN)
        return INT64_MIN;
    return (int64_t)v;
}

stek_status stek_ring_deadlines(const stek_accepted_set *set, int64_t boot_now, int64_t wall_now,
                                stek_ring_key *keys)
{
    STEK_ENSURE_REF(set);
    STEK_ENSURE_REF(keys);
    STEK_ENSURE(set->n_keys == 0 || set->keys != NULL, STEK_ERR_INVALID_ARG);
    /* The later of the two is the conservative base: a key's remaining life
     * is the smaller of what the service said (as of issued_at) and what
     * our wall clock says. */
    const int64_t base = set->issued_at > wall_now ? set->issued_at : wall_now;
    for (size_t i = 0; i < set->n_keys; i++) {
        const stek_accepted_key *k = &set->keys[i];
        keys[i] = (stek_ring_key){
            .epoch = k->epoch,
            .group = 0,
            .enc_from = add_sub_sat(boot_now, k->not_before, base),
            .enc_until = add_sub_sat(boot_now, k->encrypt_until, base),
            .dec_until = add_sub_sat(boot_now, k->decrypt_until, base),
        };
    }
    return STEK_OK;
}

/* ---- snapshots ----------------------------------------------------------------- */

void stek_ring_free(stek_ring *r)
{
    if (r == NULL)
        return;
    stek_secret_free(r->material); /* cleanses */
    free(r->keys);
    free(r->by_name);
    free(r);
}

int stek_ring_group_index(const stek_ring *r, const char *group)
{
    if (r == NULL || group == NULL)
        return -1;
    for (size_t g = 0; g < r->n_groups; g++)
        if (strcmp(r->groups[g].name, group) == 0)
            return (int)g;
    return -1;
}

/* qsort has no context argument: the material is passed through a
 * thread-local (builds run on the writer only, never in the callback). */
static _Thread_local const uint8_t *sort_material;

static int cmp_by_name(const void *a, const void *b)
{
    uint32_t ia = *(const uint32_t *)a, ib = *(const uint32_t *)b;
    return memcmp(sort_material + (size_t)ia * STEK_RING_ENTRY_BYTES,
                  sort_material + (size_t)ib * STEK_RING_ENTRY_BYTES, STEK_RING_NAME_BYTES);
}

/* Binary search of by_name: the key's index, or -1. */
static long find_name(const stek_ring *r, const uint8_t *name)
{
    size_t lo = 0, hi = r->n_keys;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint32_t i = r->by_name[mid];
        int c = memcmp(name, stek_ring_entry(r, i), STEK_RING_NAME_BYTES);
        if (c == 0)
            return (long)i;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

static bool name_in(const stek_ring *r, const uint8_t *name)
{
    return find_name(r, name) >= 0;
}

static void remember(stek_ring *r, const uint8_t *name, uint8_t why)
{
    for (size_t i = 0; i < r->n_gone; i++)
        if (memcmp(r->gone[i].name, name, STEK_RING_NAME_BYTES) == 0)
            return;
    if (r->n_gone == STEK_RING_GONE_MAX)
        return; /* full: callers add the newest first, so the oldest drop off */
    memcpy(r->gone[r->n_gone].name, name, STEK_RING_NAME_BYTES);
    r->gone[r->n_gone].why = why;
    r->n_gone++;
}

static stek_status check_input(const stek_ring_input *in)
{
    STEK_ENSURE_REF(in->group);
    STEK_GUARD(stek_group_name_check(in->group));
    STEK_ENSURE(in->n_keys <= STEK_ACCEPT_MAX_KEYS, STEK_ERR_INVALID_ARG);
    STEK_ENSURE(in->n_keys == 0 || (in->keys != NULL && in->entries != NULL), STEK_ERR_INVALID_ARG);
    for (size_t i = 1; i < in->n_keys; i++)
        STEK_ENSURE(in->keys[i - 1].epoch < in->keys[i].epoch, STEK_ERR_INVALID_ARG);
    return STEK_OK;
}

stek_status stek_ring_build(const stek_ring *prev, const stek_ring_input *update, int64_t boot_now,
                            stek_ring **out)
{
    stek_status st = STEK_OK;
    stek_ring *r = NULL;
    STEK_ENSURE_REF(out);
    *out = NULL;
    if (update != NULL)
        STEK_GUARD(check_input(update));

    r = calloc(1, sizeof(*r));
    STEK_ENSURE_GOTO(r != NULL, STEK_ERR_NOMEM);
    r->seq = prev != NULL ? prev->seq + 1 : 1;

    /* The groups: prev's in order, the update's replacing or appended. */
    int upd_prev = -1;
    size_t upd_g = 0;
    if (prev != NULL) {
        r->n_groups = prev->n_groups;
        memcpy(r->groups, prev->groups, sizeof(r->groups));
        if (update != NULL)
            upd_prev = stek_ring_group_index(prev, update->group);
    }
    if (update != NULL) {
        if (upd_prev >= 0) {
            upd_g = (size_t)upd_prev;
        } else {
            STEK_ENSURE_GOTO(r->n_groups < STEK_RING_MAX_GROUPS, STEK_ERR_INVALID_ARG);
            upd_g = r->n_groups++;
            memset(&r->groups[upd_g], 0, sizeof(r->groups[upd_g]));
            strcpy(r->groups[upd_g].name, update->group); /* length checked */
        }
        r->groups[upd_g].generation = update->generation;
        r->groups[upd_g].current_epoch = update->current_epoch;
    }

    /* Count what survives. */
    size_t cap = 0;
    for (size_t g = 0; g < r->n_groups; g++) {
        if (update != NULL && g == upd_g)
            cap += update->n_keys;
        else if (prev != NULL && g < prev->n_groups)
            cap += prev->groups[g].count;
    }
    if (cap > 0) {
        r->keys = calloc(cap, sizeof(*r->keys));
        r->by_name = calloc(cap, sizeof(*r->by_name));
        STEK_ENSURE_GOTO(r->keys != NULL && r->by_name != NULL, STEK_ERR_NOMEM);
        STEK_GUARD_GOTO(stek_secret_new(cap * STEK_RING_ENTRY_BYTES, &r->material));
    }
    uint8_t *mat = r->material != NULL ? stek_secret_data(r->material) : NULL;
    size_t n = 0;
    for (size_t g = 0; g < r->n_groups; g++) {
        const stek_ring_key *src;
        const uint8_t *src_mat;
        size_t count;
        if (update != NULL && g == upd_g) {
            src = update->keys;
            src_mat = update->entries;
            count = update->n_keys;
        } else {
            src = prev->keys + prev->groups[g].first;
            src_mat = stek_ring_entry(prev, prev->groups[g].first);
            count = prev->groups[g].count;
        }
        r->groups[g].first = n;
        /* Whether this update continues a generation this host already
         * holds keys of (not its first set, not a rekey). */
        const bool continues = update != NULL && g == upd_g && upd_prev >= 0 &&
                               prev->groups[upd_prev].generation == update->generation &&
                               prev->groups[upd_prev].count > 0;
        for (size_t i = 0; i < count; i++) {
            if (src[i].dec_until <= boot_now)
                continue; /* expired: dropped (and its name remembered below) */
            r->keys[n] = src[i];
            r->keys[n].group = (uint32_t)g;
            /*
             * A key already due to encrypt that this host never held, not
             * even as `next` (the service was out of reach across an epoch
             * boundary), would make tickets that peers still on the older
             * set cannot decrypt. It waits min(epoch/2, 10 s) while an older
             * key of the generation that this host held still decrypts;
             * that key encrypts meanwhile, and every peer has it.
             */
            if (continues && src[i].enc_from <= boot_now &&
                !name_in(prev, src_mat + i * STEK_RING_ENTRY_BYTES)) {
                /* Half an epoch at most: the key must still get its turn. */
                int64_t half = (src[i].enc_until - src[i].enc_from) / 2;
                int64_t grace =
                    half > 0 && half < STEK_RING_UNSEEN_GRACE_NS ? half : STEK_RING_UNSEEN_GRACE_NS;
                bool older = false;
                for (size_t j = r->groups[g].first; j < n && !older; j++)
                    older = r->keys[j].dec_until > boot_now + grace &&
                            name_in(prev, mat + j * STEK_RING_ENTRY_BYTES);
                if (older)
                    r->keys[n].enc_from = boot_now + grace;
            }
            memcpy(mat + n * STEK_RING_ENTRY_BYTES, src_mat + i * STEK_RING_ENTRY_BYTES,
                   STEK_RING_ENTRY_BYTES);
            r->by_name[n] = (uint32_t)n;
            n++;
        }
        r->groups[g].count = n - r->groups[g].first;
    }
    r->n_keys = n;
    if (n > 1) {
        sort_material = mat;
        qsort(r->by_name, n, sizeof(*r->by_name), cmp_by_name);
        sort_material = NULL;
    }

    /* Names that leave now, then the ones remembered before. */
    if (prev != NULL) {
        for (size_t i = 0; i < prev->n_keys; i++) {
            const uint8_t *name = stek_ring_entry(prev, i);
            if (name_in(r, name))
                continue;
            const stek_ring_group *pg = &prev->groups[prev->keys[i].group];
            int ng = stek_ring_group_index(r, pg->name);
            bool other_gen = ng >= 0 && r->groups[ng].generation != pg->generation &&
                             prev->keys[i].dec_until > boot_now;
            remember(r, name, other_gen ? STEK_RING_GONE_OTHER_GENERATION : STEK_RING_GONE_EXPIRED);
        }
        for (size_t i = 0; i < prev->n_gone; i++)
            if (!name_in(r, prev->gone[i].name))
                remember(r, prev->gone[i].name, prev->gone[i].why);
    }
    *out = r;
    r = NULL;
done:
    stek_ring_free(r);
    return st;
}

long stek_ring_encrypt_key(const stek_ring *r, uint32_t g, int64_t boot_now, bool *stale)
{
    *stale = false;
    if (r == NULL || g >= r->n_groups)
        return -1;
    const stek_ring_group *grp = &r->groups[g];
    /* Newest first: the newest key that has started and still decrypts. */
    for (size_t j = grp->count; j-- > 0;) {
        const stek_ring_key *k = &r->keys[grp->first + j];
        if (k->enc_from <= boot_now && boot_now < k->dec_until) {
            *stale = boot_now >= k->enc_until;
            return (long)(grp->first + j);
        }
    }
    return -1;
}

stek_ring_lookup stek_ring_decrypt_key(const stek_ring *r, const uint8_t name[STEK_RING_NAME_BYTES],
                                       int64_t boot_now, long *index)
{
    *index = -1;
    if (r == NULL)
        return STEK_RING_MISS_UNKNOWN;
    long i = find_name(r, name);
    if (i >= 0) {
        const stek_ring_key *k = &r->keys[i];
        /* Past its deadline but not yet dropped (the next publish drops
         * it): never used. */
        if (boot_now >= k->dec_until)
            return STEK_RING_MISS_EXPIRED;
        *index = i;
        bool stale = false;
        return stek_ring_encrypt_key(r, k->group, boot_now, &stale) == i ? STEK_RING_FOUND_CURRENT
                                                                         : STEK_RING_FOUND_OTHER;
    }
    for (size_t j = 0; j < r->n_gone; j++)
        if (memcmp(r->gone[j].name, name, STEK_RING_NAME_BYTES) == 0)
            return r->gone[j].why == STEK_RING_GONE_OTHER_GENERATION
                       ? STEK_RING_MISS_OTHER_GENERATION
                       : STEK_RING_MISS_EXPIRED;
    return STEK_RING_MISS_UNKNOWN;
}

/* ---- publication ----------------------------------------------------------------- */

struct stek_keyring {
    _Atomic(stek_ring *) current;
    atomic_uint phase;
    /* Separate cache lines: readers of one phase do not slow the other. */
    struct {
        atomic_ulong n;
        char pad[64 - sizeof(atomic_ulong)];
    } active[2] __attribute__((aligned(64)));
    stek_keyring_retire_hook hook;
    void *hook_arg;
};

stek_status stek_keyring_new(stek_keyring **out)
{
    STEK_ENSURE_REF(out);
    stek_keyring *kr = aligned_alloc(64, (sizeof(*kr) + 63) / 64 * 64);
    STEK_ENSURE(kr != NULL, STEK_ERR_NOMEM);
    memset(kr, 0, sizeof(*kr));
    atomic_init(&kr->current, NULL);
    atomic_init(&kr->phase, 0);
    atomic_init(&kr->active[0].n, 0);
    atomic_init(&kr->active[1].n, 0);
    *out = kr;
    return STEK_OK;
}

const stek_ring *stek_keyring_read_begin(stek_keyring *kr, unsigned *slot)
{
    unsigned p = atomic_load(&kr->phase) & 1u;
    atomic_fetch_add(&kr->active[p].n, 1);
    *slot = p;
    return atomic_load(&kr->current);
}

void stek_keyring_read_end(stek_keyring *kr, unsigned slot)
{
    atomic_fetch_sub(&kr->active[slot & 1u].n, 1);
}

const stek_ring *stek_keyring_peek(const stek_keyring *kr)
{
    return atomic_load(&((stek_keyring *)kr)->current);
}

static void drain(stek_keyring *kr, unsigned p)
{
    /* Readers stay microseconds: spin briefly, then yield. */
    for (unsigned spins = 0; atomic_load(&kr->active[p].n) != 0; spins++) {
        if (spins < 64)
            continue;
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

static void retire(stek_keyring *kr, stek_ring *old)
{
    if (old == NULL)
        return;
    if (old->material != NULL)
        stek_cleanse(stek_secret_data(old->material), stek_secret_len(old->material));
    if (kr->hook != NULL)
        kr->hook(kr->hook_arg, old);
    stek_ring_free(old);
}

void stek_keyring_publish(stek_keyring *kr, stek_ring *r)
{
    stek_ring *old = atomic_exchange(&kr->current, r);
    if (old == NULL)
        return;
    unsigned p = atomic_load(&kr->phase) & 1u;
    atomic_store(&kr->phase, p ^ 1u);
    drain(kr, p);
    atomic_store(&kr->phase, p);
    drain(kr, p ^ 1u);
    retire(kr, old);
}

void stek_keyring_set_retire_hook(stek_keyring *kr, stek_keyring_retire_hook fn, void *arg)
{
    kr->hook = fn;
    kr->hook_arg = arg;
}

void stek_keyring_free(stek_keyring *kr)
{
    if (kr == NULL)
        return;
    stek_keyring_publish(kr, NULL);
    free(kr);
}
