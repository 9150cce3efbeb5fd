/*
 * stekd's operations surface against a real stekd process and SoftHSM
 * token: Prometheus /metrics (checked by `promtool check metrics` and by
 * value), grpc.health.v1 following the HSM, the audit log (one line per set
 * served, reopened on SIGHUP, never a key byte), systemd notification, and
 * exit code 4 when the metrics address is taken.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "fx_grpc.h"
#include "fx_http.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "stek/v1/stek.pb-c.h"

#ifndef STEKD_BIN
#error "STEKD_BIN must name the stekd binary"
#endif

#define EPOCH_S 60
#define LIFETIME_S 120
#define GET "/stek.v1.KeyService/GetKeySet"
#define WATCH "/stek.v1.KeyService/WatchKeySet"
#define METRICS_LINE "metrics = { listen = \"127.0.0.1:0\"; };\n"
/* A relative audit_log is relative to the config file, in d's directory. */
#define AUDIT_LINE "audit_log = \"audit.log\";\n"
#define MAX_KEYS 64

static fx_stekd d;
static fx_cert host_a, host_b; /* b's key signs the forged request */
static stek_host_eph *eph;
static uint8_t pub[STEK_P256_POINT_BYTES];
static uint8_t nonce[16];
static char audit_path[FX_PATH_MAX + 32];
static char notify_path[FX_PATH_MAX + 32];
static int notify_fd = -1;

/* Every key unwrapped from a set served: none may show up in a log. */
static uint8_t keys_seen[MAX_KEYS][80];
static size_t n_keys_seen;
/* Sets served into the current audit file, by event. */
static int served_get, served_watch_open;

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

/* ---- helpers ------------------------------------------------------------ */

static bool file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return false;
    char line[2048];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* One HTTP/1.0 request to stekd's metrics address. */
static int http(const char *method, const char *path, fx_http_reply *out)
{
    return fx_http(fx_metrics_port(d.log_path), method, path, out);
}

static char *scrape(void)
{
    fx_http_reply r;
    assert_int_equal(http("GET", "/metrics", &r), 0);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.head, "Content-Type: text/plain; version=0.0.4"));
    char *body = r.body;
    r.body = NULL;
    fx_http_free(&r);
    return body;
}

static double must_metric(const char *text, const char *series)
{
    double v = fx_metric(text, series);
    if (isnan(v))
        fprintf(stderr, "no sample %s in:\n%s\n", series, text);
    assert_false(isnan(v));
    return v;
}

/* `promtool check metrics` on text: 0 when it exits 0 with nothing to say. */
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
    FILE *f = fopen(log, "r");
    char said[4096] = "";
    size_t n = f ? fread(said, 1, sizeof(said) - 1, f) : 0;
    said[n] = '\0';
    if (f)
        fclose(f);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || n > 0)
        fprintf(stderr, "promtool check metrics (status %d):\n%s\n", status, said);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(n, 0);
}

static fx_grpc *channel(void)
{
    fx_grpc *ch = NULL;
    assert_int_equal(
        fx_grpc_open(&ch, d.target, d.ca.cert_path, host_a.cert_path, host_a.key_path, "localhost"),
        0);
    return ch;
}

/* Remembers the unwrapped keys of a served set (KeySet bytes). */
static void remember_keys(const uint8_t *msg, size_t len)
{
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    Stek__V1__SignedKeySet *s =
        stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    assert_non_null(s);
    stek_secret *kek = NULL;
    assert_int_equal(stek_host_kek_derive(eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len, s->group,
                                          (uint32_t)s->generation, &kek),
                     STEK_OK);
    for (size_t i = 0; i < s->n_keys; i++) {
        stek_secret *k = NULL;
        assert_int_equal(
            stek_host_unwrap(kek, s->keys[i]->wrapped.data, s->keys[i]->wrapped.len, &k), STEK_OK);
        bool known = false;
        for (size_t j = 0; j < n_keys_seen && !known; j++)
            known = memcmp(keys_seen[j], stek_secret_data(k), 80) == 0;
        if (!known && n_keys_seen < MAX_KEYS)
            memcpy(keys_seen[n_keys_seen++], stek_secret_data(k), 80);
        stek_secret_free(k);
    }
    stek_secret_free(kek);
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    stek__v1__key_set__free_unpacked(ks, NULL);
}

/* One GetKeySet signed with key_pem; returns its status. */
static grpc_status_code fetch_signed_by(fx_grpc *ch, const char *key_pem)
{
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(
        fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce), key_pem, &req, &len), 0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, GET, req, len, 10000, &r), 0);
    free(req);
    grpc_status_code st = r.status;
    if (st == GRPC_STATUS_OK) {
        remember_keys(r.body, r.body_len);
        served_get++;
    }
    fx_grpc_result_free(&r);
    return st;
}

static grpc_status_code fetch(fx_grpc *ch)
{
    return fetch_signed_by(ch, host_a.key_path);
}

static int health(void)
{
    fx_grpc *ch = channel();
    int serving = -1;
    grpc_status_code st;
    fx_grpc_health(ch, "", 5000, &serving, &st);
    fx_grpc_close(ch);
    return serving;
}

static void restart(const char *clock_offset)
{
    int code = -1;
    if (d.pid > 0)
        assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    if (clock_offset)
        setenv("STEKD_TEST_CLOCK_OFFSET", clock_offset, 1);
    assert_int_equal(fx_stekd_start(&d), 0);
    unsetenv("STEKD_TEST_CLOCK_OFFSET");
}

static int setup(void **state)
{
    (void)state;
    const char *uris_a[] = {"spiffe://fleet/edge/a", NULL};
    const char *uris_b[] = {"spiffe://fleet/edge/b", NULL};
    fx_cert_opts oa = {.name = "edge-a", .uri_sans = uris_a};
    fx_cert_opts ob = {.name = "edge-b", .uri_sans = uris_b};
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, METRICS_LINE AUDIT_LINE) != 0 ||
        fx_stekd_host_cert(&d, &oa, &host_a) != 0 || fx_stekd_host_cert(&d, &ob, &host_b) != 0 ||
        stek_host_eph_generate(&eph) != STEK_OK || stek_host_eph_public(eph, pub) != STEK_OK ||
        RAND_bytes(nonce, sizeof(nonce)) != 1)
        return -1;
    snprintf(audit_path, sizeof(audit_path), "%s/audit.log", d.dir);
    return fx_stekd_start(&d);
}

static int teardown(void **state)
{
    (void)state;
    if (notify_fd >= 0)
        close(notify_fd);
    stek_host_eph_free(eph);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- /metrics ----------------------------------------------------------- */

static void test_metrics_scrape(void **state)
{
    (void)state;
    char *before = scrape();
    promtool_check(before);
    uint64_t e0 = fx_stekd_epoch_now(&d);
    fx_grpc *ch = channel();
    for (int i = 0; i < 3; i++)
        assert_int_equal(fetch(ch), GRPC_STATUS_OK);
    /* Host a's certificate, host b's signature. */
    assert_int_equal(fetch_signed_by(ch, host_b.key_path), GRPC_STATUS_UNAUTHENTICATED);
    fx_grpc_close(ch);
    char *after = scrape();
    uint64_t e1 = fx_stekd_epoch_now(&d);
    promtool_check(after);

#define DELTA(series) (must_metric(after, series) - must_metric(before, series))
    assert_int_equal(DELTA("stekd_fetches_total{code=\"OK\"}"), 3);
    assert_int_equal(DELTA("stekd_fetches_total{code=\"UNAUTHENTICATED\"}"), 1);
    assert_int_equal(DELTA("stekd_fetches_total{code=\"PERMISSION_DENIED\"}"), 0);
    assert_int_equal(DELTA("stekd_request_signatures_rejected_total"), 1);
    /* The same request three times: one wrap in the HSM, then the cache. */
    double hits = DELTA("stekd_wrap_cache_hits_total");
    double misses = DELTA("stekd_wrap_cache_misses_total");
    assert_int_equal(hits + misses, 3);
    if (e0 == e1) { /* no rotation in between, which would change the view */
        assert_int_equal(misses, 1);
        assert_int_equal(hits, 2);
    }
#undef DELTA

    double epoch = must_metric(after, "stekd_group_epoch{group=\"edge\"}");
    assert_true(epoch >= (double)e0 && epoch <= (double)e1);
    assert_int_equal(must_metric(after, "stekd_group_generation{group=\"edge\"}"), 1);
    assert_int_equal(must_metric(after, "stekd_group_available{group=\"edge\"}"), 1);
    assert_int_equal(must_metric(after, "stekd_serving"), 1);
    assert_int_equal(must_metric(after, "stekd_hsm_up"), 1);
    assert_true(must_metric(after, "stekd_group_keys_served{group=\"edge\"}") >= 2);
    assert_true(must_metric(after, "stekd_group_hsm_keys{group=\"edge\",kind=\"ticket\"}") >= 2);
    assert_int_equal(must_metric(after, "stekd_group_hsm_keys{group=\"edge\",kind=\"chain\"}"), 1);
    double next = must_metric(after, "stekd_group_next_rotation_seconds{group=\"edge\"}");
    assert_true(next >= 0 && next <= EPOCH_S);
    assert_int_equal(must_metric(after, "stekd_group_schedule_jump_refused{group=\"edge\"}"), 0);

    /* The wrap and the signature were timed: buckets cumulative, ending at _count. */
    const char *calls[] = {"C_WrapKey", "C_Sign"};
    for (size_t c = 0; c < 2; c++) {
        char series[160];
        snprintf(series, sizeof(series), "stekd_hsm_call_duration_seconds_count{call=\"%s\"}",
                 calls[c]);
        double count = must_metric(after, series);
        assert_true(count >= 1);
        const char *les[] = {"0.0001", "0.001", "0.01", "0.1", "1", "5", "+Inf"};
        double prev = 0;
        for (size_t i = 0; i < sizeof(les) / sizeof(les[0]); i++) {
            snprintf(series, sizeof(series),
                     "stekd_hsm_call_duration_seconds_bucket{call=\"%s\",le=\"%s\"}", calls[c],
                     les[i]);
            double b = must_metric(after, series);
            assert_true(b >= prev);
            prev = b;
        }
        assert_true(prev == count);
    }
    free(before);
    free(after);

    /* Only GET and HEAD of /metrics. */
    fx_http_reply r;
    assert_int_equal(http("GET", "/other", &r), 0);
    assert_int_equal(r.status, 404);
    fx_http_free(&r);
    assert_int_equal(http("POST", "/metrics", &r), 0);
    assert_int_equal(r.status, 405);
    fx_http_free(&r);
    assert_int_equal(http("HEAD", "/metrics", &r), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "");
    fx_http_free(&r);
}

typedef struct watch_arg {
    double want;
} watch_arg;

static bool cancelled_counted(void *arg)
{
    watch_arg *w = arg;
    fx_http_reply r;
    if (http("GET", "/metrics", &r) != 0)
        return false;
    bool ok = fx_metric(r.body, "stekd_watch_streams_total{code=\"CANCELLED\"}") == w->want;
    fx_http_free(&r);
    return ok;
}

/* A watch stream that the host drops is counted as CANCELLED when it closes. */
static void test_watch_stream_counted(void **state)
{
    (void)state;
    char *before = scrape();
    double cancelled = must_metric(before, "stekd_watch_streams_total{code=\"CANCELLED\"}");
    double sent = must_metric(before, "stekd_watch_sets_sent_total");
    free(before);

    fx_grpc *ch = channel();
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce),
                                     host_a.key_path, &req, &len),
                     0);
    fx_grpc_stream *s = NULL;
    assert_int_equal(fx_grpc_stream_start(ch, WATCH, req, len, 30000, &s), 0);
    uint8_t *msg = NULL;
    size_t mlen = 0;
    assert_int_equal(fx_grpc_stream_read(s, 10000, &msg, &mlen), 1);
    remember_keys(msg, mlen);
    served_watch_open++;
    free(msg);
    free(req);

    char *open = scrape();
    assert_int_equal(must_metric(open, "stekd_watch_streams_open"), 1);
    assert_true(must_metric(open, "stekd_watch_sets_sent_total") >= sent + 1);
    free(open);

    fx_grpc_stream_cancel_and_free(s);
    fx_grpc_close(ch);
    watch_arg w = {cancelled + 1};
    assert_int_equal(fx_wait_until(cancelled_counted, &w, 10000), 0);
}

/* ---- the audit log ------------------------------------------------------ */

typedef struct audit_counts {
    int get, watch_open, watch_update, lines;
} audit_counts;

/* Reads path; checks every line's fields; counts lines by event. */
static void check_audit_file(const char *path, audit_counts *c)
{
    memset(c, 0, sizeof(*c));
    /* The fingerprint of host a's certificate, as the log writes it. */
    FILE *cf = fopen(host_a.cert_path, "r");
    assert_non_null(cf);
    X509 *cert = PEM_read_X509(cf, NULL, NULL, NULL);
    fclose(cf);
    assert_non_null(cert);
    unsigned char md[32];
    unsigned int md_len = 0;
    assert_int_equal(X509_digest(cert, EVP_sha256(), md, &md_len), 1);
    X509_free(cert);
    char fp[65];
    assert_int_equal(OPENSSL_buf2hexstr_ex(fp, sizeof(fp), NULL, md, md_len, '\0'), 1);

    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[4096];
    while (fgets(line, sizeof(line), f) != NULL) {
        c->lines++;
        assert_non_null(strchr(line, '\n')); /* whole lines only */
        json_object *o = json_tokener_parse(line);
        if (o == NULL)
            fprintf(stderr, "not JSON: %s", line);
        assert_non_null(o);
        json_object *v;
#define FIELD(name) (assert_true(json_object_object_get_ex(o, name, &v)), v)
        const char *event = json_object_get_string(FIELD("event"));
        if (strcmp(event, "get") == 0)
            c->get++;
        else if (strcmp(event, "watch_open") == 0)
            c->watch_open++;
        else if (strcmp(event, "watch_update") == 0)
            c->watch_update++;
        else
            fail_msg("unknown event %s", event);
        assert_string_equal(json_object_get_string(FIELD("identity")), "uri:spiffe://fleet/edge/a");
        assert_string_equal(json_object_get_string(FIELD("group")), "edge");
        assert_string_equal(json_object_get_string(FIELD("cert_sha256")), fp);
        assert_int_equal(strncmp(json_object_get_string(FIELD("peer")), "ipv4:127.0.0.1:", 15), 0);
        assert_int_equal(json_object_get_int64(FIELD("generation")), 1);
        uint64_t first = json_object_get_uint64(FIELD("epoch_first"));
        uint64_t last = json_object_get_uint64(FIELD("epoch_last"));
        uint64_t cur = json_object_get_uint64(FIELD("epoch_current"));
        assert_true(first <= cur && cur + 1 == last);
        assert_true(cur + 1 >= fx_stekd_epoch_now(&d) && cur <= fx_stekd_epoch_now(&d));
        const char *ts = json_object_get_string(FIELD("ts"));
        assert_int_equal(strlen(ts), 24); /* 2026-03-01T12:00:00.123Z */
        assert_int_equal(ts[23], 'Z');
#undef FIELD
        json_object_put(o);
    }
    fclose(f);
}

static bool mem_has(const uint8_t *hay, size_t n, const void *needle, size_t len)
{
    return len > 0 && len <= n && memmem(hay, n, needle, len) != NULL;
}

/* Fails when path holds any of the keys served so far, raw or encoded. */
static void assert_no_key_bytes(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static uint8_t buf[1 << 20];
    size_t n = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    assert_true(n < sizeof(buf));
    assert_true(n_keys_seen >= 2);
    /* The whole key, its name, its HMAC and AES halves. */
    const struct {
        size_t off, len;
    } parts[] = {{0, 80}, {0, 16}, {16, 32}, {48, 32}};
    for (size_t k = 0; k < n_keys_seen; k++) {
        for (size_t p = 0; p < sizeof(parts) / sizeof(parts[0]); p++) {
            const uint8_t *bytes = keys_seen[k] + parts[p].off;
            size_t len = parts[p].len;
            assert_false(mem_has(buf, n, bytes, len));
            char hex[2 * 80 + 1];
            assert_int_equal(OPENSSL_buf2hexstr_ex(hex, sizeof(hex), NULL, bytes, (long)len, '\0'),
                             1);
            assert_false(mem_has(buf, n, hex, strlen(hex))); /* upper case */
            for (char *c = hex; *c; c++)
                *c = (char)tolower((unsigned char)*c);
            assert_false(mem_has(buf, n, hex, strlen(hex)));
            unsigned char b64[4 * 80 / 3 + 8];
            int b64_len = EVP_EncodeBlock(b64, bytes, (int)len);
            assert_false(mem_has(buf, n, b64, (size_t)b64_len));
        }
    }
}

static void test_audit_lines(void **state)
{
    (void)state;
    audit_counts c;
    check_audit_file(audit_path, &c);
    fprintf(stderr, "audit: %d lines (%d get, %d watch_open, %d watch_update), %zu keys checked\n",
            c.lines, c.get, c.watch_open, c.watch_update, n_keys_seen);
    /* Exactly the sets served: refused fetches leave no line. */
    assert_int_equal(c.get, served_get);
    assert_int_equal(c.watch_open, served_watch_open);
    assert_int_equal(c.lines, c.get + c.watch_open + c.watch_update);
    char *text = scrape();
    assert_int_equal(must_metric(text, "stekd_audit_lines_total"), c.lines);
    assert_int_equal(must_metric(text, "stekd_audit_write_errors_total"), 0);
    free(text);
    assert_no_key_bytes(audit_path);
    assert_no_key_bytes(d.log_path);

    struct stat sb;
    mode_t um = umask(0);
    umask(um);
    assert_int_equal(stat(audit_path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0640 & ~um);
}

static bool reopened(void *arg)
{
    (void)arg;
    return file_contains(d.log_path, "SIGHUP: audit log reopened");
}

/* logrotate's rename, then SIGHUP: new lines go to a new file at the same path. */
static void test_audit_reopen_on_sighup(void **state)
{
    (void)state;
    char rotated[sizeof(audit_path) + 8];
    snprintf(rotated, sizeof(rotated), "%s.1", audit_path);
    audit_counts old_c, c;
    check_audit_file(audit_path, &old_c);
    assert_int_equal(rename(audit_path, rotated), 0);
    assert_int_equal(kill(d.pid, SIGHUP), 0);
    assert_int_equal(fx_wait_until(reopened, NULL, 10000), 0);

    served_get = served_watch_open = 0;
    fx_grpc *ch = channel();
    assert_int_equal(fetch(ch), GRPC_STATUS_OK);
    fx_grpc_close(ch);
    check_audit_file(audit_path, &c);
    assert_int_equal(c.lines, 1);
    assert_int_equal(c.get, 1);
    check_audit_file(rotated, &c);
    assert_int_equal(c.lines, old_c.lines);
    assert_no_key_bytes(audit_path);
    assert_int_equal(d.pid > 0 && kill(d.pid, 0) == 0, 1); /* SIGHUP did not stop it */
}

/* ---- health ------------------------------------------------------------- */

typedef struct health_arg {
    int want;
} health_arg;

static bool health_is(void *arg)
{
    return health() == ((health_arg *)arg)->want;
}

static bool hsm_up_is(void *arg)
{
    fx_http_reply r;
    if (http("GET", "/metrics", &r) != 0)
        return false;
    bool ok = fx_metric(r.body, "stekd_hsm_up") == ((health_arg *)arg)->want;
    fx_http_free(&r);
    return ok;
}

/* SERVING -> token removed -> NOT_SERVING -> token back -> SERVING, same process. */
static void test_health_follows_hsm(void **state)
{
    (void)state;
    pid_t pid = d.pid;
    assert_int_equal(health(), 1);
    health_arg up = {1}, down = {0}, not_serving = {2};

    assert_int_equal(fx_token_hide(&d.tok), 0);
    assert_int_equal(fx_wait_until(health_is, &not_serving, 10000), 0);
    assert_int_equal(fx_wait_until(hsm_up_is, &down, 10000), 0);
    char *text = scrape();
    promtool_check(text);
    assert_int_equal(must_metric(text, "stekd_serving"), 0);
    assert_int_equal(must_metric(text, "stekd_group_available{group=\"edge\"}"), 0);
    assert_true(isnan(fx_metric(text, "stekd_group_epoch{group=\"edge\"}")));
    free(text);

    assert_int_equal(fx_token_restore(&d.tok), 0);
    health_arg serving = {1};
    assert_int_equal(fx_wait_until(health_is, &serving, 15000), 0);
    assert_int_equal(fx_wait_until(hsm_up_is, &up, 10000), 0);
    fx_grpc *ch = channel();
    assert_int_equal(fetch(ch), GRPC_STATUS_OK);
    fx_grpc_close(ch);
    text = scrape();
    assert_true(must_metric(text, "stekd_hsm_reconnects_total") >= 1);
    free(text);
    assert_int_equal(d.pid, pid);
}

/* A clock a day ahead: the refused jump is counted, health is NOT_SERVING. */
static void test_refused_jump_counted(void **state)
{
    (void)state;
    restart("86400");
    char *text = scrape();
    promtool_check(text);
    assert_int_equal(must_metric(text, "stekd_group_schedule_jumps_refused_total{group=\"edge\"}"),
                     1);
    assert_int_equal(must_metric(text, "stekd_group_schedule_jump_refused{group=\"edge\"}"), 1);
    assert_int_equal(must_metric(text, "stekd_serving"), 0);
    assert_int_equal(must_metric(text, "stekd_hsm_up"), 1); /* the HSM is fine */
    free(text);
    assert_int_equal(health(), 2);
    fx_grpc *ch = channel();
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce),
                                     host_a.key_path, &req, &len),
                     0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, GET, req, len, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
    fx_grpc_result_free(&r);
    free(req);
    fx_grpc_close(ch);
    text = scrape();
    assert_int_equal(must_metric(text, "stekd_fetches_total{code=\"UNAVAILABLE\"}"), 1);
    free(text);

    restart(NULL);
    assert_int_equal(health(), 1);
}

/* ---- systemd ------------------------------------------------------------ */

typedef struct notify_arg {
    const char *want;
    char seen[4096];
} notify_arg;

/* Reads pending datagrams; true once one contained want. */
static bool notified(void *arg)
{
    notify_arg *a = arg;
    char msg[512];
    ssize_t n;
    while ((n = recv(notify_fd, msg, sizeof(msg) - 1, MSG_DONTWAIT)) > 0) {
        msg[n] = '\0';
        size_t used = strlen(a->seen);
        snprintf(a->seen + used, sizeof(a->seen) - used, "%s\n", msg);
    }
    return strstr(a->seen, a->want) != NULL;
}

static void test_systemd_notify(void **state)
{
    (void)state;
#ifndef STEK_HAVE_SYSTEMD
    skip(); /* stekd was built without libsystemd */
#else
    snprintf(notify_path, sizeof(notify_path), "%s/notify.sock", d.dir);
    notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    assert_true(strlen(notify_path) < sizeof(sa.sun_path));
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", notify_path);
    assert_int_equal(bind(notify_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    setenv("NOTIFY_SOCKET", notify_path, 1);
    setenv("WATCHDOG_USEC", "3000000", 1);
    restart(NULL);
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");

    notify_arg a = {.want = "READY=1"};
    assert_int_equal(fx_wait_until(notified, &a, 10000), 0);
    a.want = "WATCHDOG=1";
    a.seen[0] = '\0';
    assert_int_equal(fx_wait_until(notified, &a, 5000), 0);
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    assert_int_equal(code, 0);
    a.want = "STOPPING=1";
    assert_true(notified(&a));
    restart(NULL);
#endif
}

/* ---- start-up ----------------------------------------------------------- */

/* Writes d's config with the line `find` replaced by `line` to <dir>/<name>.conf,
 * runs stekd on it and returns its exit status; its log is <dir>/<name>.log. */
static int run_with(const char *name, const char *find, const char *line, char *log, size_t log_len)
{
    FILE *f = fopen(d.config_path, "r");
    assert_non_null(f);
    static char conf[16384];
    size_t n = fread(conf, 1, sizeof(conf) - 1, f);
    fclose(f);
    conf[n] = '\0';
    char *at = strstr(conf, find);
    assert_non_null(at);
    static char out[sizeof(conf) + 512];
    snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - conf), conf, line, at + strlen(find));
    char path[FX_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/%s.conf", d.dir, name);
    snprintf(log, log_len, "%s/%s.log", d.dir, name);
    assert_int_equal(fx_write_file(path, out, 0600), 0);
    char *argv[] = {STEKD_BIN, "--config", path, NULL};
    pid_t pid;
    int status = 0;
    assert_int_equal(fx_spawn(argv, log, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 20000, &status), 0);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* An audit log that cannot be opened is a configuration error: exit 2. */
static void test_audit_unopenable_exits_2(void **state)
{
    (void)state;
    char log[FX_PATH_MAX + 32];
    assert_int_equal(run_with("noaudit", AUDIT_LINE, "audit_log = \"no-such-dir/audit.log\";\n",
                              log, sizeof(log)),
                     2);
    assert_true(file_contains(log, "no-such-dir/audit.log: No such file or directory"));
}

/* A metrics address another process holds: exit 4 with the reason. */
static void test_metrics_listen_busy_exits_4(void **state)
{
    (void)state;
    int code = -1;
    if (d.pid > 0)
        assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    int busy = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    assert_int_equal(bind(busy, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(busy, 1), 0);
    assert_int_equal(getsockname(busy, (struct sockaddr *)&sa, &sl), 0);
    int port = ntohs(sa.sin_port);

    /* The same config with the metrics line pointing at the busy port. */
    char line[96], log[FX_PATH_MAX + 32];
    snprintf(line, sizeof(line), "metrics = { listen = \"127.0.0.1:%d\"; };\n", port);
    int rc = run_with("busy", METRICS_LINE, line, log, sizeof(log));
    close(busy);
    assert_int_equal(rc, 4);
    char want[96];
    snprintf(want, sizeof(want), "cannot listen on 127.0.0.1:%d for metrics", port);
    assert_true(file_contains(log, want));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_scrape),
        cmocka_unit_test(test_watch_stream_counted),
        cmocka_unit_test(test_audit_lines),
        cmocka_unit_test(test_audit_reopen_on_sighup),
        cmocka_unit_test(test_health_follows_hsm),
        cmocka_unit_test(test_refused_jump_counted),
        cmocka_unit_test(test_systemd_notify),
        cmocka_unit_test(test_audit_unopenable_exits_2),
        cmocka_unit_test(test_metrics_listen_busy_exits_4),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
