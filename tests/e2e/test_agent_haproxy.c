/*
 * stek-agent with Debian's real HAProxy (2.6): a real stekd (4 s epochs,
 * 8 s lifetime), two HAProxy instances A and B on loopback, each driven by
 * its own stek-agent (own host certificate) through its stats socket, and
 * `openssl s_client`:
 *
 *   - a session from A resumes on B under TLS 1.3 and 1.2;
 *   - HAProxy's ring, read back with `show tls-keys`, is [previous,
 *     current, next] as the agent's manifest names them, so the second
 *     newest (the one HAProxy encrypts with) is current;
 *   - across one rotation the session still resumes; two rotations later
 *     its key has left the ring of 3 and it is New (the ring's limit);
 *   - continuous resumption alternating between A and B across three
 *     rotations never falls back to a full handshake (the count is printed).
 * HAProxy missing is a failure, never a skip.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "e2e.h"

#define HAPROXY "/usr/sbin/haproxy"

static fx_stekd d;
static fx_cert web;
static char web_pem[FX_PATH_MAX + 32];

typedef struct instance {
    const char *name;
    char dir[FX_PATH_MAX + 16], keys[FX_PATH_MAX + 16];
    char cfg[FX_PATH_MAX + 48], socket[FX_PATH_MAX + 48], keys_file[FX_PATH_MAX + 48];
    char agent_conf[FX_PATH_MAX + 48], agent_log[FX_PATH_MAX + 48];
    char manifest[FX_PATH_MAX + 64];
    fx_cert host;
    int port;
    pid_t haproxy, agent;
} instance;

static instance insts[] = {{.name = "a"}, {.name = "b"}};
static instance *const A = &insts[0], *const B = &insts[1];

static const fx_stekd_group groups[] = {{E2E_GROUP, {"uri:spiffe://fleet/edge/*", NULL}}};

static int write_haproxy_cfg(instance *in)
{
    char text[4096];
    /*
     * tune.ssl.lifetime is longer than the epoch here on purpose (the agent
     * warns about it): the test shows that the ring, not the session
     * timeout, is what ends resumption two rotations later.
     */
    snprintf(text, sizeof(text),
             "global\n"
             "  stats socket %s mode 600 level admin\n"
             "  tune.ssl.lifetime 60s\n"
             /* No session cache: "Reused" can only come from a ticket, as with nginx. */
             "  tune.ssl.cachesize 0\n"
             "defaults\n"
             "  mode http\n"
             "  timeout connect 2s\n"
             "  timeout client 5s\n"
             "  timeout server 5s\n"
             "frontend fe\n"
             "  bind 127.0.0.1:%d ssl crt %s tls-ticket-keys %s\n"
             "  http-request return status 200 content-type text/plain string ok\n",
             in->socket, in->port, web_pem, in->keys_file);
    return fx_write_file(in->cfg, text, 0600);
}

static int start_haproxy(instance *in)
{
    char *argv[] = {HAPROXY, "-f", in->cfg, "-db", NULL};
    char log[FX_PATH_MAX + 64];
    snprintf(log, sizeof(log), "%s/haproxy.out", in->dir);
    if (fx_spawn(argv, log, &in->haproxy) != 0)
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
    snprintf(in->dir, sizeof(in->dir), "%s/haproxy-%s", d.dir, in->name);
    snprintf(in->keys, sizeof(in->keys), "%s/keys-%s", d.dir, in->name);
    snprintf(in->cfg, sizeof(in->cfg), "%s/haproxy.cfg", in->dir);
    snprintf(in->socket, sizeof(in->socket), "%s/admin.sock", in->dir);
    snprintf(in->keys_file, sizeof(in->keys_file), "%s/%s.keys", in->keys, in->name);
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
    if (in->port <= 0 || write_haproxy_cfg(in) != 0)
        return -1;
    char targets[4096];
    snprintf(targets, sizeof(targets),
             "  { name = \"%s\"; group = \"" E2E_GROUP "\"; type = \"haproxy\"; dir = \"%s\";\n"
             "    socket = \"%s\"; server_config = \"%s\"; }",
             in->name, in->keys, in->socket, in->cfg);
    if (e2e_write_agent_config(in->agent_conf, &d, &in->host, "", targets) != 0 ||
        e2e_start_agent(in->agent_conf, in->agent_log, &in->agent) != 0)
        return -1;
    /* HAProxy needs its tls-ticket-keys file to start: the agent writes it first. */
    if (fx_wait_until(file_exists, in->keys_file, 20000) != 0)
        return -1;
    if (start_haproxy(in) != 0)
        return -1;
    /* Its first applies failed while the server was down (unless the server
     * came up just in time): it retries until the manifest says applied. */
    return fx_wait_until(manifest_applied, in, 10000);
}

static int setup(void **state)
{
    (void)state;
    if (e2e_require_binary(HAPROXY, "haproxy") != 0)
        return -1;
    if (fx_stekd_setup(&d, E2E_EPOCH_S, E2E_LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_stekd_start(&d) != 0)
        return -1;
    static const char *const web_dns[] = {"localhost", NULL};
    fx_cert_opts wo = {.name = "web", .dns_sans = web_dns, .eku = FX_EKU_SERVER};
    if (fx_stekd_host_cert(&d, &wo, &web) != 0)
        return -1;
    /* HAProxy takes the certificate and its key in one file. */
    char *cert = e2e_read_file(web.cert_path), *key = e2e_read_file(web.key_path), *both = NULL;
    snprintf(web_pem, sizeof(web_pem), "%s/web-both.pem", d.dir);
    int rc = cert != NULL && key != NULL && asprintf(&both, "%s%s", cert, key) > 0
                 ? fx_write_file(web_pem, both, 0600)
                 : -1;
    free(cert);
    free(key);
    free(both);
    if (rc != 0)
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
        if (insts[i].haproxy > 0)
            fx_stop(insts[i].haproxy, SIGTERM, 5000, &status);
    }
    fx_stekd_destroy(&d);
    return 0;
}

static void sess_path(char *out, size_t len, const char *tag)
{
    snprintf(out, len, "%s/session-%s.pem", d.dir, tag);
}

static void resume_across(const char *tls_flag)
{
    char sess[FX_PATH_MAX + 64];
    sess_path(sess, sizeof(sess), tls_flag + 1);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, tls_flag, NULL, sess), E2E_NEW);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, sess, NULL), E2E_REUSED);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, NULL, sess), E2E_NEW);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, A->port, tls_flag, sess, NULL), E2E_REUSED);
    assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, tls_flag, NULL, NULL), E2E_NEW);
    fprintf(stderr, "haproxy %s: New on A, Reused on B (and B to A)\n", tls_flag);
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

/* `show tls-keys <file>`: the names of the ring, oldest first, as hex. */
static int ring_names(const instance *in, char names[3][33])
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(in->socket) >= sizeof(sa.sun_path))
        return -1;
    memcpy(sa.sun_path, in->socket, strlen(in->socket) + 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
        return -1;
    char cmd[FX_PATH_MAX + 64], reply[4096];
    int len = snprintf(cmd, sizeof(cmd), "show tls-keys %s\n", in->keys_file);
    size_t got = 0;
    ssize_t n = write(fd, cmd, (size_t)len);
    while (n > 0 && got < sizeof(reply) - 1 &&
           (n = read(fd, reply + got, sizeof(reply) - 1 - got)) > 0)
        got += (size_t)n;
    close(fd);
    reply[got] = '\0';
    int k = 0;
    for (char *save = NULL, *line = strtok_r(reply, "\n", &save); line != NULL && k < 3;
         line = strtok_r(NULL, "\n", &save)) {
        char *sp = strchr(line, ' ');
        if (line[0] == '#' || sp == NULL)
            continue;
        unsigned char raw[96];
        if (EVP_DecodeBlock(raw, (unsigned char *)sp + 1, 108) < 16)
            return -1;
        for (int i = 0; i < 16; i++)
            snprintf(names[k] + 2 * i, 3, "%02x", raw[i]);
        OPENSSL_cleanse(raw, sizeof(raw));
        k++;
    }
    return k == 3 ? 0 : -1;
}

/* The key name (first 16 bytes of the ticket) of a saved s_client session, as hex. */
static int session_ticket_name(const char *path, char out[33])
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    SSL_SESSION *sess = PEM_read_SSL_SESSION(f, NULL, NULL, NULL);
    fclose(f);
    const unsigned char *tick = NULL;
    size_t len = 0;
    if (sess != NULL)
        SSL_SESSION_get0_ticket(sess, &tick, &len);
    int rc = -1;
    if (len >= 16) {
        for (int i = 0; i < 16; i++)
            snprintf(out + 2 * i, 3, "%02x", tick[i]);
        rc = 0;
    }
    SSL_SESSION_free(sess);
    return rc;
}

/* The name of the manifest's key with `role`, or NULL. */
static char *manifest_name(const char *manifest, const char *role)
{
    char want[32];
    snprintf(want, sizeof(want), "\"role\":\"%s\"", role);
    const char *r = strstr(manifest, want);
    if (r == NULL)
        return NULL;
    /* Each key object holds "name" before "role". */
    const char *nm = r;
    while (nm > manifest && strncmp(nm, "\"name\":\"", 8) != 0)
        nm--;
    return strndup(nm + 8, 32);
}

static void test_ring_is_previous_current_next(void **state)
{
    (void)state;
    for (size_t i = 0; i < 2; i++) {
        char names[3][33];
        /* Away from a boundary, so the manifest and the ring are of one moment. */
        e2e_wait_epoch_offset(&d, 2.0);
        assert_int_equal(ring_names(&insts[i], names), 0);
        char *m = e2e_read_file(insts[i].manifest);
        assert_non_null(m);
        char *cur = manifest_name(m, "encrypt"), *next = manifest_name(m, "next"),
             *prev = manifest_name(m, "decrypt");
        assert_non_null(cur);
        assert_non_null(next);
        assert_non_null(prev);
        assert_string_equal(names[0], prev);
        assert_string_equal(names[1], cur); /* HAProxy encrypts with the second newest */
        assert_string_equal(names[2], next);
        free(cur);
        free(next);
        free(prev);
        free(m);
    }
}

/*
 * A ticket of epoch e resumes in epoch e+1 (ring [e, e+1, e+2]) and is New
 * in e+2 (ring [e+1, e+2, e+3]): HAProxy's window is about one epoch.
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
    e2e_wait_epoch_offset(&d, 1.5);
    assert_int_equal(fx_stekd_epoch_now(&d), e + 2);
    for (int i = 0; i < 2; i++)
        assert_int_equal(e2e_sclient(d.dir, d.ca.cert_path, B->port, flags[i], sess[i], NULL),
                         E2E_NEW);
    fprintf(stderr, "haproxy: Reused on B one rotation later, New two rotations later\n");
}

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
    int attempts[2] = {0, 0}, reused[2] = {0, 0}, out_of_ring[2] = {0, 0};
    unsigned k = 0;
    while (fx_stekd_epoch_now(&d) < first + 3 || attempts[1] < 4) {
        int v = (int)(k % 2);
        const instance *in = (k / 2) % 2 == 0 ? B : A;
        /* Whether the ticket's key is in the instance's ring right before the attempt, */
        char ring[3][33], name[33];
        assert_int_equal(ring_names(in, ring), 0);
        assert_int_equal(session_ticket_name(sess[v], name), 0);
        bool in_ring =
            strcmp(name, ring[0]) == 0 || strcmp(name, ring[1]) == 0 || strcmp(name, ring[2]) == 0;
        e2e_outcome o = e2e_sclient(d.dir, d.ca.cert_path, in->port, flags[v], sess[v], sess[v]);
        /* And right after it: a push in between may have just moved the key out. */
        assert_int_equal(ring_names(in, ring), 0);
        in_ring = in_ring && (strcmp(name, ring[0]) == 0 || strcmp(name, ring[1]) == 0 ||
                              strcmp(name, ring[2]) == 0);
        attempts[v]++;
        if (o == E2E_REUSED)
            reused[v]++;
        else if (o == E2E_NEW && !in_ring)
            out_of_ring[v]++; /* its key had left the ring of 3: outside the window */
        else {
            fprintf(stderr, "attempt %u (%s on %s, epoch %llu, t=%.3f): not resumed\n", k, flags[v],
                    in->name, (unsigned long long)fx_stekd_epoch_now(&d), e2e_now());
            char *log = e2e_read_file(e2e_last_log());
            fprintf(stderr, "%s\n", log != NULL ? log : "(no log)");
            free(log);
            for (size_t i = 0; i < 2; i++) {
                char rn[3][33];
                if (ring_names(&insts[i], rn) == 0)
                    fprintf(stderr, "ring %s now: %s %s %s\n", insts[i].name, rn[0], rn[1], rn[2]);
            }
            for (size_t i = 0; i < 2; i++) {
                char *al = e2e_read_file(insts[i].agent_log);
                fprintf(stderr, "--- agent %s ---\n%s\n", insts[i].name, al != NULL ? al : "");
                free(al);
            }
        }
        k++;
    }
    uint64_t last = fx_stekd_epoch_now(&d);
    fprintf(stderr,
            "haproxy continuous: epochs %llu..%llu (%llu rotations): TLS 1.3 %d/%d resumed, "
            "TLS 1.2 %d/%d resumed, %d New with the ticket's key already out of the ring\n",
            (unsigned long long)first, (unsigned long long)last, (unsigned long long)(last - first),
            reused[0], attempts[0], reused[1], attempts[1], out_of_ring[1]);
    assert_true(last - first >= 3);
    /* TLS 1.3 gets a fresh ticket on every connection: every attempt resumes. */
    assert_int_equal(reused[0], attempts[0]);
    assert_int_equal(out_of_ring[0], 0);
    /*
     * Measured: HAProxy 2.6 does not renew a TLS 1.2 ticket decrypted under an
     * older ring key, so a TLS 1.2 chain keeps its first ticket until that
     * key leaves the ring (two rotations): then one full handshake. Every
     * attempt whose key was still in the ring resumed.
     */
    assert_int_equal(reused[1] + out_of_ring[1], attempts[1]);
    assert_true(out_of_ring[1] <= 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls13_reused_across_instances),
        cmocka_unit_test(test_tls12_reused_across_instances),
        cmocka_unit_test(test_ring_is_previous_current_next),
        cmocka_unit_test(test_rotation_window),
        cmocka_unit_test(test_continuous_across_rotations),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
