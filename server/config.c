/*
 * stekd's configuration file, read with libconfig and checked strictly:
 * unknown settings, wrong types and out-of-range values are errors with the
 * file and line, so a typo stops the service at start-up instead of quietly
 * taking a default. A PIN in the file is refused wherever it appears.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <libconfig.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include "policy.h"

#define DAY_S UINT64_C(86400)
#define MAX_WINDOW_S (30 * DAY_S) /* epoch and decrypt lifetime */
/* PKCS#11 token labels are 32 bytes, blank padded. */
#define TOKEN_LABEL_MAX 32

/* Where the file is, for details and for resolving relative paths. */
typedef struct loader {
    const char *path; /* as given: the name the operator recognises */
    char *dir;        /* the file's directory, absolute */
} loader;

typedef struct unit {
    const char *suffix;
    uint64_t mult;
} unit;

static const unit sec_units[] = {{"", 1},     {"s", 1},     {"m", 60},
                                 {"h", 3600}, {"d", 86400}, {NULL, 0}};
/* The jitter is kept in milliseconds, so it alone takes "ms". */
static const unit ms_units[] = {{"", 1000},     {"ms", 1},       {"s", 1000}, {"m", 60000},
                                {"h", 3600000}, {"d", 86400000}, {NULL, 0}};

/* Why text is not a duration in units, or NULL with *out set. Leaves the error slot alone. */
static const char *parse_scaled(const char *text, const unit *units, uint64_t *out)
{
    /* strtoull would skip spaces and accept a sign ("-5" wraps to a huge value). */
    if (text != NULL && text[0] == '-')
        return "it is negative";
    if (text == NULL || !isdigit((unsigned char)text[0]))
        return "it must start with a digit";
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno == ERANGE)
        return "it is too large";
    for (const unit *u = units; u->suffix != NULL; u++) {
        if (strcmp(end, u->suffix) != 0)
            continue;
        /* Times are int64 everywhere downstream. */
        if (v > (uint64_t)INT64_MAX / u->mult)
            return "it is too large";
        *out = v * u->mult;
        return NULL;
    }
    return units == ms_units ? "unknown unit (use ms, s, m, h or d)"
                             : "unknown unit (use s, m, h or d)";
}

stek_status stekd_parse_duration(const char *text, uint64_t *seconds)
{
    STEK_ENSURE_REF(seconds);
    const char *why = parse_scaled(text, sec_units, seconds);
    if (why != NULL)
        STEK_BAIL(STEK_ERR_CONFIG, "bad duration \"%.32s\": %s", text != NULL ? text : "", why);
    return STEK_OK;
}

/* The nearest line: array elements and the root carry none of their own. */
static unsigned line_of(const config_setting_t *s)
{
    while (s != NULL && config_setting_source_line(s) == 0)
        s = config_setting_parent(s);
    return s != NULL ? config_setting_source_line(s) : 0;
}

/* Fails with "FILE:LINE: message" at setting s ("FILE: message" when s has no line). */
__attribute__((format(printf, 3, 4))) static stek_status
fail_at(const loader *ld, const config_setting_t *s, const char *fmt, ...)
{
    char msg[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    const char *file = s != NULL ? config_setting_source_file(s) : NULL;
    if (file == NULL)
        file = ld->path;
    unsigned line = line_of(s);
    if (line == 0)
        return stek_error_set(STEK_ERR_CONFIG, "%s: %s", file, msg);
    return stek_error_set(STEK_ERR_CONFIG, "%s:%u: %s", file, line, msg);
}

/* Refuses a PIN anywhere in the tree, before anything else can mention the setting. */
static stek_status refuse_pins(const loader *ld, const config_setting_t *s)
{
    const char *name = config_setting_name(s);
    if (name != NULL && (strcasecmp(name, "pin") == 0 || strcasecmp(name, "so_pin") == 0))
        return fail_at(ld, s,
                       "%s: PINs are never read from the config file; use the environment "
                       "variable or --pin-file",
                       name);
    if (config_setting_is_group(s) || config_setting_is_list(s))
        for (int i = 0; i < config_setting_length(s); i++)
            STEK_GUARD(refuse_pins(ld, config_setting_get_elem(s, (unsigned)i)));
    return STEK_OK;
}

/* Every member of group g must be one of the NULL-terminated allowed names. */
static stek_status check_names(const loader *ld, const config_setting_t *g, const char *where,
                               const char *const *allowed)
{
    for (int i = 0; i < config_setting_length(g); i++) {
        const config_setting_t *m = config_setting_get_elem(g, (unsigned)i);
        const char *name = config_setting_name(m);
        bool known = false;
        for (const char *const *a = allowed; *a != NULL && !known; a++)
            known = strcmp(*a, name) == 0;
        if (!known)
            return fail_at(ld, m, "unknown setting \"%s%s\"", where, name);
    }
    return STEK_OK;
}

/* The sub-group `name` of parent, or NULL when it is absent and optional. */
static stek_status get_section(const loader *ld, const config_setting_t *parent, const char *name,
                               bool required, const config_setting_t **out)
{
    *out = config_setting_get_member(parent, name);
    if (*out == NULL) {
        if (required)
            return fail_at(ld, parent, "missing required setting \"%s\"", name);
        return STEK_OK;
    }
    if (!config_setting_is_group(*out))
        return fail_at(ld, *out, "\"%s\" must be a group { ... }", name);
    return STEK_OK;
}

/* A non-empty string member; *out keeps its value (a default or NULL) when absent and optional. */
static stek_status get_string(const loader *ld, const config_setting_t *parent, const char *where,
                              const char *name, bool required, char **out)
{
    const config_setting_t *s = config_setting_get_member(parent, name);
    if (s == NULL) {
        if (required)
            return fail_at(ld, parent, "missing required setting \"%s%s\"", where, name);
        return STEK_OK;
    }
    if (config_setting_type(s) != CONFIG_TYPE_STRING)
        return fail_at(ld, s, "\"%s%s\" must be a string", where, name);
    const char *v = config_setting_get_string(s);
    if (v[0] == '\0')
        return fail_at(ld, s, "\"%s%s\" must not be empty", where, name);
    char *copy = strdup(v);
    STEK_ENSURE(copy != NULL, STEK_ERR_NOMEM);
    free(*out);
    *out = copy;
    return STEK_OK;
}

/*
 * A path member, resolved against the config file's directory when
 * relative. Bare module names ("libsofthsm2.so") are left to dlopen's
 * search, and pkcs11: URIs are not paths.
 */
static stek_status get_path(const loader *ld, const config_setting_t *parent, const char *where,
                            const char *name, bool bare_ok, char **out)
{
    STEK_GUARD(get_string(ld, parent, where, name, true, out));
    char *p = *out;
    if (p[0] == '/' || strncmp(p, "pkcs11:", 7) == 0 || (bare_ok && strchr(p, '/') == NULL))
        return STEK_OK;
    char *abs = NULL;
    STEK_ENSURE(asprintf(&abs, "%s/%s", ld->dir, p) >= 0, STEK_ERR_NOMEM);
    free(p);
    *out = abs;
    return STEK_OK;
}

/* An environment variable name, as a shell would accept it. */
static stek_status get_env_name(const loader *ld, const config_setting_t *parent, const char *name,
                                char **out)
{
    STEK_GUARD(get_string(ld, parent, "hsm.", name, false, out));
    const char *v = *out;
    bool ok = isalpha((unsigned char)v[0]) || v[0] == '_';
    for (const char *c = v; *c != '\0' && ok; c++)
        ok = isalnum((unsigned char)*c) || *c == '_';
    if (!ok)
        return fail_at(ld, config_setting_get_member(parent, name),
                       "\"hsm.%s\" must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                       name);
    return STEK_OK;
}

/*
 * A duration member in [min, max] (in the units' base), or *out unchanged
 * when absent. Integers are seconds. libconfig 1.5 truncates integer
 * literals above 2^31-1 to 32 bits without an error, so strings are the
 * safe form; the documented ranges are far below that.
 */
static stek_status get_duration(const loader *ld, const config_setting_t *parent, const char *where,
                                const char *name, const unit *units, uint64_t min, uint64_t max,
                                const char *range, uint64_t *out)
{
    const config_setting_t *s = config_setting_get_member(parent, name);
    if (s == NULL)
        return STEK_OK;
    uint64_t v = 0;
    int type = config_setting_type(s);
    if (type == CONFIG_TYPE_STRING) {
        const char *text = config_setting_get_string(s);
        const char *why = parse_scaled(text, units, &v);
        if (why != NULL)
            return fail_at(ld, s, "\"%s%s\": bad duration \"%.32s\": %s", where, name, text, why);
    } else if (type == CONFIG_TYPE_INT || type == CONFIG_TYPE_INT64) {
        long long n = config_setting_get_int64(s);
        if (n < 0)
            return fail_at(ld, s, "\"%s%s\": bad duration %lld: it is negative", where, name, n);
        /* The base of the table is the multiplier of a bare number. */
        if ((uint64_t)n > (uint64_t)INT64_MAX / units[0].mult)
            return fail_at(ld, s, "\"%s%s\": bad duration %lld: it is too large", where, name, n);
        v = (uint64_t)n * units[0].mult;
    } else {
        return fail_at(ld, s, "\"%s%s\" must be a duration such as \"90s\"", where, name);
    }
    if (v < min || v > max)
        return fail_at(ld, s, "\"%s%s\" is out of range (%s)", where, name, range);
    *out = v;
    return STEK_OK;
}

/* An integer member in [min, max], or *out unchanged when absent. */
static stek_status get_count(const loader *ld, const config_setting_t *parent, const char *where,
                             const char *name, long long min, long long max, uint64_t *out)
{
    const config_setting_t *s = config_setting_get_member(parent, name);
    if (s == NULL)
        return STEK_OK;
    int type = config_setting_type(s);
    if (type != CONFIG_TYPE_INT && type != CONFIG_TYPE_INT64)
        return fail_at(ld, s, "\"%s%s\" must be an integer", where, name);
    long long v = config_setting_get_int64(s);
    if (v < min || v > max)
        return fail_at(ld, s, "\"%s%s\" is out of range (%lld to %lld)", where, name, min, max);
    *out = (uint64_t)v;
    return STEK_OK;
}

/* The origin: Unix seconds, or "YYYY-MM-DDTHH:MM:SSZ". */
static stek_status get_origin(const loader *ld, const config_setting_t *g, const char *where,
                              int64_t *out)
{
    const config_setting_t *s = config_setting_get_member(g, "origin");
    if (s == NULL)
        return STEK_OK;
    int type = config_setting_type(s);
    if (type == CONFIG_TYPE_INT || type == CONFIG_TYPE_INT64) {
        long long v = config_setting_get_int64(s);
        if (v < 0)
            return fail_at(ld, s, "\"%sorigin\" must not be before 1970", where);
        *out = v;
        return STEK_OK;
    }
    if (type != CONFIG_TYPE_STRING)
        return fail_at(ld, s, "\"%sorigin\" must be Unix seconds or a UTC time string", where);

    const char *text = config_setting_get_string(s);
    struct tm tm = {0};
    const char *end = strlen(text) == 20 ? strptime(text, "%Y-%m-%dT%H:%M:%SZ", &tm) : NULL;
    time_t t = (end != NULL && *end == '\0') ? timegm(&tm) : (time_t)-1;
    /*
     * strptime takes spaces and out-of-range days ("02-31") that timegm then
     * normalises; printing the result back catches both.
     */
    char back[32] = "";
    struct tm check;
    if (t >= 0 && gmtime_r(&t, &check) != NULL)
        strftime(back, sizeof(back), "%Y-%m-%dT%H:%M:%SZ", &check);
    if (strcmp(back, text) != 0)
        return fail_at(ld, s, "\"%sorigin\": bad time \"%.32s\" (want 2026-01-01T00:00:00Z)", where,
                       text);
    *out = (int64_t)t;
    return STEK_OK;
}

static const char *const group_names[] = {"name",   "epoch", "decrypt_lifetime",
                                          "origin", "allow", NULL};

static stek_status load_allow(const loader *ld, const config_setting_t *g, const char *where,
                              stekd_group_cfg *out)
{
    const config_setting_t *a = config_setting_get_member(g, "allow");
    if (a == NULL)
        return fail_at(ld, g, "missing required setting \"%sallow\"", where);
    if (!config_setting_is_array(a) && !config_setting_is_list(a))
        return fail_at(ld, a, "\"%sallow\" must be a list of patterns [ \"uri:...\", ... ]", where);
    int n = config_setting_length(a);
    if (n == 0)
        return fail_at(ld, a, "\"%sallow\" is empty: nobody could fetch the group", where);
    out->allow = calloc((size_t)n, sizeof(*out->allow));
    STEK_ENSURE(out->allow != NULL, STEK_ERR_NOMEM);
    for (int i = 0; i < n; i++) {
        const config_setting_t *p = config_setting_get_elem(a, (unsigned)i);
        if (config_setting_type(p) != CONFIG_TYPE_STRING)
            return fail_at(ld, p, "\"%sallow[%d]\" must be a string", where, i);
        const char *pat = config_setting_get_string(p);
        if (stekd_policy_check_pattern(pat) != STEK_OK) {
            char why[128];
            snprintf(why, sizeof(why), "%s", stek_error_detail());
            return fail_at(ld, p, "\"%sallow[%d]\": bad pattern \"%.40s\": %s", where, i, pat, why);
        }
        out->allow[i] = strdup(pat);
        STEK_ENSURE(out->allow[i] != NULL, STEK_ERR_NOMEM);
        out->n_allow = (size_t)i + 1;
    }
    return STEK_OK;
}

/* Group i of the list; the groups before it are loaded, for the duplicate check. */
static stek_status load_group(const loader *ld, const config_setting_t *g, size_t i,
                              const stekd_config *cfg, stekd_group_cfg *out)
{
    char where[32];
    snprintf(where, sizeof(where), "groups[%zu].", i);
    if (!config_setting_is_group(g))
        return fail_at(ld, g, "\"groups[%zu]\" must be a group { name = ...; ... }", i);
    STEK_GUARD(check_names(ld, g, where, group_names));

    const config_setting_t *name = config_setting_get_member(g, "name");
    if (name == NULL)
        return fail_at(ld, g, "missing required setting \"%sname\"", where);
    if (config_setting_type(name) != CONFIG_TYPE_STRING)
        return fail_at(ld, name, "\"%sname\" must be a string", where);
    const char *v = config_setting_get_string(name);
    if (stek_group_name_check(v) != STEK_OK)
        return fail_at(ld, name, "\"%sname\": bad group name \"%.64s\" (1 to %d of [a-z0-9._-])",
                       where, v, STEK_GROUP_MAX_BYTES);
    for (size_t j = 0; j < i; j++)
        if (strcmp(cfg->groups[j].name, v) == 0)
            return fail_at(ld, name, "\"%sname\": duplicate group \"%s\"", where, v);
    snprintf(out->name, sizeof(out->name), "%s", v);

    if (config_setting_get_member(g, "epoch") == NULL)
        return fail_at(ld, g, "missing required setting \"%sepoch\"", where);
    STEK_GUARD(get_duration(ld, g, where, "epoch", sec_units, 1, MAX_WINDOW_S, "1s to 30d",
                            &out->sched.epoch_s));
    out->sched.lifetime_s = 18 * 3600;
    STEK_GUARD(get_duration(ld, g, where, "decrypt_lifetime", sec_units, 0, MAX_WINDOW_S,
                            "0s to 30d", &out->sched.lifetime_s));
    out->sched.origin = 0;
    STEK_GUARD(get_origin(ld, g, where, &out->sched.origin));
    STEK_GUARD(load_allow(ld, g, where, out));

    if (stek_sched_check(&out->sched) != STEK_OK) {
        char why[128];
        snprintf(why, sizeof(why), "%s", stek_error_detail());
        return fail_at(ld, g, "group \"%s\": bad schedule: %s", out->name, why);
    }
    /* Every set carries next, current and ceil(L/P) older keys: bound it so
     * a set stays far below gRPC's and the hosts' message limits. */
    uint64_t keys = stek_sched_past_epochs(&out->sched) + 2;
    if (keys > STEKD_MAX_KEYS_PER_SET)
        return fail_at(ld, g,
                       "group \"%s\": decrypt_lifetime / epoch gives %llu keys per set; "
                       "at most %d (lengthen the epoch or shorten the lifetime)",
                       out->name, (unsigned long long)keys, STEKD_MAX_KEYS_PER_SET);
    return STEK_OK;
}

static stek_status load_groups(const loader *ld, const config_setting_t *root, stekd_config *cfg)
{
    const config_setting_t *gs = config_setting_get_member(root, "groups");
    if (gs == NULL)
        return fail_at(ld, root, "missing required setting \"groups\"");
    if (!config_setting_is_list(gs))
        return fail_at(ld, gs, "\"groups\" must be a list ( { ... }, ... )");
    int n = config_setting_length(gs);
    if (n == 0)
        return fail_at(ld, gs, "\"groups\" is empty: at least one group is required");
    cfg->groups = calloc((size_t)n, sizeof(*cfg->groups));
    STEK_ENSURE(cfg->groups != NULL, STEK_ERR_NOMEM);
    for (int i = 0; i < n; i++) {
        /* Counted first, so a half-loaded group is freed too. */
        cfg->n_groups = (size_t)i + 1;
        STEK_GUARD(load_group(ld, config_setting_get_elem(gs, (unsigned)i), (size_t)i, cfg,
                              &cfg->groups[i]));
    }
    return STEK_OK;
}

static const char *const top_names[] = {"listen", "tls",     "hsm",       "schedule", "limits",
                                        "groups", "metrics", "audit_log", "fleet",    NULL};
static const char *const tls_names[] = {"cert", "key", "client_ca", NULL};
static const char *const hsm_names[] = {"module", "token", "pin_env", "so_pin_env", NULL};
static const char *const schedule_names[] = {"max_jump", "heartbeat", "jitter", NULL};
static const char *const limits_names[] = {"max_request_bytes", "wrap_cache_entries",
                                           "max_watchers", NULL};
static const char *const metrics_names[] = {"listen", NULL};
static const char *const fleet_names[] = {"max_hosts", "expire", NULL};

static stek_status load_hsm(const loader *ld, const config_setting_t *root, stekd_config *cfg)
{
    const config_setting_t *hsm;
    STEK_GUARD(get_section(ld, root, "hsm", true, &hsm));
    STEK_GUARD(check_names(ld, hsm, "hsm.", hsm_names));
    STEK_GUARD(get_path(ld, hsm, "hsm.", "module", true, &cfg->hsm_module));
    STEK_GUARD(get_string(ld, hsm, "hsm.", "token", true, &cfg->hsm_token));
    if (strlen(cfg->hsm_token) > TOKEN_LABEL_MAX)
        return fail_at(ld, config_setting_get_member(hsm, "token"),
                       "\"hsm.token\" is longer than a token label (%d bytes)", TOKEN_LABEL_MAX);
    STEK_GUARD(get_env_name(ld, hsm, "pin_env", &cfg->pin_env));
    STEK_GUARD(get_env_name(ld, hsm, "so_pin_env", &cfg->so_pin_env));
    return STEK_OK;
}

static stek_status load_tuning(const loader *ld, const config_setting_t *root, stekd_config *cfg)
{
    const config_setting_t *sch, *lim;
    STEK_GUARD(get_section(ld, root, "schedule", false, &sch));
    if (sch != NULL) {
        STEK_GUARD(check_names(ld, sch, "schedule.", schedule_names));
        uint64_t jump = cfg->max_jump;
        STEK_GUARD(get_count(ld, sch, "schedule.", "max_jump", 1, 1000000, &jump));
        cfg->max_jump = (unsigned)jump;
        STEK_GUARD(get_duration(ld, sch, "schedule.", "heartbeat", sec_units, 1, DAY_S, "1s to 1d",
                                &cfg->heartbeat_s));
        STEK_GUARD(get_duration(ld, sch, "schedule.", "jitter", ms_units, 0, 3600 * 1000,
                                "0s to 1h", &cfg->jitter_ms));
    }
    STEK_GUARD(get_section(ld, root, "limits", false, &lim));
    if (lim != NULL) {
        STEK_GUARD(check_names(ld, lim, "limits.", limits_names));
        uint64_t v = cfg->max_request_bytes;
        /* A request signed with an RSA-4096 host key is about 700 bytes. */
        STEK_GUARD(get_count(ld, lim, "limits.", "max_request_bytes", 1024, 1 << 20, &v));
        cfg->max_request_bytes = (size_t)v;
        v = cfg->wrap_cache_entries;
        STEK_GUARD(get_count(ld, lim, "limits.", "wrap_cache_entries", 1, 10000000, &v));
        cfg->wrap_cache_entries = (size_t)v;
        v = cfg->max_watchers;
        STEK_GUARD(get_count(ld, lim, "limits.", "max_watchers", 1, 1000000, &v));
        cfg->max_watchers = (size_t)v;
    }
    return STEK_OK;
}

/* Operations: the optional /metrics address and audit log path. */
static stek_status load_ops(const loader *ld, const config_setting_t *root, stekd_config *cfg)
{
    const config_setting_t *met;
    STEK_GUARD(get_section(ld, root, "metrics", false, &met));
    if (met != NULL) {
        STEK_GUARD(check_names(ld, met, "metrics.", metrics_names));
        STEK_GUARD(get_string(ld, met, "metrics.", "listen", true, &cfg->metrics_listen));
    }
    if (config_setting_get_member(root, "audit_log") != NULL)
        STEK_GUARD(get_path(ld, root, "", "audit_log", false, &cfg->audit_log));
    /* The hosts' reports (fleet.h): how many, and how long they are kept. */
    const config_setting_t *fleet;
    STEK_GUARD(get_section(ld, root, "fleet", false, &fleet));
    if (fleet != NULL) {
        STEK_GUARD(check_names(ld, fleet, "fleet.", fleet_names));
        uint64_t v = cfg->fleet_max_hosts;
        STEK_GUARD(get_count(ld, fleet, "fleet.", "max_hosts", 1, 1000000, &v));
        cfg->fleet_max_hosts = (size_t)v;
        STEK_GUARD(get_duration(ld, fleet, "fleet.", "expire", sec_units, 60, MAX_WINDOW_S,
                                "1m to 30d", &cfg->fleet_expire_s));
    }
    return STEK_OK;
}

static stek_status load_root(const loader *ld, const config_setting_t *root, stekd_config *cfg)
{
    STEK_GUARD(refuse_pins(ld, root));
    STEK_GUARD(check_names(ld, root, "", top_names));
    STEK_GUARD(get_string(ld, root, "", "listen", true, &cfg->listen));

    const config_setting_t *tls;
    STEK_GUARD(get_section(ld, root, "tls", true, &tls));
    STEK_GUARD(check_names(ld, tls, "tls.", tls_names));
    STEK_GUARD(get_path(ld, tls, "tls.", "cert", false, &cfg->tls_cert));
    STEK_GUARD(get_path(ld, tls, "tls.", "key", false, &cfg->tls_key));
    STEK_GUARD(get_path(ld, tls, "tls.", "client_ca", false, &cfg->tls_client_ca));

    STEK_GUARD(load_hsm(ld, root, cfg));
    STEK_GUARD(load_tuning(ld, root, cfg));
    STEK_GUARD(load_ops(ld, root, cfg));
    return load_groups(ld, root, cfg);
}

/* The defaults of config.h, before the file overrides them. */
static stek_status set_defaults(stekd_config *cfg, const char *path)
{
    cfg->path = strdup(path);
    cfg->pin_env = strdup("STEK_PIN");
    cfg->so_pin_env = strdup("STEK_SO_PIN");
    STEK_ENSURE(cfg->path != NULL && cfg->pin_env != NULL && cfg->so_pin_env != NULL,
                STEK_ERR_NOMEM);
    cfg->max_jump = 2;
    cfg->heartbeat_s = 30;
    cfg->jitter_ms = 2000;
    cfg->max_request_bytes = 4096;
    cfg->wrap_cache_entries = 10000;
    cfg->max_watchers = 10000;
    cfg->fleet_max_hosts = 10000;
    cfg->fleet_expire_s = 3600;
    return STEK_OK;
}

/* Checks that path is a readable regular file, and finds its absolute directory. */
static stek_status open_check(const char *path, char **dir)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "%s: %s", path, strerror(errno));
    struct stat st;
    bool regular = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode);
    fclose(f);
    if (!regular)
        STEK_BAIL(STEK_ERR_IO, "%s: not a regular file", path);

    /* The directory of the name given, not of a symlink's target. */
    const char *slash = strrchr(path, '/');
    char *parent = slash == NULL ? strdup(".") : strndup(path, (size_t)(slash - path));
    STEK_ENSURE(parent != NULL, STEK_ERR_NOMEM);
    *dir = realpath(parent[0] != '\0' ? parent : "/", NULL);
    int e = errno;
    free(parent);
    if (*dir == NULL)
        STEK_BAIL(STEK_ERR_IO, "%s: cannot resolve its directory: %s", path, strerror(e));
    return STEK_OK;
}

stek_status stekd_config_load(const char *path, stekd_config **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE_REF(path);

    stek_status st = STEK_OK;
    loader ld = {.path = path, .dir = NULL};
    config_t lc;
    config_init(&lc);
    stekd_config *cfg = calloc(1, sizeof(*cfg));
    STEK_ENSURE_GOTO(cfg != NULL, STEK_ERR_NOMEM);
    STEK_GUARD_GOTO(set_defaults(cfg, path));
    STEK_GUARD_GOTO(open_check(path, &ld.dir));

    /* @include names are relative to the file, like every other path in it. */
    config_set_include_dir(&lc, ld.dir);
    if (!config_read_file(&lc, path)) {
        if (config_error_type(&lc) == CONFIG_ERR_FILE_IO)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: %s", path, config_error_text(&lc));
        const char *file = config_error_file(&lc);
        STEK_BAIL_GOTO(STEK_ERR_CONFIG, "%s:%d: %s", file != NULL ? file : path,
                       config_error_line(&lc), config_error_text(&lc));
    }
    STEK_GUARD_GOTO(load_root(&ld, config_root_setting(&lc), cfg));
    *out = cfg;
    cfg = NULL;

done:
    config_destroy(&lc);
    free(ld.dir);
    stekd_config_free(cfg);
    return st;
}

void stekd_config_free(stekd_config *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < cfg->n_groups; i++) {
        for (size_t j = 0; j < cfg->groups[i].n_allow; j++)
            free(cfg->groups[i].allow[j]);
        free(cfg->groups[i].allow);
    }
    free(cfg->groups);
    free(cfg->path);
    free(cfg->listen);
    free(cfg->tls_cert);
    free(cfg->tls_key);
    free(cfg->tls_client_ca);
    free(cfg->hsm_module);
    free(cfg->hsm_token);
    free(cfg->pin_env);
    free(cfg->so_pin_env);
    free(cfg->metrics_listen);
    free(cfg->audit_log);
    free(cfg);
}

const stekd_group_cfg *stekd_config_group(const stekd_config *cfg, const char *name)
{
    if (cfg == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < cfg->n_groups; i++)
        if (strcmp(cfg->groups[i].name, name) == 0)
            return &cfg->groups[i];
    return NULL;
}
