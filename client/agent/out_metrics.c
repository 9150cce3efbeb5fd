/*
 * stek-agent's metrics, in Prometheus' text format for node_exporter's
 * textfile collector (--collector.textfile.directory): what each target
 * holds and whether its last apply worked, and the agent's own key-service
 * stream. Names, epochs and counts only; never key material or key names.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

typedef struct buf {
    char *p;
    size_t len, cap;
    bool failed;
} buf;

static void put(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put(buf *b, const char *fmt, ...)
{
    for (int round = 0; round < 2 && !b->failed; round++) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap + (size_t)n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* HELP and TYPE of one family. */
static void family(buf *b, const char *name, const char *type, const char *help)
{
    put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Target names are [A-Za-z0-9_-] and groups [a-z0-9._-] (checked when the
 * config is read), so they need no escaping in a label value. */
static void labels(buf *b, const agent_target_metrics *t)
{
    put(b, "{target=\"%s\",group=\"%s\",kind=\"%s\"}", t->cfg->name, t->cfg->group,
        agent_kind_name(t->cfg->kind));
}

static void per_target(buf *b, const agent_metrics *m, const char *name, const char *type,
                       const char *help, unsigned long long (*value)(const agent_target_metrics *))
{
    family(b, name, type, help);
    for (size_t i = 0; i < m->n_targets; i++) {
        put(b, "%s", name);
        labels(b, &m->targets[i]);
        put(b, " %llu\n", value(&m->targets[i]));
    }
}

static unsigned long long v_applied(const agent_target_metrics *t)
{
    return t->attempted && t->ok;
}
static unsigned long long v_keys(const agent_target_metrics *t)
{
    return t->keys;
}
static unsigned long long v_generation(const agent_target_metrics *t)
{
    return t->generation;
}
static unsigned long long v_epoch(const agent_target_metrics *t)
{
    return t->encrypt_epoch;
}
static unsigned long long v_failures(const agent_target_metrics *t)
{
    return t->consecutive_failures;
}
static unsigned long long v_last_success(const agent_target_metrics *t)
{
    return t->last_success_unix > 0 ? (unsigned long long)t->last_success_unix : 0;
}

stek_status agent_metrics_write(const char *path, const agent_metrics *m)
{
    STEK_ENSURE_REF(path);
    STEK_ENSURE_REF(m);
    buf b = {.cap = 4096};
    b.p = malloc(b.cap);
    STEK_ENSURE(b.p != NULL, STEK_ERR_NOMEM);
    b.p[0] = '\0';

    per_target(&b, m, "stek_agent_target_applied", "gauge",
               "1 when the target holds the group's current key set, 0 when its last apply "
               "failed or none was made yet.",
               v_applied);
    per_target(&b, m, "stek_agent_target_keys", "gauge",
               "Ticket keys the target was last given (encrypting, next and the decrypt window).",
               v_keys);
    per_target(&b, m, "stek_agent_target_generation", "gauge",
               "Key generation the target was last given.", v_generation);
    per_target(&b, m, "stek_agent_target_encrypt_epoch", "gauge",
               "Epoch of the key the target was last told to encrypt with.", v_epoch);
    per_target(&b, m, "stek_agent_target_consecutive_failures", "gauge",
               "Failed applies (write or reload) since the last success.", v_failures);
    per_target(&b, m, "stek_agent_target_last_success_timestamp_seconds", "gauge",
               "Unix time of the last successful apply; 0 when none.", v_last_success);
    family(&b, "stek_agent_target_applies_total", "counter",
           "Applies (key files, snippet or runtime API, reload) since the agent started.");
    for (size_t i = 0; i < m->n_targets; i++) {
        const agent_target_metrics *t = &m->targets[i];
        put(&b,
            "stek_agent_target_applies_total{target=\"%s\",group=\"%s\",kind=\"%s\",result="
            "\"ok\"} %llu\n",
            t->cfg->name, t->cfg->group, agent_kind_name(t->cfg->kind),
            (unsigned long long)t->applies_ok);
        put(&b,
            "stek_agent_target_applies_total{target=\"%s\",group=\"%s\",kind=\"%s\",result="
            "\"failed\"} %llu\n",
            t->cfg->name, t->cfg->group, agent_kind_name(t->cfg->kind),
            (unsigned long long)t->applies_failed);
    }
    family(&b, "stek_agent_stream_up", "gauge",
           "1 when every group's key-set stream from stekd is delivering messages.");
    put(&b, "stek_agent_stream_up %d\n", m->stream_up ? 1 : 0);
    family(&b, "stek_agent_sets_accepted_total", "counter",
           "Key sets from stekd that passed every check.");
    put(&b, "stek_agent_sets_accepted_total %llu\n", (unsigned long long)m->sets_accepted);
    family(&b, "stek_agent_sets_rejected_total", "counter",
           "Key sets from stekd that failed a check (signature, identity, epoch...).");
    put(&b, "stek_agent_sets_rejected_total %llu\n", (unsigned long long)m->sets_rejected);
    family(&b, "stek_agent_last_fetch_timestamp_seconds", "gauge",
           "Unix time of the last accepted key set; 0 when none.");
    put(&b, "stek_agent_last_fetch_timestamp_seconds %lld\n",
        (long long)(m->last_fetch_unix > 0 ? m->last_fetch_unix : 0));

    stek_status st = STEK_OK;
    if (b.failed) {
        st = stek_error_set(STEK_ERR_NOMEM, "metrics text");
        goto done;
    }
    /* A temporary file beside it, then rename: the collector never reads a
     * half-written file. World-readable: it holds no secret, and the
     * collector runs as another user. */
    size_t tl = strlen(path) + 16;
    char *tmp = malloc(tl);
    if (tmp == NULL) {
        st = stek_error_set(STEK_ERR_NOMEM, "metrics path");
        goto done;
    }
    snprintf(tmp, tl, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
        st = stek_error_set(STEK_ERR_IO, "open %s: %s", tmp, strerror(errno));
    } else {
        (void)fchmod(fd, 0644); /* whatever the umask */
        size_t off = 0;
        while (off < b.len) {
            ssize_t n = write(fd, b.p + off, b.len - off);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        if (off != b.len)
            st = stek_error_set(STEK_ERR_IO, "write %s: %s", tmp, strerror(errno));
        if (close(fd) != 0 && st == STEK_OK)
            st = stek_error_set(STEK_ERR_IO, "close %s: %s", tmp, strerror(errno));
        if (st == STEK_OK && rename(tmp, path) != 0)
            st = stek_error_set(STEK_ERR_IO, "rename %s: %s", path, strerror(errno));
        if (st != STEK_OK)
            (void)unlink(tmp);
    }
    free(tmp);
done:
    free(b.p);
    return st;
}
