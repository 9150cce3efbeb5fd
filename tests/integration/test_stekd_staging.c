/*
 * Staged sets: stekd builds each watch stream's set for the next epoch
 * before the boundary (K(e+2) exists ahead of need), so that a rotation only
 * sends. A real stekd (epochs of 4 s: sets are staged right after the
 * previous rotation), its
 * metrics listener, and hosts that check every set with libstek's own
 * acceptance (signature, binding, unwrap of every key and its name).
 *
 *   - Rotation sets arrive staged: signed before their epoch began, sent
 *     at the boundary, and counted as such.
 *   - A rekey between staging and the boundary: the staged set (the old
 *     generation's, for the next epoch) is never sent; the host gets the
 *     new generation's set at once, built fresh.
 *   - stekd's TLS connections release their record buffers while idle.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <grpc/grpc.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "accept.h"
#include "fx_grpc.h"
#include "fx_http.h"
#include "fx_stekd.h"
#include "hostwrap.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

#define EPOCH_S 4
#define LIFETIME_S 4
#define LEAD_MS (EPOCH_S * 1000) /* a whole epoch, below 25 s: server/rpc.c */
#define NS 1000000000LL
#define WATCH "/stek.v1.KeyService/WatchKeySet"
#define METRICS_LINE "metrics = { listen = \"127.0.0.1:0\"; };\n"

static fx_stekd d;
static EVP_PKEY *service_key;

typedef struct host {
    fx_cert cert;
    const char *identity;
    const char *group;
    stek_host_eph *eph;
    uint8_t pub[STEK_P256_POINT_BYTES];
    uint8_t nonce[16];
    fx_grpc *ch;
} host;

static host edge = {.identity = "uri:spiffe://fleet/edge/a", .group = "edge"};
static host other = {.identity = "uri:spiffe://fleet/other/x", .group = "other"};

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL}},
    {"other", {"uri:spiffe://fleet/other/*", NULL}},
};

static int host_init(host *h, const char *name)
{
    const char *uris[] = {h->identity + 4, NULL};
    fx_cert_opts o = {
        .name = name, .key_type = FX_KEY_EC_P256, .uri_sans = uris, .eku = FX_EKU_CLIENT};
    if (fx_stekd_host_cert(&d, &o, &h->cert) != 0 || stek_host_eph_generate(&h->eph) != STEK_OK ||
        stek_host_eph_public(h->eph, h->pub) != STEK_OK || RAND_bytes(h->nonce, 16) != 1)
        return -1;
    return fx_grpc_open(&h->ch, d.target, d.ca.cert_path, h->cert.cert_path, h->cert.key_path,
                        "localhost");
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, METRICS_LINE) != 0 ||
        fx_stekd_start(&d) != 0)
        return -1;
    FILE *f = fopen(d.signing_pem_path, "r");
    service_key = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    if (service_key == NULL || host_init(&edge, "edge-a") != 0 || host_init(&other, "other-x") != 0)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    host *hs[] = {&edge, &other};
    for (size_t i = 0; i < 2; i++) {
        fx_grpc_close(hs[i]->ch);
        stek_host_eph_free(hs[i]->eph);
    }
    int code = -1;
    int rc = d.pid > 0 ? fx_stekd_stop(&d, 10000, &code) : 0;
    EVP_PKEY_free(service_key);
    fx_stekd_destroy(&d);
    return rc == 0 && (code == 0 || code == -1) ? 0 : -1;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A sample of stekd's /metrics page; asserts that it is there. */
static double scrape(const char *series)
{
    fx_http_reply r;
    assert_int_equal(fx_http(fx_metrics_port(d.log_path), "GET", "/metrics", &r), 0);
    assert_int_equal(r.status, 200);
    double v = fx_metric(r.body, series);
    if (isnan(v))
        fprintf(stderr, "no sample %s\n", series);
    fx_http_free(&r);
    assert_false(isnan(v));
    return v;
}

/* A host's watch stream and what it has accepted so far. */
typedef struct watch {
    host *h;
    fx_grpc_stream *s;
    uint64_t generation, epoch; /* of the last set accepted */
} watch;

static void watch_open(watch *w, host *h)
{
    memset(w, 0, sizeof(*w));
    w->h = h;
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request(h->group, h->pub, sizeof(h->pub), h->nonce, sizeof(h->nonce),
                                     h->cert.key_path, &req, &len),
                     0);
    assert_int_equal(fx_grpc_stream_start(h->ch, WATCH, req, len, 120000, &w->s), 0);
    free(req);
}

/*
 * The next set on w (heartbeats skipped), accepted as libstek accepts it:
 * never older than the last one. Free with stek_accepted_set_free.
 */
/* assert_true, with stekd's last log lines first when it fails: these
 * checks are about timing, and the log says what stekd was doing. */
#define assert_or_tail(cond)                                                                       \
    do {                                                                                           \
        bool ok_ = (cond);                                                                         \
        if (!ok_)                                                                                  \
            fx_stekd_log_tail(&d, 60);                                                             \
        assert_true(ok_);                                                                          \
    } while (0)

static stek_accepted_set *next_set(watch *w, int timeout_ms)
{
    int64_t deadline = wall_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - wall_ms();
        assert_or_tail(left > 0);
        uint8_t *msg = NULL;
        size_t len = 0;
        assert_or_tail(fx_grpc_stream_read(w->s, (int)left, &msg, &len) == 1);
        stek_accept_ctx c = {.service_pubs = &service_key,
                             .n_service_pubs = 1,
                             .identity = w->h->identity,
                             .eph = w->h->eph,
                             .nonce = w->h->nonce,
                             .nonce_len = sizeof(w->h->nonce),
                             .group = w->h->group,
                             .now = (int64_t)time(NULL),
                             .generation_hwm = w->generation,
                             .current_epoch_hwm = w->epoch};
        stek_accepted_set *set = NULL;
        stek_reject why = STEK_REJECT_NONE;
        bool beat = false;
        stek_status st = stek_accept(&c, msg, len, &set, &why, &beat);
        free(msg);
        if (st != STEK_OK)
            fprintf(stderr, "set rejected: %s (%s)\n", stek_reject_name(why), stek_error_detail());
        assert_int_equal(st, STEK_OK);
        if (beat)
            continue;
        w->generation = set->generation;
        w->epoch = set->current_epoch;
        return set;
    }
}

/* Rotation sets are built before their epoch starts and sent at its start. */
static void test_rotation_sends_staged_set(void **state)
{
    (void)state;
    double staged0 = scrape("stekd_watch_sets_staged_total");
    double sent0 = scrape("stekd_watch_staged_sent_total");
    watch w;
    watch_open(&w, &edge);
    stek_accepted_set *set = next_set(&w, 5000);
    uint64_t e0 = set->current_epoch;
    stek_accepted_set_free(set);
    /* The first rotation may come too soon after the stream opened to
     * stage; the next two are measured. */
    set = next_set(&w, (EPOCH_S + 2) * 1000);
    assert_int_equal(set->current_epoch, e0 + 1);
    stek_accepted_set_free(set);
    for (uint64_t e = e0 + 2; e <= e0 + 3; e++) {
        set = next_set(&w, (EPOCH_S + 2) * 1000);
        int64_t arrived = wall_ms();
        int64_t start_ns = (int64_t)e * EPOCH_S * NS;
        fprintf(stderr, "epoch %llu: issued %lld ms before its start, received %lld ms after it\n",
                (unsigned long long)e, (long long)((start_ns - set->issued_at) / 1000000),
                (long long)(arrived - start_ns / 1000000));
        assert_int_equal(set->current_epoch, e);
        /* Signed ahead, within the lead (issued_at has whole seconds). */
        assert_or_tail(set->issued_at < start_ns);
        assert_or_tail(set->issued_at >= start_ns - (LEAD_MS / 1000 + 1) * NS);
        /* Sent at the boundary: no HSM work between it and the host. */
        assert_or_tail(arrived - start_ns / 1000000 < 1000);
        /* current and next, and the key before as decrypt-only. */
        assert_int_equal(set->n_keys, 2 + LIFETIME_S / EPOCH_S);
        assert_int_equal(set->keys[set->n_keys - 1].epoch, e + 1);
        stek_accepted_set_free(set);
    }
    fx_grpc_stream_cancel_and_free(w.s);
    assert_true(scrape("stekd_watch_staged_sent_total") - sent0 >= 2);
    assert_true(scrape("stekd_watch_sets_staged_total") - staged0 >= 2);
}

typedef struct sample_at_least {
    const char *series;
    double want;
} sample_at_least;

static bool sample_reached(void *arg)
{
    const sample_at_least *c = arg;
    fx_http_reply r;
    if (fx_http(fx_metrics_port(d.log_path), "GET", "/metrics", &r) != 0)
        return false;
    double v = fx_metric(r.body, c->series);
    fx_http_free(&r);
    return strcmp(c->series, "stekd_watch_streams_open") == 0 ? v == c->want : v >= c->want;
}

static void stekctl_rekey(const char *group)
{
    char *argv[] = {STEKCTL_PATH, "--config", d.config_path, "rekey", (char *)group, NULL};
    char log[FX_PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/stekctl-rekey.log", d.dir);
    pid_t pid;
    int status = -1;
    assert_int_equal(fx_token_activate(&d.tok), 0);
    assert_int_equal(fx_spawn(argv, log, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 30000, &status), 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "stekctl rekey failed; see %s\n", log);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* A rekey after staging: the staged set of the old generation never goes out. */
static void test_rekey_drops_staged_set(void **state)
{
    (void)state;
    /* The previous test's stream is gone, so only this one stages: once
     * for the boundary after it opened, then once after each rotation. */
    sample_at_least none = {"stekd_watch_streams_open", 0};
    assert_int_equal(fx_wait_until(sample_reached, &none, 5000), 0);
    double base = scrape("stekd_watch_sets_staged_total");
    watch w;
    watch_open(&w, &other);
    stek_accepted_set *set = next_set(&w, 5000);
    assert_int_equal(set->generation, 1);
    stek_accepted_set_free(set);

    /* After rotation k, wait for the stream's (k+1)th staging: the one for
     * the next boundary. Then rekey, early enough that stekd sees it before
     * that boundary: stekctl takes a fraction of a second, and stekd
     * refreshes every second. */
    uint64_t e;
    for (int k = 1;; k++) {
        assert_true(k <= 4);
        set = next_set(&w, (EPOCH_S + 2) * 1000);
        stek_accepted_set_free(set);
        sample_at_least staged = {"stekd_watch_sets_staged_total", base + k + 1};
        assert_int_equal(fx_wait_until(sample_reached, &staged, (EPOCH_S + 2) * 1000), 0);
        e = w.epoch;
        int64_t left = (int64_t)(e + 1) * EPOCH_S * 1000 - wall_ms();
        fprintf(stderr, "staged for epoch %llu, %lld ms before its start\n",
                (unsigned long long)e + 1, (long long)left);
        if (left >= LEAD_MS - 1000)
            break;
    }
    double sent_before = scrape("stekd_watch_staged_sent_total");
    int64_t rekey_at = wall_ms();
    stekctl_rekey("other");

    /* The new generation's set for the current epoch, built after the
     * rekey: not the staged one, which is for the next epoch. */
    set = next_set(&w, (EPOCH_S + 2) * 1000);
    int64_t arrived = wall_ms();
    fprintf(stderr,
            "generation %llu epoch %llu arrived %lld ms after the rekey started, %lld ms "
            "before the boundary\n",
            (unsigned long long)set->generation, (unsigned long long)set->current_epoch,
            (long long)(arrived - rekey_at),
            (long long)((int64_t)(e + 1) * EPOCH_S * 1000 - arrived));
    assert_or_tail(set->generation == 2);
    assert_or_tail(set->current_epoch == e);
    assert_true(set->issued_at >= (rekey_at / 1000) * NS);
    stek_accepted_set_free(set);
    assert_true(scrape("stekd_watch_staged_sent_total") == sent_before);

    /* The next rotation carries generation 2 on. */
    set = next_set(&w, (EPOCH_S + 2) * 1000);
    assert_int_equal(set->generation, 2);
    assert_int_equal(set->current_epoch, e + 1);
    stek_accepted_set_free(set);
    fx_grpc_stream_cancel_and_free(w.s);
}

/*
 * Memory per connection (docs/benchmarks.md): stekd sets
 * SSL_MODE_RELEASE_BUFFERS on the TLS context gRPC makes (tls_buffers.c),
 * which works only if gRPC's SSL_CTX_new resolved to stekd's; and on gRPC
 * core 29 it takes the classic socket read path (stekd.c), which the
 * environment here does not override.
 */
static void test_tls_buffers_released(void **state)
{
    (void)state;
    FILE *f = fopen(d.log_path, "r");
    assert_non_null(f);
    char line[1024];
    bool released = false, kept = false, classic = false;
    while (fgets(line, sizeof(line), f) != NULL) {
        released = released || strstr(line, "TLS record buffers are released while idle");
        kept = kept || strstr(line, "keep their TLS record buffers");
        classic = classic || strstr(line, "socket reads: gRPC's classic read path");
    }
    fclose(f);
    assert_true(released);
    assert_false(kept);
    if (getenv("GRPC_EXPERIMENTS") == NULL && strncmp(grpc_version_string(), "29.", 3) == 0)
        assert_true(classic);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls_buffers_released),
        cmocka_unit_test(test_rotation_sends_staged_set),
        cmocka_unit_test(test_rekey_drops_staged_set),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
