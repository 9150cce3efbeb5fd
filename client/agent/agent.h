/*
 * stek-agent: keeps the ticket keys of servers that cannot link libstek
 * (nginx, HAProxy, anything that reads key files) in step with stekd.
 *
 * One libstek client serves every target's group. The main loop reads the
 * client's keyring (stek_client_internal.h), builds each target's view of
 * its group (the keys in the order its server needs, copied into locked
 * memory), and applies a view that differs from what the target holds:
 * out_nginx.c, out_haproxy.c, out_files.c. A failed apply is retried with
 * exponential backoff and reported; it is never skipped.
 */
#ifndef STEK_AGENT_H
#define STEK_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "secret.h"
#include "status.h"

#define AGENT_NAME_BYTES 16
#define AGENT_ENTRY_BYTES 80 /* name | hmac | aes, as the keyring holds it */
#define AGENT_MAX_KEYS 32
#define AGENT_MAX_TARGETS 16

/* Exit codes (docs/agent.md). */
#define AGENT_EXIT_OK 0
#define AGENT_EXIT_FAILED 1  /* --once: a target could not be applied, or no keys in time */
#define AGENT_EXIT_CONFIG 2  /* usage or configuration error (file and line) */
#define AGENT_EXIT_REFUSED 3 /* strict mode: a server config enables 0-RTT */
#define AGENT_EXIT_CLIENT 4  /* libstek refused the stekd settings (files, keys) */

typedef enum agent_kind {
    AGENT_NGINX = 0,
    AGENT_HAPROXY,
    AGENT_FILES,
} agent_kind;

/* One target: a group and an output. Strings are owned. */
typedef struct agent_target_cfg {
    char *name;  /* [A-Za-z0-9_-], names files and log lines */
    char *group; /* the stekd group */
    agent_kind kind;
    char *dir;           /* key files and the manifest */
    char *snippet;       /* nginx: the include file (default <dir>/<name>.conf) */
    char **reload_argv;  /* nginx, files: a command run without a shell, or NULL */
    size_t n_reload;     /* elements of reload_argv, without the terminating NULL */
    char *pid_file;      /* nginx, files: or a signal to the pid in this file */
    int reload_signal;   /* with pid_file; SIGHUP by default */
    char *server_config; /* nginx, haproxy: checked for 0-RTT (and nginx's shutdown timeout) */
    char *socket;        /* haproxy: the stats socket (level admin) */
    char *keys_file;     /* haproxy: the tls-ticket-keys file (default <dir>/<name>.keys) */
    char *keys_ref;      /* haproxy: the reference for set ssl tls-key (default keys_file) */
} agent_target_cfg;

typedef struct agent_config {
    char **servers;
    size_t n_servers;
    char *server_name; /* may be NULL */
    char *ca, *cert, *key;
    char **service_keys;
    size_t n_service_keys;
    char *state_dir; /* may be NULL */
    bool strict;
    uint64_t retry_min_ms, retry_max_ms;
    char *metrics_file; /* node-exporter textfile output, or NULL */
    agent_target_cfg targets[AGENT_MAX_TARGETS];
    size_t n_targets;
} agent_config;

/* Reads and checks the file. STEK_ERR_CONFIG with "FILE:LINE: why"; STEK_ERR_IO. */
STEK_MUST_USE stek_status agent_config_load(const char *path, agent_config **out);
void agent_config_free(agent_config *cfg);
const char *agent_kind_name(agent_kind k);

/* One key of a view. Deadlines are Unix seconds (for people and manifests). */
typedef struct agent_key {
    uint64_t epoch;
    uint8_t name[AGENT_NAME_BYTES];
    int64_t enc_from, enc_until, dec_until;
} agent_key;

/*
 * A target's keys in its server's order: keys[0] encrypts, then the newer
 * keys (next) ascending, then the older keys descending. material holds
 * n * AGENT_ENTRY_BYTES (name | hmac | aes) in the same order; NULL when
 * n == 0.
 */
typedef struct agent_view {
    uint64_t generation;
    size_t n;
    agent_key keys[AGENT_MAX_KEYS];
    stek_secret *material;
    int64_t epoch_s; /* the schedule's epoch length, 0 when unknown */
} agent_view;

static inline const uint8_t *agent_entry(const agent_view *v, size_t i)
{
    return stek_secret_cdata(v->material) + i * AGENT_ENTRY_BYTES;
}

/* Index of the newest key older than keys[0] (the previous), or -1. */
long agent_view_prev(const agent_view *v);
/* Index of the oldest key newer than keys[0] (next), or -1. */
long agent_view_next(const agent_view *v);

/* ---- outputs ---------------------------------------------------------------------- */

/* Each makes the target's server hold the view; STEK_OK only when it does. */
STEK_MUST_USE stek_status out_nginx_apply(const agent_target_cfg *t, const agent_view *v);
STEK_MUST_USE stek_status out_haproxy_apply(const agent_target_cfg *t, const agent_view *v);
STEK_MUST_USE stek_status out_files_apply(const agent_target_cfg *t, const agent_view *v);

/* ---- shared by the outputs (agent_io.c) ------------------------------------------- */

/* "stek-<target>-e<epoch>-<first 4 name bytes in hex>.key" into out. */
void agent_key_file_name(const agent_target_cfg *t, const agent_key *k, char *out, size_t len);

/*
 * Writes key i of v (its 80 bytes, in `order`: name|hmac|aes as held, for
 * nginx and files) to <dir>/<file name> atomically with mode 0600, unless
 * the file already exists (a name is one key: its content never changes).
 */
STEK_MUST_USE stek_status agent_write_key_file(const agent_target_cfg *t, const agent_view *v,
                                               size_t i);

/*
 * Removes every key file of t in its directory that v does not hold:
 * overwritten with zeros, synced, unlinked, directory synced.
 */
STEK_MUST_USE stek_status agent_scrub_key_files(const agent_target_cfg *t, const agent_view *v);

/* Overwrites the file at fd with zeros (its whole size) and syncs it. */
STEK_MUST_USE stek_status agent_zero_fd(int fd, const char *what);

/*
 * Replaces path atomically with data (mode 0600); if an older file was
 * there, its old content is overwritten with zeros after the rename (the
 * old inode, through a descriptor opened before), so no key outlives the
 * file that named it.
 */
STEK_MUST_USE stek_status agent_replace_secret_file(const char *path, const void *data, size_t len);

/* Runs the target's reload: its command (exit 0 within 15 s), or its signal to the pid file. */
STEK_MUST_USE stek_status agent_reload(const agent_target_cfg *t);

/*
 * Writes <dir>/<name>.manifest.json: target, type, group, generation, the
 * keys with epoch, name (hex), role, file and deadlines, whether the last
 * apply succeeded, its error, failures in a row. Names only, never key
 * bytes. Also what `stek-agent status` reads.
 */
STEK_MUST_USE stek_status agent_write_manifest(const agent_target_cfg *t, const agent_view *v,
                                               bool applied, unsigned failures,
                                               const char *last_error);

/* Prints what each target of cfg holds, from its manifest. Returns an exit code. */
int agent_status(const agent_config *cfg);

/* One target's state, for the metrics file. */
typedef struct agent_target_metrics {
    const agent_target_cfg *cfg;
    bool attempted, ok;
    uint64_t generation, encrypt_epoch;
    size_t keys;
    unsigned consecutive_failures;
    uint64_t applies_ok, applies_failed;
    int64_t last_success_unix; /* 0: never */
} agent_target_metrics;

/* The agent's own state, for the metrics file. */
typedef struct agent_metrics {
    bool stream_up;
    uint64_t sets_accepted, sets_rejected;
    int64_t last_fetch_unix;
    const agent_target_metrics *targets;
    size_t n_targets;
} agent_metrics;

/*
 * Writes m to path in Prometheus' text format, for node_exporter's textfile
 * collector: atomically (temporary file, rename), mode 0644, names and
 * numbers only, never key material. STEK_OK, or STEK_ERR_IO / _NOMEM.
 */
STEK_MUST_USE stek_status agent_metrics_write(const char *path, const agent_metrics *m);

/* Scans a server config for settings that break shared keys (checks.c). */
typedef struct agent_server_checks {
    bool early_data;           /* nginx ssl_early_data on; haproxy allow-0rtt */
    bool has_shutdown_timeout; /* nginx worker_shutdown_timeout */
    int64_t shutdown_timeout_s;
    bool has_ssl_lifetime; /* haproxy tune.ssl.lifetime */
    int64_t ssl_lifetime_s;
} agent_server_checks;

STEK_MUST_USE stek_status agent_check_server_config(agent_kind kind, const char *path,
                                                    agent_server_checks *out);

#endif
