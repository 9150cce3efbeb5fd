/*
 * bench_stekd: throughput and latency of a real stekd (issue 4, acceptance 5).
 *
 *   warm  GetKeySet with a fixed (eph_pub, nonce) per caller: a reconnecting
 *         host, served from stekd's key-set cache, against the benchmark echo
 *         method (STEKD_BENCH_ECHO=1) answering the same number of bytes on
 *         the same server build. Target: warm/echo >= 0.8.
 *   cold  GetKeySet with a new ephemeral key, nonce and request signature per
 *         call (1 ECDH, the KEK derive, n wraps and 1 sign in the HSM), against
 *         the same HSM work done directly through the PKCS#11 layer on a
 *         second, identically provisioned token. Target: cold/raw >= 0.7.
 *
 * Speed is printed, never asserted: the exit status is non-zero only when
 * something failed (a setup step, or calls that did not return OK).
 *
 * Processes. SOFTHSM2_CONF is process-global and read at C_Initialize, so
 * the raw measurement runs in a child forked at the very start, before this
 * process has touched PKCS#11 or started a thread (gRPC's included); the
 * child provisions the second token, waits on a pipe until the stekd phases
 * are over, measures, and writes its figures back. The parent provisions
 * the first token, starts stekd (tests/fixture/fx_stekd) and drives it over
 * mTLS with one fx_grpc channel (one connection) per calling thread.
 *
 * Client and server share the machine's CPUs. Cold requests are built before
 * the timed loops so that the client's key generation and signing do not
 * compete with stekd while it is measured.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "fx_grpc.h"
#include "bench_util.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "stek/v1/stek.pb-c.h"
#include "stek_p11.h"

#define GROUP "bench"
#define GEN 1u
/* The DESIGN default shape: hourly epochs, 18 h decrypt lifetime, so a set
 * holds 18 past keys + current + next. An epoch this long means no
 * rotation inside a phase (except across an hour boundary; see the doc). */
#define EPOCH_S 3600u
#define LIFETIME_S (18u * 3600u)
#define PAST_EPOCHS (LIFETIME_S / EPOCH_S)
#define N_KEYS (PAST_EPOCHS + 2)

#define MANY 16
#define GET "/stek.v1.KeyService/GetKeySet"
#define ECHO "/stek.bench.Echo/Echo"
#define CALL_TIMEOUT_MS 10000
#define RAW_POINTS 256 /* host points the raw loop cycles through */
#define MAX_ERRORS 100 /* per phase: stop early rather than spin on a broken server */
#define CHILD_WAIT_MS 120000

static void sleep_until(int64_t t)
{
    for (;;) {
        int64_t d = t - bench_mono_ns();
        if (d <= 0 || bench_stop_requested)
            return;
        struct timespec ts = {(time_t)(d / 1000000000LL), (long)(d % 1000000000LL)};
        nanosleep(&ts, NULL);
    }
}

/* ---- CPU accounting ----------------------------------------------------- */

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- a timed phase: N threads calling op() ------------------------------ */

typedef struct samples {
    uint32_t *lat_us;
    size_t n, cap;
} samples;

typedef struct runner runner;
/* One call by thread t: 0 done, 1 nothing left to send (pool dry), -1 failed. */
typedef int (*op_fn)(runner *r, unsigned t);

struct runner {
    unsigned threads;
    op_fn op;
    void *ctx;
    pid_t server_pid; /* whose CPU to charge as "server"; 0: none */
    int64_t measure_ns, end_ns;
    atomic_llong dry_ns; /* when the request pool ran dry, or 0 */
    atomic_long errors;
    pthread_barrier_t go;
    samples s[MANY];
    pthread_mutex_t mu;
    char first_error[320];
};

typedef struct result {
    bool ran;
    double calls_s, p50_ms, p99_ms;
    double server_cpu_us, client_cpu_us; /* per call; < 0 when unknown */
    size_t calls;
    long errors;
    bool dry;
} result;

static void runner_error(runner *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void runner_error(runner *r, const char *fmt, ...)
{
    atomic_fetch_add(&r->errors, 1);
    pthread_mutex_lock(&r->mu);
    if (r->first_error[0] == '\0') {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->first_error, sizeof(r->first_error), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&r->mu);
}

typedef struct worker_arg {
    runner *r;
    unsigned t;
} worker_arg;

static void *worker(void *arg)
{
    worker_arg *w = arg;
    runner *r = w->r;
    samples *s = &r->s[w->t];
    pthread_barrier_wait(&r->go);
    while (!bench_stop_requested && atomic_load(&r->errors) < MAX_ERRORS) {
        int64_t t0 = bench_mono_ns();
        if (t0 >= r->end_ns)
            break;
        int rc = r->op(r, w->t);
        int64_t t1 = bench_mono_ns();
        if (rc > 0) {
            long long zero = 0;
            atomic_compare_exchange_strong(&r->dry_ns, &zero, (long long)t0);
            break;
        }
        /* Completions inside the window count, whenever they started. */
        if (rc == 0 && t1 >= r->measure_ns && t1 <= r->end_ns) {
            if (s->n == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 4096;
                uint32_t *p = realloc(s->lat_us, cap * sizeof(*p));
                if (p == NULL)
                    break;
                s->lat_us = p;
                s->cap = cap;
            }
            s->lat_us[s->n++] = (uint32_t)((t1 - t0) / 1000);
        }
    }
    return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Runs r->op on r->threads threads: warm-up, then the measured window. */
static int runner_run(runner *r, int warmup_ms, int run_ms, result *out)
{
    memset(out, 0, sizeof(*out));
    pthread_t th[MANY];
    worker_arg wa[MANY];
    unsigned started = 0;
    atomic_init(&r->dry_ns, 0);
    atomic_init(&r->errors, 0);
    pthread_mutex_init(&r->mu, NULL);
    r->first_error[0] = '\0';
    memset(r->s, 0, sizeof(r->s));
    pthread_barrier_init(&r->go, NULL, r->threads + 1);
    int64_t t = bench_mono_ns();
    r->measure_ns = t + (int64_t)warmup_ms * 1000000LL;
    r->end_ns = r->measure_ns + (int64_t)run_ms * 1000000LL;
    for (unsigned i = 0; i < r->threads; i++) {
        wa[i] = (worker_arg){r, i};
        if (pthread_create(&th[i], NULL, worker, &wa[i]) != 0)
            break;
        started++;
    }
    if (started < r->threads) {
        /* The barrier counts every thread; without them all nobody gets
         * past it, so stop here (exit status says why). */
        fprintf(stderr, "bench: pthread_create failed\n");
        exit(1);
    }
    pthread_barrier_wait(&r->go);
    sleep_until(r->measure_ns);
    double srv0 = r->server_pid ? bench_proc_cpu_s(r->server_pid) : -1, cli0 = self_cpu_s();
    sleep_until(r->end_ns);
    double srv1 = r->server_pid ? bench_proc_cpu_s(r->server_pid) : -1, cli1 = self_cpu_s();
    for (unsigned i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&r->go);

    int64_t end = r->end_ns, dry = (int64_t)atomic_load(&r->dry_ns);
    if (dry != 0 && dry < end) {
        out->dry = true;
        end = dry > r->measure_ns ? dry : r->measure_ns + 1;
    }
    size_t n = 0;
    for (unsigned i = 0; i < r->threads; i++)
        n += r->s[i].n;
    uint32_t *all = malloc((n ? n : 1) * sizeof(*all));
    size_t k = 0;
    for (unsigned i = 0; i < r->threads; i++) {
        if (all != NULL)
            for (size_t j = 0; j < r->s[i].n; j++)
                all[k++] = r->s[i].lat_us[j];
        free(r->s[i].lat_us);
        r->s[i] = (samples){0};
    }
    out->ran = true;
    out->errors = atomic_load(&r->errors);
    out->calls = k;
    out->calls_s = (double)k / ((double)(end - r->measure_ns) / 1e9);
    if (k > 0) {
        qsort(all, k, sizeof(*all), cmp_u32);
        out->p50_ms = all[k / 2] / 1000.0;
        out->p99_ms = all[k * 99 / 100] / 1000.0;
    }
    free(all);
    out->server_cpu_us = srv0 >= 0 && srv1 >= 0 && k ? (srv1 - srv0) * 1e6 / (double)k : -1;
    out->client_cpu_us = k ? (cli1 - cli0) * 1e6 / (double)k : -1;
    if (out->errors > 0)
        fprintf(stderr, "bench: %ld failed call(s); first: %s\n", out->errors, r->first_error);
    pthread_mutex_destroy(&r->mu);
    return out->errors > 0 ? -1 : 0;
}

/* ---- provisioning (both tokens, identically) ---------------------------- */

/*
 * The signing key, and generation 1 of GROUP whose root starts PAST_EPOCHS
 * before the current epoch e, ratcheted to e + 2: ticket keys e-18 .. e+1
 * exist, as in a service that has been running for a day. (fx_stekd's own
 * provisioning starts the root at e, which gives 2 keys per set.)
 * With out_p11 NULL the handle is closed; epochs gets the N_KEYS epochs.
 */
static int provision(const fx_token *t, const char *pem_path, stek_p11 **out_p11,
                     uint64_t epochs[N_KEYS])
{
    stek_p11_config c = {
        .module_path = t->module,
        .token_label = t->label,
        .pin_env = t->pin_env,
    };
    stek_p11 *p11 = NULL;
    char *pem = NULL;
    int rc = -1;
    uint64_t e = (uint64_t)time(NULL) / EPOCH_S, first = e - PAST_EPOCHS;
    if (stek_p11_open(&c, &p11) != STEK_OK || stek_p11_signing_key_create(p11) != STEK_OK ||
        stek_p11_signing_pubkey_pem(p11, &pem) != STEK_OK ||
        stek_p11_root_create(p11, GROUP, GEN, first) != STEK_OK ||
        stek_p11_generation_record(p11, GROUP, GEN, (int64_t)(first * EPOCH_S)) != STEK_OK ||
        stek_p11_ratchet_advance(p11, GROUP, GEN, e + 2) != STEK_OK) {
        fprintf(stderr, "bench: provision %s: %s\n", t->label, stek_error_detail());
        goto done;
    }
    if (pem_path != NULL && fx_write_file(pem_path, pem, 0644) != 0)
        goto done;
    for (unsigned i = 0; i < N_KEYS; i++)
        epochs[i] = first + i;
    rc = 0;
done:
    free(pem);
    if (rc == 0 && out_p11 != NULL) {
        *out_p11 = p11;
    } else {
        stek_p11_close(p11);
    }
    return rc;
}

/* ---- the raw child: the HSM work alone ---------------------------------- */

typedef struct raw_cmd {
    uint32_t signed_len; /* bytes the sign step covers: a signed set's size */
    uint32_t n_runs;     /* 0: nothing to do, exit */
    unsigned threads[3];
    int warmup_ms, run_ms;
} raw_cmd;

typedef struct raw_ctx {
    stek_p11 *p11;
    uint64_t epochs[N_KEYS];
    uint8_t points[RAW_POINTS][STEK_P256_POINT_BYTES];
    uint8_t *msg;
    size_t msg_len;
    atomic_uint next;
} raw_ctx;

/* What stekd's cold path asks of the HSM per call: the wrap (ephemeral key,
 * ECDH, KEK derive, n wraps) and one signature over a set-sized message. */
static int raw_op(runner *r, unsigned t)
{
    (void)t;
    raw_ctx *c = r->ctx;
    unsigned i = atomic_fetch_add(&c->next, 1) % RAW_POINTS;
    uint8_t hsm_pub[STEK_P256_POINT_BYTES], blobs[N_KEYS][STEK_WRAPPED_KEY_BYTES];
    uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES];
    size_t sig_len = 0;
    stek_status st = stek_p11_wrap_tickets(c->p11, GROUP, GEN, c->points[i], STEK_P256_POINT_BYTES,
                                           c->epochs, N_KEYS, hsm_pub, blobs);
    if (st == STEK_OK)
        st = stek_p11_sign(c->p11, c->msg, c->msg_len, sig, &sig_len);
    if (st != STEK_OK) {
        runner_error(r, "%s: %s", stek_status_name(st), stek_error_detail());
        return -1;
    }
    return 0;
}

static bool write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        b += w;
        n -= (size_t)w;
    }
    return true;
}

/* Reads exactly n bytes, waiting at most timeout_ms (-1: forever). */
static bool read_all(int fd, void *p, size_t n, int timeout_ms)
{
    uint8_t *b = p;
    int64_t until = timeout_ms < 0 ? 0 : bench_mono_ns() + (int64_t)timeout_ms * 1000000LL;
    while (n > 0) {
        int left = -1;
        if (timeout_ms >= 0) {
            int64_t d = until - bench_mono_ns();
            if (d <= 0)
                return false;
            left = (int)(d / 1000000LL) + 1;
        }
        struct pollfd pfd = {fd, POLLIN, 0};
        int pr = poll(&pfd, 1, left);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            return false;
        ssize_t got = read(fd, b, n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return false;
        b += got;
        n -= (size_t)got;
    }
    return true;
}

static int raw_child(const fx_token *tok, int cmd_fd, int res_fd)
{
    static raw_ctx c; /* static: the blobs of RAW_POINTS points are not stack material */
    char ready = 'E';
    if (fx_token_activate(tok) == 0 && provision(tok, NULL, &c.p11, c.epochs) == 0)
        ready = 'R';
    for (unsigned i = 0; ready == 'R' && i < RAW_POINTS; i++) {
        stek_host_eph *eph = NULL;
        if (stek_host_eph_generate(&eph) != STEK_OK ||
            stek_host_eph_public(eph, c.points[i]) != STEK_OK)
            ready = 'E';
        stek_host_eph_free(eph);
    }
    if (!write_all(res_fd, &ready, 1) || ready != 'R') {
        stek_p11_close(c.p11);
        return 1;
    }
    raw_cmd cmd;
    if (!read_all(cmd_fd, &cmd, sizeof(cmd), -1) || cmd.n_runs == 0 || cmd.n_runs > 3) {
        stek_p11_close(c.p11); /* the parent gave up: nothing to measure */
        return 0;
    }
    c.msg_len = cmd.signed_len;
    c.msg = malloc(c.msg_len ? c.msg_len : 1);
    int rc = c.msg != NULL && RAND_bytes(c.msg, (int)c.msg_len) == 1 ? 0 : 1;
    for (uint32_t i = 0; rc == 0 && i < cmd.n_runs; i++) {
        runner r = {.threads = cmd.threads[i], .op = raw_op, .ctx = &c, .server_pid = getpid()};
        result res;
        if (runner_run(&r, cmd.warmup_ms, cmd.run_ms, &res) != 0)
            rc = 1;
        if (!write_all(res_fd, &res, sizeof(res)))
            rc = 1;
    }
    free(c.msg);
    stek_p11_close(c.p11);
    return rc;
}

/* ---- the gRPC phases ---------------------------------------------------- */

typedef struct req {
    uint8_t *b;
    size_t len;
} req;

typedef struct grpc_ctx {
    const char *method;
    fx_grpc **ch;     /* one channel per thread */
    const req *fixed; /* per-thread request, or NULL */
    const req *pool;  /* single-use requests (cold), or NULL */
    size_t pool_n;
    atomic_size_t next;
    /* Sizes an OK answer must have: a key set's length varies by a few
     * bytes with its DER signature; the echo's never does. 0: any. */
    size_t expect_min, expect_max;
} grpc_ctx;

static int grpc_op(runner *r, unsigned t)
{
    grpc_ctx *g = r->ctx;
    const req *q = &g->fixed[t];
    if (g->pool != NULL) {
        size_t i = atomic_fetch_add(&g->next, 1);
        if (i >= g->pool_n)
            return 1;
        q = &g->pool[i];
    }
    fx_grpc_result res = {0};
    int rc = fx_grpc_unary(g->ch[t], g->method, q->b, q->len, CALL_TIMEOUT_MS, &res);
    int out = 0;
    if (rc != 0 || res.status != GRPC_STATUS_OK) {
        runner_error(r, "%s: status %d: %s", g->method, (int)res.status, res.details);
        out = -1;
    } else if (g->expect_max != 0 &&
               (res.body_len < g->expect_min || res.body_len > g->expect_max)) {
        runner_error(r, "%s: %zu response bytes, expected %zu..%zu", g->method, res.body_len,
                     g->expect_min, g->expect_max);
        out = -1;
    }
    fx_grpc_result_free(&res);
    return out;
}

/* A signed GetKeySet request for a fresh ephemeral key and nonce. */
static int make_request(const char *key_path, req *out)
{
    stek_host_eph *eph = NULL;
    uint8_t pub[STEK_P256_POINT_BYTES], nonce[16];
    int rc = -1;
    if (stek_host_eph_generate(&eph) == STEK_OK && stek_host_eph_public(eph, pub) == STEK_OK &&
        RAND_bytes(nonce, sizeof(nonce)) == 1)
        rc = fx_stek_request(GROUP, pub, sizeof(pub), nonce, sizeof(nonce), key_path, &out->b,
                             &out->len);
    stek_host_eph_free(eph);
    return rc;
}

typedef struct gen_arg {
    const char *key_path;
    req *reqs;
    size_t n;
    int rc;
} gen_arg;

static void *gen_main(void *arg)
{
    gen_arg *g = arg;
    for (size_t i = 0; i < g->n && g->rc == 0 && !bench_stop_requested; i++)
        g->rc = make_request(g->key_path, &g->reqs[i]);
    return NULL;
}

/* Builds n cold requests on two threads (the machine's cores), untimed. */
static int make_pool(const char *key_path, req *reqs, size_t n)
{
    gen_arg a = {key_path, reqs, n / 2, 0}, b = {key_path, reqs + n / 2, n - n / 2, 0};
    pthread_t th;
    if (pthread_create(&th, NULL, gen_main, &a) != 0)
        return -1;
    gen_main(&b);
    pthread_join(th, NULL);
    return a.rc == 0 && b.rc == 0 && !bench_stop_requested ? 0 : -1;
}

/* Checks the first answer as a host would: a signed set of N_KEYS keys. */
static int check_keyset(const char *pem_path, const uint8_t *body, size_t len, size_t *signed_len)
{
    FILE *f = fopen(pem_path, "r");
    EVP_PKEY *pub = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    if (f != NULL)
        fclose(f);
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, body);
    Stek__V1__SignedKeySet *s =
        ks ? stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data) : NULL;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool sig_ok = pub && ks && md && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pub) == 1 &&
                  EVP_DigestVerify(md, ks->signature.data, ks->signature.len, ks->signed_set.data,
                                   ks->signed_set.len) == 1;
    int rc = 0;
    if (!sig_ok || s == NULL || s->n_keys != N_KEYS) {
        fprintf(stderr, "bench: first key set: signature %s, %zu keys (want %u)\n",
                sig_ok ? "ok" : "BAD", s ? s->n_keys : 0, N_KEYS);
        rc = -1;
    }
    if (ks != NULL)
        *signed_len = ks->signed_set.len;
    EVP_MD_CTX_free(md);
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    stek__v1__key_set__free_unpacked(ks, NULL);
    EVP_PKEY_free(pub);
    return rc;
}

/* ---- the report --------------------------------------------------------- */

static void print_row(const char *phase, unsigned threads, const result *r)
{
    if (!r->ran) {
        printf("%-17s %-8u (not run)\n", phase, threads);
        return;
    }
    char srv[16] = "-", cli[16] = "-";
    if (r->server_cpu_us >= 0)
        snprintf(srv, sizeof(srv), "%.0f", r->server_cpu_us);
    if (r->client_cpu_us >= 0)
        snprintf(cli, sizeof(cli), "%.0f", r->client_cpu_us);
    printf("%-17s %-8u %9.0f %8.3f %8.3f %10s %10s%s\n", phase, threads, r->calls_s, r->p50_ms,
           r->p99_ms, srv, cli, r->dry ? "  (request pool ran dry: shorter window)" : "");
}

static void print_ratio(const char *name, unsigned threads, const result *a, const result *b,
                        double target)
{
    if (!a->ran || !b->ran || b->calls_s <= 0) {
        printf("%-17s %-8u -\n", name, threads);
        return;
    }
    double q = a->calls_s / b->calls_s;
    printf("%-17s %-8u %9.2f   (target >= %.1f: %s)\n", name, threads, q, target,
           q >= target ? "met" : "MISSED");
}

static void softhsm_version(char *out, size_t len)
{
    snprintf(out, len, "?");
    FILE *p = popen("softhsm2-util --version 2>/dev/null", "r");
    if (p == NULL)
        return;
    if (fgets(out, (int)len, p) != NULL)
        out[strcspn(out, "\r\n")] = '\0';
    pclose(p);
}

/* ---- main --------------------------------------------------------------- */

enum { R_WARM, R_ECHO, R_COLD, R_RAW, R_KINDS };

int main(void)
{
    const int warmup_ms = bench_env_int("STEK_BENCH_WARMUP_MS", 1000, 0, 60000);
    const int run_ms = bench_env_int("STEK_BENCH_RUN_MS", 5000, 100, 120000);
    const size_t pool_n = (size_t)bench_env_int("STEK_BENCH_COLD_POOL", 12000, 100, 1000000);
    const unsigned counts[2] = {MANY, 1};
    setvbuf(stdout, NULL, _IOLBF, 0);

    bench_catch_signals();
    if (setenv("STEKD_BENCH_ECHO", "1", 1) != 0)
        return 1;

    static const fx_stekd_group groups[] = {{GROUP, {"uri:spiffe://fleet/bench/*", NULL}}};
    static fx_stekd d;
    static fx_token raw_tok;
    static fx_grpc *ch[MANY];
    static req fixed[MANY], echo_req[MANY], *pool;
    static result res[R_KINDS][3];
    fx_cert host;
    pid_t child = 0;
    int cmd_pipe[2] = {-1, -1}, res_pipe[2] = {-1, -1};
    int rc = 1, stekd_exit = -1;
    size_t keyset_len = 0, signed_len = 0;
    uint64_t epochs[N_KEYS];

    printf("bench: provisioning two SoftHSM tokens, starting stekd\n");
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_token_create(&raw_tok, "stek-bench-raw") != 0)
        goto done;

    /* Fork the raw child now: one thread, no PKCS#11 yet (see the top). */
    if (pipe(cmd_pipe) != 0 || pipe(res_pipe) != 0)
        goto done;
    fflush(stdout);
    fflush(stderr);
    child = fork();
    if (child < 0)
        goto done;
    if (child == 0) {
        close(cmd_pipe[1]);
        close(res_pipe[0]);
        _exit(raw_child(&raw_tok, cmd_pipe[0], res_pipe[1]));
    }
    close(cmd_pipe[0]);
    close(res_pipe[1]);
    cmd_pipe[0] = res_pipe[1] = -1;

    /* stekd's token, provisioned as the child provisions its own. */
    if (fx_token_activate(&d.tok) != 0 || provision(&d.tok, d.signing_pem_path, NULL, epochs) != 0)
        goto done;
    d.provisioned = true;
    static const char *const uris[] = {"spiffe://fleet/bench/h1", NULL};
    fx_cert_opts ho = {.name = "bench-host", .key_type = FX_KEY_EC_P256, .uri_sans = uris};
    if (fx_stekd_host_cert(&d, &ho, &host) != 0 || fx_stekd_start(&d) != 0)
        goto done;
    for (unsigned i = 0; i < MANY; i++)
        if (fx_grpc_open(&ch[i], d.target, d.ca.cert_path, host.cert_path, host.key_path,
                         "localhost") != 0 ||
            make_request(host.key_path, &fixed[i]) != 0)
            goto done;

    /* The first set fixes the sizes: the echo answers as many bytes, and
     * the raw sign covers as many bytes as stekd signs. */
    fx_grpc_result first = {0};
    if (fx_grpc_unary(ch[0], GET, fixed[0].b, fixed[0].len, CALL_TIMEOUT_MS, &first) != 0 ||
        first.status != GRPC_STATUS_OK) {
        fprintf(stderr, "bench: first GetKeySet: status %d: %s\n", (int)first.status,
                first.details);
        fx_grpc_result_free(&first);
        goto done;
    }
    keyset_len = first.body_len;
    int ck = check_keyset(d.signing_pem_path, first.body, first.body_len, &signed_len);
    fx_grpc_result_free(&first);
    if (ck != 0)
        goto done;
    /* Echo requests: 4 bytes of wanted size, padded to a request's length. */
    for (unsigned i = 0; i < MANY; i++) {
        echo_req[i].len = fixed[i].len;
        echo_req[i].b = calloc(1, echo_req[i].len);
        if (echo_req[i].b == NULL || echo_req[i].len < 4)
            goto done;
        for (int j = 0; j < 4; j++)
            echo_req[i].b[j] = (uint8_t)(keyset_len >> (24 - 8 * j));
    }
    char child_ready = 0;
    if (!read_all(res_pipe[0], &child_ready, 1, CHILD_WAIT_MS) || child_ready != 'R') {
        fprintf(stderr, "bench: the raw child did not come up\n");
        goto done;
    }
    printf("bench: key set %zu bytes (%zu signed), %u keys; building %zu cold requests\n",
           keyset_len, signed_len, N_KEYS, pool_n);
    pool = calloc(pool_n, sizeof(*pool));
    if (pool == NULL || make_pool(host.key_path, pool, pool_n) != 0)
        goto done;

    int failures = 0;
    for (int c = 0; c < 2 && !bench_stop_requested; c++) {
        grpc_ctx warm = {.method = GET,
                         .ch = ch,
                         .fixed = fixed,
                         .expect_min = keyset_len - 8,
                         .expect_max = keyset_len + 8};
        grpc_ctx echo = {.method = ECHO,
                         .ch = ch,
                         .fixed = echo_req,
                         .expect_min = keyset_len,
                         .expect_max = keyset_len};
        runner rw = {.threads = counts[c], .op = grpc_op, .ctx = &warm, .server_pid = d.pid};
        runner re = {.threads = counts[c], .op = grpc_op, .ctx = &echo, .server_pid = d.pid};
        printf("bench: warm and echo, %u thread(s)\n", counts[c]);
        failures += runner_run(&rw, warmup_ms, run_ms, &res[R_WARM][c]) != 0;
        failures += runner_run(&re, warmup_ms, run_ms, &res[R_ECHO][c]) != 0;
    }
    size_t used = 0;
    for (int c = 0; c < 2 && !bench_stop_requested; c++) {
        /* Each cold phase gets its own part of the pool (2/3 for the busier
         * one): a request is never sent twice, so every call misses the
         * cache. */
        size_t share = c == 0 ? pool_n * 2 / 3 : pool_n - used;
        grpc_ctx cold = {.method = GET, .ch = ch, .pool = pool + used, .pool_n = share};
        atomic_init(&cold.next, 0);
        runner r = {.threads = counts[c], .op = grpc_op, .ctx = &cold, .server_pid = d.pid};
        printf("bench: cold, %u thread(s)\n", counts[c]);
        failures += runner_run(&r, warmup_ms, run_ms, &res[R_COLD][c]) != 0;
        used += share;
    }

    /* The raw figures: close the connections and stop stekd first, so the
     * child has the machine as stekd had it. */
    for (unsigned i = 0; i < MANY; i++) {
        fx_grpc_close(ch[i]);
        ch[i] = NULL;
    }
    if (fx_stekd_stop(&d, 10000, &stekd_exit) != 0 || stekd_exit != 0) {
        fprintf(stderr, "bench: stekd exited with %d\n", stekd_exit);
        failures++;
    }
    if (!bench_stop_requested) {
        printf("bench: raw HSM operations (PKCS#11 layer, second token)\n");
        /* Also 2 threads: as many as stekd's completion-queue threads
         * (fx_stekd starts it with --threads 2), the HSM's best case here. */
        raw_cmd cmd = {(uint32_t)signed_len, 3, {counts[0], counts[1], 2}, warmup_ms, run_ms};
        if (!write_all(cmd_pipe[1], &cmd, sizeof(cmd)))
            goto done;
        for (int c = 0; c < 3; c++)
            if (!read_all(res_pipe[0], &res[R_RAW][c], sizeof(result),
                          warmup_ms + run_ms + CHILD_WAIT_MS)) {
                fprintf(stderr, "bench: no figures from the raw child\n");
                failures++;
                break;
            }
    }
    close(cmd_pipe[1]); /* EOF: a child still waiting for a command exits */
    cmd_pipe[1] = -1;
    int cstatus = 0;
    if (fx_wait_exit(child, 30000, &cstatus) != 0 || !WIFEXITED(cstatus) ||
        WEXITSTATUS(cstatus) != 0) {
        fprintf(stderr, "bench: the raw child failed\n");
        failures++;
    }
    child = 0;

    char ver[64];
    double load[3] = {0, 0, 0};
    softhsm_version(ver, sizeof(ver));
    if (getloadavg(load, 3) < 0)
        load[0] = load[1] = load[2] = -1;
    printf("\nstekd benchmark (SoftHSM %s, %u keys per set, %ld vCPU, load %.2f %.2f %.2f)\n", ver,
           N_KEYS, sysconf(_SC_NPROCESSORS_ONLN), load[0], load[1], load[2]);
    printf("key set %zu bytes; %.1f s warm-up + %.1f s measured per phase\n", keyset_len,
           warmup_ms / 1000.0, run_ms / 1000.0);
    printf("%-17s %-8s %9s %8s %8s %10s %10s\n", "phase", "threads", "calls/s", "p50 ms", "p99 ms",
           "srv us/op", "cli us/op");
    for (int c = 0; c < 2; c++) {
        print_row("warm GetKeySet", counts[c], &res[R_WARM][c]);
        print_row("echo", counts[c], &res[R_ECHO][c]);
        print_ratio("ratio warm/echo", counts[c], &res[R_WARM][c], &res[R_ECHO][c], 0.8);
    }
    for (int c = 0; c < 2; c++) {
        print_row("cold GetKeySet", counts[c], &res[R_COLD][c]);
        print_row("raw HSM ops", counts[c], &res[R_RAW][c]);
        print_ratio("ratio cold/raw", counts[c], &res[R_COLD][c], &res[R_RAW][c], 0.7);
    }
    print_row("raw HSM ops", 2, &res[R_RAW][2]);
    printf("srv us/op: stekd CPU per call (raw: the raw process per op); "
           "cli us/op: this process's CPU per call\n");
    rc = failures == 0 && !bench_stop_requested ? 0 : 1;

done:
    if (rc != 0 && d.log_path[0] != '\0') {
        fprintf(stderr, "bench: failed; stekd's log (%s) ends:\n", d.log_path);
        char cmd[FX_PATH_MAX + 64];
        snprintf(cmd, sizeof(cmd), "tail -n 20 '%s' >&2", d.log_path);
        if (system(cmd) != 0)
            fprintf(stderr, "bench: (no log)\n");
    }
    for (unsigned i = 0; i < MANY; i++) {
        fx_grpc_close(ch[i]);
        free(fixed[i].b);
        free(echo_req[i].b);
    }
    for (size_t i = 0; pool != NULL && i < pool_n; i++)
        free(pool[i].b);
    free(pool);
    if (cmd_pipe[1] >= 0)
        close(cmd_pipe[1]); /* EOF: a waiting child exits */
    cmd_pipe[1] = -1;
    if (child > 0) {
        int st;
        fx_stop(child, SIGKILL, 10000, &st);
    }
    if (d.pid > 0)
        fx_stekd_stop(&d, 10000, &stekd_exit);
    fx_stekd_destroy(&d);
    fx_token_destroy(&raw_tok);
    for (int i = 0; i < 2; i++) {
        if (cmd_pipe[i] >= 0)
            close(cmd_pipe[i]);
        if (res_pipe[i] >= 0)
            close(res_pipe[i]);
    }
    return rc;
}
