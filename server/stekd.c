/*
 * stekd: the HSM-backed key service.
 *
 *   stekd --config FILE [--pin-file FILE] [--port-file FILE] [--threads N]
 *
 * The PIN comes from --pin-file or the environment variable named in the
 * config (hsm.pin_env, default STEK_PIN), never from argv or the config.
 * Exit codes: 0 after SIGTERM/SIGINT, 2 usage or configuration (the audit
 * log too), 3 HSM, 4 TLS or a listening address (gRPC or metrics).
 * SIGHUP reopens the audit log.
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <grpc/grpc.h>
#include <openssl/crypto.h>

#include "audit.h"
#include "config.h"
#include "fleet.h"
#include "keyset.h"
#include "log.h"
#include "metrics.h"
#include "metrics_http.h"
#include "notify.h"
#include "rpc.h"
#include "state.h"
#include "tls_buffers.h"

enum { EXIT_USAGE = 2, EXIT_HSM = 3, EXIT_NET = 4 };

typedef struct scheduler {
    stekd_state *state;
    stek_p11 *p11;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    bool watchdog; /* systemd expects WATCHDOG=1: sent after every refresh */
} scheduler;

/*
 * Refreshes every group right after each rotation (a few ms past the epoch
 * boundary), and at least every second so the HSM coming back or a clock
 * step is noticed promptly. Each round also destroys the shared HSM
 * ephemeral key once its window has passed, so an idle stekd keeps none.
 */
static void *scheduler_main(void *arg)
{
    scheduler *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        pthread_mutex_unlock(&s->mu);
        int64_t now = stekd_now();
        int64_t next = stekd_state_refresh(s->state, now);
        stek_p11_eph_sweep(s->p11);
        /* A refresh stuck in the HSM stops the pings: systemd restarts stekd. */
        if (s->watchdog)
            stekd_notify_watchdog();
        /* stekd_now() may carry a test offset; wait on the real clock. */
        int64_t offset = stekd_now() - (int64_t)time(NULL);
        struct timespec real, until;
        clock_gettime(CLOCK_REALTIME, &real);
        until.tv_sec = (time_t)(next - offset);
        until.tv_nsec = 5000000L;
        if (until.tv_sec > real.tv_sec + 1 ||
            (until.tv_sec == real.tv_sec + 1 && until.tv_nsec > real.tv_nsec)) {
            until.tv_sec = real.tv_sec + 1;
            until.tv_nsec = real.tv_nsec;
        }
        pthread_mutex_lock(&s->mu);
        if (!s->stop)
            pthread_cond_timedwait(&s->cv, &s->mu, &until);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* GET /fleet?group=G on the metrics address (metrics_http.h). */
static unsigned fleet_json(void *arg, const char *group, char **body, size_t *len)
{
    const stekd_handler *h = arg;
    const int64_t now = stekd_now();
    stekd_fleet_group g;
    if (!stekd_handle_fleet_group(h, group, now, &g))
        return 404;
    if (stekd_fleet_json(h->fleet, &g, now, body, len) != STEK_OK) {
        stek_log(STEK_LOG_WARN, "stekd", "fleet of %s: %s", group, stek_error_detail());
        return 500;
    }
    return 200;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: stekd --config FILE [--pin-file FILE] [--port-file FILE] [--threads N]\n"
               "  The HSM PIN comes from --pin-file or the variable named by hsm.pin_env.\n");
}

static int write_port_file(const char *path, int port)
{
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "%d\n", port);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path); /* readers never see a half-written file */
}

/*
 * Every host holds its own mTLS connection, so stekd needs a descriptor per
 * host: raise the soft open-files limit to the hard one (systemd's default
 * soft limit is 1024; the unit also sets LimitNOFILE). Never fatal.
 */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max)
        return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
        stek_log(STEK_LOG_INFO, "stekd", "open files limit raised from %llu to %llu",
                 (unsigned long long)was, (unsigned long long)rl.rlim_max);
}

/*
 * At most two malloc arenas, unless the environment sets a number
 * (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in GLIBC_TUNABLES). glibc
 * allows 8 per core. The ticker's helpers are new threads at every tick of a
 * rotation and may each land on another arena than the threads that later
 * free what they built, so free memory piled up in arenas little allocated
 * from again: over 20 rotations with 2,000 watchers (bench_load) peak RSS
 * was 18 MiB higher with glibc's 16 arenas than with two, and still rising
 * in steps, at the same propagation time and CPU. Called before any thread
 * exists.
 */
static void limit_malloc_arenas(void)
{
#ifdef __GLIBC__
    const char *tunables = getenv("GLIBC_TUNABLES");
    if (getenv("MALLOC_ARENA_MAX") == NULL &&
        (tunables == NULL || strstr(tunables, "glibc.malloc.arena_max") == NULL))
        mallopt(M_ARENA_MAX, 2);
#endif
}

/*
 * gRPC core 29 (1.51) reads sockets through its tcp_read_chunks experiment,
 * on by default there. Turned off, gRPC takes its classic read path, which
 * sizes reads from the channel arguments rpc.c sets: bench_load's peak RSS
 * (2,000 watchers, 10,000 hosts) fell from 261 to 249 MiB, where either
 * change alone made no difference. GRPC_EXPERIMENTS is gRPC's documented
 * switch and is read at grpc_init. Only on core 29, where this was
 * measured, and never over the environment's own GRPC_EXPERIMENTS. Called
 * before any thread exists (setenv). Returns what it did, for the log.
 */
static const char *choose_grpc_read_path(void)
{
    if (getenv("GRPC_EXPERIMENTS") != NULL)
        return "gRPC experiments as the environment sets them (GRPC_EXPERIMENTS)";
    if (strncmp(grpc_version_string(), "29.", 3) != 0)
        return "gRPC's default read path (stekd tunes it only on gRPC core 29)";
    if (setenv("GRPC_EXPERIMENTS", "-tcp_read_chunks", 0) != 0)
        return "gRPC's default read path (setenv failed)";
    return "gRPC's classic read path, small read chunks (GRPC_EXPERIMENTS=-tcp_read_chunks)";
}

int main(int argc, char **argv)
{
    limit_malloc_arenas();
    const char *read_path = choose_grpc_read_path();
    const char *config_path = NULL, *pin_file = NULL, *port_file = NULL;
    unsigned threads = 4;
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"pin-file", required_argument, NULL, 'p'},
        {"port-file", required_argument, NULL, 'P'},
        {"threads", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "c:p:P:t:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config_path = optarg;
            break;
        case 'p':
            pin_file = optarg;
            break;
        case 'P':
            port_file = optarg;
            break;
        case 't':
            threads = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    if (config_path == NULL || optind != argc || threads == 0 || threads > 64) {
        usage(stderr);
        return EXIT_USAGE;
    }

    stekd_config *cfg = NULL;
    if (stekd_config_load(config_path, &cfg) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "configuration: %s", stek_error_detail());
        return EXIT_USAGE;
    }

    raise_nofile();

    /* Signals go to the main thread only: block them before any thread starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    int rc = 0;
    stek_p11 *p11 = NULL;
    stekd_state *state = NULL;
    stekd_cache *cache = NULL;
    stekd_vcache *vcache = NULL;
    stekd_fleet *fleet = NULL;
    stekd_rpc *rpc = NULL;
    stekd_audit *audit = NULL;
    stekd_metrics *metrics = NULL;
    stekd_metrics_http *mhttp = NULL;
    scheduler sched = {0};
    pthread_t sched_thread;
    bool sched_started = false;
    char *pem = NULL;

    /* Before the HSM: an unwritable audit log is a configuration error. */
    if (cfg->audit_log != NULL && stekd_audit_open(cfg->audit_log, &audit) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "configuration: %s", stek_error_detail());
        rc = EXIT_USAGE;
        goto done;
    }
    if (cfg->metrics_listen != NULL && stekd_metrics_new(&metrics) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "start-up: %s", stek_error_detail());
        rc = EXIT_USAGE;
        goto done;
    }

    stek_p11_config pc = {
        .module_path = cfg->hsm_module,
        .token_label = cfg->hsm_token,
        .pin_env = pin_file ? NULL : cfg->pin_env,
        .pin_file = pin_file,
        .so_pin_env = cfg->so_pin_env,
    };
    if (stek_p11_open(&pc, &p11) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "HSM: %s", stek_error_detail());
        rc = EXIT_HSM;
        goto done;
    }
    /* The layer keeps the PIN in locked memory for reconnects. The
     * variable's copy would stay readable in /proc/PID/environ and in
     * core files: overwrite it in place, then drop it. */
    if (pc.pin_env != NULL) {
        char *v = getenv(pc.pin_env);
        if (v != NULL)
            OPENSSL_cleanse(v, strlen(v));
        unsetenv(pc.pin_env);
    }
    /* Sets built within a second of each other share the HSM ephemeral key
     * (keyset.h): one key generation per burst instead of one per set. */
    stek_p11_set_eph_reuse_ms(p11, STEKD_HSM_EPH_REUSE_MS);
    /* HSM call latencies, before any other thread uses the handle. */
    if (metrics != NULL)
        stek_p11_set_call_observer(p11, stekd_metrics_hsm_call, metrics);
    if (stek_p11_signing_pubkey_pem(p11, &pem) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "HSM: no service signing key (run stekctl init): %s",
                 stek_error_detail());
        rc = EXIT_HSM;
        goto done;
    }
    if (stekd_state_new(cfg, p11, &state) != STEK_OK ||
        stekd_cache_new(cfg->wrap_cache_entries, &cache) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "start-up: %s", stek_error_detail());
        rc = EXIT_HSM;
        goto done;
    }
    /* Start-up cleanup, then the first refresh, before anyone is served. */
    for (size_t i = 0; i < cfg->n_groups; i++) {
        stek_p11_generation *gens = NULL;
        size_t n = 0;
        if (stek_p11_generation_list(p11, cfg->groups[i].name, &gens, &n) == STEK_OK && n > 0 &&
            stek_p11_chain_cleanup(p11, cfg->groups[i].name, gens[n - 1].generation) != STEK_OK)
            stek_log(STEK_LOG_WARN, "stekd", "cleanup of %s: %s", cfg->groups[i].name,
                     stek_error_detail());
        free(gens);
    }
    (void)stekd_state_refresh(state, stekd_now());

    if (stekd_vcache_new(STEKD_VCACHE_ENTRIES, &vcache) != STEK_OK ||
        stekd_fleet_new(cfg->fleet_max_hosts, cfg->fleet_expire_s, &fleet) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "start-up: %s", stek_error_detail());
        rc = EXIT_HSM;
        goto done;
    }
    stekd_handler h = {cfg, p11, state, cache, vcache, metrics, audit, fleet};
    if (stekd_rpc_start(&h, threads, &rpc) != STEK_OK) {
        stek_log(STEK_LOG_ERROR, "stekd", "listen: %s", stek_error_detail());
        rc = EXIT_NET;
        goto done;
    }
    /* The listener's TLS context exists now; see tls_buffers.c. */
    if (stekd_tls_buffers_released())
        stek_log(STEK_LOG_INFO, "stekd", "TLS record buffers are released while idle");
    else
        stek_log(STEK_LOG_WARN, "stekd",
                 "gRPC did not create its TLS context through stekd's SSL_CTX_new: "
                 "idle connections keep their TLS record buffers (about 34 KiB each)");
    stek_log(STEK_LOG_INFO, "stekd", "socket reads: %s", read_path);
    stekd_metrics_sources sources = {&h, rpc, (int64_t)time(NULL)};
    if (metrics != NULL) {
        if (stekd_metrics_add_collector(metrics, stekd_metrics_collect_service, &sources) !=
                STEK_OK ||
            stekd_metrics_http_start(cfg->metrics_listen, metrics, fleet_json, &h, &mhttp) !=
                STEK_OK) {
            stek_log(STEK_LOG_ERROR, "stekd", "metrics listen: %s", stek_error_detail());
            rc = EXIT_NET;
            goto done;
        }
        stek_log(STEK_LOG_INFO, "stekd",
                 "metrics listening on %s (port %d), paths /metrics and /fleet",
                 cfg->metrics_listen, stekd_metrics_http_port(mhttp));
    }
    unsigned long watchdog_ms = 0;
    sched.watchdog = stekd_notify_watchdog_enabled(&watchdog_ms);
    if (sched.watchdog && watchdog_ms < 2000)
        stek_log(STEK_LOG_WARN, "stekd", "WatchdogSec=%lu ms: stekd pings about once a second",
                 watchdog_ms);
    sched.state = state;
    sched.p11 = p11;
    pthread_mutex_init(&sched.mu, NULL);
    pthread_cond_init(&sched.cv, NULL);
    sched_started = pthread_create(&sched_thread, NULL, scheduler_main, &sched) == 0;
    stek_log(STEK_LOG_INFO, "stekd", "listening on %s (port %d), %zu group(s)", cfg->listen,
             stekd_rpc_port(rpc), cfg->n_groups);
    if (port_file != NULL && write_port_file(port_file, stekd_rpc_port(rpc)) != 0)
        stek_log(STEK_LOG_WARN, "stekd", "cannot write port file %s", port_file);
    if (cfg->audit_log != NULL)
        stek_log(STEK_LOG_INFO, "stekd", "audit log %s", cfg->audit_log);
    char status[128];
    snprintf(status, sizeof(status), "serving %zu group(s) on port %d", cfg->n_groups,
             stekd_rpc_port(rpc));
    stekd_notify_ready(status);

    int sig = 0;
    for (;;) {
        sigwait(&sigs, &sig);
        if (sig != SIGHUP)
            break;
        /* logrotate moved the file: continue in a new one at the same path. */
        if (audit != NULL && stekd_audit_reopen(audit) != STEK_OK)
            stek_log(STEK_LOG_ERROR, "stekd", "SIGHUP: %s; still writing the old file",
                     stek_error_detail());
        else if (audit != NULL)
            stek_log(STEK_LOG_INFO, "stekd", "SIGHUP: audit log reopened");
    }
    stekd_notify_stopping();
    stek_log(STEK_LOG_INFO, "stekd", "signal %d: finishing in-flight calls", sig);

done:
    /* Scrapes read everything below: they stop first. */
    stekd_metrics_http_stop(mhttp);
    if (sched_started) {
        pthread_mutex_lock(&sched.mu);
        sched.stop = true;
        pthread_cond_signal(&sched.cv);
        pthread_mutex_unlock(&sched.mu);
        pthread_join(sched_thread, NULL);
        pthread_mutex_destroy(&sched.mu);
        pthread_cond_destroy(&sched.cv);
    }
    stekd_rpc_stop(rpc, 3000);
    stekd_cache_free(cache);
    stekd_vcache_free(vcache);
    stekd_fleet_free(fleet); /* after the RPC threads that fill it */
    stekd_state_free(state);
    free(pem);
    stek_p11_close(p11);
    stekd_metrics_free(metrics); /* after the HSM handle that reports to it */
    stekd_audit_close(audit);
    stekd_config_free(cfg);
    if (rc == 0)
        stek_log(STEK_LOG_INFO, "stekd", "stopped");
    return rc;
}
