/*
 * stekd under faults, each against a real stekd process and SoftHSM token:
 * a clock a day ahead, the token removed while serving, SIGKILL at a
 * rotation, and many watch streams connecting and dropping at random.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/rand.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "stek/v1/stek.pb-c.h"

#define EPOCH_S 3
#define LIFETIME_S 6
#define GET "/stek.v1.KeyService/GetKeySet"
#define WATCH "/stek.v1.KeyService/WatchKeySet"

static fx_stekd d;
static fx_cert host_cert;
static stek_host_eph *eph;
static uint8_t pub[STEK_P256_POINT_BYTES];
static uint8_t nonce[16];

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

static int setup(void **state)
{
    (void)state;
    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = "edge-a", .uri_sans = uris};
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_stekd_host_cert(&d, &o, &host_cert) != 0 || stek_host_eph_generate(&eph) != STEK_OK ||
        stek_host_eph_public(eph, pub) != STEK_OK || RAND_bytes(nonce, sizeof(nonce)) != 1)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    stek_host_eph_free(eph);
    fx_stekd_destroy(&d);
    return 0;
}

static fx_grpc *channel(void)
{
    fx_grpc *ch = NULL;
    assert_int_equal(fx_grpc_open(&ch, d.target, d.ca.cert_path, host_cert.cert_path,
                                  host_cert.key_path, "localhost"),
                     0);
    return ch;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A fetched set: epochs and unwrapped keys. */
typedef struct fetched {
    grpc_status_code status;
    char details[256];
    size_t n;
    uint64_t epochs[8];
    uint8_t keys[8][80];
    uint64_t current;
} fetched;

static void fetch(fx_grpc *ch, fetched *out)
{
    memset(out, 0, sizeof(*out));
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce),
                                     host_cert.key_path, &req, &len),
                     0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, GET, req, len, 10000, &r), 0);
    free(req);
    out->status = r.status;
    snprintf(out->details, sizeof(out->details), "%s", r.details);
    if (r.status == GRPC_STATUS_OK) {
        Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, r.body_len, r.body);
        assert_non_null(ks);
        Stek__V1__SignedKeySet *s =
            stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
        assert_non_null(s);
        stek_secret *kek = NULL;
        assert_int_equal(stek_host_kek_derive(eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len,
                                              s->group, (uint32_t)s->generation, &kek),
                         STEK_OK);
        assert_true(s->n_keys <= 8);
        out->n = s->n_keys;
        for (size_t i = 0; i < s->n_keys; i++) {
            stek_secret *k = NULL;
            assert_int_equal(
                stek_host_unwrap(kek, s->keys[i]->wrapped.data, s->keys[i]->wrapped.len, &k),
                STEK_OK);
            out->epochs[i] = s->keys[i]->epoch;
            memcpy(out->keys[i], stek_secret_data(k), 80);
            if (s->keys[i]->state == STEK__V1__KEY_STATE__KEY_STATE_CURRENT)
                out->current = s->keys[i]->epoch;
            stek_secret_free(k);
        }
        stek_secret_free(kek);
        stek__v1__signed_key_set__free_unpacked(s, NULL);
        stek__v1__key_set__free_unpacked(ks, NULL);
    }
    fx_grpc_result_free(&r);
}

/* Keys of epochs both sets hold must be identical; returns how many. */
static size_t same_keys(const fetched *a, const fetched *b)
{
    size_t common = 0;
    for (size_t i = 0; i < a->n; i++)
        for (size_t j = 0; j < b->n; j++)
            if (a->epochs[i] == b->epochs[j]) {
                assert_memory_equal(a->keys[i], b->keys[j], 80);
                common++;
            }
    return common;
}

typedef struct poll_arg {
    fx_grpc *ch;
    grpc_status_code want;
    fetched last;
} poll_arg;

static bool status_is(void *arg)
{
    poll_arg *p = arg;
    fetch(p->ch, &p->last);
    return p->last.status == p->want;
}

static int health(fx_grpc *ch)
{
    int serving = -1;
    grpc_status_code st;
    return fx_grpc_health(ch, "", 5000, &serving, &st);
}

static void restart(const char *clock_offset)
{
    int code = -1;
    if (d.pid > 0)
        assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    if (clock_offset)
        setenv("STEKD_TEST_CLOCK_OFFSET", clock_offset, 1);
    else
        unsetenv("STEKD_TEST_CLOCK_OFFSET");
    assert_int_equal(fx_stekd_start(&d), 0);
    unsetenv("STEKD_TEST_CLOCK_OFFSET");
}

/*
 * A replica whose clock runs a day ahead refuses to advance the chain past
 * max_jump: UNAVAILABLE, NOT_SERVING, and no key destroyed.
 */
static void test_clock_ahead_refuses(void **state)
{
    (void)state;
    restart(NULL);
    fx_grpc *ch = channel();
    fetched before;
    fetch(ch, &before);
    assert_int_equal(before.status, GRPC_STATUS_OK);
    fx_grpc_close(ch);

    restart("86400");
    ch = channel();
    fetched ahead;
    fetch(ch, &ahead);
    assert_int_equal(ahead.status, GRPC_STATUS_UNAVAILABLE);
    assert_non_null(strstr(ahead.details, "refusing to advance"));
    assert_int_equal(health(ch), 2); /* NOT_SERVING */
    fx_grpc_close(ch);

    /* Back on the right clock: the same keys are still there. */
    restart(NULL);
    ch = channel();
    fetched after;
    fetch(ch, &after);
    assert_int_equal(after.status, GRPC_STATUS_OK);
    assert_true(same_keys(&before, &after) >= 1);
    assert_int_equal(health(ch), 1);
    fx_grpc_close(ch);
}

/* The token disappears while serving: UNAVAILABLE, then recovery, no restart. */
static void test_token_removed_while_serving(void **state)
{
    (void)state;
    if (d.pid <= 0)
        restart(NULL);
    pid_t pid = d.pid;
    fx_grpc *ch = channel();
    fetched ok;
    fetch(ch, &ok);
    assert_int_equal(ok.status, GRPC_STATUS_OK);

    assert_int_equal(fx_token_hide(&d.tok), 0);
    poll_arg p = {ch, GRPC_STATUS_UNAVAILABLE, {0}};
    assert_int_equal(fx_wait_until(status_is, &p, 10000), 0);
    assert_int_equal(health(ch), 2);

    assert_int_equal(fx_token_restore(&d.tok), 0);
    p.want = GRPC_STATUS_OK;
    assert_int_equal(fx_wait_until(status_is, &p, 15000), 0);
    assert_int_equal(health(ch), 1);
    assert_true(same_keys(&ok, &p.last) >= 1);
    assert_int_equal(d.pid, pid); /* the same process recovered */
    fx_grpc_close(ch);
}

/*
 * SIGKILL right at a rotation, then a restart: the same keys for the same
 * epochs, no epoch skipped, and the set moves on from where it was.
 */
static void test_sigkill_at_rotation(void **state)
{
    (void)state;
    if (d.pid <= 0)
        restart(NULL);
    for (int round = 0; round < 2; round++) {
        fx_grpc *ch = channel();
        fetched before;
        fetch(ch, &before);
        assert_int_equal(before.status, GRPC_STATUS_OK);
        fx_grpc_close(ch);

        /* Kill within a few ms of the next epoch boundary (round 0) or just
         * after it, while stekd is deriving (round 1). */
        int64_t boundary_ms = (int64_t)(before.current + 1) * EPOCH_S * 1000;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int64_t wait_ms =
            boundary_ms - (now.tv_sec * 1000 + now.tv_nsec / 1000000) + (round == 0 ? -5 : 20);
        if (wait_ms > 0) {
            struct timespec ts = {wait_ms / 1000, (wait_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL); /* aiming at a moment, not waiting for readiness */
        }
        int status = 0;
        assert_int_equal(fx_stop(d.pid, SIGKILL, 5000, &status), 0);
        d.pid = 0;
        restart(NULL);

        ch = channel();
        fetched after;
        fetch(ch, &after);
        assert_int_equal(after.status, GRPC_STATUS_OK);
        assert_true(same_keys(&before, &after) >= 2);
        assert_true(after.current >= before.current);
        /* Contiguous epochs: nothing skipped or duplicated. */
        for (size_t i = 1; i < after.n; i++)
            assert_int_equal(after.epochs[i], after.epochs[i - 1] + 1);
        fx_grpc_close(ch);
    }
}

/* 200 watchers connect and drop at random; the server keeps serving all. */
static void test_many_watchers_churn(void **state)
{
    (void)state;
    if (d.pid <= 0)
        restart(NULL);
    enum { N = 200 };
    fx_grpc *ch = channel();
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce),
                                     host_cert.key_path, &req, &len),
                     0);
    fx_grpc_stream **s = calloc(N, sizeof(*s));
    int opened = 0, first_sets = 0;
    for (int i = 0; i < N; i++) {
        if (fx_grpc_stream_start(ch, WATCH, req, len, 60000, &s[i]) == 0)
            opened++;
    }
    assert_int_equal(opened, N);
    for (int i = 0; i < N; i++) {
        uint8_t *msg = NULL;
        size_t mlen = 0;
        if (fx_grpc_stream_read(s[i], 10000, &msg, &mlen) == 1)
            first_sets++;
        free(msg);
        /* Drop a random third straight away. */
        uint8_t r = 0;
        assert_int_equal(RAND_bytes(&r, 1), 1);
        if (r % 3 == 0) {
            fx_grpc_stream_cancel_and_free(s[i]);
            s[i] = NULL;
        }
    }
    assert_int_equal(first_sets, N);
    /* The survivors all see the next rotation. */
    int64_t deadline = mono_ms() + (EPOCH_S + 3) * 1000;
    int rotated = 0, survivors = 0;
    for (int i = 0; i < N; i++) {
        if (s[i] == NULL)
            continue;
        survivors++;
        for (;;) {
            int64_t left = deadline - mono_ms();
            uint8_t *msg = NULL;
            size_t mlen = 0;
            if (left <= 0 || fx_grpc_stream_read(s[i], (int)left, &msg, &mlen) != 1)
                break;
            Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, mlen, msg);
            free(msg);
            bool set = ks != NULL && ks->heartbeat == NULL;
            if (ks)
                stek__v1__key_set__free_unpacked(ks, NULL);
            if (set) {
                rotated++;
                break;
            }
        }
        fx_grpc_stream_cancel_and_free(s[i]);
    }
    fprintf(stderr, "watchers: %d opened, %d survivors, %d saw the rotation\n", N, survivors,
            rotated);
    if (rotated != survivors)
        fx_stekd_log_tail(&d, 60);
    assert_int_equal(rotated, survivors);
    free(s);
    free(req);

    /* And a plain fetch still works. */
    fetched f;
    fetch(ch, &f);
    assert_int_equal(f.status, GRPC_STATUS_OK);
    fx_grpc_close(ch);
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    assert_int_equal(code, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clock_ahead_refuses),
        cmocka_unit_test(test_token_removed_while_serving),
        cmocka_unit_test(test_sigkill_at_rotation),
        cmocka_unit_test(test_many_watchers_churn),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
