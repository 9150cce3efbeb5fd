/*
 * What the outputs share: key files (written once, 0600, atomically; zeroed
 * and unlinked when their key leaves), the reload of a server, and the
 * manifest that records what a target holds (names and epochs, never key
 * bytes), which `stek-agent status` prints.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "atomic_file.h"

#define RELOAD_TIMEOUT_MS 15000

long agent_view_prev(const agent_view *v)
{
    for (size_t i = 1; i < v->n; i++)
        if (v->keys[i].epoch < v->keys[0].epoch)
            return (long)i; /* older keys follow newer ones, newest first */
    return -1;
}

long agent_view_next(const agent_view *v)
{
    return v->n > 1 && v->keys[1].epoch > v->keys[0].epoch ? 1 : -1;
}

void agent_key_file_name(const agent_target_cfg *t, const agent_key *k, char *out, size_t len)
{
    snprintf(out, len, "stek-%s-e%llu-%02x%02x%02x%02x.key", t->name, (unsigned long long)k->epoch,
             k->name[0], k->name[1], k->name[2], k->name[3]);
}

static stek_status dir_sync(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", dir, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    if (rc != 0)
        STEK_BAIL(STEK_ERR_IO, "fsync %s: %s", dir, strerror(errno));
    return STEK_OK;
}

stek_status agent_write_key_file(const agent_target_cfg *t, const agent_view *v, size_t i)
{
    char name[128], path[4096];
    agent_key_file_name(t, &v->keys[i], name, sizeof(name));
    snprintf(path, sizeof(path), "%s/%s", t->dir, name);
    struct stat sb;
    if (lstat(path, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size == AGENT_ENTRY_BYTES)
        return STEK_OK; /* a name is one key: the file already holds it */
    return stek_file_replace(path, agent_entry(v, i), AGENT_ENTRY_BYTES);
}

stek_status agent_zero_fd(int fd, const char *what)
{
    struct stat sb;
    if (fstat(fd, &sb) != 0)
        STEK_BAIL(STEK_ERR_IO, "fstat %s: %s", what, strerror(errno));
    static const uint8_t zeros[4096];
    off_t off = 0;
    while (off < sb.st_size) {
        size_t chunk =
            (size_t)(sb.st_size - off) < sizeof(zeros) ? (size_t)(sb.st_size - off) : sizeof(zeros);
        ssize_t n = pwrite(fd, zeros, chunk, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            STEK_BAIL(STEK_ERR_IO, "zeroing %s: %s", what, strerror(errno));
        off += n;
    }
    if (fsync(fd) != 0)
        STEK_BAIL(STEK_ERR_IO, "fsync %s: %s", what, strerror(errno));
    return STEK_OK;
}

/* Zeroes, syncs and unlinks one file. */
static stek_status scrub_file(const char *path)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        if (errno == ENOENT)
            return STEK_OK;
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", path, strerror(errno));
    }
    stek_status st = agent_zero_fd(fd, path);
    close(fd);
    STEK_GUARD(st);
    if (unlink(path) != 0 && errno != ENOENT)
        STEK_BAIL(STEK_ERR_IO, "unlink %s: %s", path, strerror(errno));
    return STEK_OK;
}

stek_status agent_scrub_key_files(const agent_target_cfg *t, const agent_view *v)
{
    stek_status st = STEK_OK;
    char prefix[96];
    snprintf(prefix, sizeof(prefix), "stek-%s-e", t->name);
    DIR *d = opendir(t->dir);
    if (d == NULL)
        STEK_BAIL(STEK_ERR_IO, "opendir %s: %s", t->dir, strerror(errno));
    bool removed = false;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0 || len < 4 ||
            strcmp(e->d_name + len - 4, ".key") != 0)
            continue;
        bool held = false;
        for (size_t i = 0; i < v->n && !held; i++) {
            char name[128];
            agent_key_file_name(t, &v->keys[i], name, sizeof(name));
            held = strcmp(name, e->d_name) == 0;
        }
        if (held)
            continue;
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", t->dir, e->d_name);
        STEK_GUARD_GOTO(scrub_file(path));
        removed = true;
    }
done:
    closedir(d);
    if (st == STEK_OK && removed)
        st = dir_sync(t->dir);
    return st;
}

stek_status agent_replace_secret_file(const char *path, const void *data, size_t len)
{
    int old = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    stek_status st = stek_file_replace(path, data, len);
    if (old >= 0) {
        /* Only once the new file is in place: a reader never sees zeros. */
        if (st == STEK_OK)
            st = agent_zero_fd(old, path);
        close(old);
    }
    return st;
}

static stek_status run_command(char *const argv[])
{
    pid_t pid = fork();
    if (pid < 0)
        STEK_BAIL(STEK_ERR_IO, "fork: %s", strerror(errno));
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, STDIN_FILENO);
        execvp(argv[0], argv);
        _exit(127);
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int status = 0;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                return STEK_OK;
            if (WIFEXITED(status))
                STEK_BAIL(STEK_ERR_IO, "%s exited with %d", argv[0], WEXITSTATUS(status));
            STEK_BAIL(STEK_ERR_IO, "%s died of signal %d", argv[0],
                      WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        }
        if (r < 0 && errno != EINTR)
            STEK_BAIL(STEK_ERR_IO, "waitpid: %s", strerror(errno));
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms > RELOAD_TIMEOUT_MS) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            STEK_BAIL(STEK_ERR_IO, "%s did not finish within %d ms", argv[0], RELOAD_TIMEOUT_MS);
        }
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static stek_status signal_pid_file(const agent_target_cfg *t)
{
    FILE *f = fopen(t->pid_file, "re");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", t->pid_file, strerror(errno));
    long pid = 0;
    int got = fscanf(f, "%ld", &pid);
    fclose(f);
    if (got != 1 || pid <= 1)
        STEK_BAIL(STEK_ERR_IO, "%s holds no process id", t->pid_file);
    if (kill((pid_t)pid, t->reload_signal) != 0)
        STEK_BAIL(STEK_ERR_IO, "signal %d to pid %ld (%s): %s", t->reload_signal, pid, t->pid_file,
                  strerror(errno));
    return STEK_OK;
}

stek_status agent_reload(const agent_target_cfg *t)
{
    if (t->reload_argv != NULL)
        return run_command(t->reload_argv);
    if (t->pid_file != NULL)
        return signal_pid_file(t);
    return STEK_OK;
}

/* ---- manifest and status ------------------------------------------------------------ */

static void hex(const uint8_t *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

static const char *role_of(const agent_view *v, size_t i)
{
    if (i == 0)
        return "encrypt";
    return v->keys[i].epoch > v->keys[0].epoch ? "next" : "decrypt";
}

stek_status agent_write_manifest(const agent_target_cfg *t, const agent_view *v, bool applied,
                                 unsigned failures, const char *last_error)
{
    stek_status st = STEK_OK;
    json_object *root = json_object_new_object();
    json_object *keys = json_object_new_array();
    STEK_ENSURE_GOTO(root != NULL && keys != NULL, STEK_ERR_NOMEM);
    json_object_object_add(root, "target", json_object_new_string(t->name));
    json_object_object_add(root, "type", json_object_new_string(agent_kind_name(t->kind)));
    json_object_object_add(root, "group", json_object_new_string(t->group));
    json_object_object_add(root, "generation", json_object_new_int64((int64_t)v->generation));
    json_object_object_add(root, "updated_unix", json_object_new_int64((int64_t)time(NULL)));
    json_object_object_add(root, "applied", json_object_new_boolean(applied));
    json_object_object_add(root, "failures", json_object_new_int((int)failures));
    if (last_error != NULL)
        json_object_object_add(root, "last_error", json_object_new_string(last_error));
    for (size_t i = 0; i < v->n; i++) {
        const agent_key *k = &v->keys[i];
        char name_hex[2 * AGENT_NAME_BYTES + 1], file[128];
        hex(k->name, sizeof(k->name), name_hex);
        json_object *o = json_object_new_object();
        STEK_ENSURE_GOTO(o != NULL, STEK_ERR_NOMEM);
        json_object_array_add(keys, o);
        json_object_object_add(o, "epoch", json_object_new_int64((int64_t)k->epoch));
        json_object_object_add(o, "name", json_object_new_string(name_hex));
        json_object_object_add(o, "role", json_object_new_string(role_of(v, i)));
        if (t->kind != AGENT_HAPROXY) {
            agent_key_file_name(t, k, file, sizeof(file));
            json_object_object_add(o, "file", json_object_new_string(file));
        }
        json_object_object_add(o, "encrypt_from_unix", json_object_new_int64(k->enc_from));
        json_object_object_add(o, "encrypt_until_unix", json_object_new_int64(k->enc_until));
        json_object_object_add(o, "decrypt_until_unix", json_object_new_int64(k->dec_until));
    }
    json_object_object_add(root, "keys", keys);
    keys = NULL;
    const char *text = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PRETTY);
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s.manifest.json", t->dir, t->name);
    st = stek_file_replace(path, text, strlen(text));
done:
    json_object_put(keys);
    json_object_put(root);
    return st;
}

static int64_t get_int(json_object *o, const char *key)
{
    json_object *v = NULL;
    return json_object_object_get_ex(o, key, &v) ? json_object_get_int64(v) : 0;
}

static const char *get_str(json_object *o, const char *key)
{
    json_object *v = NULL;
    return json_object_object_get_ex(o, key, &v) ? json_object_get_string(v) : NULL;
}

int agent_status(const agent_config *cfg)
{
    int rc = AGENT_EXIT_OK;
    const int64_t now = (int64_t)time(NULL);
    for (size_t i = 0; i < cfg->n_targets; i++) {
        const agent_target_cfg *t = &cfg->targets[i];
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s.manifest.json", t->dir, t->name);
        json_object *root = json_object_from_file(path);
        if (root == NULL) {
            printf("target %s (%s, group %s): nothing applied yet (no %s)\n", t->name,
                   agent_kind_name(t->kind), t->group, path);
            rc = AGENT_EXIT_FAILED;
            continue;
        }
        json_object *applied = NULL, *keys = NULL;
        bool ok = json_object_object_get_ex(root, "applied", &applied) &&
                  json_object_get_boolean(applied);
        printf("target %s (%s, group %s): generation %lld, %s, updated %lld s ago\n", t->name,
               agent_kind_name(t->kind), t->group, (long long)get_int(root, "generation"),
               ok ? "applied" : "NOT applied", (long long)(now - get_int(root, "updated_unix")));
        if (!ok) {
            const char *err = get_str(root, "last_error");
            printf("  %lld failures in a row; last error: %s\n",
                   (long long)get_int(root, "failures"), err != NULL ? err : "?");
            rc = AGENT_EXIT_FAILED;
        }
        if (json_object_object_get_ex(root, "keys", &keys)) {
            for (size_t k = 0; k < json_object_array_length(keys); k++) {
                json_object *o = json_object_array_get_idx(keys, k);
                const char *name = get_str(o, "name"), *role = get_str(o, "role");
                printf("  epoch %lld  %-7s  name %s  decrypts for %lld s more\n",
                       (long long)get_int(o, "epoch"), role != NULL ? role : "?",
                       name != NULL ? name : "?",
                       (long long)(get_int(o, "decrypt_until_unix") - now));
            }
        }
        json_object_put(root);
    }
    return rc;
}
