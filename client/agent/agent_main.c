/*
 * stek-agent: the main loop. See agent.h for the shape and docs/agent.md for
 * operating it.
 *
 *   stek-agent --config FILE [--once] [--wait SECONDS]
 *   stek-agent status --config FILE
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>

#include <openssl/rand.h>

#ifdef STEK_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "agent.h"
#include "log.h"
#include "stek_client_internal.h"

#define COMPONENT "stek-agent"
#define TICK_MS 100
/* HAProxy's ring can change under us (a restart, another writer): check it this often. */
#define HAPROXY_VERIFY_NS (5LL * 1000000000LL)
#define NS 1000000000LL
/* The metrics file is rewritten after every apply, and at least this often. */
#define METRICS_EVERY_NS (5LL * NS)

static atomic_bool stop_requested;

static void on_stop(int sig)
{
    (void)sig;
    atomic_store(&stop_requested, true);
}

/* What a target last got, and its retry state. */
typedef struct target_state {
    const agent_target_cfg *cfg;
    bool attempted, ok;
    uint64_t generation;
    size_t n;
    uint8_t names[AGENT_MAX_KEYS][AGENT_NAME_BYTES];
    unsigned failures;
    int64_t retry_at, last_apply; /* CLOCK_BOOTTIME ns */
    bool checked_timeouts;
    /* For the metrics file. */
    uint64_t encrypt_epoch, applies_ok, applies_failed;
    int64_t last_success_unix;
} target_state;

static void usage(FILE *f)
{
    fprintf(f, "usage: stek-agent --config FILE [--once] [--wait SECONDS]\n"
               "       stek-agent status --config FILE\n");
}

/* ---- views ------------------------------------------------------------------------ */

static int64_t unix_of(int64_t deadline, int64_t boot, int64_t wall)
{
    return (wall + (deadline - boot)) / NS;
}

/*
 * The view of one group at this moment: the key OpenSSL-based libstek would
 * encrypt with, then the newer keys, then the older live ones. One
 * exception: right after an epoch boundary, before the set naming the new
 * next key arrives, the previous key keeps encrypting for up to a quarter
 * epoch (it is live, and every peer holds it), so that a server is not
 * reloaded twice per rotation.
 */
static stek_status build_view(stek_keyring *kr, const char *group, agent_view *v)
{
    memset(v, 0, sizeof(*v));
    stek_secret *m = NULL;
    /* Allocated outside the read section: a reader must not hold up the writer. */
    STEK_GUARD(stek_secret_new(AGENT_MAX_KEYS * AGENT_ENTRY_BYTES, &m));
    unsigned slot = 0;
    const stek_ring *r = stek_keyring_read_begin(kr, &slot);
    const int64_t boot = stek_boottime_ns(), wall = stek_walltime_ns();
    int g = r != NULL ? stek_ring_group_index(r, group) : -1;
    bool stale = false;
    long e = g >= 0 ? stek_ring_encrypt_key(r, (uint32_t)g, boot, &stale) : -1;
    if (e >= 0) {
        const stek_ring_group *grp = &r->groups[g];
        const size_t first = grp->first, end = grp->first + grp->count;
        const stek_ring_key *ke = &r->keys[e];
        int64_t grace = (ke->enc_until - ke->enc_from) / 4;
        bool newest = true;
        for (size_t j = (size_t)e + 1; j < end; j++)
            newest = newest && r->keys[j].dec_until <= boot;
        if (newest && (size_t)e > first && boot < ke->enc_from + grace &&
            r->keys[e - 1].dec_until > boot)
            e--;
        size_t order[AGENT_MAX_KEYS], n = 0;
        order[n++] = (size_t)e;
        for (size_t j = (size_t)e + 1; j < end && n < AGENT_MAX_KEYS; j++)
            if (r->keys[j].dec_until > boot)
                order[n++] = j;
        for (size_t j = (size_t)e; j-- > first && n < AGENT_MAX_KEYS;)
            if (r->keys[j].dec_until > boot)
                order[n++] = j;
        for (size_t i = 0; i < n; i++) {
            const stek_ring_key *k = &r->keys[order[i]];
            const uint8_t *entry = stek_ring_entry(r, order[i]);
            memcpy(stek_secret_data(m) + i * AGENT_ENTRY_BYTES, entry, AGENT_ENTRY_BYTES);
            v->keys[i].epoch = k->epoch;
            memcpy(v->keys[i].name, entry, AGENT_NAME_BYTES);
            v->keys[i].enc_from = unix_of(k->enc_from, boot, wall);
            v->keys[i].enc_until = unix_of(k->enc_until, boot, wall);
            v->keys[i].dec_until = unix_of(k->dec_until, boot, wall);
        }
        v->n = n;
        v->generation = grp->generation;
        v->epoch_s = (ke->enc_until - ke->enc_from) / NS;
    }
    stek_keyring_read_end(kr, slot);
    if (v->n > 0)
        v->material = m;
    else
        stek_secret_free(m);
    return STEK_OK;
}

static void view_free(agent_view *v)
{
    stek_secret_free(v->material);
    v->material = NULL;
}

static bool same_as_applied(const target_state *s, const agent_view *v)
{
    if (!s->attempted || s->generation != v->generation || s->n != v->n)
        return false;
    for (size_t i = 0; i < v->n; i++)
        if (memcmp(s->names[i], v->keys[i].name, AGENT_NAME_BYTES) != 0)
            return false;
    return true;
}

/* ---- server config checks --------------------------------------------------------- */

/* 0-RTT: a warning, or in strict mode a refusal (AGENT_EXIT_REFUSED). */
static int check_early_data(const agent_config *cfg)
{
    for (size_t i = 0; i < cfg->n_targets; i++) {
        const agent_target_cfg *t = &cfg->targets[i];
        if (t->server_config == NULL)
            continue;
        agent_server_checks c;
        stek_status st = agent_check_server_config(t->kind, t->server_config, &c);
        if (st != STEK_OK) {
            fprintf(stderr, "stek-agent: target %s: server_config: %s\n", t->name,
                    stek_error_detail());
            return AGENT_EXIT_CONFIG;
        }
        if (!c.early_data)
            continue;
        const char *what = t->kind == AGENT_NGINX ? "ssl_early_data on" : "allow-0rtt";
        stek_log(cfg->strict ? STEK_LOG_ERROR : STEK_LOG_WARN, COMPONENT,
                 "target %s: %s enables 0-RTT (%s): with keys shared by N servers, one "
                 "ClientHello with early data can be replayed N times%s",
                 t->name, t->server_config, what,
                 cfg->strict ? "; strict mode refuses to run" : "");
        if (cfg->strict)
            return AGENT_EXIT_REFUSED;
    }
    return AGENT_EXIT_OK;
}

/* Once the epoch is known: settings that keep old keys around or cut the window short. */
static void check_timeouts(target_state *s, const agent_view *v)
{
    const agent_target_cfg *t = s->cfg;
    if (s->checked_timeouts || v->epoch_s <= 0)
        return;
    s->checked_timeouts = true;
    if (t->server_config == NULL)
        return;
    agent_server_checks c;
    if (agent_check_server_config(t->kind, t->server_config, &c) != STEK_OK)
        return;
    if (t->kind == AGENT_NGINX &&
        (!c.has_shutdown_timeout || c.shutdown_timeout_s < 0 || c.shutdown_timeout_s > v->epoch_s))
        stek_log(STEK_LOG_WARN, COMPONENT,
                 "target %s: %s: worker_shutdown_timeout is %s; old workers keep old keys "
                 "until they exit, so set it to at most the epoch (%lld s)",
                 t->name, t->server_config, c.has_shutdown_timeout ? "longer" : "unset",
                 (long long)v->epoch_s);
    if (t->kind == AGENT_HAPROXY &&
        (!c.has_ssl_lifetime || c.ssl_lifetime_s < 0 || c.ssl_lifetime_s > v->epoch_s))
        stek_log(STEK_LOG_WARN, COMPONENT,
                 "target %s: %s: tune.ssl.lifetime is %s; HAProxy's ring of 3 decrypts a "
                 "ticket for about one epoch, so set it to at most the epoch (%lld s)",
                 t->name, t->server_config, c.has_ssl_lifetime ? "longer" : "unset (300 s)",
                 (long long)v->epoch_s);
}

/* ---- applying ----------------------------------------------------------------------- */

static stek_status apply(const agent_target_cfg *t, const agent_view *v)
{
    switch (t->kind) {
    case AGENT_NGINX:
        return out_nginx_apply(t, v);
    case AGENT_HAPROXY:
        return out_haproxy_apply(t, v);
    case AGENT_FILES:
        return out_files_apply(t, v);
    }
    return STEK_ERR_INTERNAL;
}

static void record(target_state *s, const agent_view *v, bool ok)
{
    s->attempted = true;
    s->ok = ok;
    s->generation = v->generation;
    s->n = v->n;
    for (size_t i = 0; i < v->n; i++)
        memcpy(s->names[i], v->keys[i].name, AGENT_NAME_BYTES);
}

/* One attempt; logs, updates the manifest and the retry schedule. Returns success. */
static bool attempt(const agent_config *cfg, target_state *s, const agent_view *v, bool quiet_ok)
{
    const agent_target_cfg *t = s->cfg;
    const int64_t now = stek_boottime_ns();
    s->last_apply = now;
    stek_status st = apply(t, v);
    record(s, v, st == STEK_OK);
    if (st == STEK_OK) {
        s->applies_ok++;
        s->encrypt_epoch = v->n > 0 ? v->keys[0].epoch : 0;
        s->last_success_unix = (int64_t)time(NULL);
    } else {
        s->applies_failed++;
    }
    char err[300] = "";
    if (st == STEK_OK) {
        if (s->failures > 0)
            stek_log(STEK_LOG_INFO, COMPONENT, "target %s: recovered after %u failed attempts",
                     t->name, s->failures);
        if (!quiet_ok || s->failures > 0)
            stek_log(STEK_LOG_INFO, COMPONENT,
                     "target %s: applied generation %llu: %zu keys, encrypting with epoch %llu",
                     t->name, (unsigned long long)v->generation, v->n,
                     v->n > 0 ? (unsigned long long)v->keys[0].epoch : 0ULL);
        s->failures = 0;
        s->retry_at = 0;
    } else {
        snprintf(err, sizeof(err), "%s: %s", stek_status_name(st), stek_error_detail());
        s->failures++;
        unsigned shift = s->failures - 1 < 16 ? s->failures - 1 : 16;
        uint64_t delay = cfg->retry_min_ms << shift;
        if (delay > cfg->retry_max_ms)
            delay = cfg->retry_max_ms;
        /* Jitter in [d/2, d]: agents of one fleet do not retry in step. */
        uint32_t rnd = 0;
        if (RAND_bytes((unsigned char *)&rnd, sizeof(rnd)) != 1)
            rnd = 0;
        delay = delay / 2 + rnd % (delay / 2 + 1);
        s->retry_at = now + (int64_t)delay * 1000000LL;
        stek_log(STEK_LOG_ERROR, COMPONENT,
                 "target %s: apply failed (attempt %u), retry in %llu ms: %s", t->name, s->failures,
                 (unsigned long long)delay, err);
    }
    if (t->kind != AGENT_FILES || st != STEK_OK) {
        stek_status ms =
            agent_write_manifest(t, v, st == STEK_OK, s->failures, st == STEK_OK ? NULL : err);
        if (ms != STEK_OK)
            stek_log(STEK_LOG_WARN, COMPONENT, "target %s: manifest not written: %s", t->name,
                     stek_error_detail());
    }
    return st == STEK_OK;
}

static stek_status make_client(const agent_config *cfg, stek_client **out)
{
    stek_options *o = NULL;
    stek_result r = stek_options_new(&o);
    for (size_t i = 0; i < cfg->n_servers && r == STEK_RESULT_OK; i++)
        r = stek_options_add_server(o, cfg->servers[i]);
    for (size_t i = 0; i < cfg->n_service_keys && r == STEK_RESULT_OK; i++)
        r = stek_options_set_service_key(o, cfg->service_keys[i]);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, cfg->ca);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cfg->cert, cfg->key);
    if (r == STEK_RESULT_OK && cfg->server_name != NULL)
        r = stek_options_set_server_name(o, cfg->server_name);
    if (r == STEK_RESULT_OK && cfg->state_dir != NULL)
        r = stek_options_set_state_dir(o, cfg->state_dir);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, cfg->targets[0].group);
    for (size_t i = 1; i < cfg->n_targets && r == STEK_RESULT_OK; i++)
        r = stek_options_add_group(o, cfg->targets[i].group);
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, out);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        STEK_BAIL(STEK_ERR_CONFIG, "libstek: %s", stek_result_name(r));
    return STEK_OK;
}

static void notify(const char *state)
{
#ifdef STEK_HAVE_SYSTEMD
    sd_notify(0, state);
#else
    (void)state;
#endif
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL); /* a signal ends it early: the loop checks the stop flag */
}

/* Writes the metrics file when one is configured; a failure is logged once
 * per streak and never stops the agent. */
static void write_metrics(const agent_config *cfg, stek_client *c, const target_state *ts)
{
    static bool failing;
    if (cfg->metrics_file == NULL)
        return;
    agent_target_metrics tm[AGENT_MAX_TARGETS];
    for (size_t i = 0; i < cfg->n_targets; i++) {
        const target_state *s = &ts[i];
        tm[i] = (agent_target_metrics){
            .cfg = s->cfg,
            .attempted = s->attempted,
            .ok = s->ok,
            .generation = s->generation,
            .encrypt_epoch = s->encrypt_epoch,
            .keys = s->n,
            .consecutive_failures = s->failures,
            .applies_ok = s->applies_ok,
            .applies_failed = s->applies_failed,
            .last_success_unix = s->last_success_unix,
        };
    }
    stek_counters k = {0};
    (void)stek_client_get_counters(c, &k);
    agent_metrics m = {
        .stream_up = k.stream_up,
        .sets_accepted = k.sets_accepted,
        .sets_rejected = k.sets_rejected,
        .last_fetch_unix = k.last_fetch_unix,
        .targets = tm,
        .n_targets = cfg->n_targets,
    };
    if (agent_metrics_write(cfg->metrics_file, &m) != STEK_OK) {
        if (!failing)
            stek_log(STEK_LOG_WARN, COMPONENT, "metrics file not written: %s", stek_error_detail());
        failing = true;
    } else {
        failing = false;
    }
}

static int run_once(const agent_config *cfg, stek_client *c, target_state *ts)
{
    int rc = AGENT_EXIT_OK;
    for (size_t i = 0; i < cfg->n_targets; i++) {
        agent_view v;
        stek_status st = build_view(stek_client_keyring(c), ts[i].cfg->group, &v);
        if (st != STEK_OK || v.n == 0) {
            stek_log(STEK_LOG_ERROR, COMPONENT, "target %s: no live key for group %s",
                     ts[i].cfg->name, ts[i].cfg->group);
            rc = AGENT_EXIT_FAILED;
            view_free(&v);
            continue;
        }
        check_timeouts(&ts[i], &v);
        if (!attempt(cfg, &ts[i], &v, false))
            rc = AGENT_EXIT_FAILED;
        view_free(&v);
    }
    write_metrics(cfg, c, ts);
    return rc;
}

static int run_loop(const agent_config *cfg, stek_client *c, target_state *ts)
{
    bool ready_sent = false;
    int64_t last_metrics = INT64_MIN / 2;
    while (!atomic_load(&stop_requested)) {
        bool all_ok = true, applied_now = false;
        for (size_t i = 0; i < cfg->n_targets; i++) {
            target_state *s = &ts[i];
            agent_view v;
            if (build_view(stek_client_keyring(c), s->cfg->group, &v) != STEK_OK) {
                all_ok = false;
                continue;
            }
            const int64_t now = stek_boottime_ns();
            bool changed = !same_as_applied(s, &v);
            bool retry = s->attempted && !s->ok && now >= s->retry_at;
            bool verify = s->attempted && s->ok && s->cfg->kind == AGENT_HAPROXY &&
                          now - s->last_apply >= HAPROXY_VERIFY_NS;
            /* Before the first key arrives there is nothing to apply (the files stay). */
            bool first_empty = !s->attempted && v.n == 0;
            if (!first_empty && (changed || retry || verify)) {
                check_timeouts(s, &v);
                /* A changed view goes out at once, even during a backoff: a key
                 * that expired must leave now. */
                attempt(cfg, s, &v, verify && !changed);
                applied_now = true;
            }
            all_ok = all_ok && s->attempted && s->ok;
            view_free(&v);
        }
        /* Every few seconds: the stream and fetch figures move on their own. */
        const int64_t now = stek_boottime_ns();
        if (applied_now || now - last_metrics >= METRICS_EVERY_NS) {
            write_metrics(cfg, c, ts);
            last_metrics = now;
        }
        if (all_ok && !ready_sent) {
            notify("READY=1\nSTATUS=every target holds its keys");
            ready_sent = true;
        }
        sleep_ms(TICK_MS);
    }
    notify("STOPPING=1");
    stek_log(STEK_LOG_INFO, COMPONENT, "stopping");
    return AGENT_EXIT_OK;
}

int main(int argc, char **argv)
{
    const char *config_path = NULL;
    bool once = false, status = false;
    long wait_s = 30;
    if (argc > 1 && strcmp(argv[1], "status") == 0) {
        status = true;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    static const struct option longopts[] = {{"config", required_argument, NULL, 'c'},
                                             {"once", no_argument, NULL, 'o'},
                                             {"wait", required_argument, NULL, 'w'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "c:", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'o':
            once = true;
            break;
        case 'w': {
            char *end = NULL;
            wait_s = strtol(optarg, &end, 10);
            if (end == optarg || *end != '\0' || wait_s < 0 || wait_s > 3600) {
                fprintf(stderr, "stek-agent: --wait takes 0..3600 seconds\n");
                return AGENT_EXIT_CONFIG;
            }
            break;
        }
        case 'h':
            usage(stdout);
            return AGENT_EXIT_OK;
        default:
            usage(stderr);
            return AGENT_EXIT_CONFIG;
        }
    }
    if (config_path == NULL || optind != argc || (status && once)) {
        usage(stderr);
        return AGENT_EXIT_CONFIG;
    }
    agent_config *cfg = NULL;
    stek_status st = agent_config_load(config_path, &cfg);
    if (st != STEK_OK) {
        fprintf(stderr, "stek-agent: %s\n", stek_error_detail());
        return AGENT_EXIT_CONFIG;
    }
    if (status) {
        int rc = agent_status(cfg);
        agent_config_free(cfg);
        return rc;
    }
    int rc = check_early_data(cfg);
    if (rc != AGENT_EXIT_OK) {
        agent_config_free(cfg);
        return rc;
    }

    struct sigaction sa = {.sa_handler = on_stop};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    stek_client *c = NULL;
    st = make_client(cfg, &c);
    if (st != STEK_OK) {
        fprintf(stderr, "stek-agent: %s (check the stekd settings and files)\n",
                stek_error_detail());
        agent_config_free(cfg);
        return AGENT_EXIT_CLIENT;
    }
    target_state ts[AGENT_MAX_TARGETS];
    memset(ts, 0, sizeof(ts));
    for (size_t i = 0; i < cfg->n_targets; i++)
        ts[i].cfg = &cfg->targets[i];
    stek_log(STEK_LOG_INFO, COMPONENT, "started: %zu targets, %zu stekd replicas%s", cfg->n_targets,
             cfg->n_servers, once ? ", once" : "");
    if (once) {
        if (stek_client_wait_ready(c, (int)wait_s * 1000) != STEK_RESULT_OK) {
            stek_log(STEK_LOG_ERROR, COMPONENT, "no keys from stekd within %ld s", wait_s);
            rc = AGENT_EXIT_FAILED;
        } else {
            rc = run_once(cfg, c, ts);
        }
    } else {
        rc = run_loop(cfg, c, ts);
    }
    stek_client_free(c);
    agent_config_free(cfg);
    return rc;
}
