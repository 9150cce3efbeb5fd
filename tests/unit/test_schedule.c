/*
 * schedule.h: epoch arithmetic at its exact boundary seconds, the bounds
 * stek_sched_check enforces, and saturation where int64 runs out.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "schedule.h"

#define HOUR INT64_C(3600)
#define DAY (24 * HOUR)
#define MAX_SPAN UINT64_C(2592000)      /* 30 days */
#define MAX_ORIGIN INT64_C(7258118400)  /* 2200-01-01T00:00:00Z */
#define EPOCH_LIMIT (UINT64_C(1) << 48) /* the epochs the header promises */
#define T0_DEFAULT INT64_C(1704067200)  /* 2024-01-01T00:00:00Z */

/* DESIGN.md's defaults: P = 1 h, L = 18 h. */
static const stek_sched DEFAULTS = {T0_DEFAULT, 3600, 18 * 3600};
/* Small numbers for readable tables: T0 = 1000, P = 60, L = 150 (not a multiple). */
static const stek_sched SMALL = {1000, 60, 150};

static void test_check_accepts(void **state)
{
    (void)state;
    assert_int_equal(stek_sched_check(&DEFAULTS), STEK_OK);
    assert_int_equal(stek_sched_check(&SMALL), STEK_OK);
    const stek_sched ok[] = {
        {0, 1, 0},                        /* smallest everything */
        {MAX_ORIGIN, MAX_SPAN, MAX_SPAN}, /* largest everything */
        {T0_DEFAULT, 5, 0},               /* the demo: seconds, no lifetime */
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        assert_int_equal(stek_sched_check(&ok[i]), STEK_OK);
}

static void test_check_rejects(void **state)
{
    (void)state;
    const stek_sched bad[] = {
        {T0_DEFAULT, 0, 0},               /* P = 0 */
        {T0_DEFAULT, MAX_SPAN + 1, 0},    /* P over 30 days */
        {T0_DEFAULT, UINT64_MAX, 0},      /* P absurd */
        {T0_DEFAULT, 3600, MAX_SPAN + 1}, /* L over 30 days */
        {T0_DEFAULT, 3600, UINT64_MAX},   /* L absurd */
        {-1, 3600, 0},                    /* origin before 1970 */
        {INT64_MIN, 3600, 0},
        {MAX_ORIGIN + 1, 3600, 0}, /* origin after 2200 */
        {INT64_MAX, 3600, 0},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(stek_sched_check(&bad[i]), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_sched_check(NULL), STEK_ERR_INVALID_ARG);
}

static void test_epoch_at_boundaries(void **state)
{
    (void)state;
    const struct {
        const stek_sched *s;
        uint64_t e;
    } rows[] = {
        {&SMALL, 1},    {&SMALL, 2},           {&SMALL, 1000},
        {&DEFAULTS, 1}, {&DEFAULTS, 24 * 365}, {&DEFAULTS, EPOCH_LIMIT - 1},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const stek_sched *s = rows[i].s;
        uint64_t e = rows[i].e, got = 0;
        int64_t start = s->origin + (int64_t)(e * s->epoch_s);
        assert_int_equal(stek_sched_epoch_at(s, start - 1, &got), STEK_OK);
        assert_int_equal(got, e - 1);
        assert_int_equal(stek_sched_epoch_at(s, start, &got), STEK_OK);
        assert_int_equal(got, e);
        assert_int_equal(stek_sched_epoch_at(s, start + (int64_t)s->epoch_s - 1, &got), STEK_OK);
        assert_int_equal(got, e);
    }
    uint64_t got = 99;
    assert_int_equal(stek_sched_epoch_at(&SMALL, SMALL.origin, &got), STEK_OK);
    assert_int_equal(got, 0);
    /* The far end of int64 is still an epoch, not an overflow. */
    assert_int_equal(stek_sched_epoch_at(&DEFAULTS, INT64_MAX, &got), STEK_OK);
    assert_int_equal(got, (uint64_t)(INT64_MAX - T0_DEFAULT) / 3600);
}

static void test_epoch_at_rejects(void **state)
{
    (void)state;
    uint64_t got = 99;
    assert_int_equal(stek_sched_epoch_at(&SMALL, SMALL.origin - 1, &got), STEK_ERR_INVALID_ARG);
    assert_int_equal(got, 0);
    assert_int_equal(stek_sched_epoch_at(&SMALL, INT64_MIN, &got), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_sched_epoch_at(&DEFAULTS, 0, &got), STEK_ERR_INVALID_ARG);
    const stek_sched zero_p = {1000, 0, 0};
    assert_int_equal(stek_sched_epoch_at(&zero_p, 5000, &got), STEK_ERR_INVALID_ARG);
    const stek_sched neg_origin = {-100, 60, 0};
    assert_int_equal(stek_sched_epoch_at(&neg_origin, 5000, &got), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_sched_epoch_at(NULL, 5000, &got), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_sched_epoch_at(&SMALL, 5000, NULL), STEK_ERR_INVALID_ARG);
}

static void test_key_times(void **state)
{
    (void)state;
    stek_key_times kt;
    stek_sched_key_times(&SMALL, 0, &kt);
    assert_int_equal(kt.not_before, 1000);
    assert_int_equal(kt.encrypt_until, 1060);
    assert_int_equal(kt.decrypt_until, 1210);
    stek_sched_key_times(&SMALL, 7, &kt);
    assert_int_equal(kt.not_before, 1420);
    assert_int_equal(kt.encrypt_until, 1480);
    assert_int_equal(kt.decrypt_until, 1630);
    stek_sched_key_times(&DEFAULTS, 10, &kt);
    assert_int_equal(kt.not_before, T0_DEFAULT + 10 * HOUR);
    assert_int_equal(kt.encrypt_until, T0_DEFAULT + 11 * HOUR);
    assert_int_equal(kt.decrypt_until, T0_DEFAULT + 29 * HOUR);
    const stek_sched no_life = {T0_DEFAULT, 3600, 0};
    stek_sched_key_times(&no_life, 10, &kt);
    assert_int_equal(kt.encrypt_until, kt.decrypt_until);
}

static void test_key_times_exact_at_limits(void **state)
{
    (void)state;
    /* The largest P for which every epoch below 2^48 is exact at the worst T0 and L. */
    const stek_sched s = {MAX_ORIGIN, 32767, MAX_SPAN};
    const uint64_t e = EPOCH_LIMIT - 1;
    stek_key_times kt;
    stek_sched_key_times(&s, e, &kt);
    assert_int_equal(kt.not_before, MAX_ORIGIN + (int64_t)(e * 32767));
    assert_int_equal(kt.encrypt_until, MAX_ORIGIN + (int64_t)((e + 1) * 32767));
    assert_int_equal(kt.decrypt_until, MAX_ORIGIN + (int64_t)((e + 1) * 32767) + (int64_t)MAX_SPAN);
    assert_true(kt.decrypt_until < INT64_MAX);
}

static void test_key_times_saturate(void **state)
{
    (void)state;
    /* 2^48 epochs of 30 days are 2^70 seconds: no int64 holds that; saturate, never wrap. */
    const stek_sched s = {MAX_ORIGIN, MAX_SPAN, MAX_SPAN};
    const uint64_t epochs[] = {EPOCH_LIMIT - 1, EPOCH_LIMIT, UINT64_MAX / MAX_SPAN, UINT64_MAX - 1,
                               UINT64_MAX};
    for (size_t i = 0; i < sizeof(epochs) / sizeof(epochs[0]); i++) {
        stek_key_times kt;
        stek_sched_key_times(&s, epochs[i], &kt);
        assert_int_equal(kt.not_before, INT64_MAX);
        assert_int_equal(kt.encrypt_until, INT64_MAX);
        assert_int_equal(kt.decrypt_until, INT64_MAX);
        assert_int_equal(stek_sched_state(&s, epochs[i], INT64_MAX - 1), STEK_KEY_NEXT);
    }
    /* The last epoch that fits: decrypt_until saturates first, the order holds. */
    const uint64_t last = (uint64_t)(INT64_MAX - MAX_ORIGIN) / MAX_SPAN - 1;
    stek_key_times kt;
    stek_sched_key_times(&s, last, &kt);
    assert_int_equal(kt.not_before, MAX_ORIGIN + (int64_t)(last * MAX_SPAN));
    assert_int_equal(kt.encrypt_until, MAX_ORIGIN + (int64_t)((last + 1) * MAX_SPAN));
    assert_int_equal(kt.decrypt_until, INT64_MAX);
    assert_true(kt.not_before <= kt.encrypt_until && kt.encrypt_until <= kt.decrypt_until);
}

static void test_state_transitions(void **state)
{
    (void)state;
    const stek_sched *s = &SMALL;
    const uint64_t e = 7;
    stek_key_times kt;
    stek_sched_key_times(s, e, &kt);
    const int64_t p = (int64_t)s->epoch_s;
    const struct {
        int64_t t;
        stek_key_state want;
    } rows[] = {
        {INT64_MIN, STEK_KEY_NEXT},             /* long before T0: documented as NEXT */
        {s->origin - 1, STEK_KEY_NEXT},         /* before T0 */
        {kt.not_before - p - 1, STEK_KEY_NEXT}, /* epoch e-2 */
        {kt.not_before - p, STEK_KEY_NEXT},     /* epoch e-1 starts */
        {kt.not_before - 1, STEK_KEY_NEXT},
        {kt.not_before, STEK_KEY_CURRENT},
        {kt.encrypt_until - 1, STEK_KEY_CURRENT},
        {kt.encrypt_until, STEK_KEY_DECRYPT_ONLY},
        {kt.decrypt_until - 1, STEK_KEY_DECRYPT_ONLY},
        {kt.decrypt_until, STEK_KEY_EXPIRED},
        {INT64_MAX, STEK_KEY_EXPIRED},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        assert_int_equal(stek_sched_state(s, e, rows[i].t), rows[i].want);

    /* L = 0: straight from CURRENT to EXPIRED. */
    const stek_sched no_life = {1000, 60, 0};
    stek_sched_key_times(&no_life, e, &kt);
    assert_int_equal(stek_sched_state(&no_life, e, kt.encrypt_until - 1), STEK_KEY_CURRENT);
    assert_int_equal(stek_sched_state(&no_life, e, kt.encrypt_until), STEK_KEY_EXPIRED);

    /* Epoch 0 at T0 itself. */
    assert_int_equal(stek_sched_state(s, 0, s->origin - 1), STEK_KEY_NEXT);
    assert_int_equal(stek_sched_state(s, 0, s->origin), STEK_KEY_CURRENT);
}

static void test_state_invalid_is_expired(void **state)
{
    (void)state;
    const stek_sched zero_p = {1000, 0, 100};
    const stek_sched neg_origin = {-1, 60, 100};
    assert_int_equal(stek_sched_state(&zero_p, 3, 1100), STEK_KEY_EXPIRED);
    assert_int_equal(stek_sched_state(&neg_origin, 3, 1100), STEK_KEY_EXPIRED);
    assert_int_equal(stek_sched_state(NULL, 3, 1100), STEK_KEY_EXPIRED);
    stek_key_times kt = {1, 2, 3};
    stek_sched_key_times(&zero_p, 3, &kt);
    assert_int_equal(kt.not_before, 0);
    assert_int_equal(kt.encrypt_until, 0);
    assert_int_equal(kt.decrypt_until, 0);
    stek_sched_key_times(&SMALL, 3, NULL); /* must not crash */
}

static void test_past_epochs(void **state)
{
    (void)state;
    const struct {
        uint64_t p, l, want;
    } rows[] = {
        {3600, 18 * 3600, 18},     /* DESIGN.md defaults: divisible */
        {3600, 18 * 3600 + 1, 19}, /* one second more needs one more key */
        {3600, 18 * 3600 - 1, 18},
        {60, 150, 3},
        {3600, 1, 1}, /* L < P */
        {3600, 0, 0},
        {1, MAX_SPAN, MAX_SPAN},
        {MAX_SPAN, MAX_SPAN, 1},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const stek_sched s = {T0_DEFAULT, rows[i].p, rows[i].l};
        assert_int_equal(stek_sched_past_epochs(&s), rows[i].want);
    }
    const stek_sched zero_p = {T0_DEFAULT, 0, 3600};
    assert_int_equal(stek_sched_past_epochs(&zero_p), 0);
    assert_int_equal(stek_sched_past_epochs(NULL), 0);
}

static void test_window(void **state)
{
    (void)state;
    uint64_t first = 0, last = 0;

    /* Defaults: next, current and 18 past: 20 keys. */
    stek_sched_window(&DEFAULTS, 1000, 0, &first, &last);
    assert_int_equal(first, 982);
    assert_int_equal(last, 1001);
    assert_int_equal(last - first + 1, 20);

    const struct {
        uint64_t e, floor, first, last;
    } rows[] = {
        {1000, 990, 990, 1001},   /* floor above e - past */
        {1000, 982, 982, 1001},   /* floor exactly e - past */
        {1000, 981, 982, 1001},   /* floor below: no effect */
        {1000, 1000, 1000, 1001}, /* generation starts now */
        {1000, 1001, 1001, 1001}, /* generation starts next epoch: only next */
        {18, 0, 0, 19},           /* e == past */
        {17, 0, 0, 18},           /* e < past: no underflow */
        {5, 0, 0, 6},
        {5, 3, 3, 6},
        {0, 0, 0, 1},
        {UINT64_MAX, 0, UINT64_MAX - 18, UINT64_MAX}, /* last does not wrap */
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        first = last = 12345;
        stek_sched_window(&DEFAULTS, rows[i].e, rows[i].floor, &first, &last);
        assert_int_equal(first, rows[i].first);
        assert_int_equal(last, rows[i].last);
    }

    /* A floor past next is an empty window, first > last. */
    stek_sched_window(&DEFAULTS, 1000, 1005, &first, &last);
    assert_int_equal(first, 1005);
    assert_int_equal(last, 1001);
    assert_true(first > last);

    /* L = 0: only current and next. */
    const stek_sched no_life = {T0_DEFAULT, 3600, 0};
    stek_sched_window(&no_life, 1000, 0, &first, &last);
    assert_int_equal(first, 1000);
    assert_int_equal(last, 1001);

    /* L not a multiple of P: ceil(150/60) = 3 past epochs. */
    stek_sched_window(&SMALL, 10, 0, &first, &last);
    assert_int_equal(first, 7);
    assert_int_equal(last, 11);

    stek_sched_window(&DEFAULTS, 1000, 0, NULL, NULL); /* must not crash */
}

/*
 * The window agrees with the states: at the start of epoch e every key in
 * it is alive (NEXT, CURRENT or DECRYPT_ONLY) and the key before it is
 * EXPIRED, whether or not L is a multiple of P.
 */
static void test_window_matches_states(void **state)
{
    (void)state;
    const stek_sched scheds[] = {DEFAULTS, SMALL, {1000, 7, 21}, {1000, 7, 20}, {1000, 7, 0}};
    for (size_t i = 0; i < sizeof(scheds) / sizeof(scheds[0]); i++) {
        const stek_sched *s = &scheds[i];
        for (uint64_t e = 0; e < 60; e++) {
            uint64_t first = 0, last = 0, at = 0;
            stek_key_times kt;
            stek_sched_key_times(s, e, &kt);
            assert_int_equal(stek_sched_epoch_at(s, kt.not_before, &at), STEK_OK);
            assert_int_equal(at, e);
            stek_sched_window(s, e, 0, &first, &last);
            assert_int_equal(stek_sched_state(s, last, kt.not_before), STEK_KEY_NEXT);
            assert_int_equal(stek_sched_state(s, e, kt.not_before), STEK_KEY_CURRENT);
            for (uint64_t k = first; k < e; k++)
                assert_int_equal(stek_sched_state(s, k, kt.not_before), STEK_KEY_DECRYPT_ONLY);
            if (first > 0)
                assert_int_equal(stek_sched_state(s, first - 1, kt.not_before), STEK_KEY_EXPIRED);
        }
    }
}

static void test_next_rotation(void **state)
{
    (void)state;
    const struct {
        const stek_sched *s;
        int64_t t, want;
    } rows[] = {
        {&SMALL, 1000, 1060}, /* at T0 */
        {&SMALL, 1059, 1060}, /* just before a boundary */
        {&SMALL, 1060, 1120}, /* at a boundary: the one after */
        {&SMALL, 1061, 1120},
        {&SMALL, 999, 1000}, /* before T0: T0 */
        {&SMALL, 0, 1000},
        {&SMALL, INT64_MIN, 1000},
        {&DEFAULTS, T0_DEFAULT + 5 * HOUR - 1, T0_DEFAULT + 5 * HOUR},
        {&DEFAULTS, T0_DEFAULT + 5 * HOUR, T0_DEFAULT + 6 * HOUR},
        {&DEFAULTS, T0_DEFAULT + 400 * DAY + 1, T0_DEFAULT + 400 * DAY + HOUR},
        {&DEFAULTS, INT64_MAX, INT64_MAX}, /* saturates: no rotation representable */
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        assert_int_equal(stek_sched_next_rotation(rows[i].s, rows[i].t), rows[i].want);

    const stek_sched zero_p = {1000, 0, 0};
    assert_int_equal(stek_sched_next_rotation(&zero_p, 5000), INT64_MAX);
    assert_int_equal(stek_sched_next_rotation(NULL, 5000), INT64_MAX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_accepts),
        cmocka_unit_test(test_check_rejects),
        cmocka_unit_test(test_epoch_at_boundaries),
        cmocka_unit_test(test_epoch_at_rejects),
        cmocka_unit_test(test_key_times),
        cmocka_unit_test(test_key_times_exact_at_limits),
        cmocka_unit_test(test_key_times_saturate),
        cmocka_unit_test(test_state_transitions),
        cmocka_unit_test(test_state_invalid_is_expired),
        cmocka_unit_test(test_past_epochs),
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_window_matches_states),
        cmocka_unit_test(test_next_rotation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
