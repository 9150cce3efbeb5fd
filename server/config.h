/*
 * stekd's configuration file, parsed with libconfig. The same file serves
 * stekctl, which needs the HSM and group settings.
 *
 *   listen = "127.0.0.1:7443";
 *   tls = { cert = "server.pem"; key = "server-key.pem";  # or key = "pkcs11:..."
 *           client_ca = "fleet-ca.pem"; };
 *   hsm = { module = "/usr/lib/softhsm/libsofthsm2.so"; token = "stek";
 *           pin_env = "STEK_PIN"; so_pin_env = "STEK_SO_PIN"; };
 *   schedule = { max_jump = 2; heartbeat = "30s"; jitter = "2s"; };
 *   limits = { max_request_bytes = 4096; wrap_cache_entries = 10000;
 *              max_watchers = 10000; };
 *   metrics = { listen = "127.0.0.1:9464"; };   # optional: Prometheus /metrics
 *   audit_log = "/var/log/stek/audit.log";      # optional: one line per set served
 *   fleet = { max_hosts = 10000; expire = "1h"; }; # optional: hosts' reports kept
 *   groups = (
 *     { name = "edge"; epoch = "1h"; decrypt_lifetime = "18h";
 *       origin = 0;   # Unix seconds, or an RFC 3339 UTC string
 *       allow = [ "uri:spiffe://fleet/edge/\*", "dns:*.edge.example" ]; }
 *   );
 *
 * Durations are integers with a unit: s, m, h or d ("90s", "18h", "2d").
 * Relative paths are relative to the config file's directory. A PIN in the
 * file (any setting named pin or so_pin) is an error: PINs come only from an
 * environment variable or --pin-file.
 */
#ifndef STEK_SERVER_CONFIG_H
#define STEK_SERVER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "kek.h"
#include "schedule.h"
#include "status.h"

/* next + current + ceil(L/P) past keys may not exceed this (88-byte blobs:
 * about 130 KiB per set at the limit). */
#define STEKD_MAX_KEYS_PER_SET 1024

typedef struct stekd_group_cfg {
    char name[STEK_GROUP_MAX_BYTES + 1];
    stek_sched sched; /* origin, epoch_s, lifetime_s (default 18 h) */
    char **allow;     /* typed patterns, checked with stekd_policy_check_pattern */
    size_t n_allow;
} stekd_group_cfg;

typedef struct stekd_config {
    char *path; /* the file it came from */
    char *listen;
    char *tls_cert;      /* PEM path */
    char *tls_key;       /* PEM path or a pkcs11: URI */
    char *tls_client_ca; /* PEM path: the fleet CA that issues host certificates */
    char *hsm_module;
    char *hsm_token;
    char *pin_env;             /* default "STEK_PIN" */
    char *so_pin_env;          /* default "STEK_SO_PIN" */
    unsigned max_jump;         /* default 2 */
    uint64_t heartbeat_s;      /* default 30 */
    uint64_t jitter_ms;        /* default 2000: spread of per-host work at a rotation */
    size_t max_request_bytes;  /* default 4096 */
    size_t wrap_cache_entries; /* default 10000 */
    size_t max_watchers;       /* default 10000 */
    char *metrics_listen;      /* host:port of the plain-HTTP /metrics; NULL: off */
    char *audit_log;           /* absolute path of the audit log; NULL: off */
    size_t fleet_max_hosts;    /* default 10000: hosts' reports kept (fleet.h) */
    uint64_t fleet_expire_s;   /* default 3600: a report is dropped after this */
    stekd_group_cfg *groups;
    size_t n_groups;
} stekd_config;

/*
 * Parses and validates the file. Returns STEK_OK and *out (free with
 * stekd_config_free); STEK_ERR_CONFIG with a detail "FILE:LINE: what is
 * wrong" (syntax error, unknown or missing setting, bad duration, bad group
 * name, duplicate group, bad pattern, a PIN in the file); STEK_ERR_IO when
 * the file cannot be read. Unknown settings are errors, so typos are loud.
 */
STEK_MUST_USE stek_status stekd_config_load(const char *path, stekd_config **out);

/* Frees the config. NULL is a no-op. */
void stekd_config_free(stekd_config *cfg);

/* The group named `name`, or NULL. */
const stekd_group_cfg *stekd_config_group(const stekd_config *cfg, const char *name);

/*
 * Parses a duration ("90s", "15m", "18h", "2d"; a bare integer is seconds).
 * Returns STEK_OK or STEK_ERR_CONFIG.
 */
STEK_MUST_USE stek_status stekd_parse_duration(const char *text, uint64_t *seconds);

#endif
