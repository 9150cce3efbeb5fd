/*
 * Fleet faults (issue 7), against real stekd replicas, real SoftHSM tokens
 * and real OpenSSL handshakes between two libstek hosts:
 *
 *   - replica failover: three replicas, each with its own token seeded from
 *     one chain; both hosts know all three; replicas are SIGKILLed one at a
 *     time (the last one lives) while a thread keeps starting sessions on
 *     one host and resuming them on the other, across rotations;
 *   - clock skew: two hosts whose wall clocks are half an epoch behind and
 *     half an epoch ahead (STEK_TEST_CLOCK_OFFSET_MS, test only) resume each
 *     other's tickets across rotations, thanks to the pre-published `next`.
 *
 * In both, not one resumption may fail: every ticket is fresh, so its key
 * is inside its window on both hosts.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/ssl.h>

#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

#define EPOCH_S 3
#define LIFETIME_S 9
#define GROUP "edge"
#define N_REPLICAS 3

static fx_stekd r[N_REPLICAS];
static fx_cert cert_a, cert_b;
static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Runs stekctl against replica x's token and config; returns its exit code. */
static int stekctl(fx_stekd *x, char *const args[])
{
    char *argv[16] = {STEKCTL_PATH, "--config", x->config_path};
    size_t n = 3;
    for (size_t i = 0; args[i] != NULL && n < 15; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    char log[FX_PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/stekctl.log", x->dir);
    pid_t pid;
    int status = -1;
    if (fx_token_activate(&x->tok) != 0 || fx_spawn(argv, log, &pid) != 0 ||
        fx_wait_exit(pid, 30000, &status) != 0)
        return -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "stekctl failed; see %s\n", log);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Copies a file (the fleet PKI of replica 0 over another replica's). */
static int copy_file(const char *from, const char *to, int mode)
{
    FILE *f = fopen(from, "r");
    if (f == NULL)
        return -1;
    char buf[16384];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    if (n == 0 || n >= sizeof(buf) - 1)
        return -1;
    buf[n] = '\0';
    return fx_write_file(to, buf, mode);
}

/*
 * Three replicas in the operator's order (docs/operations.md): signing keys
 * everywhere, the group on replica 0, then its chain key, still at the
 * current epoch, to every other replica before it starts. The fixture makes
 * one CA per stekd; a fleet has one, so replicas 1 and 2 take replica 0's
 * server certificate and client CA. Each keeps its own signing key.
 */
static int setup(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_REPLICAS; i++) {
        if (fx_stekd_setup(&r[i], EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0)
            return -1;
        r[i].no_roots = true;
        if (fx_stekd_provision(&r[i]) != 0)
            return -1;
    }
    char *add[] = {"group", "add", GROUP, NULL};
    if (stekctl(&r[0], add) != 0)
        return -1;
    for (size_t i = 1; i < N_REPLICAS; i++) {
        char tpub[FX_PATH_MAX + 32], blob[FX_PATH_MAX + 32], id[16];
        snprintf(tpub, sizeof(tpub), "%s/transport.pem", r[i].dir);
        snprintf(blob, sizeof(blob), "%s/chain-%zu.bin", r[0].dir, i);
        snprintf(id, sizeof(id), "seed-%zu", i);
        char *mk[] = {"transport-create", "--id", id, "--out", tpub, NULL};
        char *ex[] = {"export-chain", GROUP, "--transport", tpub, "--id", id, "--out", blob, NULL};
        char *im[] = {"import-chain", "--in", blob, NULL};
        if (stekctl(&r[i], mk) != 0 || stekctl(&r[0], ex) != 0 || stekctl(&r[i], im) != 0)
            return -1;
        if (copy_file(r[0].ca.cert_path, r[i].ca.cert_path, 0644) != 0 ||
            copy_file(r[0].server.cert_path, r[i].server.cert_path, 0644) != 0 ||
            copy_file(r[0].server.key_path, r[i].server.key_path, 0600) != 0)
            return -1;
    }
    for (size_t i = 0; i < N_REPLICAS; i++)
        if (fx_stekd_start(&r[i]) != 0)
            return -1;
    const char *ua[] = {"spiffe://fleet/edge/a", NULL};
    const char *ub[] = {"spiffe://fleet/edge/b", NULL};
    fx_cert_opts oa = {.name = "edge-a", .uri_sans = ua};
    fx_cert_opts ob = {.name = "edge-b", .uri_sans = ub};
    if (fx_stekd_host_cert(&r[0], &oa, &cert_a) != 0 ||
        fx_stekd_host_cert(&r[0], &ob, &cert_b) != 0)
        return -1;
    return 0;
}

/* Runs even when an assertion failed: no stekd outlives the test. */
static int teardown(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_REPLICAS; i++)
        fx_stekd_destroy(&r[i]);
    return 0;
}

/*
 * A host: a libstek client knowing the replicas [first, N_REPLICAS) and
 * pinning every replica's signing key, with its wall clock offset by
 * offset_ms (test only: read by stek_client_new).
 */
static stek_client *host_client(const fx_cert *cert, size_t first, long offset_ms)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result res = STEK_RESULT_OK;
    for (size_t i = first; i < N_REPLICAS && res == STEK_RESULT_OK; i++)
        res = stek_options_add_server(o, r[i].target);
    for (size_t i = 0; i < N_REPLICAS && res == STEK_RESULT_OK; i++)
        res = stek_options_set_service_key(o, r[i].signing_pem_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_ca(o, r[0].ca.cert_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_group(o, GROUP);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_server_name(o, "localhost");
    char off[32];
    snprintf(off, sizeof(off), "%ld", offset_ms);
    setenv("STEK_TEST_CLOCK_OFFSET_MS", off, 1);
    if (res == STEK_RESULT_OK)
        res = stek_client_new(o, &c);
    unsetenv("STEK_TEST_CLOCK_OFFSET_MS");
    stek_options_free(o);
    if (res != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(res));
    return c;
}

static SSL_CTX *server_ctx(stek_client *c)
{
    SSL_CTX *ctx = fx_tls_server_ctx(r[0].server.cert_path, r[0].server.key_path);
    if (ctx != NULL && stek_client_attach(c, ctx) != STEK_RESULT_OK) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    memset(&k, 0, sizeof(k));
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

/* ---- continuous cross-host resumption ------------------------------------------ */

/*
 * Round i: a full handshake on host i % 2, then its session resumed on the
 * other host; TLS 1.3 and 1.2 in turn. Runs until stop.
 */
typedef struct xloop {
    SSL_CTX *ctx[2];
    atomic_bool stop;
    atomic_uint full, full_failed, attempted, resumed, failed;
    pthread_t thread;
} xloop;

static void *xloop_main(void *arg)
{
    xloop *l = arg;
    for (unsigned i = 0; !atomic_load(&l->stop); i++) {
        const int from = (int)(i & 1), to = from ^ 1;
        const int version = (i / 2) & 1 ? TLS1_2_VERSION : TLS1_3_VERSION;
        fx_tls_result f = fx_tls_handshake(l->ctx[from], version, NULL, NULL);
        atomic_fetch_add(&l->full, 1);
        if (!f.ok || f.session == NULL) {
            atomic_fetch_add(&l->full_failed, 1);
            fprintf(stderr, "full handshake on host %d failed\n", from);
            SSL_SESSION_free(f.session);
            continue;
        }
        fx_tls_result x = fx_tls_handshake(l->ctx[to], version, NULL, f.session);
        atomic_fetch_add(&l->attempted, 1);
        if (x.ok && x.client_reused && x.server_reused) {
            atomic_fetch_add(&l->resumed, 1);
        } else {
            atomic_fetch_add(&l->failed, 1);
            fprintf(stderr, "resumption %d -> %d (TLS %s) failed at %lld\n", from, to,
                    version == TLS1_3_VERSION ? "1.3" : "1.2", (long long)time(NULL));
        }
        SSL_SESSION_free(f.session);
        SSL_SESSION_free(x.session);
        /* Pacing on two loaded cores, so stekd and the hosts' threads run. */
        struct timespec pace = {0, 5 * 1000000L};
        nanosleep(&pace, NULL);
    }
    return NULL;
}

static void xloop_start(xloop *l, SSL_CTX *a, SSL_CTX *b)
{
    memset(l, 0, sizeof(*l));
    l->ctx[0] = a;
    l->ctx[1] = b;
    assert_int_equal(pthread_create(&l->thread, NULL, xloop_main, l), 0);
}

static void xloop_stop(xloop *l)
{
    atomic_store(&l->stop, true);
    assert_int_equal(pthread_join(l->thread, NULL), 0);
}

typedef struct epoch_wait {
    stek_client *c[2];
    uint64_t at_least;
} epoch_wait;

/* Both hosts' CURRENT epoch has reached at_least. */
static bool epoch_reached(void *arg)
{
    epoch_wait *w = arg;
    return counters(w->c[0]).current_epoch >= w->at_least &&
           counters(w->c[1]).current_epoch >= w->at_least;
}

typedef struct failover_wait {
    stek_client *c[2];
    uint64_t accepted[2]; /* sets_accepted at the kill */
} failover_wait;

/* Both hosts have a stream up again and accepted a set since the kill. */
static bool failed_over(void *arg)
{
    failover_wait *w = arg;
    for (int i = 0; i < 2; i++) {
        stek_counters k = counters(w->c[i]);
        if (!k.stream_up || k.sets_accepted <= w->accepted[i])
            return false;
    }
    return true;
}

/* ---- the tests --------------------------------------------------------------------- */

static void test_replica_failover(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_REPLICAS; i++)
        assert_true(r[i].pid > 0);
    stek_client *a = host_client(&cert_a, 0, 0);
    stek_client *b = host_client(&cert_b, 0, 0);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(stek_client_wait_ready(a, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(b, 20000), STEK_RESULT_OK);
    SSL_CTX *ca = server_ctx(a), *cb = server_ctx(b);
    assert_non_null(ca);
    assert_non_null(cb);

    xloop l;
    xloop_start(&l, ca, cb);
    const uint64_t e0 = counters(a).current_epoch;
    assert_true(e0 > 0);
    int64_t failover_ms[N_REPLICAS - 1] = {0};
    int64_t last_kill_unix = 0;
    /* The hosts try the replicas in order, so they watch replica 0 first,
     * then 1: kill each right after a rotation reached both hosts. */
    for (size_t k = 0; k + 1 < N_REPLICAS; k++) {
        epoch_wait ew = {{a, b}, e0 + k + 1};
        assert_int_equal(fx_wait_until(epoch_reached, &ew, (EPOCH_S + 10) * 1000), 0);
        failover_wait fw = {{a, b}, {counters(a).sets_accepted, counters(b).sets_accepted}};
        const int64_t t0 = mono_ms();
        last_kill_unix = (int64_t)time(NULL);
        int status = 0;
        assert_int_equal(fx_stop(r[k].pid, SIGKILL, 5000, &status), 0);
        r[k].pid = 0;
        assert_int_equal(fx_wait_until(failed_over, &fw, 20000), 0);
        failover_ms[k] = mono_ms() - t0;
        fprintf(stderr, "replica %zu killed: both hosts failed over in %lld ms\n", k,
                (long long)failover_ms[k]);
    }
    /* Two more rotations on the last replica alone. */
    epoch_wait ew = {{a, b}, e0 + N_REPLICAS + 1};
    assert_int_equal(fx_wait_until(epoch_reached, &ew, (2 * EPOCH_S + 10) * 1000), 0);
    xloop_stop(&l);

    stek_counters ka = counters(a), kb = counters(b);
    fprintf(stderr,
            "failover: epochs %llu..%llu, %u full handshakes (%u failed), "
            "%u resumptions attempted, %u resumed, %u failed; "
            "host a: resumed %llu renewed %llu sets %llu; host b: resumed %llu renewed %llu "
            "sets %llu\n",
            (unsigned long long)e0, (unsigned long long)ka.current_epoch, atomic_load(&l.full),
            atomic_load(&l.full_failed), atomic_load(&l.attempted), atomic_load(&l.resumed),
            atomic_load(&l.failed), (unsigned long long)ka.tickets_resumed,
            (unsigned long long)ka.tickets_renewed, (unsigned long long)ka.sets_accepted,
            (unsigned long long)kb.tickets_resumed, (unsigned long long)kb.tickets_renewed,
            (unsigned long long)kb.sets_accepted);
    assert_int_equal(atomic_load(&l.full_failed), 0);
    assert_int_equal(atomic_load(&l.failed), 0);
    assert_true(atomic_load(&l.attempted) >= 20);
    assert_int_equal(atomic_load(&l.resumed), atomic_load(&l.attempted));
    assert_true(ka.current_epoch >= e0 + N_REPLICAS + 1); /* rotations went on */
    /* Still fetching, from the last replica, after the last kill. */
    for (int i = 0; i < 2; i++) {
        stek_counters k = i == 0 ? ka : kb;
        assert_true(k.stream_up);
        assert_true(k.last_fetch_unix >= last_kill_unix);
        assert_int_equal(k.sets_rejected, 0);
        assert_int_equal(k.no_key_encrypts, 0);
        assert_int_equal(k.miss_unknown + k.miss_expired, 0);
    }
    SSL_CTX_free(ca);
    SSL_CTX_free(cb);
    stek_client_free(a);
    stek_client_free(b);
}

/*
 * Host a's clock half an epoch behind, host b's half an epoch ahead. b
 * starts encrypting under the next key half an epoch before the boundary,
 * and a decrypts those tickets because it holds `next`. a keeps the current
 * key until the boundary (a clock behind cannot stretch a key: deadlines
 * start from the set's issue time), and b still decrypts it: a key's
 * decrypt window outlasts its encrypt window by far more than the skew.
 * Both hosts accept the sets: an epoch off by one is within the check.
 */
static void test_clock_skew(void **state)
{
    (void)state;
    size_t live = N_REPLICAS;
    for (size_t i = 0; i < N_REPLICAS; i++)
        if (r[i].pid > 0) {
            live = i;
            break;
        }
    assert_true(live < N_REPLICAS);
    const long half_ms = EPOCH_S * 1000 / 2;
    stek_client *a = host_client(&cert_a, live, -half_ms);
    stek_client *b = host_client(&cert_b, live, half_ms);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(stek_client_wait_ready(a, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(b, 20000), STEK_RESULT_OK);
    SSL_CTX *ca = server_ctx(a), *cb = server_ctx(b);
    assert_non_null(ca);
    assert_non_null(cb);

    xloop l;
    xloop_start(&l, ca, cb);
    const uint64_t e0 = counters(a).current_epoch;
    epoch_wait ew = {{a, b}, e0 + 2};
    assert_int_equal(fx_wait_until(epoch_reached, &ew, (2 * EPOCH_S + 10) * 1000), 0);
    xloop_stop(&l);

    stek_counters ka = counters(a), kb = counters(b);
    fprintf(stderr,
            "skew -%ld/+%ld ms: epochs %llu..%llu, %u resumptions attempted, %u resumed, "
            "%u failed; host a renewed %llu, host b renewed %llu (tickets of the other's key)\n",
            half_ms, half_ms, (unsigned long long)e0, (unsigned long long)ka.current_epoch,
            atomic_load(&l.attempted), atomic_load(&l.resumed), atomic_load(&l.failed),
            (unsigned long long)ka.tickets_renewed, (unsigned long long)kb.tickets_renewed);
    assert_int_equal(atomic_load(&l.full_failed), 0);
    assert_int_equal(atomic_load(&l.failed), 0);
    assert_true(atomic_load(&l.attempted) >= 20);
    assert_int_equal(ka.sets_rejected + kb.sets_rejected, 0);
    /* The skew was real: each host resumed tickets under a key that was
     * not its own current one (b's next on a, a's previous on b). */
    assert_true(ka.tickets_renewed >= 1);
    assert_true(kb.tickets_renewed >= 1);
    SSL_CTX_free(ca);
    SSL_CTX_free(cb);
    stek_client_free(a);
    stek_client_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clock_skew),
        cmocka_unit_test(test_replica_failover),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
