/*
 * stek-agent with Debian's real nginx: a real stekd (4 s epochs, 8 s decrypt
 * lifetime), two nginx instances A and B on loopback, each fed by its own
 * stek-agent with its own host certificate, and `openssl s_client`:
 *
 *   - a session from A resumes on B ("Reused") under TLS 1.3 and 1.2;
 *   - across a rotation while the ticket's key is in its window, and no
 *     longer once the window has passed;
 *   - continuous resumption alternating between A and B across three
 *     rotations never falls back to a full handshake (the count is printed);
 *   - faults: nginx stopped (reload fails, the agent reports and retries,
 *     and recovers when nginx is back), an unwritable key directory, a
 *     corrupt config (the line is named), 0-RTT in strict mode, and stekd
 *     down (the files stay until their keys expire, then are zeroed and
 *     removed).
 * nginx missing is a failure, never a skip.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "e2e.h"

#define NGINX "/usr/sbin/nginx"

static fx_stekd d;
static fx_cert web;

typedef struct instance {
    const char *name;
    char dir[FX_PATH_MAX + 16];  /* nginx prefix: conf, logs, pid */
    char keys[FX_PATH_MAX + 16]; /* the agent's key directory */
    char conf[FX_PATH_MAX + 48], error_log[FX_PATH_MAX + 48], pid_file[FX_PATH_MAX + 48];
    char agent_conf[FX_PATH_MAX + 48], agent_log[FX_PATH_MAX + 48];
    char manifest[FX_PATH_MAX + 64];
    fx_cert host;
    int port;
    pid_t nginx, agent;
} instance;

static instance insts[] = {{.name = "a"}, {.name = "b"}};
static instance *const A = &insts[0], *const B = &insts[1];

static const fx_stekd_group groups[] = {{E2E_GROUP, {"uri:spiffe://fleet/edge/*", NULL}}};

static int write_nginx_conf(instance *in, const char *extra_server)
{
    char text[8192];
    snprintf(text, sizeof(text),
             "daemon off;\n"
             "master_process on;\n"
             "worker_processes 1;\n"
             "pid %s;\n"
             "error_log %s notice;\n"
             "worker_shutdown_timeout 2s;\n"
             "events { worker_connections 64; }\n"
             "http {\n"
             "  access_log off;\n"
             "  client_body_temp_path %s/tmp-body;\n"
             "  proxy_temp_path %s/tmp-proxy;\n"
             "  fastcgi_temp_path %s/tmp-fastcgi;\n"
             "  uwsgi_temp_path %s/tmp-uwsgi;\n"
             "  scgi_temp_path %s/tmp-scgi;\n"
             "  server {\n"
             "    listen 127.0.0.1:%d ssl;\n"
             "    ssl_certificate %s;\n"
             "    ssl_certificate_key %s;\n"
             "    ssl_protocols TLSv1.2 TLSv1.3;\n"
             "    include %s/%s.conf;\n"
             "%s"
             "    location / { return 200 \"ok\\n\"; }\n"
             "  }\n"
             "}\n",
             in->pid_file, in->error_log, in->dir, in->dir, in->dir, in->dir, in->dir, in->port,
             web.cert_path, web.key_path, in->keys, in->name, extra_server);
    return fx_write_file(in->conf, text, 0600);
}

static int start_nginx(instance *in)
{
    char *argv[] = {NGINX, "-p", in->dir, "-c", in->conf, NULL};
    char log[FX_PATH_MAX + 64];
    snprintf(log, sizeof(log), "%s/nginx.out", in->dir);
    if (fx_spawn(argv, log, &in->nginx) != 0)
        return -1;
    return fx_wait_until(e2e_port_open, &in->port, 10000);
}

static bool file_exists(void *path)
{
    return access(path, R_OK) == 0;
}

static bool manifest_applied(void *arg)
{
    const instance *in = arg;
    char *m = e2e_read_file(in->manifest);
    bool yes = m != NULL && strstr(m, "\"applied\":true") != NULL;
    free(m);
    return yes;
}

static int setup_instance(instance *in)
{
    snprintf(in->dir, sizeof(in->dir), "%s/nginx-%s", d.dir, in->name);
    snprintf(in->keys, sizeof(in->keys), "%s/keys-%s", d.dir, in->name);
    snprintf(in->conf, sizeof(in->conf), "%s/nginx.conf", in->dir);
    snprintf(in->error_log, sizeof(in->error_log), "%s/error.log", in->dir);
    snprintf(in->pid_file, sizeof(in->pid_file), "%s/nginx.pid", in->dir);
    snprintf(in->agent_conf, sizeof(in->agent_conf), "%s/agent-%s.conf", d.dir, in->name);
    snprintf(in->agent_log, sizeof(in->agent_log), "%s/agent-%s.log", d.dir, in->name);
    snprintf(in->manifest, sizeof(in->manifest), "%s/%s.manifest.json", in->keys, in->name);
    if (mkdir(in->dir, 0700) != 0 || mkdir(in->keys, 0700) != 0)
        return -1;
    char stem[32], uri[64];
    snprintf(stem, sizeof(stem), "host-%s", in->name);
    snprintf(uri, sizeof(uri), "spiffe://fleet/edge/%s", in->name);
    const char *uris[] = {uri, NULL};
    fx_cert_opts o = {.name = stem, .uri_sans = uris};
    if (fx_stekd_host_cert(&d, &o, &in->host) != 0)
        return -1;
    in->port = e2e_free_port();
    if (in->port <= 0 || write_nginx_conf(in, "") != 0)
        return -1;
    char targets[4096];
    snprintf(targets, sizeof(targets),
             "  { name = \"%s\"; group = \"" E2E_GROUP "\"; type = \"nginx\"; dir = \"%s\";\n"
             "    reload = [\"" NGINX "\", \"-s\", \"reload\", \"-p\", \"%s\", \"-c\", \"%s\"];\n"
             "    server_config = \"%s\"; }",
             in->name, in->keys, in->dir, in->conf, in->conf);
    if (e2e_write_agent_config(in->agent_conf, &d, &in->host, "", targets) != 0 ||
        e2e_start_agent(in->agent_conf, in->agent_log, &in->agent) != 0)
        return -1;
    /* nginx refuses to start before the snippet it includes exists. */
    char snippet[FX_PATH_MAX + 64];
    snprintf(snippet, sizeof(snippet), "%s/%s.conf", in->keys, in->name);
    if (fx_wait_until(file_exists, snippet, 20000) != 0)
        return -1;
    if (start_nginx(in) != 0)
        return -1;
    /* The agent's reloads failed while nginx was down; it retries until one works. */
    /* Its first applies failed while the server was down (unless the server
     * came up just in time): it retries until the manifest says applied. */
    return fx_wait_until(manifest_applied, in, 10000);
}

static int setup(void **state)
{
    (void)state;
    if (e2e_require_binary(NGINX, "nginx") != 0)
        return -1;
    if (fx_stekd_setup(&d, E2E_EPOCH_S, E2E_LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_stekd_start(&d) != 0)
        return -1;
    static const char *const web_dns[] = {"localhost", NULL};
    fx_cert_opts wo = {.name = "web", .dns_sans = web_dns, .eku = FX_EKU_SERVER};
    if (fx_stekd_host_cert(&d, &wo, &web) != 0)
        return -1;
    for (size_t i = 0; i < 2; i++)
        if (setup_instance(&insts[i]) != 0) {
            fprintf(stderr, "instance %s did not start; see %s\n", insts[i].name,
                    insts[i].agent_log);
            return -1;
        }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (size_t i = 0; i < 2; i++) {
        int status;
        if (insts[i].agent > 0)
            fx_stop(insts[i].agent, SIGTERM, 5000, &status);
        if (insts[i].nginx > 0)
            fx_stop(insts[i].nginx, SIGTERM, 5000, &status);
    }
    fx_stekd_destroy(&d);
    return 0;
}

static void sess_path(char *out, size_t len, const char *tag)
{
    snprintf(out, len, "%s/session-%s.pem", d.dir, tag);
}

/* ---- resumption ---------------------------------------------------------------------- */

static void resume_across(const char *tls_flag)
{
    char sess[FX_PATH_MAX + 64];
    sess_path(sess, sizeof(sess), tls_flag + 1);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, tls_flag, NULL, sess), E2E_NEW);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, sess, NULL), E2E_REUSED);
    /* And the other way round. */
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, NULL, sess), E2E_NEW);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, tls_flag, sess, NULL), E2E_REUSED);
    /* The control: no session offered, no resumption. */
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, NULL, NULL), E2E_NEW);
    fprintf(stderr, "nginx %s: New on A, Reused on B (and B to A)\n", tls_flag);
}

static void test_tls13_reused_across_instances(void **state)
{
    (void)state;
    resume_across("-tls1_3");
}

static void test_tls12_reused_across_instances(void **state)
{
    (void)state;
    resume_across("-tls1_2");
}

/*
 * A ticket made early in epoch e (under key e, or e-1 in the agent's grace
 * right after the boundary) still resumes on B in epoch e+1; its key's
 * decrypt window ends with epoch e+2 (enc_until + L), after which B has no
 * file for it and the session is New.
 */
static void test_rotation_window(void **state)
{
    (void)state;
    const char *flags[] = {"-tls1_3", "-tls1_2"};
    char sess[2][FX_PATH_MAX + 64];
    e2e_wait_epoch_offset(&d, 1.5);
    uint64_t e = fx_stekd_epoch_now(&d);
    for (int i = 0; i < 2; i++) {
        sess_path(sess[i], sizeof(sess[i]), i == 0 ? "rot13" : "rot12");
        assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, flags[i], NULL, sess[i]),
                         E2E_NEW);
    }
    e2e_wait_epoch_offset(&d, 1.5);
    assert_int_equal(fx_stekd_epoch_now(&d), e + 1);
    for (int i = 0; i < 2; i++)
        assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, flags[i], sess[i], NULL),
                         E2E_REUSED);
    e2e_wait_epoch_offset(&d, 0.0);
    e2e_wait_epoch_offset(&d, 1.5);
    assert_int_equal(fx_stekd_epoch_now(&d), e + 3);
    for (int i = 0; i < 2; i++)
        assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, flags[i], sess[i], NULL),
                         E2E_NEW);
    fprintf(stderr, "nginx: Reused on B one rotation later, New once the key's window passed\n");
}

/*
 * Two session chains (TLS 1.3, TLS 1.2), each attempt resuming the previous
 * attempt's session on the other instance and saving the (possibly renewed)
 * session, across at least three rotations. Every attempt's key is inside
 * its window, so every attempt must resume.
 */
static void test_continuous_across_rotations(void **state)
{
    (void)state;
    const char *flags[] = {"-tls1_3", "-tls1_2"};
    char sess[2][FX_PATH_MAX + 64];
    for (int i = 0; i < 2; i++) {
        sess_path(sess[i], sizeof(sess[i]), i == 0 ? "cont13" : "cont12");
        assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, flags[i], NULL, sess[i]),
                         E2E_NEW);
    }
    uint64_t first = fx_stekd_epoch_now(&d);
    int attempts[2] = {0, 0}, reused[2] = {0, 0};
    unsigned k = 0;
    while (fx_stekd_epoch_now(&d) < first + 3 || attempts[1] < 4) {
        int v = (int)(k % 2);
        const instance *in = (k / 2) % 2 == 0 ? B : A;
        e2e_outcome o = e2e_sclient(d.dir, d.ca.cert_path, in->port, flags[v], sess[v], sess[v]);
        attempts[v]++;
        if (o == E2E_REUSED)
            reused[v]++;
        else {
            fprintf(stderr, "attempt %u (%s on %s, epoch %llu, t=%.3f): not resumed\n", k, flags[v],
                    in->name, (unsigned long long)fx_stekd_epoch_now(&d), e2e_now());
            char *log = e2e_read_file(e2e_last_log());
            fprintf(stderr, "%s\n", log != NULL ? log : "(no log)");
            free(log);
        }
        k++;
    }
    uint64_t last = fx_stekd_epoch_now(&d);
    fprintf(stderr,
            "nginx continuous: epochs %llu..%llu (%llu rotations): TLS 1.3 %d/%d resumed, "
            "TLS 1.2 %d/%d resumed\n",
            (unsigned long long)first, (unsigned long long)last, (unsigned long long)(last - first),
            reused[0], attempts[0], reused[1], attempts[1]);
    assert_true(last - first >= 3);
    assert_int_equal(reused[0], attempts[0]);
    assert_int_equal(reused[1], attempts[1]);
}

/* ---- faults -------------------------------------------------------------------------- */

static bool manifest_says(const instance *in, const char *text)
{
    char *m = e2e_read_file(in->manifest);
    bool yes = m != NULL && strstr(m, text) != NULL;
    free(m);
    return yes;
}

static bool not_applied(void *arg)
{
    return manifest_says(arg, "\"applied\":false");
}

static bool applied(void *arg)
{
    return manifest_says(arg, "\"applied\":true");
}

static void test_stopped_nginx_retried_then_recovers(void **state)
{
    (void)state;
    int status;
    int recovered = e2e_count_containing(B->agent_log, "recovered");
    assert_int_equal(fx_stop(B->nginx, SIGTERM, 10000, &status), 0);
    B->nginx = 0;
    /* The next rotation's reload fails: reported in the log and the manifest. */
    assert_int_equal(fx_wait_until(not_applied, B, 3 * E2E_EPOCH_S * 1000), 0);
    assert_int_equal(e2e_wait_log(B->agent_log, "apply failed (attempt 2)", 1, 5000), 0);
    /* status says so too (exit 1, "NOT applied"). */
    char status_log[FX_PATH_MAX + 48];
    snprintf(status_log, sizeof(status_log), "%s/status-b.log", d.dir);
    char *args[] = {"status", "--config", B->agent_conf, NULL};
    assert_int_equal(e2e_run_agent(args, status_log, 10000), 1);
    assert_int_equal(e2e_count_containing(status_log, "NOT applied"), 1);
    assert_int_equal(start_nginx(B), 0);
    assert_int_equal(e2e_wait_log(B->agent_log, "recovered", recovered + 1, 10000), 0);
    assert_int_equal(fx_wait_until(applied, B, 5000), 0);
    resume_across("-tls1_3");
}

static void test_unwritable_key_dir(void **state)
{
    (void)state;
    char dir[FX_PATH_MAX + 32], conf[FX_PATH_MAX + 32], log[FX_PATH_MAX + 32];
    snprintf(dir, sizeof(dir), "%s/keys-c", d.dir);
    snprintf(conf, sizeof(conf), "%s/agent-c.conf", d.dir);
    snprintf(log, sizeof(log), "%s/agent-c.log", d.dir);
    /* root writes through any mode bits: for root the "directory" is a file instead. */
    bool root = geteuid() == 0;
    if (root)
        assert_int_equal(fx_write_file(dir, "not a directory\n", 0400), 0);
    else
        assert_int_equal(mkdir(dir, 0500), 0);
    char targets[1024];
    snprintf(targets, sizeof(targets),
             "  { name = \"c\"; group = \"" E2E_GROUP "\"; type = \"files\"; dir = \"%s\"; }", dir);
    assert_int_equal(e2e_write_agent_config(conf, &d, &A->host, "", targets), 0);
    pid_t agent;
    assert_int_equal(e2e_start_agent(conf, log, &agent), 0);
    assert_int_equal(e2e_wait_log(log, "apply failed (attempt 3)", 1, 15000), 0);
    assert_int_equal(e2e_count_key_files(root ? d.dir : dir, "c"), 0);
    /* Writable again: the next retry succeeds. */
    if (root)
        assert_int_equal(unlink(dir), 0);
    assert_true(root ? mkdir(dir, 0700) == 0 : chmod(dir, 0700) == 0);
    assert_int_equal(e2e_wait_log(log, "recovered", 1, 5000), 0);
    assert_true(e2e_count_key_files(dir, "c") >= 2);
    struct stat sb;
    char *manifest = NULL;
    assert_true(asprintf(&manifest, "%s/c.manifest.json", dir) > 0);
    assert_int_equal(stat(manifest, &sb), 0);
    free(manifest);
    int status;
    assert_int_equal(fx_stop(agent, SIGTERM, 5000, &status), 0);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void test_corrupt_config_names_line(void **state)
{
    (void)state;
    char conf[FX_PATH_MAX + 32], log[FX_PATH_MAX + 32];
    snprintf(conf, sizeof(conf), "%s/bad.conf", d.dir);
    snprintf(log, sizeof(log), "%s/bad.log", d.dir);
    /* A syntax error on line 3. */
    assert_int_equal(fx_write_file(conf, "stekd = {\n  servers = [\"x:1\"];\n  ca = ;\n};\n", 0600),
                     0);
    char *args[] = {"--once", "--config", conf, NULL};
    assert_int_equal(e2e_run_agent(args, log, 10000), 2);
    char want[FX_PATH_MAX + 128];
    snprintf(want, sizeof(want), "%s:3:", conf);
    assert_int_equal(e2e_count_containing(log, want), 1);
    /* An unknown setting on line 2 of an otherwise fine file. */
    assert_int_equal(fx_write_file(conf, "stekd = {\n  servres = [\"x:1\"];\n};\n", 0600), 0);
    assert_int_equal(e2e_run_agent(args, log, 10000), 2);
    snprintf(want, sizeof(want), "%s:2: unknown setting \"stekd.servres\"", conf);
    assert_int_equal(e2e_count_containing(log, want), 1);
}

static void test_early_data_strict_refuses(void **state)
{
    (void)state;
    char nconf[FX_PATH_MAX + 32], conf[FX_PATH_MAX + 32], log[FX_PATH_MAX + 32];
    snprintf(nconf, sizeof(nconf), "%s/nginx-0rtt.conf", d.dir);
    snprintf(conf, sizeof(conf), "%s/agent-0rtt.conf", d.dir);
    snprintf(log, sizeof(log), "%s/agent-0rtt.log", d.dir);
    assert_int_equal(fx_write_file(nconf, "http { server { ssl_early_data   on; } }\n", 0600), 0);
    char targets[2048];
    snprintf(targets, sizeof(targets),
             "  { name = \"z\"; group = \"" E2E_GROUP "\"; type = \"nginx\"; dir = \"%s\";\n"
             "    pid_file = \"%s/none.pid\"; server_config = \"%s\"; }",
             d.dir, d.dir, nconf);
    assert_int_equal(e2e_write_agent_config(conf, &d, &A->host, "strict = true;", targets), 0);
    char *args[] = {"--once", "--config", conf, NULL};
    assert_int_equal(e2e_run_agent(args, log, 10000), 3);
    assert_int_equal(e2e_count_containing(log, "enables 0-RTT"), 1);
}

/* Last: stops stekd. The files stay while their keys live, then leave, zeroed. */
static void test_stekd_down_files_expire(void **state)
{
    (void)state;
    /* Hold a key file open: after its removal its bytes must read back as zeros. */
    char *m = e2e_read_file(B->manifest);
    assert_non_null(m);
    char *f = strstr(m, "\"file\":\"");
    assert_non_null(f);
    f += strlen("\"file\":\"");
    *strchr(f, '"') = '\0';
    char path[FX_PATH_MAX + 128];
    snprintf(path, sizeof(path), "%s/%s", B->keys, f);
    free(m);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);

    int code;
    assert_int_equal(fx_stekd_stop(&d, 10000, &code), 0);
    double stopped = e2e_now();
    int held = e2e_count_key_files(B->keys, "b");
    assert_true(held >= 3);
    /* The newest key lives until (its epoch + 1) * P + L: at most P + P + L from now. */
    while (e2e_count_key_files(B->keys, "b") > 0 &&
           e2e_now() < stopped + 2 * E2E_EPOCH_S + E2E_LIFETIME_S + 6) {
        /* Still resuming from the kept files while some key lives. */
        struct timespec ts = {0, 250 * 1000000L};
        nanosleep(&ts, NULL);
    }
    double gone = e2e_now() - stopped;
    assert_int_equal(e2e_count_key_files(B->keys, "b"), 0);
    assert_true(gone > E2E_EPOCH_S); /* not dropped at once: kept until expiry */
    uint8_t buf[80];
    assert_int_equal(pread(fd, buf, sizeof(buf), 0), 80);
    for (size_t i = 0; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0);
    close(fd);
    char snippet[FX_PATH_MAX + 64];
    snprintf(snippet, sizeof(snippet), "%s/b.conf", B->keys);
    assert_int_equal(e2e_count_containing(snippet, "ssl_session_ticket_key"), 0);
    fprintf(stderr, "stekd down: %d key files kept, the last removed (zeroed) after %.1f s\n", held,
            gone);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls13_reused_across_instances),
        cmocka_unit_test(test_tls12_reused_across_instances),
        cmocka_unit_test(test_rotation_window),
        cmocka_unit_test(test_continuous_across_rotations),
        cmocka_unit_test(test_corrupt_config_names_line),
        cmocka_unit_test(test_early_data_strict_refuses),
        cmocka_unit_test(test_unwritable_key_dir),
        cmocka_unit_test(test_stopped_nginx_retried_then_recovers),
        cmocka_unit_test(test_stekd_down_files_expire),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
