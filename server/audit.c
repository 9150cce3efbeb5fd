/*
 * The audit log. Lines are built with json-c, so every string (a SAN can
 * hold quotes or control characters) is escaped by the library, and written
 * with one writev each.
 */
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <openssl/crypto.h>

#include "log.h"

struct stekd_audit {
    char *path;
    /* Lines take it shared (they only read fd); a reopen takes it exclusive. */
    pthread_rwlock_t lock;
    int fd;
    atomic_ulong lines, errors;
    atomic_bool failing; /* the last write failed: logged once per episode */
};

static stek_status open_fd(const char *path, int *fd)
{
    /* 0640: the operator's log group may read it; the umask can only narrow it. */
    *fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
    if (*fd < 0)
        STEK_BAIL(STEK_ERR_IO, "audit log %s: %s", path, strerror(errno));
    return STEK_OK;
}

stek_status stekd_audit_open(const char *path, stekd_audit **out)
{
    STEK_ENSURE_REF(path);
    STEK_ENSURE_REF(out);
    *out = NULL;
    stekd_audit *a = calloc(1, sizeof(*a));
    STEK_ENSURE(a != NULL, STEK_ERR_NOMEM);
    a->fd = -1;
    pthread_rwlock_init(&a->lock, NULL);
    stek_status st = STEK_OK;
    a->path = strdup(path);
    STEK_ENSURE_GOTO(a->path != NULL, STEK_ERR_NOMEM);
    STEK_GUARD_GOTO(open_fd(path, &a->fd));
    *out = a;
    a = NULL;
done:
    stekd_audit_close(a);
    return st;
}

stek_status stekd_audit_reopen(stekd_audit *a)
{
    STEK_ENSURE_REF(a);
    int fd = -1;
    STEK_GUARD(open_fd(a->path, &fd));
    pthread_rwlock_wrlock(&a->lock);
    int old = a->fd;
    a->fd = fd;
    pthread_rwlock_unlock(&a->lock);
    if (old >= 0)
        close(old);
    return STEK_OK;
}

void stekd_audit_close(stekd_audit *a)
{
    if (a == NULL)
        return;
    if (a->fd >= 0)
        close(a->fd);
    pthread_rwlock_destroy(&a->lock);
    free(a->path);
    free(a);
}

/* "2026-03-01T12:00:00.123Z", as the log's timestamps. */
static void utc_now(char out[48])
{
    struct timespec ts;
    struct tm tm;
    char when[24];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, 48, "%s.%03dZ", when, (int)(ts.tv_nsec / 1000000L));
}

static void add_str(json_object *o, const char *name, const char *v)
{
    json_object_object_add(o, name, v != NULL ? json_object_new_string(v) : NULL);
}

/* Builds the line's JSON text; *json is freed with json_object_put. */
static const char *build_line(const stekd_audit_set *s, json_object **json)
{
    char when[48];
    utc_now(when);
    /* Upper-case hex without separators: `openssl x509 -fingerprint -sha256` minus the colons. */
    char fp[2 * STEKD_AUDIT_FP_BYTES + 1] = "";
    if (s->cert_sha256 != NULL && OPENSSL_buf2hexstr_ex(fp, sizeof(fp), NULL, s->cert_sha256,
                                                        STEKD_AUDIT_FP_BYTES, '\0') != 1)
        fp[0] = '\0';

    json_object *o = json_object_new_object();
    if (o == NULL)
        return NULL;
    add_str(o, "ts", when);
    add_str(o, "event", s->event);
    add_str(o, "identity", s->identity);
    add_str(o, "peer", s->peer);
    add_str(o, "cert_sha256", fp);
    add_str(o, "group", s->group);
    json_object_object_add(o, "generation", json_object_new_int64(s->generation));
    json_object_object_add(o, "epoch_first", json_object_new_uint64(s->epoch_first));
    json_object_object_add(o, "epoch_last", json_object_new_uint64(s->epoch_last));
    json_object_object_add(o, "epoch_current", json_object_new_uint64(s->epoch_current));
    *json = o;
    /* PLAIN: no newlines or indentation, so one object is one line. */
    return json_object_to_json_string_ext(o,
                                          JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
}

void stekd_audit_keyset(stekd_audit *a, const stekd_audit_set *s)
{
    if (a == NULL || s == NULL)
        return;
    json_object *json = NULL;
    const char *text = build_line(s, &json);
    bool ok = false;
    int err = ENOMEM;
    if (text != NULL) {
        size_t len = strlen(text);
        struct iovec iov[2] = {{(void *)text, len}, {(void *)"\n", 1}};
        pthread_rwlock_rdlock(&a->lock);
        /* O_APPEND and one writev: concurrent lines land whole, one after another. */
        ssize_t n = writev(a->fd, iov, 2);
        err = errno;
        pthread_rwlock_unlock(&a->lock);
        ok = n >= 0 && (size_t)n == len + 1;
        if (n >= 0 && !ok)
            err = ENOSPC; /* a short write: the disk filled up */
    }
    json_object_put(json);
    if (ok) {
        atomic_fetch_add(&a->lines, 1);
        if (atomic_exchange(&a->failing, false))
            stek_log(STEK_LOG_INFO, "stekd", "audit log %s: writing again", a->path);
        return;
    }
    atomic_fetch_add(&a->errors, 1);
    if (!atomic_exchange(&a->failing, true))
        stek_log(STEK_LOG_ERROR, "stekd", "audit log %s: cannot write: %s (lines are lost)",
                 a->path, strerror(err));
}

void stekd_audit_get_stats(stekd_audit *a, stekd_audit_stats *out)
{
    out->lines = a != NULL ? atomic_load(&a->lines) : 0;
    out->errors = a != NULL ? atomic_load(&a->errors) : 0;
}
