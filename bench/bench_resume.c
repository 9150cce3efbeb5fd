/*
 * bench_resume: TLS resumption handshakes per second on a server SSL_CTX
 * with libstek attached, against the same context with OpenSSL's built-in
 * ticket keys (SSL_CTX_set_tlsext_ticket_keys), in the same run (issue
 * "libstek", benchmark; target libstek/built-in >= 0.98 in every cell).
 *
 * A real stekd (tests/fixture/fx_stekd) rotates the group's key every
 * second (epoch 1 s, decrypt lifetime 18 s: 20 keys per set, as many as
 * the DESIGN default of hourly epochs and 18 h), and a libstek client
 * watches it through the public API, so a rotation reaches the callback
 * every second of every run, A's and B's alike.
 *
 *   A  libstek: stek_client_attach on the server context.
 *   B  built-in: 80 random bytes of ticket keys, the session-id context,
 *      session timeout and max_early_data that attach gives A.
 *
 * Both contexts have the same certificate and no server-side session cache,
 * so a resumption can only come from a ticket. Each cell is a TLS version
 * (1.2, 1.3) and a thread count (1, 2): every thread gets a ticket with one
 * full handshake, then loops resumption handshakes in memory (a BIO pair per
 * connection, client and server on the same thread) for the run's length,
 * taking the newest session the server gives it (a renewed ticket, TLS 1.3's
 * new tickets, or after a full handshake), as a client would. Only
 * handshakes that resumed on both ends count; full ones are counted apart.
 *
 * Two figures per run:
 *   server hs/s  resumed handshakes per second of server-side time: the
 *                server's calls (SSL_new, SSL_do_handshake, SSL_shutdown,
 *                SSL_free) are timed, the client's are not. Summed over the
 *                threads. The ratio and its target are on this figure.
 *   loop hs/s    resumed handshakes per second of the loop's wall time,
 *                client work included (which dilutes any difference).
 * The machine is shared: the time each thread spent runnable but waiting
 * for a CPU (/proc/thread-self/schedstat) is taken out of both figures in
 * proportion, and the CPU that other processes took is printed.
 * Runs of A and B alternate (A B, then B A, ...) for ROUNDS rounds; a cell
 * reports the medians of each figure and the median of the per-round
 * ratios.
 *
 * Speed is printed, never asserted: the exit status is non-zero only when
 * something failed (setup, or a handshake that did not complete).
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "bench_util.h"
#include "fx_stekd.h"
#include "stek/stek.h"

#define GROUP "bench"
#define EPOCH_S 1u
#define LIFETIME_S 18u
#define MAX_THREADS 2
#define MAX_ROUNDS 15
#define MAX_FAILED 10 /* handshakes that failed outright, per thread and run */
#define READY_MS 20000
#define MONITOR_MS 10               /* how often the main thread reads libstek's counters */
#define SID_CTX_LABEL "stek-sid-v1" /* stek.h: SHA-256("stek-sid-v1" || group) */
#define TICKET_KEYS_BYTES 80        /* name 16, HMAC 32, AES 32 */

static void sleep_ns(int64_t d)
{
    if (d <= 0)
        return;
    struct timespec ts = {(time_t)(d / 1000000000LL), (long)(d % 1000000000LL)};
    nanosleep(&ts, NULL);
}

/* ---- CPU that other processes take --------------------------------------------------- */

/* The machine's busy CPU seconds (all CPUs, from /proc/stat); -1 if unknown. */
static double machine_busy_s(void)
{
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    int n = f ? fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                       &v[4], &v[5], &v[6], &v[7])
              : 0;
    if (f != NULL)
        fclose(f);
    if (n != 8)
        return -1;
    /* user nice system idle iowait irq softirq steal: all but idle and iowait. */
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)sysconf(_SC_CLK_TCK);
}

/* Busy CPU of the machine not spent by this process or stekd. */
static double others_cpu_s(pid_t stekd)
{
    double m = machine_busy_s(), me = bench_proc_cpu_s(getpid()), d = bench_proc_cpu_s(stekd);
    return m < 0 || me < 0 || d < 0 ? -1 : m - me - d;
}

/*
 * Nanoseconds this thread has waited on a run queue, runnable but not
 * running (the second field of /proc/thread-self/schedstat); -1 if unknown.
 */
static int64_t runqueue_wait_ns(void)
{
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    unsigned long long run_ns = 0, wait_ns = 0;
    int n = f ? fscanf(f, "%llu %llu", &run_ns, &wait_ns) : 0;
    if (f != NULL)
        fclose(f);
    return n == 2 ? (int64_t)wait_ns : -1;
}

/* ---- one handshake in memory ------------------------------------------------------ */

typedef struct hs_result {
    bool ok;      /* both ends finished, and the client took in the server's tickets */
    bool resumed; /* on both ends */
    bool renewed; /* the client holds a newer session than it offered */
    int64_t srv_ns;
} hs_result;

static bool want_more(SSL *s, int rc)
{
    int e = SSL_get_error(s, rc);
    return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
}

/*
 * One connection from a client of cctx offering *sess (NULL: none) to
 * sctx. On success *sess becomes the client's newest session: the one it
 * offered, or the one a new ticket brought. Only the server's calls are
 * timed; a TLS 1.3 server writes its NewSessionTicket inside
 * SSL_do_handshake, so the ticket's encryption is in its time.
 */
static hs_result handshake(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION **sess)
{
    hs_result out = {0};
    int64_t t = bench_mono_ns();
    SSL *s = SSL_new(sctx);
    int64_t srv = bench_mono_ns() - t;
    SSL *c = SSL_new(cctx);
    BIO *bs = NULL, *bc = NULL;
    if (s == NULL || c == NULL || BIO_new_bio_pair(&bs, 0, &bc, 0) != 1)
        goto done;
    SSL_set_bio(s, bs, bs);
    SSL_set_bio(c, bc, bc);
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    if (*sess != NULL && SSL_set_session(c, *sess) != 1)
        goto done;
    bool cdone = false, sdone = false;
    for (int round = 0; round < 16 && !(cdone && sdone); round++) {
        if (!cdone) {
            int rc = SSL_do_handshake(c);
            if (rc == 1)
                cdone = true;
            else if (!want_more(c, rc))
                break;
        }
        if (!sdone) {
            t = bench_mono_ns();
            int rs = SSL_do_handshake(s);
            srv += bench_mono_ns() - t;
            if (rs == 1)
                sdone = true;
            else if (!want_more(s, rs))
                break;
        }
    }
    if (!cdone || !sdone)
        goto done;
    /* The client reads what the server sent after its Finished (TLS 1.3
     * tickets); there is no application data, so it ends wanting more. */
    char byte;
    int rd = SSL_read(c, &byte, 1);
    if (rd > 0 || SSL_get_error(c, rd) != SSL_ERROR_WANT_READ)
        goto done;
    out.resumed = SSL_session_reused(s) == 1 && SSL_session_reused(c) == 1;
    SSL_SESSION *got = SSL_get1_session(c);
    if (got == NULL)
        goto done;
    if (got != *sess) {
        out.renewed = *sess != NULL && out.resumed;
        SSL_SESSION_free(*sess);
        *sess = got;
    } else {
        SSL_SESSION_free(got);
    }
    /* close_notify both ways: a connection freed without it marks its
     * session not resumable (ssl_clear_bad_session). */
    (void)SSL_shutdown(c);
    t = bench_mono_ns();
    (void)SSL_shutdown(s);
    srv += bench_mono_ns() - t;
    out.ok = true;
done:
    SSL_free(c);
    t = bench_mono_ns();
    SSL_free(s);
    out.srv_ns = srv + (bench_mono_ns() - t);
    return out;
}

/* ---- a run: N threads looping resumptions on one server context -------------------- */

typedef struct tally {
    uint64_t resumed, full, renewed, failed;
    int64_t srv_ns;  /* server-side time of the resumed handshakes */
    int64_t span_ns; /* the thread's measured window */
    int64_t wait_ns; /* of which runnable but waiting for a CPU; < 0 unknown */
} tally;

typedef struct run {
    SSL_CTX *sctx;
    int version;
    unsigned threads;
    int64_t measure_ns, end_ns;
    pthread_barrier_t go;
    tally t[MAX_THREADS];
    atomic_int setup_failed;
} run;

typedef struct worker_arg {
    run *r;
    unsigned i;
} worker_arg;

static SSL_CTX *client_ctx(int version)
{
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    if (c == NULL || SSL_CTX_set_min_proto_version(c, version) != 1 ||
        SSL_CTX_set_max_proto_version(c, version) != 1) {
        SSL_CTX_free(c);
        return NULL;
    }
    SSL_CTX_set_verify(c, SSL_VERIFY_NONE, NULL);
    return c;
}

static void *worker(void *arg)
{
    worker_arg *w = arg;
    run *r = w->r;
    tally *t = &r->t[w->i];
    SSL_CTX *cctx = client_ctx(r->version);
    SSL_SESSION *sess = NULL;
    /* The first ticket, untimed: one full handshake. */
    hs_result first = cctx ? handshake(r->sctx, cctx, &sess) : (hs_result){0};
    if (!first.ok || sess == NULL || !SSL_SESSION_has_ticket(sess)) {
        fprintf(stderr, "bench: the first handshake gave no ticket\n");
        ERR_print_errors_fp(stderr);
        atomic_store(&r->setup_failed, 1);
    }
    pthread_barrier_wait(&r->go);
    int64_t span0 = 0, wait0 = -1;
    while (!bench_stop_requested && !atomic_load(&r->setup_failed) && t->failed < MAX_FAILED) {
        int64_t start = bench_mono_ns();
        if (start >= r->end_ns)
            break;
        if (span0 == 0 && start >= r->measure_ns) {
            span0 = start;
            wait0 = runqueue_wait_ns();
        }
        hs_result h = handshake(r->sctx, cctx, &sess);
        int64_t done = bench_mono_ns();
        if (!h.ok) {
            if (t->failed++ == 0)
                ERR_print_errors_fp(stderr);
            ERR_clear_error();
            continue;
        }
        /* Completions inside the window count, whenever they started. */
        if (done < r->measure_ns || done > r->end_ns)
            continue;
        if (h.resumed) {
            t->resumed++;
            t->srv_ns += h.srv_ns;
        } else {
            t->full++;
        }
        t->renewed += h.renewed;
    }
    if (span0 != 0) {
        int64_t wait1 = runqueue_wait_ns();
        t->span_ns = bench_mono_ns() - span0;
        t->wait_ns = wait0 >= 0 && wait1 >= wait0 ? wait1 - wait0 : -1;
    }
    SSL_SESSION_free(sess);
    SSL_CTX_free(cctx);
    return NULL;
}

typedef struct figures {
    double srv_hs_s, loop_hs_s;
    double others_s; /* CPU seconds other processes used in the window; < 0 unknown */
    double waited;   /* share of the threads' windows spent waiting for a CPU */
    uint64_t resumed, full, renewed, failed, rotations;
} figures;

/*
 * Runs one measured window on sctx and, meanwhile, counts the rotations the
 * client installs (changes of current_epoch). Returns 0, or -1 when a
 * thread could not start or a handshake failed.
 */
static int run_once(stek_client *sc, pid_t stekd, SSL_CTX *sctx, int version, unsigned threads,
                    int warmup_ms, int run_ms, figures *out)
{
    static run r;
    pthread_t th[MAX_THREADS];
    worker_arg wa[MAX_THREADS];
    unsigned started = 0;
    memset(&r, 0, sizeof(r));
    memset(out, 0, sizeof(*out));
    r.sctx = sctx;
    r.version = version;
    r.threads = threads;
    atomic_init(&r.setup_failed, 0);
    pthread_barrier_init(&r.go, NULL, threads + 1);
    for (unsigned i = 0; i < threads; i++) {
        wa[i] = (worker_arg){&r, i};
        if (pthread_create(&th[i], NULL, worker, &wa[i]) != 0)
            break;
        started++;
    }
    if (started < threads) {
        /* The barrier counts every thread: nobody would get past it. */
        fprintf(stderr, "bench: pthread_create failed\n");
        exit(1);
    }
    /* Set before the barrier, which publishes it to the threads; the
     * warm-up also covers their first (full) handshakes. */
    r.measure_ns = bench_mono_ns() + (int64_t)warmup_ms * 1000000LL;
    r.end_ns = r.measure_ns + (int64_t)run_ms * 1000000LL;
    pthread_barrier_wait(&r.go);
    stek_counters k;
    uint64_t epoch = stek_client_get_counters(sc, &k) == STEK_RESULT_OK ? k.current_epoch : 0;
    double others0 = -1;
    for (int64_t t = bench_mono_ns(); t < r.end_ns && !bench_stop_requested; t = bench_mono_ns()) {
        int64_t next = t < r.measure_ns ? r.measure_ns : r.end_ns;
        sleep_ns(next - t < MONITOR_MS * 1000000LL ? next - t : MONITOR_MS * 1000000LL);
        if (others0 < 0 && bench_mono_ns() >= r.measure_ns)
            others0 = others_cpu_s(stekd);
        if (stek_client_get_counters(sc, &k) == STEK_RESULT_OK && k.current_epoch != epoch) {
            if (bench_mono_ns() >= r.measure_ns)
                out->rotations++;
            epoch = k.current_epoch;
        }
    }
    double others1 = others_cpu_s(stekd);
    out->others_s = others0 >= 0 && others1 >= 0 ? others1 - others0 : -1;
    for (unsigned i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&r.go);
    for (unsigned i = 0; i < threads; i++) {
        const tally *t = &r.t[i];
        out->resumed += t->resumed;
        out->full += t->full;
        out->renewed += t->renewed;
        out->failed += t->failed;
        if (t->span_ns <= 0 || t->srv_ns <= 0)
            continue;
        /* Time spent preempted (by other processes, stekd, or this
         * process's other threads) is taken out of both figures, spread
         * over the window: a server call is as likely to be preempted as
         * any other part of the loop. Blocking on a lock is not removed. */
        double kept = t->wait_ns >= 0 ? 1.0 - (double)t->wait_ns / (double)t->span_ns : 1.0;
        kept = kept < 0.05 ? 0.05 : kept;
        out->srv_hs_s += (double)t->resumed / ((double)t->srv_ns * kept / 1e9);
        out->loop_hs_s += (double)t->resumed / ((double)t->span_ns * kept / 1e9);
        out->waited += (1.0 - kept) / threads;
    }
    if (out->failed > 0)
        fprintf(stderr, "bench: %llu handshake(s) failed\n", (unsigned long long)out->failed);
    return atomic_load(&r.setup_failed) || out->failed > 0 ? -1 : 0;
}

/* ---- setup --------------------------------------------------------------------------- */

static stek_client *client_for(const fx_stekd *d, const fx_cert *cert)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, d->target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d->ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d->signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "bench: libstek client: %s\n", stek_result_name(r));
    return c;
}

static SSL_CTX *server_ctx(const fx_stekd *d)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL || SSL_CTX_use_certificate_chain_file(ctx, d->server.cert_path) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, d->server.key_path, SSL_FILETYPE_PEM) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* No server-side cache: a resumption can only come from a ticket. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

/* B: OpenSSL's own ticket keys, and what stek_client_attach set on A. */
static int builtin_setup(SSL_CTX *b, const SSL_CTX *a)
{
    uint8_t keys[TICKET_KEYS_BYTES], sid[32];
    unsigned sid_len = 0;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
              EVP_DigestUpdate(md, SID_CTX_LABEL, strlen(SID_CTX_LABEL)) == 1 &&
              EVP_DigestUpdate(md, GROUP, strlen(GROUP)) == 1 &&
              EVP_DigestFinal_ex(md, sid, &sid_len) == 1 &&
              SSL_CTX_set_session_id_context(b, sid, sid_len) == 1 &&
              RAND_bytes(keys, sizeof(keys)) == 1 &&
              SSL_CTX_set_tlsext_ticket_keys(b, keys, sizeof(keys)) == 1 &&
              SSL_CTX_set_max_early_data(b, SSL_CTX_get_max_early_data(a)) == 1;
    OPENSSL_cleanse(keys, sizeof(keys));
    EVP_MD_CTX_free(md);
    if (!ok) {
        fprintf(stderr, "bench: built-in ticket keys: setup failed\n");
        return -1;
    }
    SSL_CTX_set_timeout(b, SSL_CTX_get_timeout(a));
    return 0;
}

/* ---- the report ---------------------------------------------------------------------- */

static const char *version_name(int v)
{
    return v == TLS1_3_VERSION ? "TLS 1.3" : v == TLS1_2_VERSION ? "TLS 1.2" : "?";
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
    double s[MAX_ROUNDS];
    memcpy(s, v, (size_t)n * sizeof(*v));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

enum { IMPL_BUILTIN, IMPL_STEK, IMPLS };

typedef struct cell {
    int version;
    unsigned threads;
    bool selected; /* STEK_BENCH_CELLS names it, or is unset */
    figures f[IMPLS][MAX_ROUNDS];
} cell;

/* ---- main ---------------------------------------------------------------------------- */

int main(void)
{
    const int warmup_ms = bench_env_int("STEK_BENCH_WARMUP_MS", 300, 0, 60000);
    const int run_ms = bench_env_int("STEK_BENCH_RUN_MS", 3000, 100, 120000);
    const int rounds = bench_env_int("STEK_BENCH_ROUNDS", 3, 1, MAX_ROUNDS);
    const double target = 0.98;
    setvbuf(stdout, NULL, _IOLBF, 0);

    bench_catch_signals();

    static const fx_stekd_group groups[] = {{GROUP, {"uri:spiffe://fleet/bench/*", NULL}}};
    static fx_stekd d;
    static cell cells[4];
    static const char *const uris[] = {"spiffe://fleet/bench/h1", NULL};
    fx_cert host;
    stek_client *sc = NULL;
    SSL_CTX *ctx[IMPLS] = {NULL, NULL};
    stek_counters k0, k1;
    int rc = 1, stekd_exit = -1, failures = 0;

    static const int versions[2] = {TLS1_2_VERSION, TLS1_3_VERSION};
    static const unsigned thread_counts[2] = {1, 2};
    for (int v = 0; v < 2; v++)
        for (int n = 0; n < 2; n++)
            cells[v * 2 + n] = (cell){.version = versions[v], .threads = thread_counts[n]};
    /* STEK_BENCH_CELLS="1.3/2,1.2/1": only those cells (e.g. under perf). */
    const char *only = getenv("STEK_BENCH_CELLS");
    bool any_cell = false;
    for (int c = 0; c < 4; c++) {
        char name[16], list[256];
        snprintf(name, sizeof(name), ",%s/%u,", cells[c].version == TLS1_3_VERSION ? "1.3" : "1.2",
                 cells[c].threads);
        snprintf(list, sizeof(list), ",%s,", only ? only : "");
        cells[c].selected = only == NULL || only[0] == '\0' || strstr(list, name) != NULL;
        any_cell = any_cell || cells[c].selected;
    }
    if (!any_cell) {
        fprintf(stderr,
                "bench: STEK_BENCH_CELLS=\"%s\" names no cell (1.2/1, 1.2/2, 1.3/1, 1.3/2)\n",
                only);
        goto done;
    }

    printf("bench: provisioning a SoftHSM token, starting stekd (epoch %u s, lifetime %u s)\n",
           EPOCH_S, LIFETIME_S);
    fx_cert_opts ho = {.name = "bench-host", .key_type = FX_KEY_EC_P256, .uri_sans = uris};
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 || fx_stekd_start(&d) != 0 ||
        fx_stekd_host_cert(&d, &ho, &host) != 0)
        goto done;
    sc = client_for(&d, &host);
    if (sc == NULL)
        goto done;
    if (stek_client_wait_ready(sc, READY_MS) != STEK_RESULT_OK) {
        fprintf(stderr, "bench: libstek not ready within %d ms\n", READY_MS);
        goto done;
    }
    ctx[IMPL_BUILTIN] = server_ctx(&d);
    ctx[IMPL_STEK] = server_ctx(&d);
    if (ctx[IMPL_BUILTIN] == NULL || ctx[IMPL_STEK] == NULL ||
        stek_client_attach(sc, ctx[IMPL_STEK]) != STEK_RESULT_OK ||
        builtin_setup(ctx[IMPL_BUILTIN], ctx[IMPL_STEK]) != 0)
        goto done;
    if (stek_client_get_counters(sc, &k0) != STEK_RESULT_OK)
        goto done;

    printf("bench: %d round(s) of %d ms (+%d ms warm-up) per run, A/B interleaved\n", rounds,
           run_ms, warmup_ms);
    for (int c = 0; c < 4 && !bench_stop_requested; c++) {
        cell *ce = &cells[c];
        if (!ce->selected)
            continue;
        for (int r = 0; r < rounds && !bench_stop_requested; r++) {
            /* A B, then B A: a slow drift of the machine favours neither. */
            for (int j = 0; j < IMPLS && !bench_stop_requested; j++) {
                int impl = (r % 2 == 0) ? j : IMPLS - 1 - j;
                failures += run_once(sc, d.pid, ctx[impl], ce->version, ce->threads, warmup_ms,
                                     run_ms, &ce->f[impl][r]) != 0;
            }
        }
        printf("bench: %s, %u thread(s) done\n", version_name(ce->version), ce->threads);
    }
    if (stek_client_get_counters(sc, &k1) != STEK_RESULT_OK)
        goto done;

    double load[3] = {0, 0, 0};
    if (getloadavg(load, 3) < 0)
        load[0] = load[1] = load[2] = -1;
    printf("\nresumption benchmark (%s, %ld vCPU, load %.2f %.2f %.2f)\n", OpenSSL_version(0),
           sysconf(_SC_NPROCESSORS_ONLN), load[0], load[1], load[2]);
    printf("rotation every %u s (%u keys per set); %d round(s) of %.1f s per run; medians\n",
           EPOCH_S, LIFETIME_S / EPOCH_S + 2, rounds, run_ms / 1000.0);
    printf("%-9s %-7s %12s %12s %7s %10s %10s %7s %6s %14s %4s\n", "cell", "threads", "built-in/s",
           "libstek/s", "ratio", "loop b-in", "loop stek", "loop r", "full", "new tickets", "rot");
    double min_ratio = 1e9, others = 0, others_max = 0, waited = 0, waited_max = 0;
    int others_n = 0, runs = 0;
    for (int c = 0; c < 4 && !bench_stop_requested; c++) {
        const cell *ce = &cells[c];
        if (!ce->selected)
            continue;
        double sb[MAX_ROUNDS], ss[MAX_ROUNDS], lb[MAX_ROUNDS], ls[MAX_ROUNDS];
        double q[MAX_ROUNDS], lq[MAX_ROUNDS], rot[MAX_ROUNDS];
        uint64_t full[IMPLS] = {0, 0}, renewed[IMPLS] = {0, 0};
        for (int r = 0; r < rounds; r++) {
            const figures *b = &ce->f[IMPL_BUILTIN][r], *s = &ce->f[IMPL_STEK][r];
            sb[r] = b->srv_hs_s;
            ss[r] = s->srv_hs_s;
            lb[r] = b->loop_hs_s;
            ls[r] = s->loop_hs_s;
            q[r] = b->srv_hs_s > 0 ? s->srv_hs_s / b->srv_hs_s : 0;
            lq[r] = b->loop_hs_s > 0 ? s->loop_hs_s / b->loop_hs_s : 0;
            rot[r] = (double)s->rotations;
            full[IMPL_BUILTIN] += b->full;
            full[IMPL_STEK] += s->full;
            renewed[IMPL_BUILTIN] += b->renewed;
            renewed[IMPL_STEK] += s->renewed;
            for (int i = 0; i < IMPLS; i++) {
                double o = ce->f[i][r].others_s, w = ce->f[i][r].waited;
                waited += w;
                waited_max = w > waited_max ? w : waited_max;
                runs++;
                if (o < 0)
                    continue;
                others += o;
                others_max = o > others_max ? o : others_max;
                others_n++;
            }
        }
        double ratio = median(q, rounds);
        min_ratio = ratio < min_ratio ? ratio : min_ratio;
        char fulls[32], renews[48];
        snprintf(fulls, sizeof(fulls), "%llu/%llu", (unsigned long long)full[IMPL_BUILTIN],
                 (unsigned long long)full[IMPL_STEK]);
        snprintf(renews, sizeof(renews), "%llu/%llu", (unsigned long long)renewed[IMPL_BUILTIN],
                 (unsigned long long)renewed[IMPL_STEK]);
        printf("%-9s %-7u %12.0f %12.0f %7.3f %10.0f %10.0f %7.3f %6s %14s %4.0f\n",
               version_name(ce->version), ce->threads, median(sb, rounds), median(ss, rounds),
               ratio, median(lb, rounds), median(ls, rounds), median(lq, rounds), fulls, renews,
               median(rot, rounds));
    }
    printf("built-in/s, libstek/s: resumed handshakes per second of server-side time, summed "
           "over threads;\nratio: median of per-round libstek/built-in; loop: the same per second "
           "of the loop's time,\nclient included; full: handshakes that did not resume, and new "
           "tickets: resumptions\n"
           "that brought the client a new ticket (built-in/libstek, all rounds);\nrot: rotations "
           "libstek installed during a libstek run\n");
    printf("libstek over the whole run: %llu tickets issued, %llu resumed, %llu renewed; "
           "misses: %llu unknown, %llu expired, %llu bad MAC; %llu without a key\n",
           (unsigned long long)(k1.tickets_issued - k0.tickets_issued),
           (unsigned long long)(k1.tickets_resumed - k0.tickets_resumed),
           (unsigned long long)(k1.tickets_renewed - k0.tickets_renewed),
           (unsigned long long)(k1.miss_unknown - k0.miss_unknown),
           (unsigned long long)(k1.miss_expired - k0.miss_expired),
           (unsigned long long)(k1.miss_bad_mac - k0.miss_bad_mac),
           (unsigned long long)(k1.no_key_encrypts - k0.no_key_encrypts));
    /* Every resumption counted on A went through libstek's callbacks. */
    uint64_t a_resumed = 0;
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < rounds && cells[c].selected; r++)
            a_resumed += cells[c].f[IMPL_STEK][r].resumed;
    uint64_t seen =
        (k1.tickets_resumed - k0.tickets_resumed) + (k1.tickets_renewed - k0.tickets_renewed);
    if (seen < a_resumed) {
        fprintf(stderr, "bench: libstek counted %llu resumptions, the libstek runs %llu\n",
                (unsigned long long)seen, (unsigned long long)a_resumed);
        failures++;
    }
    if (others_n > 0 && runs > 0) {
        /* Each window is run_ms long on every CPU of the machine. */
        double cap = run_ms / 1000.0 * (double)sysconf(_SC_NPROCESSORS_ONLN);
        printf("other processes took %.1f%% of the machine's CPU in the measured windows "
               "(%.1f%% in the worst one);\nthe benchmark's threads waited for a CPU %.1f%% of "
               "the time (%.1f%% in the worst run;\ntaken out of the figures)%s\n",
               100.0 * others / (cap * others_n), 100.0 * others_max / cap, 100.0 * waited / runs,
               100.0 * waited_max,
               others_max / cap > 0.05 ? ": the figures are noisy, rerun on a quiet machine" : "");
    }
    if (!bench_stop_requested)
        printf("minimum ratio %.3f (target >= %.2f: %s)\n", min_ratio, target,
               min_ratio >= target ? "met" : "MISSED");
    rc = failures == 0 && !bench_stop_requested ? 0 : 1;

done:
    if (rc != 0 && d.log_path[0] != '\0') {
        fprintf(stderr, "bench: failed; stekd's log (%s) ends:\n", d.log_path);
        char cmd[FX_PATH_MAX + 64];
        snprintf(cmd, sizeof(cmd), "tail -n 20 '%s' >&2", d.log_path);
        if (system(cmd) != 0)
            fprintf(stderr, "bench: (no log)\n");
    }
    /* The client first: it detaches from the context it still references. */
    stek_client_free(sc);
    SSL_CTX_free(ctx[IMPL_STEK]);
    SSL_CTX_free(ctx[IMPL_BUILTIN]);
    if (d.pid > 0 && (fx_stekd_stop(&d, 10000, &stekd_exit) != 0 || stekd_exit != 0)) {
        fprintf(stderr, "bench: stekd exited with %d\n", stekd_exit);
        rc = 1;
    }
    fx_stekd_destroy(&d);
    return rc;
}
