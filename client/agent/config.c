/*
 * stek-agent's configuration file, read with libconfig (as stekd's) and
 * checked strictly: unknown settings, wrong types and bad values are errors
 * with the file and line, so a typo stops the agent at start-up instead of
 * quietly feeding a server the wrong keys.
 */
#include <ctype.h>
#include <errno.h>
#include <libconfig.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "agent.h"

#define DEFAULT_RETRY_MIN_MS 500
#define DEFAULT_RETRY_MAX_MS 30000
#define MAX_LIST 16

typedef struct loader {
    const char *path;
    char *dir; /* the file's directory, absolute: relative paths are resolved there */
} loader;

static unsigned line_of(const config_setting_t *s)
{
    while (s != NULL && config_setting_source_line(s) == 0)
        s = config_setting_parent(s);
    return s != NULL ? config_setting_source_line(s) : 0;
}

/* Fails with "FILE:LINE: message" at setting s. */
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

/* Resolves a relative path against the config file's directory. */
static stek_status absolute(const loader *ld, char **p)
{
    if (*p == NULL || (*p)[0] == '/' || strncmp(*p, "pkcs11:", 7) == 0)
        return STEK_OK;
    char *abs = NULL;
    STEK_ENSURE(asprintf(&abs, "%s/%s", ld->dir, *p) >= 0, STEK_ERR_NOMEM);
    free(*p);
    *p = abs;
    return STEK_OK;
}

static stek_status get_path(const loader *ld, const config_setting_t *parent, const char *where,
                            const char *name, bool required, char **out)
{
    STEK_GUARD(get_string(ld, parent, where, name, required, out));
    return absolute(ld, out);
}

/* A list or array of non-empty strings: 1..MAX_LIST elements. */
static stek_status get_strings(const loader *ld, const config_setting_t *parent, const char *where,
                               const char *name, bool required, bool paths, char ***out, size_t *n)
{
    const config_setting_t *s = config_setting_get_member(parent, name);
    if (s == NULL) {
        if (required)
            return fail_at(ld, parent, "missing required setting \"%s%s\"", where, name);
        return STEK_OK;
    }
    if (!config_setting_is_array(s) && !config_setting_is_list(s))
        return fail_at(ld, s, "\"%s%s\" must be a list of strings [\"...\", ...]", where, name);
    int len = config_setting_length(s);
    if (len < 1 || len > MAX_LIST)
        return fail_at(ld, s, "\"%s%s\" must have 1 to %d elements", where, name, MAX_LIST);
    char **v = calloc((size_t)len + 1, sizeof(*v));
    STEK_ENSURE(v != NULL, STEK_ERR_NOMEM);
    *out = v;
    for (int i = 0; i < len; i++) {
        const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
        if (config_setting_type(e) != CONFIG_TYPE_STRING || config_setting_get_string(e)[0] == '\0')
            return fail_at(ld, e, "\"%s%s\" must hold non-empty strings", where, name);
        v[i] = strdup(config_setting_get_string(e));
        STEK_ENSURE(v[i] != NULL, STEK_ERR_NOMEM);
        *n = (size_t)i + 1;
        if (paths)
            STEK_GUARD(absolute(ld, &v[i]));
    }
    return STEK_OK;
}

/* A duration in milliseconds: an integer (seconds) or "500ms", "2s", "1m". */
static stek_status get_ms(const loader *ld, const config_setting_t *parent, const char *where,
                          const char *name, uint64_t *out)
{
    const config_setting_t *s = config_setting_get_member(parent, name);
    if (s == NULL)
        return STEK_OK;
    if (config_setting_type(s) == CONFIG_TYPE_INT) {
        int v = config_setting_get_int(s);
        if (v < 0 || v > 3600)
            return fail_at(ld, s, "\"%s%s\" is out of range (0s to 1h)", where, name);
        *out = (uint64_t)v * 1000;
        return STEK_OK;
    }
    if (config_setting_type(s) != CONFIG_TYPE_STRING)
        return fail_at(ld, s, "\"%s%s\" must be a duration such as \"500ms\"", where, name);
    const char *text = config_setting_get_string(s);
    char *end = NULL;
    errno = 0;
    unsigned long long v = isdigit((unsigned char)text[0]) ? strtoull(text, &end, 10) : 0;
    uint64_t mult = 0;
    if (end != NULL && errno == 0) {
        if (strcmp(end, "ms") == 0)
            mult = 1;
        else if (strcmp(end, "s") == 0 || *end == '\0')
            mult = 1000;
        else if (strcmp(end, "m") == 0)
            mult = 60000;
    }
    if (mult == 0 || v > 3600000ULL / mult)
        return fail_at(ld, s, "\"%s%s\": bad duration \"%.32s\" (use ms, s or m, up to 1h)", where,
                       name, text);
    *out = v * mult;
    return STEK_OK;
}

static bool name_ok(const char *s, bool dots)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (; *s != '\0'; s++)
        if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && !(dots && *s == '.'))
            return false;
    return true;
}

static stek_status load_stekd(const loader *ld, const config_setting_t *root, agent_config *cfg)
{
    static const char *const names[] = {"servers", "server_name",  "ca",        "cert",
                                        "key",     "service_keys", "state_dir", NULL};
    const config_setting_t *s = config_setting_get_member(root, "stekd");
    if (s == NULL)
        return fail_at(ld, root, "missing required setting \"stekd\"");
    if (!config_setting_is_group(s))
        return fail_at(ld, s, "\"stekd\" must be a group { ... }");
    STEK_GUARD(check_names(ld, s, "stekd.", names));
    STEK_GUARD(
        get_strings(ld, s, "stekd.", "servers", true, false, &cfg->servers, &cfg->n_servers));
    STEK_GUARD(get_string(ld, s, "stekd.", "server_name", false, &cfg->server_name));
    STEK_GUARD(get_path(ld, s, "stekd.", "ca", true, &cfg->ca));
    STEK_GUARD(get_path(ld, s, "stekd.", "cert", true, &cfg->cert));
    STEK_GUARD(get_path(ld, s, "stekd.", "key", true, &cfg->key));
    STEK_GUARD(get_strings(ld, s, "stekd.", "service_keys", true, true, &cfg->service_keys,
                           &cfg->n_service_keys));
    STEK_GUARD(get_path(ld, s, "stekd.", "state_dir", false, &cfg->state_dir));
    return STEK_OK;
}

static stek_status get_signal(const loader *ld, const config_setting_t *t, const char *where,
                              int *out)
{
    static const struct {
        const char *name;
        int sig;
    } sigs[] = {{"HUP", SIGHUP}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {NULL, 0}};
    char *name = NULL;
    STEK_GUARD(get_string(ld, t, where, "signal", false, &name));
    if (name == NULL)
        return STEK_OK;
    const char *n = strncasecmp(name, "SIG", 3) == 0 ? name + 3 : name;
    for (size_t i = 0; sigs[i].name != NULL; i++) {
        if (strcasecmp(n, sigs[i].name) == 0) {
            *out = sigs[i].sig;
            free(name);
            return STEK_OK;
        }
    }
    free(name);
    return fail_at(ld, config_setting_get_member(t, "signal"),
                   "\"%ssignal\" must be HUP, USR1 or USR2", where);
}

static stek_status load_target(const loader *ld, const config_setting_t *t, size_t index,
                               agent_target_cfg *out)
{
    static const char *const names[] = {
        "name",   "group",         "type",   "dir",       "snippet",  "reload", "pid_file",
        "signal", "server_config", "socket", "keys_file", "keys_ref", NULL};
    char where[32];
    snprintf(where, sizeof(where), "targets.[%zu].", index);
    if (!config_setting_is_group(t))
        return fail_at(ld, t, "each target must be a group { ... }");
    STEK_GUARD(check_names(ld, t, where, names));
    STEK_GUARD(get_string(ld, t, where, "name", true, &out->name));
    if (!name_ok(out->name, false))
        return fail_at(ld, config_setting_get_member(t, "name"),
                       "\"%sname\" must be 1..64 of [A-Za-z0-9_-]", where);
    STEK_GUARD(get_string(ld, t, where, "group", true, &out->group));
    if (!name_ok(out->group, true))
        return fail_at(ld, config_setting_get_member(t, "group"), "\"%sgroup\" is not a group name",
                       where);
    char *type = NULL;
    STEK_GUARD(get_string(ld, t, where, "type", true, &type));
    bool known = true;
    if (strcmp(type, "nginx") == 0)
        out->kind = AGENT_NGINX;
    else if (strcmp(type, "haproxy") == 0)
        out->kind = AGENT_HAPROXY;
    else if (strcmp(type, "files") == 0)
        out->kind = AGENT_FILES;
    else
        known = false;
    free(type);
    if (!known)
        return fail_at(ld, config_setting_get_member(t, "type"),
                       "\"%stype\" must be \"nginx\", \"haproxy\" or \"files\"", where);
    STEK_GUARD(get_path(ld, t, where, "dir", true, &out->dir));
    STEK_GUARD(get_path(ld, t, where, "snippet", false, &out->snippet));
    STEK_GUARD(
        get_strings(ld, t, where, "reload", false, false, &out->reload_argv, &out->n_reload));
    STEK_GUARD(get_path(ld, t, where, "pid_file", false, &out->pid_file));
    out->reload_signal = SIGHUP;
    STEK_GUARD(get_signal(ld, t, where, &out->reload_signal));
    STEK_GUARD(get_path(ld, t, where, "server_config", false, &out->server_config));
    STEK_GUARD(get_path(ld, t, where, "socket", false, &out->socket));
    STEK_GUARD(get_path(ld, t, where, "keys_file", false, &out->keys_file));
    STEK_GUARD(get_string(ld, t, where, "keys_ref", false, &out->keys_ref));

    const config_setting_t *at = t;
    if (out->reload_argv != NULL && out->pid_file != NULL)
        return fail_at(ld, config_setting_get_member(t, "pid_file"),
                       "target \"%s\": give \"reload\" or \"pid_file\", not both", out->name);
    if (config_setting_get_member(t, "signal") != NULL && out->pid_file == NULL)
        return fail_at(ld, config_setting_get_member(t, "signal"),
                       "target \"%s\": \"signal\" goes with \"pid_file\"", out->name);
    switch (out->kind) {
    case AGENT_NGINX:
        /* nginx reads key files only at start and reload: without one, new keys never load. */
        if (out->reload_argv == NULL && out->pid_file == NULL)
            return fail_at(ld, at, "target \"%s\": nginx needs \"reload\" or \"pid_file\"",
                           out->name);
        /* fall through */
    case AGENT_FILES:
        if (out->socket != NULL || out->keys_file != NULL || out->keys_ref != NULL)
            return fail_at(ld, at,
                           "target \"%s\": \"socket\", \"keys_file\" and \"keys_ref\" are "
                           "for haproxy targets",
                           out->name);
        if (out->kind == AGENT_FILES && out->server_config != NULL)
            return fail_at(ld, config_setting_get_member(t, "server_config"),
                           "target \"%s\": \"server_config\" is for nginx and haproxy", out->name);
        if (out->kind == AGENT_NGINX && out->snippet == NULL &&
            asprintf(&out->snippet, "%s/%s.conf", out->dir, out->name) < 0)
            return STEK_ERR_NOMEM;
        break;
    case AGENT_HAPROXY:
        if (out->socket == NULL)
            return fail_at(ld, at, "target \"%s\": haproxy needs \"socket\" (its stats socket)",
                           out->name);
        if (out->snippet != NULL || out->reload_argv != NULL || out->pid_file != NULL)
            return fail_at(ld, at,
                           "target \"%s\": haproxy is driven through its socket; \"snippet\", "
                           "\"reload\" and \"pid_file\" are for nginx and files",
                           out->name);
        if (out->keys_file == NULL &&
            asprintf(&out->keys_file, "%s/%s.keys", out->dir, out->name) < 0)
            return STEK_ERR_NOMEM;
        if (out->keys_ref == NULL && (out->keys_ref = strdup(out->keys_file)) == NULL)
            return STEK_ERR_NOMEM;
        break;
    }
    return STEK_OK;
}

static stek_status load_root(const loader *ld, const config_setting_t *root, agent_config *cfg)
{
    static const char *const names[] = {"stekd",        "strict",  "retry",
                                        "metrics_file", "targets", NULL};
    STEK_GUARD(check_names(ld, root, "", names));
    STEK_GUARD(load_stekd(ld, root, cfg));
    const config_setting_t *s = config_setting_get_member(root, "strict");
    if (s != NULL) {
        if (config_setting_type(s) != CONFIG_TYPE_BOOL)
            return fail_at(ld, s, "\"strict\" must be true or false");
        cfg->strict = config_setting_get_bool(s) != 0;
    }
    STEK_GUARD(get_path(ld, root, "", "metrics_file", false, &cfg->metrics_file));
    cfg->retry_min_ms = DEFAULT_RETRY_MIN_MS;
    cfg->retry_max_ms = DEFAULT_RETRY_MAX_MS;
    const config_setting_t *r = config_setting_get_member(root, "retry");
    if (r != NULL) {
        static const char *const rnames[] = {"min", "max", NULL};
        if (!config_setting_is_group(r))
            return fail_at(ld, r, "\"retry\" must be a group { min = ...; max = ...; }");
        STEK_GUARD(check_names(ld, r, "retry.", rnames));
        STEK_GUARD(get_ms(ld, r, "retry.", "min", &cfg->retry_min_ms));
        STEK_GUARD(get_ms(ld, r, "retry.", "max", &cfg->retry_max_ms));
        if (cfg->retry_min_ms < 10 || cfg->retry_max_ms < cfg->retry_min_ms)
            return fail_at(ld, r, "\"retry\": need 10ms <= min <= max");
    }
    const config_setting_t *ts = config_setting_get_member(root, "targets");
    if (ts == NULL)
        return fail_at(ld, root, "missing required setting \"targets\"");
    if (!config_setting_is_list(ts) || config_setting_length(ts) < 1 ||
        config_setting_length(ts) > AGENT_MAX_TARGETS)
        return fail_at(ld, ts, "\"targets\" must be a list ( { ... }, ... ) of 1 to %d targets",
                       AGENT_MAX_TARGETS);
    for (int i = 0; i < config_setting_length(ts); i++) {
        const config_setting_t *t = config_setting_get_elem(ts, (unsigned)i);
        STEK_GUARD(load_target(ld, t, (size_t)i, &cfg->targets[i]));
        cfg->n_targets = (size_t)i + 1;
        for (int j = 0; j < i; j++)
            if (strcmp(cfg->targets[j].name, cfg->targets[i].name) == 0)
                return fail_at(ld, t, "target name \"%s\" used twice", cfg->targets[i].name);
    }
    return STEK_OK;
}

stek_status agent_config_load(const char *path, agent_config **out)
{
    STEK_ENSURE_REF(path);
    STEK_ENSURE_REF(out);
    stek_status st = STEK_OK;
    config_t lc;
    loader ld = {.path = path};
    agent_config *cfg = calloc(1, sizeof(*cfg));
    STEK_ENSURE(cfg != NULL, STEK_ERR_NOMEM);
    config_init(&lc);
    char *copy = strdup(path);
    STEK_ENSURE_GOTO(copy != NULL, STEK_ERR_NOMEM);
    char *slash = strrchr(copy, '/');
    if (slash == NULL) {
        free(copy);
        copy = getcwd(NULL, 0);
        STEK_ENSURE_GOTO(copy != NULL, STEK_ERR_IO);
    } else if (slash == copy) {
        slash[1] = '\0';
    } else {
        *slash = '\0';
    }
    if (copy[0] != '/') {
        char *cwd = getcwd(NULL, 0);
        char *abs = NULL;
        int n = cwd != NULL ? asprintf(&abs, "%s/%s", cwd, copy) : -1;
        free(cwd);
        free(copy);
        copy = n >= 0 ? abs : NULL;
        STEK_ENSURE_GOTO(copy != NULL, STEK_ERR_NOMEM);
    }
    ld.dir = copy;
    if (!config_read_file(&lc, path)) {
        if (config_error_type(&lc) == CONFIG_ERR_FILE_IO)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: cannot read the file", path);
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
    agent_config_free(cfg);
    return st;
}

static void free_strings(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

void agent_config_free(agent_config *cfg)
{
    if (cfg == NULL)
        return;
    free_strings(cfg->servers, cfg->n_servers);
    free_strings(cfg->service_keys, cfg->n_service_keys);
    free(cfg->server_name);
    free(cfg->ca);
    free(cfg->cert);
    free(cfg->key);
    free(cfg->state_dir);
    free(cfg->metrics_file);
    for (size_t i = 0; i < AGENT_MAX_TARGETS; i++) {
        agent_target_cfg *t = &cfg->targets[i];
        free(t->name);
        free(t->group);
        free(t->dir);
        free(t->snippet);
        free_strings(t->reload_argv, t->n_reload);
        free(t->pid_file);
        free(t->server_config);
        free(t->socket);
        free(t->keys_file);
        free(t->keys_ref);
    }
    free(cfg);
}

const char *agent_kind_name(agent_kind k)
{
    switch (k) {
    case AGENT_NGINX:
        return "nginx";
    case AGENT_HAPROXY:
        return "haproxy";
    case AGENT_FILES:
        return "files";
    }
    return "?";
}
