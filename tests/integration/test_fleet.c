/*
 * Fleet convergence telemetry end to end: a real stekd (3-second epochs,
 * metrics listener on), two hosts running libstek (the shared library,
 * public API only), the real `stekctl fleet` binary read with --json and
 * json-c, and stekd's /metrics checked by value and by `promtool check
 * metrics`:
 *   - both hosts show as converged, holding the current and next keys,
 *     with their resumption counters;
 *   - a host that stops (stek_client_free) shows as lagging within one
 *     epoch plus the grace, in both, while the other stays converged
 *     across a rotation;
 *   - ReportStatus is authenticated like GetKeySet: another host's signed
 *     request is UNAUTHENTICATED, a group the certificate may not fetch is
 *     PERMISSION_DENIED, malformed reports are INVALID_ARGUMENT, and a
 *     report is filed under the certificate's identity only.
 * Every wait polls a condition with a deadline.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <json-c/json.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "fx_grpc.h"
#include "fx_http.h"
#include "fx_stekd.h"
#include "fx_tls.h"
#include "hostwrap.h"
#include "stek/stek.h"
#include "stek/v1/stek.pb-c.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

extern char **environ;

#define EPOCH_S 3
#define LIFETIME_S 6
#define GRACE_S 2 /* STEKD_FLEET_GRACE_S + the fixture's jitter (0) */
#define GROUP "edge"
#define REPORT "/stek.v1.KeyService/ReportStatus"
#define ID_A "uri:spiffe://fleet/edge/a"
#define ID_B "uri:spiffe://fleet/edge/b"
#define ID_C "uri:spiffe://fleet/edge/c"
#define METRICS_LINE "metrics = { listen = \"127.0.0.1:0\"; };\n"

static fx_stekd d;
static fx_cert cert_a, cert_b, cert_c;
static stek_client *client_a, *client_b;
static SSL_CTX *server_a, *server_b;
static char ctl_config[FX_PATH_MAX + 32]; /* stekd's config with the real metrics port */
static char metrics_url[64];

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
    {"api", {"uri:spiffe://fleet/api/*", NULL}},
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf != NULL && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2)
            buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    if (buf != NULL)
        buf[len] = '\0';
    return buf;
}

/* ---- stekd over HTTP and stekctl ---------------------------------------- */

typedef struct body {
    char *p;
    size_t len;
} body;

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
    body *b = arg;
    size_t n = size * nmemb;
    char *p = realloc(b->p, b->len + n + 1);
    if (p == NULL)
        return 0;
    memcpy(p + b->len, ptr, n);
    b->len += n;
    p[b->len] = '\0';
    b->p = p;
    return n;
}

/* GET path on the metrics address: the body (free()) of a 200, or NULL. */
static char *http_get(const char *path)
{
    char url[256];
    snprintf(url, sizeof(url), "%s%s", metrics_url, path);
    body b = {0};
    CURL *h = curl_easy_init();
    assert_non_null(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    CURLcode rc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(h);
    if (rc != CURLE_OK || code != 200) {
        fprintf(stderr, "GET %s: curl %d, HTTP %ld\n", url, (int)rc, code);
        free(b.p);
        return NULL;
    }
    return b.p;
}

static double fleet_metric(const char *text, const char *label, const char *value)
{
    char series[160];
    const char *family =
        strcmp(label, "state") == 0 ? "stekd_fleet_hosts" : "stekd_fleet_hosts_by_epoch";
    snprintf(series, sizeof(series), "%s{group=\"" GROUP "\",%s=\"%s\"}", family, label, value);
    return fx_metric(text, series);
}

/* `promtool check metrics` on text: it must exit 0 and say nothing. */
static void promtool_check(const char *text)
{
    char in[FX_PATH_MAX + 32], log[FX_PATH_MAX + 32], cmd[3 * FX_PATH_MAX];
    snprintf(in, sizeof(in), "%s/scrape.txt", d.dir);
    snprintf(log, sizeof(log), "%s/promtool.log", d.dir);
    assert_int_equal(fx_write_file(in, text, 0600), 0);
    unlink(log);
    snprintf(cmd, sizeof(cmd),
             "command -v promtool >/dev/null || { echo 'promtool not found: install the "
             "prometheus package (ci/packages.txt)'; exit 127; }; exec promtool check metrics < %s",
             in);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    pid_t pid;
    int status = 0;
    assert_int_equal(fx_spawn(argv, log, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 30000, &status), 0);
    char *said = slurp(log);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || (said != NULL && said[0] != '\0'))
        fprintf(stderr, "promtool check metrics (status %d):\n%s\n", status, said ? said : "");
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(said == NULL || said[0] == '\0');
    free(said);
}

/* Runs stekctl with args (NULL-terminated); *out gets its stdout. Returns its exit code. */
static int stekctl(char **out, ...)
{
    char *argv[16];
    size_t n = 0;
    argv[n++] = (char *)STEKCTL_PATH;
    va_list ap;
    va_start(ap, out);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL) {
        assert_true(n < 15);
        argv[n++] = (char *)a;
    }
    va_end(ap);
    argv[n] = NULL;
    char out_path[FX_PATH_MAX + 32], err_path[FX_PATH_MAX + 32];
    snprintf(out_path, sizeof(out_path), "%s/ctl.out", d.dir);
    snprintf(err_path, sizeof(err_path), "%s/ctl.err", d.dir);
    posix_spawn_file_actions_t fa;
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    assert_int_equal(posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    assert_int_equal(rc, 0);
    int status = 0;
    assert_int_equal(fx_wait_exit(pid, 30000, &status), 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    char *err = slurp(err_path);
    if (code != 0 || (err != NULL && err[0] != '\0'))
        fprintf(stderr, "stekctl exit %d: %s", code, err ? err : "");
    free(err);
    *out = slurp(out_path);
    return code;
}

/* `stekctl --config CONF fleet edge --json`, parsed. */
static json_object *fleet_json(void)
{
    char *out = NULL;
    assert_int_equal(stekctl(&out, "--config", ctl_config, "fleet", GROUP, "--json", NULL), 0);
    assert_non_null(out);
    json_object *doc = json_tokener_parse(out);
    if (doc == NULL)
        fprintf(stderr, "not JSON: %s\n", out);
    free(out);
    assert_non_null(doc);
    return doc;
}

static json_object *member(json_object *o, const char *key)
{
    json_object *v = NULL;
    return json_object_object_get_ex(o, key, &v) ? v : NULL;
}

static json_object *host(json_object *doc, const char *identity)
{
    json_object *hosts = member(doc, "hosts");
    for (size_t i = 0; hosts != NULL && i < json_object_array_length(hosts); i++) {
        json_object *h = json_object_array_get_idx(hosts, i);
        if (strcmp(json_object_get_string(member(h, "identity")), identity) == 0)
            return h;
    }
    return NULL;
}

static bool state_is(json_object *doc, const char *identity, const char *state)
{
    json_object *h = host(doc, identity);
    return h != NULL && strcmp(json_object_get_string(member(h, "state")), state) == 0;
}

/* ---- conditions polled ---------------------------------------------------- */

/* Both hosts converged in stekctl fleet and in /metrics. */
static bool both_converged(void *arg)
{
    (void)arg;
    json_object *doc = fleet_json();
    bool ok = state_is(doc, ID_A, "converged") && state_is(doc, ID_B, "converged");
    json_object_put(doc);
    char *text = ok ? http_get("/metrics") : NULL;
    ok = text != NULL && fleet_metric(text, "state", "converged") == 2 &&
         fleet_metric(text, "state", "lagging") == 0;
    free(text);
    return ok;
}

/* Host a's report carries the resumption it served. */
static bool a_reported_resumption(void *arg)
{
    (void)arg;
    json_object *doc = fleet_json();
    json_object *h = host(doc, ID_A), *r = h ? member(h, "resumption_hit_ratio") : NULL;
    bool ok = r != NULL && json_object_get_double(r) == 1.0;
    json_object_put(doc);
    return ok;
}

/* b lagging and a converged, in stekctl fleet and in /metrics. */
static bool b_lagging(void *arg)
{
    (void)arg;
    json_object *doc = fleet_json();
    bool ok = state_is(doc, ID_B, "lagging") && state_is(doc, ID_A, "converged");
    json_object_put(doc);
    char *text = ok ? http_get("/metrics") : NULL;
    ok = text != NULL && fleet_metric(text, "state", "converged") == 1 &&
         fleet_metric(text, "state", "lagging") == 1;
    free(text);
    return ok;
}

typedef struct epoch_wait {
    int64_t after;
} epoch_wait;

/* The group's epoch (as stekctl fleet shows it) has passed w->after, and a has reported it. */
static bool a_converged_after(void *arg)
{
    epoch_wait *w = arg;
    json_object *doc = fleet_json();
    json_object *h = host(doc, ID_A);
    bool ok = json_object_get_int64(member(doc, "epoch")) > w->after && h != NULL &&
              json_object_get_int64(member(h, "epoch")) > w->after &&
              state_is(doc, ID_A, "converged") && state_is(doc, ID_B, "lagging");
    json_object_put(doc);
    return ok;
}

/* ---- setup ------------------------------------------------------------------------ */

static stek_client *client_for(const fx_cert *cert)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, d.target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(r));
    return c;
}

static SSL_CTX *server_ctx(stek_client *c)
{
    SSL_CTX *ctx = fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
    if (ctx != NULL && stek_client_attach(c, ctx) != STEK_RESULT_OK) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* stekd's config, with "127.0.0.1:0" of the metrics line replaced by the bound port. */
static int write_ctl_config(int port)
{
    char *conf = slurp(d.config_path);
    char *at = conf ? strstr(conf, "metrics = { listen = \"127.0.0.1:0\"") : NULL;
    if (at == NULL) {
        free(conf);
        return -1;
    }
    char *zero = strstr(at, ":0\"") + 1;
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    fprintf(f, "%.*s%d%s", (int)(zero - conf), conf, port, zero + 1);
    fclose(f);
    snprintf(ctl_config, sizeof(ctl_config), "%s/stekctl.conf", d.dir);
    int rc = fx_write_file(ctl_config, out, 0600);
    free(out);
    free(conf);
    return rc;
}

static int setup(void **state)
{
    (void)state;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return -1;
    const char *uri_a[] = {"spiffe://fleet/edge/a", NULL};
    const char *uri_b[] = {"spiffe://fleet/edge/b", NULL};
    const char *uri_c[] = {"spiffe://fleet/edge/c", NULL};
    fx_cert_opts oa = {.name = "edge-a", .key_type = FX_KEY_EC_P256, .uri_sans = uri_a};
    fx_cert_opts ob = {.name = "edge-b", .key_type = FX_KEY_RSA_2048, .uri_sans = uri_b};
    fx_cert_opts oc = {.name = "edge-c", .key_type = FX_KEY_EC_P256, .uri_sans = uri_c};
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, METRICS_LINE) != 0 ||
        fx_stekd_start(&d) != 0 || fx_stekd_host_cert(&d, &oa, &cert_a) != 0 ||
        fx_stekd_host_cert(&d, &ob, &cert_b) != 0 || fx_stekd_host_cert(&d, &oc, &cert_c) != 0)
        return -1;
    int port = fx_metrics_port(d.log_path);
    if (port <= 0 || write_ctl_config(port) != 0)
        return -1;
    snprintf(metrics_url, sizeof(metrics_url), "http://127.0.0.1:%d", port);
    client_a = client_for(&cert_a);
    client_b = client_for(&cert_b);
    if (client_a == NULL || client_b == NULL)
        return -1;
    server_a = server_ctx(client_a);
    server_b = server_ctx(client_b);
    return server_a != NULL && server_b != NULL ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    stek_client_free(client_a);
    stek_client_free(client_b);
    SSL_CTX_free(server_a);
    SSL_CTX_free(server_b);
    fx_stekd_destroy(&d);
    curl_global_cleanup();
    return 0;
}

/* ---- tests ------------------------------------------------------------------------ */

/* Both running hosts converge: current epoch, current and next keys held. */
static void test_converged(void **state)
{
    (void)state;
    assert_int_equal(stek_client_wait_ready(client_a, 15000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(client_b, 15000), STEK_RESULT_OK);
    /* A resumption on server A, for its hit ratio. */
    fx_tls_result full = fx_tls_handshake(server_a, TLS1_2_VERSION, NULL, NULL);
    assert_true(full.ok);
    fx_tls_result again = fx_tls_handshake(server_a, TLS1_2_VERSION, NULL, full.session);
    assert_true(again.ok && again.server_reused);
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(again.session);

    assert_int_equal(fx_wait_until(both_converged, NULL, 20000), 0);
    /* Counters ride on the next report (the next rotation, at most an epoch away). */
    assert_int_equal(fx_wait_until(a_reported_resumption, NULL, 3 * EPOCH_S * 1000 + 12000), 0);

    json_object *doc = fleet_json();
    int64_t epoch = json_object_get_int64(member(doc, "epoch"));
    assert_int_equal(json_object_get_int64(member(doc, "hosts_total")), 2);
    assert_int_equal(json_object_get_int64(member(doc, "converged")), 2);
    for (int i = 0; i < 2; i++) {
        json_object *h = host(doc, i == 0 ? ID_A : ID_B);
        assert_non_null(h);
        /* Converged means the group's epoch, or a moment ahead at a rotation. */
        assert_true(json_object_get_int64(member(h, "epoch")) >= epoch);
        assert_int_equal(json_object_get_int64(member(h, "generation")), 1);
        assert_true(json_object_get_int64(member(h, "keys_held")) >= 2);
        assert_non_null(member(h, "peer"));
        assert_non_null(strstr(json_object_get_string(member(h, "peer")), "127.0.0.1"));
        assert_true(json_object_is_type(member(h, "lagging_since"), json_type_null));
    }
    /* A holds the group's current and next keys by name, checked in stekd. */
    json_object *ha = host(doc, ID_A);
    if (json_object_get_int64(member(ha, "epoch")) == epoch) {
        assert_true(json_object_get_boolean(member(ha, "holds_current_key")));
        assert_true(json_object_get_boolean(member(ha, "holds_next_key")));
    }
    json_object *ka = member(ha, "counters");
    assert_true(json_object_get_int64(member(ka, "tickets_resumed")) >= 1);
    assert_true(json_object_get_int64(member(ka, "tickets_issued")) >= 1);
    json_object_put(doc);

    /* The table view: both hosts, converged. */
    char *out = NULL;
    assert_int_equal(stekctl(&out, "--config", ctl_config, "fleet", GROUP, NULL), 0);
    fprintf(stderr, "%s", out);
    assert_non_null(strstr(out, "2 host(s): 2 converged, 0 lagging"));
    assert_non_null(strstr(out, ID_A));
    free(out);

    char *text = http_get("/metrics");
    assert_non_null(text);
    assert_true(
        fleet_metric(text, "epoch_offset", "0") + fleet_metric(text, "epoch_offset", "-1") == 2);
    assert_true(fx_metric(text, "stekd_fleet_reports_total{code=\"OK\"}") >= 2);
    promtool_check(text);
    free(text);
}

/*
 * Host b stops: within an epoch plus the grace (and a poll's margin) it is
 * lagging in stekctl fleet and in /metrics; a stays converged through the
 * next rotation.
 */
static void test_stopped_host_lags(void **state)
{
    (void)state;
    stek_client_free(client_b);
    client_b = NULL;
    const int64_t t0 = mono_ms();
    const int64_t limit_ms = (EPOCH_S + GRACE_S + 3) * 1000;
    assert_int_equal(fx_wait_until(b_lagging, NULL, (int)limit_ms), 0);
    int64_t took = mono_ms() - t0;
    fprintf(stderr, "host b lagging after %lld ms (epoch %d s, grace %d s)\n", (long long)took,
            EPOCH_S, GRACE_S);
    assert_true(took <= limit_ms);

    json_object *doc = fleet_json();
    json_object *hb = host(doc, ID_B);
    assert_non_null(hb);
    int64_t since = json_object_get_int64(member(hb, "lagging_since"));
    int64_t last = json_object_get_int64(member(hb, "last_report"));
    int64_t now = json_object_get_int64(member(doc, "now"));
    /* It fell behind at its last report or at the end of the epoch it holds. */
    assert_true(since > 0 && since <= now && since <= last + EPOCH_S);
    assert_true(json_object_get_boolean(member(hb, "silent")) ||
                json_object_get_boolean(member(hb, "behind")));
    epoch_wait w = {json_object_get_int64(member(doc, "epoch"))};
    json_object_put(doc);

    char *text = http_get("/metrics");
    assert_non_null(text);
    promtool_check(text);
    free(text);

    /* a keeps up across the next rotation; b stays lagging. */
    assert_int_equal(fx_wait_until(a_converged_after, &w, 2 * EPOCH_S * 1000 + 5000), 0);

    char *out = NULL;
    assert_int_equal(stekctl(&out, "--config", ctl_config, "fleet", GROUP, NULL), 0);
    fprintf(stderr, "%s", out);
    assert_non_null(strstr(out, "2 host(s): 1 converged, 1 lagging"));
    free(out);
}

/* One raw ReportStatus from `from` (a host certificate), embedding a
 * key-set request for group signed with signer's key. */
static grpc_status_code report(const fx_cert *from, const char *group, const fx_cert *signer,
                               size_t name_len, uint32_t interval_s, char *details, size_t dlen)
{
    stek_host_eph *eph = NULL;
    uint8_t pub[STEK_P256_POINT_BYTES], nonce[16];
    assert_int_equal(stek_host_eph_generate(&eph), STEK_OK);
    assert_int_equal(stek_host_eph_public(eph, pub), STEK_OK);
    stek_host_eph_free(eph);
    assert_int_equal(RAND_bytes(nonce, sizeof(nonce)), 1);
    uint8_t *ksr = NULL;
    size_t ksr_len = 0;
    assert_int_equal(fx_stek_request(group, pub, sizeof(pub), nonce, sizeof(nonce),
                                     signer->key_path, &ksr, &ksr_len),
                     0);
    uint8_t name[32] = {0};
    ProtobufCBinaryData names[1] = {{name_len, name}};
    Stek__V1__HostCounters hc = STEK__V1__HOST_COUNTERS__INIT;
    hc.tickets_issued = 7;
    Stek__V1__ReportStatusRequest m = STEK__V1__REPORT_STATUS_REQUEST__INIT;
    m.key_set_request.data = ksr;
    m.key_set_request.len = ksr_len;
    m.generation = 1;
    m.current_epoch = 1; /* far behind */
    m.n_key_names = 1;
    m.key_names = names;
    m.counters = &hc;
    m.report_interval_s = interval_s;
    size_t len = stek__v1__report_status_request__get_packed_size(&m);
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    stek__v1__report_status_request__pack(&m, buf);
    free(ksr);

    fx_grpc *ch = NULL;
    assert_int_equal(
        fx_grpc_open(&ch, d.target, d.ca.cert_path, from->cert_path, from->key_path, "localhost"),
        0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, REPORT, buf, len, 10000, &r), 0);
    free(buf);
    grpc_status_code st = r.status;
    snprintf(details, dlen, "%s", r.details);
    fx_grpc_result_free(&r);
    fx_grpc_close(ch);
    return st;
}

/* ReportStatus is authenticated like GetKeySet, and validated. */
static void test_reports_authenticated(void **state)
{
    (void)state;
    char why[256];
    /* c presents a's signed request: the signature is not by c's key. */
    assert_int_equal(report(&cert_c, GROUP, &cert_a, 16, 10, why, sizeof(why)),
                     GRPC_STATUS_UNAUTHENTICATED);
    /* A group c's certificate may not fetch. */
    assert_int_equal(report(&cert_c, "api", &cert_c, 16, 10, why, sizeof(why)),
                     GRPC_STATUS_PERMISSION_DENIED);
    /* Malformed: a key name of 15 bytes, an interval of 0. */
    assert_int_equal(report(&cert_c, GROUP, &cert_c, 15, 10, why, sizeof(why)),
                     GRPC_STATUS_INVALID_ARGUMENT);
    assert_non_null(strstr(why, "key name"));
    assert_int_equal(report(&cert_c, GROUP, &cert_c, 16, 0, why, sizeof(why)),
                     GRPC_STATUS_INVALID_ARGUMENT);
    /* Not a report at all. */
    fx_grpc *ch = NULL;
    assert_int_equal(
        fx_grpc_open(&ch, d.target, d.ca.cert_path, cert_c.cert_path, cert_c.key_path, "localhost"),
        0);
    fx_grpc_result r = {0};
    const uint8_t junk[] = {0xff, 0xff, 0xff};
    assert_int_equal(fx_grpc_unary(ch, REPORT, junk, sizeof(junk), 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    fx_grpc_result_free(&r);
    fx_grpc_close(ch);

    /* None of those was kept: c is not in the fleet, a is untouched. */
    json_object *doc = fleet_json();
    assert_null(host(doc, ID_C));
    json_object *ka = member(host(doc, ID_A), "counters");
    assert_int_not_equal(json_object_get_int64(member(ka, "tickets_issued")), 7);
    json_object_put(doc);

    /* A valid report of c's own: filed under c's certificate identity,
     * lagging (epoch 1 is far behind), in the "older" bucket. */
    assert_int_equal(report(&cert_c, GROUP, &cert_c, 16, 10, why, sizeof(why)), GRPC_STATUS_OK);
    doc = fleet_json();
    json_object *hc = host(doc, ID_C);
    assert_non_null(hc);
    assert_string_equal(json_object_get_string(member(hc, "state")), "lagging");
    assert_true(json_object_get_boolean(member(hc, "behind")));
    assert_string_equal(json_object_get_string(member(hc, "epoch_bucket")), "older");
    assert_false(json_object_get_boolean(member(hc, "holds_current_key")));
    json_object_put(doc);

    char *text = http_get("/metrics");
    assert_non_null(text);
    assert_true(fleet_metric(text, "epoch_offset", "older") >= 1);
    assert_true(fx_metric(text, "stekd_fleet_reports_total{code=\"UNAUTHENTICATED\"}") >= 1);
    assert_true(fx_metric(text, "stekd_fleet_reports_total{code=\"PERMISSION_DENIED\"}") >= 1);
    assert_true(fx_metric(text, "stekd_fleet_reports_total{code=\"INVALID_ARGUMENT\"}") >= 3);
    promtool_check(text);
    free(text);

    /* /fleet of a group that does not exist is 404; stekctl says so (exit 2: not configured). */
    char *none = http_get("/fleet?group=nope");
    assert_null(none);
    char *out = NULL;
    assert_int_equal(stekctl(&out, "--config", ctl_config, "fleet", "nope", NULL), 2);
    free(out);
}

/* --url, given twice (as for two replicas): the merge keeps one row per host. */
static void test_url_merge(void **state)
{
    (void)state;
    char *out = NULL;
    assert_int_equal(stekctl(&out, "--config", ctl_config, "fleet", GROUP, "--json", "--url",
                             metrics_url, "--url", metrics_url, NULL),
                     0);
    json_object *doc = json_tokener_parse(out);
    free(out);
    assert_non_null(doc);
    assert_int_equal(json_object_get_int64(member(doc, "hosts_total")), 3);
    assert_int_equal(json_object_array_length(member(doc, "hosts")), 3);
    json_object_put(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_converged),
        cmocka_unit_test(test_stopped_host_lags),
        cmocka_unit_test(test_reports_authenticated),
        cmocka_unit_test(test_url_merge),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
