/*
 * The example server with the real OpenSSL command-line client: a real
 * stekd (groups "edge" and "other") and three stek-demo-server processes on
 * loopback, each with its own host certificate towards stekd:
 *
 *   A  group edge,  host certificate EC P-256
 *   B  group edge,  host certificate RSA 2048
 *   C  group other, host certificate EC P-256
 *
 * `openssl s_client -sess_out` on A, then `-sess_in` on B, says "Reused"
 * under TLS 1.3 and TLS 1.2 (and B itself logs a resumption). The negative
 * controls say "New": C's session offered to B (another group's keys, and
 * another session-id context), and a fresh s_client on B without a session.
 * As in ci/demo.sh, -ign_eof keeps s_client reading until the server
 * closes, so a TLS 1.3 ticket (sent after the handshake) always arrives
 * before -sess_out writes the session. openssl is found through PATH.
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

#include "fx_stekd.h"

#ifndef STEK_DEMO_SERVER
#error "STEK_DEMO_SERVER must name the stek-demo-server binary"
#endif

#define EPOCH_S 10
#define LIFETIME_S 30
#define SERVER_READY_MS 20000 /* the server waits up to 10 s for keys itself */
#define SCLIENT_MS 20000

static fx_stekd d;
static fx_cert web;

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL}},
    {"other", {"uri:spiffe://fleet/other/*", NULL}},
};

typedef struct demo_server {
    const char *name, *group, *uri;
    fx_key_type key_type;
    fx_cert host;
    char port_file[FX_PATH_MAX + 32];
    char log_path[FX_PATH_MAX + 32];
    int port;
    pid_t pid;
} demo_server;

static demo_server servers[] = {
    {.name = "a", .group = "edge", .uri = "spiffe://fleet/edge/a", .key_type = FX_KEY_EC_P256},
    {.name = "b", .group = "edge", .uri = "spiffe://fleet/edge/b", .key_type = FX_KEY_RSA_2048},
    {.name = "c", .group = "other", .uri = "spiffe://fleet/other/c", .key_type = FX_KEY_EC_P256},
};
#define N_SERVERS (sizeof(servers) / sizeof(servers[0]))
static demo_server *const A = &servers[0], *const B = &servers[1], *const C = &servers[2];

/* ---- the servers --------------------------------------------------------------------- */

static bool port_ready(void *arg)
{
    demo_server *s = arg;
    FILE *f = fopen(s->port_file, "r");
    if (f == NULL)
        return false;
    int port = 0;
    bool ok = fscanf(f, "%d", &port) == 1 && port > 0;
    fclose(f);
    if (ok)
        s->port = port;
    return ok;
}

static int start_server(demo_server *s)
{
    const char *uris[] = {s->uri, NULL};
    char stem[32];
    snprintf(stem, sizeof(stem), "host-%s", s->name);
    fx_cert_opts o = {.name = stem, .key_type = s->key_type, .uri_sans = uris};
    if (fx_stekd_host_cert(&d, &o, &s->host) != 0)
        return -1;
    snprintf(s->port_file, sizeof(s->port_file), "%s/server-%s.port", d.dir, s->name);
    snprintf(s->log_path, sizeof(s->log_path), "%s/server-%s.log", d.dir, s->name);
    char *argv[] = {STEK_DEMO_SERVER,
                    "--name",
                    (char *)s->name,
                    "--listen",
                    "127.0.0.1:0",
                    "--port-file",
                    s->port_file,
                    "--tls-cert",
                    web.cert_path,
                    "--tls-key",
                    web.key_path,
                    "--stekd",
                    d.target,
                    "--stekd-name",
                    "localhost",
                    "--ca",
                    d.ca.cert_path,
                    "--host-cert",
                    s->host.cert_path,
                    "--host-key",
                    s->host.key_path,
                    "--service-key",
                    d.signing_pem_path,
                    "--group",
                    (char *)s->group,
                    "--max-seconds",
                    "120",
                    NULL};
    return fx_spawn(argv, s->log_path, &s->pid);
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    static const char *const web_dns[] = {"localhost", NULL};
    fx_cert_opts wo = {.name = "web", .dns_sans = web_dns, .eku = FX_EKU_SERVER};
    if (fx_stekd_host_cert(&d, &wo, &web) != 0)
        return -1;
    /* All three start together; each waits for its keys before it listens. */
    for (size_t i = 0; i < N_SERVERS; i++)
        if (start_server(&servers[i]) != 0)
            return -1;
    for (size_t i = 0; i < N_SERVERS; i++) {
        if (fx_wait_until(port_ready, &servers[i], SERVER_READY_MS) != 0) {
            fprintf(stderr, "server %s did not start; its log is %s\n", servers[i].name,
                    servers[i].log_path);
            return -1;
        }
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SERVERS; i++) {
        int status;
        if (servers[i].pid > 0)
            fx_stop(servers[i].pid, SIGKILL, 5000, &status);
        servers[i].pid = 0;
    }
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- s_client ------------------------------------------------------------------------ */

typedef enum outcome { NO_HANDSHAKE, NEW, REUSED } outcome;

/*
 * One `openssl s_client` connection to s with tls_flag ("-tls1_3"), and
 * sess_flag/sess_file ("-sess_out" or "-sess_in" and a path; both NULL for
 * neither). Returns what it printed: "New, TLSv1.x" or "Reused, TLSv1.x"
 * for the version asked.
 */
static outcome sclient(const demo_server *s, const char *tls_flag, const char *sess_flag,
                       const char *sess_file)
{
    static unsigned runs;
    char connect[32], log[FX_PATH_MAX + 48];
    snprintf(connect, sizeof(connect), "127.0.0.1:%d", s->port);
    snprintf(log, sizeof(log), "%s/sclient-%u.log", d.dir, runs++);
    char *argv[] = {"openssl",
                    "s_client",
                    "-connect",
                    connect,
                    "-servername",
                    "localhost",
                    "-CAfile",
                    d.ca.cert_path,
                    "-verify_return_error",
                    "-ign_eof",
                    (char *)tls_flag,
                    (char *)sess_flag,
                    (char *)sess_file,
                    NULL};
    pid_t pid;
    int status = -1;
    assert_int_equal(fx_spawn(argv, log, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, SCLIENT_MS, &status), 0);
    const char *version = strcmp(tls_flag, "-tls1_3") == 0 ? "TLSv1.3" : "TLSv1.2";
    char new_line[32], reused_line[32];
    snprintf(new_line, sizeof(new_line), "New, %s,", version);
    snprintf(reused_line, sizeof(reused_line), "Reused, %s,", version);
    int n_new = fx_count_lines(log, new_line), n_reused = fx_count_lines(log, reused_line);
    assert_true(n_new >= 0 && n_reused >= 0);
    if (n_new + n_reused != 1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "s_client to %s %s: exit status 0x%x, %d New / %d Reused; see %s\n",
                s->name, tls_flag, status, n_new, n_reused, log);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    return n_reused == 1 && n_new == 0 ? REUSED : n_new == 1 && n_reused == 0 ? NEW : NO_HANDSHAKE;
}

typedef struct log_wait {
    const char *path;
    char prefix[64];
    int want;
} log_wait;

static bool log_has(void *arg)
{
    log_wait *w = arg;
    return fx_count_lines(w->path, w->prefix) >= w->want;
}

/* Waits for server s's report line "<name>: <version> <what>" number `want`. */
static void server_reported(const demo_server *s, const char *version, const char *what, int want)
{
    log_wait w = {.path = s->log_path, .want = want};
    snprintf(w.prefix, sizeof(w.prefix), "%s: %s %s", s->name, version, what);
    assert_int_equal(fx_wait_until(log_has, &w, 5000), 0);
}

static int reports(const demo_server *s, const char *version, const char *what)
{
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "%s: %s %s", s->name, version, what);
    int n = fx_count_lines(s->log_path, prefix);
    assert_true(n >= 0);
    return n;
}

static void sess_path(char *out, size_t len, const char *tag, const char *tls_flag)
{
    snprintf(out, len, "%s/session-%s%s.pem", d.dir, tag, tls_flag);
}

/* ---- tests --------------------------------------------------------------------------- */

static void resume_across(const char *tls_flag, const char *version)
{
    char sess[FX_PATH_MAX + 64];
    sess_path(sess, sizeof(sess), "a", tls_flag);
    int b_resumed = reports(B, version, "resumed");
    assert_int_equal(sclient(A, tls_flag, "-sess_out", sess), NEW);
    assert_int_equal(sclient(B, tls_flag, "-sess_in", sess), REUSED);
    /* B saw it the same way: a resumption of a ticket A issued. */
    server_reported(B, version, "resumed", b_resumed + 1);
    fprintf(stderr, "%s: New on A, Reused on B\n", version);
}

static void test_tls13_reused_across_servers(void **state)
{
    (void)state;
    resume_across("-tls1_3", "TLSv1.3");
}

static void test_tls12_reused_across_servers(void **state)
{
    (void)state;
    resume_across("-tls1_2", "TLSv1.2");
}

/* Negative controls: what does not resume says "New". */
static void not_resumed(const char *tls_flag, const char *version)
{
    char sess[FX_PATH_MAX + 64];
    sess_path(sess, sizeof(sess), "c", tls_flag);
    int b_full = reports(B, version, "full handshake");
    assert_int_equal(sclient(C, tls_flag, "-sess_out", sess), NEW);
    /* C's session is of group "other": B (group "edge") holds none of its keys. */
    assert_int_equal(sclient(B, tls_flag, "-sess_in", sess), NEW);
    /* And the baseline: no session offered at all. */
    assert_int_equal(sclient(B, tls_flag, NULL, NULL), NEW);
    server_reported(B, version, "full handshake", b_full + 2);
    fprintf(stderr, "%s: C's session is New on B; a fresh s_client is New\n", version);
}

static void test_tls13_other_group_is_new(void **state)
{
    (void)state;
    not_resumed("-tls1_3", "TLSv1.3");
}

static void test_tls12_other_group_is_new(void **state)
{
    (void)state;
    not_resumed("-tls1_2", "TLSv1.2");
}

/* SIGTERM: each server stops on its own, exit status 0. */
static void test_clean_stop(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SERVERS; i++) {
        int status = -1;
        assert_int_equal(fx_stop(servers[i].pid, SIGTERM, 10000, &status), 0);
        servers[i].pid = 0;
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls13_reused_across_servers),
        cmocka_unit_test(test_tls12_reused_across_servers),
        cmocka_unit_test(test_tls13_other_group_is_new),
        cmocka_unit_test(test_tls12_other_group_is_new),
        cmocka_unit_test(test_clean_stop),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
