#include "schedule.h"

#include <stdbool.h>
#include <stddef.h>

/*
 * Bounds that stek_sched_check enforces, and why they are enough:
 *
 *   0 <= T0 <= STEK_SCHED_MAX_ORIGIN (2200-01-01T00:00:00Z)
 *   1 <= P  <= STEK_SCHED_MAX_SPAN   (30 days, 2,592,000 s < 2^22)
 *   0 <= L  <= STEK_SCHED_MAX_SPAN
 *
 * T0 >= 0 makes t - T0 non-negative and free of overflow for every
 * t >= T0, so epoch_at is a plain unsigned division (floor division).
 * T0 + L < 2^33, so the largest time, T0 + (e+1)*P + L, fits in int64
 * exactly for e + 1 <= (INT64_MAX - T0max - Lmax) / P: every epoch below
 * 2^48 when P <= 32767 s (the default P = 1 h included), and every epoch
 * below 3.5e12 (292 billion years) when P = 30 days. Past that, e*P has no
 * int64 value at all, so times saturate at INT64_MAX ("never") instead of
 * wrapping: the arithmetic below uses checked builtins and never overflows
 * for any uint64 epoch, and the order not_before <= encrypt_until <=
 * decrypt_until always holds.
 *
 * The void and value-returning functions do not re-report invalid
 * parameters (they have no status); they stay free of undefined behaviour
 * and fail safe instead: a key of an invalid schedule is EXPIRED, its
 * times are 0, and it has no past epochs and no next rotation.
 */
#define STEK_SCHED_MAX_ORIGIN INT64_C(7258118400)
#define STEK_SCHED_MAX_SPAN UINT64_C(2592000)

static bool sched_valid(const stek_sched *s)
{
    return s != NULL && s->origin >= 0 && s->origin <= STEK_SCHED_MAX_ORIGIN && s->epoch_s > 0 &&
           s->epoch_s <= STEK_SCHED_MAX_SPAN && s->lifetime_s <= STEK_SCHED_MAX_SPAN;
}

/* T0 + n*P + extra, saturated at INT64_MAX; n may be any uint64. */
static int64_t sched_time(const stek_sched *s, uint64_t n, uint64_t extra)
{
    uint64_t off = 0;
    if (__builtin_mul_overflow(n, s->epoch_s, &off) || __builtin_add_overflow(off, extra, &off))
        return INT64_MAX;
    /* T0 >= 0, so T0 + off fits unless off alone is past INT64_MAX - T0. */
    if (off > (uint64_t)(INT64_MAX - s->origin))
        return INT64_MAX;
    return s->origin + (int64_t)off;
}

stek_status stek_sched_check(const stek_sched *s)
{
    STEK_ENSURE_REF(s);
    if (s->epoch_s == 0 || s->epoch_s > STEK_SCHED_MAX_SPAN)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "schedule: epoch length %llu s outside 1..%llu",
                  (unsigned long long)s->epoch_s, (unsigned long long)STEK_SCHED_MAX_SPAN);
    if (s->lifetime_s > STEK_SCHED_MAX_SPAN)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "schedule: decrypt lifetime %llu s over %llu",
                  (unsigned long long)s->lifetime_s, (unsigned long long)STEK_SCHED_MAX_SPAN);
    if (s->origin < 0 || s->origin > STEK_SCHED_MAX_ORIGIN)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "schedule: origin %lld outside 0..%lld",
                  (long long)s->origin, (long long)STEK_SCHED_MAX_ORIGIN);
    return STEK_OK;
}

stek_status stek_sched_epoch_at(const stek_sched *s, int64_t t, uint64_t *epoch)
{
    STEK_ENSURE_REF(epoch);
    *epoch = 0;
    STEK_GUARD(stek_sched_check(s));
    if (t < s->origin)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "schedule: time %lld is before the origin %lld",
                  (long long)t, (long long)s->origin);
    *epoch = (uint64_t)(t - s->origin) / s->epoch_s;
    return STEK_OK;
}

void stek_sched_key_times(const stek_sched *s, uint64_t e, stek_key_times *out)
{
    if (out == NULL)
        return;
    if (!sched_valid(s)) {
        *out = (stek_key_times){0, 0, 0};
        return;
    }
    out->not_before = sched_time(s, e, 0);
    /* e + 1 would wrap at UINT64_MAX; e*P + P saturates the same way. */
    out->encrypt_until = e == UINT64_MAX ? INT64_MAX : sched_time(s, e + 1, 0);
    out->decrypt_until = e == UINT64_MAX ? INT64_MAX : sched_time(s, e + 1, s->lifetime_s);
}

/*
 * Before not_before the key is NEXT, whether t is in epoch e-1 (where the
 * set publishes it) or earlier, before T0 included: a key nobody encrypts
 * with yet is at most decrypt-only, which is what NEXT means to a host.
 * Whether e is in the set at all is stek_sched_window's business.
 */
stek_key_state stek_sched_state(const stek_sched *s, uint64_t e, int64_t t)
{
    if (!sched_valid(s))
        return STEK_KEY_EXPIRED;
    stek_key_times kt;
    stek_sched_key_times(s, e, &kt);
    if (t < kt.not_before)
        return STEK_KEY_NEXT;
    if (t < kt.encrypt_until)
        return STEK_KEY_CURRENT;
    if (t < kt.decrypt_until)
        return STEK_KEY_DECRYPT_ONLY;
    return STEK_KEY_EXPIRED;
}

uint64_t stek_sched_past_epochs(const stek_sched *s)
{
    if (!sched_valid(s))
        return 0;
    /* L/P + (L%P != 0) is ceil without the overflow of (L + P - 1)/P. */
    return s->lifetime_s / s->epoch_s + (s->lifetime_s % s->epoch_s != 0);
}

void stek_sched_window(const stek_sched *s, uint64_t e, uint64_t floor_epoch, uint64_t *first,
                       uint64_t *last)
{
    uint64_t past = stek_sched_past_epochs(s);
    /* Epoch 0 is the first there is: a subtraction below it stops at 0. */
    uint64_t lo = e >= past ? e - past : 0;
    uint64_t hi = e == UINT64_MAX ? UINT64_MAX : e + 1;
    /*
     * A floor above e + 1 (a generation that starts after next) leaves
     * first > last: an empty window, which a first..last loop skips.
     */
    if (lo < floor_epoch)
        lo = floor_epoch;
    if (first != NULL)
        *first = lo;
    if (last != NULL)
        *last = hi;
}

int64_t stek_sched_next_rotation(const stek_sched *s, int64_t t)
{
    if (!sched_valid(s))
        return INT64_MAX;
    if (t < s->origin)
        return s->origin;
    /* t >= T0 >= 0: the division is a floor and e + 1 cannot wrap. */
    uint64_t e = (uint64_t)(t - s->origin) / s->epoch_s;
    return sched_time(s, e + 1, 0);
}
