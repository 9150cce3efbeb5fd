/*
 * stekctl fleet GROUP [--json] [--url URL]... [--timeout MS]: which hosts
 * hold which epoch, who lags and since when, and each host's resumption
 * hit ratio, from the reports hosts send to stekd (ReportStatus).
 *
 * stekd serves its table as JSON on its metrics address (GET
 * /fleet?group=G, metrics_http.h), and this command reads it with
 * libcurl: no admin gRPC service and no admin certificate, the same
 * operator-only listener as /metrics, and read-only. The URL comes from
 * the config's metrics.listen (a wildcard host means this machine's
 * loopback), or from --url, once per replica: each replica knows the hosts
 * that report to it, so their tables are merged, the newest report of a
 * host winning.
 *
 * It prints names, epochs, times and counters; stekd never sends key
 * names or key material there.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <json-c/json.h>

#include "stekctl_cmd.h"

#define MAX_URLS 16
#define MAX_BODY_BYTES (64u << 20)
#define IDENTITY_COLUMN_MAX 48

/* ---- fetching ------------------------------------------------------------ */

typedef struct body {
    char *p;
    size_t len;
    bool too_big;
} body;

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
    body *b = arg;
    size_t n = size * nmemb;
    if (n > MAX_BODY_BYTES - b->len) {
        b->too_big = true;
        return 0; /* makes curl fail the transfer */
    }
    char *p = realloc(b->p, b->len + n + 1);
    if (p == NULL)
        return 0;
    memcpy(p + b->len, ptr, n);
    b->len += n;
    p[b->len] = '\0';
    b->p = p;
    return n;
}

/* GET url; *out is the body (free()) on 200. Reports failures. */
static stek_status http_get(stekctl *c, const char *url, long timeout_ms, const char *group,
                            char **out)
{
    stek_status st = STEK_OK;
    body b = {0};
    CURL *h = curl_easy_init();
    if (h == NULL)
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "curl_easy_init"), "no libcurl");
    char err[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    /* stekd's metrics address is local or on a management network: an
     * http_proxy in the environment must not get in the way. */
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    CURLcode rc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (rc != CURLE_OK) {
        st = stek_error_set(STEK_ERR_IO, "%s",
                            b.too_big ? "answer over 64 MiB"
                            : err[0]  ? err
                                      : curl_easy_strerror(rc));
        st = stekctl_fail(c, st, "cannot read %s (is stekd running with metrics.listen?)", url);
    } else if (code == 404 && b.p != NULL && strstr(b.p, "no such group") != NULL) {
        st = stekctl_fail(c, stek_error_set(STEK_ERR_NOT_FOUND, "HTTP 404 from %s", url),
                          "that stekd has no group \"%s\" (another config?)", group);
    } else if (code == 404) {
        st = stekctl_fail(c, stek_error_set(STEK_ERR_NOT_FOUND, "HTTP 404 from %s", url),
                          "no fleet table there (a stekd without fleet reports, or not stekd)");
    } else if (code != 200 || b.p == NULL) {
        st = stekctl_fail(c, stek_error_set(STEK_ERR_IO, "HTTP %ld from %s", code, url),
                          "stekd did not answer with the fleet");
    } else {
        *out = b.p;
        b.p = NULL;
    }
    free(b.p);
    curl_easy_cleanup(h);
    return st;
}

/*
 * The /fleet URL of a metrics address: "host:port" or "[v6]:port" from
 * metrics.listen (an empty or wildcard host is this machine), or a base
 * URL given with --url ("http://stekd-1.example:9464").
 */
static stek_status fleet_url(stekctl *c, const char *base, bool from_config, const char *group,
                             char *out, size_t out_len)
{
    char host[300];
    const char *port = NULL;
    if (from_config) {
        const char *colon = strrchr(base, ':');
        size_t n = colon != NULL ? (size_t)(colon - base) : 0;
        if (colon == NULL || colon[1] == '\0' || n >= sizeof(host))
            return stekctl_usage(c, "metrics.listen \"%.64s\" is not host:port", base);
        memcpy(host, base, n);
        host[n] = '\0';
        port = colon + 1;
        if (strcmp(port, "0") == 0)
            return stekctl_usage(c, "metrics.listen has port 0 (stekd picked one and logged "
                                    "it): give --url http://HOST:PORT");
        if (host[0] == '\0' || strcmp(host, "0.0.0.0") == 0)
            snprintf(host, sizeof(host), "127.0.0.1");
        else if (strcmp(host, "::") == 0 || strcmp(host, "[::]") == 0)
            snprintf(host, sizeof(host), "[::1]");
    }
    char *esc = curl_easy_escape(NULL, group, 0);
    if (esc == NULL)
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "curl_easy_escape"), "no memory");
    int w;
    if (from_config) {
        w = snprintf(out, out_len, "http://%s:%s/fleet?group=%s", host, port, esc);
    } else {
        size_t n = strlen(base);
        while (n > 0 && base[n - 1] == '/')
            n--;
        w = snprintf(out, out_len, "%.*s/fleet?group=%s", (int)n, base, esc);
    }
    curl_free(esc);
    if (w < 0 || (size_t)w >= out_len)
        return stekctl_usage(c, "URL too long");
    return STEK_OK;
}

/* ---- merging ------------------------------------------------------------- */

static int64_t get_int(json_object *o, const char *key, int64_t dflt)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v) || v == NULL)
        return dflt;
    return json_object_get_int64(v);
}

static const char *get_str(json_object *o, const char *key)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

static bool get_bool(json_object *o, const char *key)
{
    json_object *v = NULL;
    return json_object_object_get_ex(o, key, &v) && json_object_get_boolean(v);
}

/*
 * Adds one replica's document to the merge: the group's newest epoch, and
 * per host (keyed by identity in `by_id`) the report with the latest
 * last_report. Takes doc.
 */
static stek_status merge(stekctl *c, const char *url, json_object *doc, json_object **base,
                         json_object *by_id)
{
    json_object *hosts = NULL;
    if (!json_object_is_type(doc, json_type_object) ||
        !json_object_object_get_ex(doc, "hosts", &hosts) ||
        !json_object_is_type(hosts, json_type_array)) {
        json_object_put(doc);
        return stekctl_fail(c, stek_error_set(STEK_ERR_IO, "no hosts array"),
                            "%s is not a stekd fleet document", url);
    }
    for (size_t i = 0; i < json_object_array_length(hosts); i++) {
        json_object *h = json_object_array_get_idx(hosts, i), *old = NULL;
        const char *id = get_str(h, "identity");
        if (id == NULL)
            continue;
        if (json_object_object_get_ex(by_id, id, &old) &&
            get_int(old, "last_report", 0) >= get_int(h, "last_report", 0))
            continue;
        json_object_object_add(by_id, id, json_object_get(h));
    }
    json_object_object_del(doc, "hosts");
    /* The group as the most advanced replica sees it. */
    if (*base == NULL || get_int(doc, "epoch", 0) > get_int(*base, "epoch", 0)) {
        json_object_put(*base);
        *base = doc;
    } else {
        json_object_put(doc);
    }
    return STEK_OK;
}

static int by_identity(const void *a, const void *b)
{
    json_object *x = *(json_object *const *)a, *y = *(json_object *const *)b;
    return strcmp(get_str(x, "identity"), get_str(y, "identity"));
}

/* ---- printing ------------------------------------------------------------ */

static void ago(int64_t now, int64_t t, char *out, size_t len)
{
    int64_t d = now - t;
    if (d < 0)
        d = 0;
    if (d < 120)
        snprintf(out, len, "%" PRId64 "s ago", d);
    else if (d < 7200)
        snprintf(out, len, "%" PRId64 "m ago", d / 60);
    else
        snprintf(out, len, "%" PRId64 "h ago", d / 3600);
}

static void print_table(json_object *doc, json_object *hosts)
{
    const int64_t now = get_int(doc, "now", 0);
    char started[32];
    stekctl_rfc3339(get_int(doc, "epoch_started", -1), started);
    json_object *gen = NULL;
    printf("group %s: ", get_str(doc, "group"));
    if (json_object_object_get_ex(doc, "generation", &gen) && gen != NULL)
        printf("generation %" PRId64 ", ", json_object_get_int64(gen));
    else
        printf("generation unknown (HSM unavailable), ");
    printf("epoch %" PRId64 " since %s (%" PRId64 " s epochs)\n", get_int(doc, "epoch", 0), started,
           get_int(doc, "epoch_seconds", 0));
    printf("%" PRId64 " host(s): %" PRId64 " converged, %" PRId64 " lagging\n",
           get_int(doc, "hosts_total", 0), get_int(doc, "converged", 0),
           get_int(doc, "lagging", 0));
    size_t n = json_object_array_length(hosts);
    if (n == 0)
        return;
    int idw = 4;
    for (size_t i = 0; i < n; i++) {
        int l = (int)strlen(get_str(json_object_array_get_idx(hosts, i), "identity"));
        idw = l > idw ? l : idw;
    }
    idw = idw < IDENTITY_COLUMN_MAX ? idw : IDENTITY_COLUMN_MAX;
    printf("\n%-*s %4s %11s %6s %-24s %-20s %-11s %4s %s\n", idw, "HOST", "GEN", "EPOCH", "OFFSET",
           "STATE", "LAGGING SINCE", "LAST REPORT", "KEYS", "RESUMPTION HITS");
    for (size_t i = 0; i < n; i++) {
        json_object *h = json_object_array_get_idx(hosts, i), *v = NULL;
        char offset[24] = "gen", since[32] = "-", last[24], ratio[48] = "-";
        if (json_object_object_get_ex(h, "epoch_offset", &v) && v != NULL)
            snprintf(offset, sizeof(offset), "%+" PRId64, json_object_get_int64(v));
        if (strcmp(offset, "+0") == 0)
            snprintf(offset, sizeof(offset), "0");
        bool lagging = strcmp(get_str(h, "state") ? get_str(h, "state") : "", "lagging") == 0;
        if (lagging)
            stekctl_rfc3339(get_int(h, "lagging_since", 0), since);
        ago(now, get_int(h, "last_report", 0), last, sizeof(last));
        json_object *k = NULL;
        if (json_object_object_get_ex(h, "resumption_hit_ratio", &v) && v != NULL &&
            json_object_object_get_ex(h, "counters", &k)) {
            int64_t hits = get_int(k, "tickets_resumed", 0) + get_int(k, "tickets_renewed", 0);
            int64_t tries = hits + get_int(k, "miss_unknown", 0) + get_int(k, "miss_expired", 0) +
                            get_int(k, "miss_other_generation", 0) +
                            get_int(k, "miss_other_group", 0) + get_int(k, "miss_bad_mac", 0);
            snprintf(ratio, sizeof(ratio), "%.1f%% (%" PRId64 "/%" PRId64 ")",
                     100.0 * json_object_get_double(v), hits, tries);
        }
        const bool silent = get_bool(h, "silent"), behind = get_bool(h, "behind");
        const char *state = !lagging           ? "converged"
                            : silent && behind ? "lagging (behind, silent)"
                            : silent           ? "lagging (silent)"
                                               : "lagging (behind)";
        printf("%-*.*s %4" PRId64 " %11" PRId64 " %6s %-24s %-20s %-11s %4" PRId64 " %s\n", idw,
               idw, get_str(h, "identity"), get_int(h, "generation", 0), get_int(h, "epoch", 0),
               offset, state, since, last, get_int(h, "keys_held", 0), ratio);
    }
}

/* ---- the command --------------------------------------------------------- */

stek_status stekctl_cmd_fleet(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"url", required_argument, NULL, 'u'},
        {"timeout", required_argument, NULL, 't'},
        {NULL, 0, NULL, 0},
    };
    bool as_json = false;
    const char *urls[MAX_URLS];
    size_t n_urls = 0;
    long timeout_ms = 5000;
    optind = 0;
    opterr = 0;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'j':
            as_json = true;
            break;
        case 'u':
            if (n_urls == MAX_URLS)
                return stekctl_usage(c, "at most %d --url", MAX_URLS);
            urls[n_urls++] = optarg;
            break;
        case 't':
            timeout_ms = atol(optarg);
            break;
        default:
            return stekctl_usage(c, "unknown option or missing value: %s", argv[optind - 1]);
        }
    }
    if (argc - optind != 1)
        return stekctl_usage(c, "expected one GROUP");
    if (timeout_ms <= 0)
        return stekctl_usage(c, "--timeout wants milliseconds > 0");
    const char *group = argv[optind];
    const stekd_group_cfg *g = NULL;
    STEK_GUARD(stekctl_group(c, group, &g));
    if (n_urls == 0 && c->cfg->metrics_listen == NULL)
        return stekctl_usage(c, "the config has no metrics.listen: stekd serves the fleet "
                                "there (or give --url)");

    stek_status st = STEK_OK;
    json_object *base = NULL, *by_id = json_object_new_object(), *hosts = NULL;
    json_object **rows = NULL;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || by_id == NULL) {
        json_object_put(by_id);
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "curl_global_init"), "no libcurl");
    }
    for (size_t i = 0; i < (n_urls ? n_urls : 1); i++) {
        char url[1024];
        char *text = NULL;
        const char *src = n_urls ? urls[i] : c->cfg->metrics_listen;
        STEK_GUARD_GOTO(fleet_url(c, src, n_urls == 0, group, url, sizeof(url)));
        STEK_GUARD_GOTO(http_get(c, url, timeout_ms, group, &text));
        enum json_tokener_error jerr = json_tokener_success;
        json_object *doc = json_tokener_parse_verbose(text, &jerr);
        free(text);
        if (doc == NULL) {
            st = stek_error_set(STEK_ERR_IO, "%s", json_tokener_error_desc(jerr));
            st = stekctl_fail(c, st, "%s is not JSON", url);
            goto done;
        }
        STEK_GUARD_GOTO(merge(c, url, doc, &base, by_id));
    }

    /* The merged hosts, by identity, with the counts recomputed. */
    size_t n = (size_t)json_object_object_length(by_id), k = 0, lagging = 0;
    rows = calloc(n ? n : 1, sizeof(*rows));
    hosts = json_object_new_array();
    if (rows == NULL || hosts == NULL) {
        st = stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "merging"), "no memory");
        goto done;
    }
    json_object_object_foreach(by_id, id, h)
    {
        (void)id;
        rows[k++] = h;
    }
    qsort(rows, k, sizeof(*rows), by_identity);
    for (size_t i = 0; i < k; i++) {
        const char *state = get_str(rows[i], "state");
        lagging += state != NULL && strcmp(state, "lagging") == 0;
        json_object_array_add(hosts, json_object_get(rows[i]));
    }
    json_object_object_add(base, "hosts_total", json_object_new_int64((int64_t)k));
    json_object_object_add(base, "converged", json_object_new_int64((int64_t)(k - lagging)));
    json_object_object_add(base, "lagging", json_object_new_int64((int64_t)lagging));
    if (as_json) {
        json_object_object_add(base, "hosts", json_object_get(hosts));
        puts(json_object_to_json_string_ext(base, JSON_C_TO_STRING_PRETTY |
                                                      JSON_C_TO_STRING_NOSLASHESCAPE));
    } else {
        print_table(base, hosts);
    }
done:
    free(rows);
    json_object_put(hosts);
    json_object_put(base);
    json_object_put(by_id);
    curl_global_cleanup();
    return st;
}
