/*
 * stekctl internals: the context every command gets, the one error-reporting
 * path, and the helpers the command files share. Not a library interface.
 */
#ifndef STEK_SERVER_STEKCTL_CMD_H
#define STEK_SERVER_STEKCTL_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "config.h"
#include "stek_p11.h"

typedef struct stekctl {
    const char *command; /* "init", "group add", ...: the prefix of every error line */
    const char *config_path;
    const char *pin_file;    /* --pin-file, or NULL for the config's hsm.pin_env */
    const char *so_pin_file; /* --so-pin-file, or NULL for hsm.so_pin_env */
    int64_t now;             /* Unix seconds: the clock, or --now */
    stekd_config *cfg;
    stek_p11 *p11; /* NULL until stekctl_open */
    bool reported; /* an error line was printed: main prints no second one */
} stekctl;

/*
 * Prints "stekctl: <command>: <what> (<status name>: <detail>)" to stderr,
 * once per run, and returns st. The detail is the thread's last
 * stek_error_detail, which names calls and CKR_ constants, never secrets.
 */
stek_status stekctl_fail(stekctl *c, stek_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A command-line mistake: reported like stekctl_fail, exit status 2. */
stek_status stekctl_usage(stekctl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Opens the token of the config (user PIN; SO PIN source too). Reports failures. */
STEK_MUST_USE stek_status stekctl_open(stekctl *c);

/* The configured group `name`; a group not in the config is a usage error (exit 2). */
STEK_MUST_USE stek_status stekctl_group(stekctl *c, const char *name, const stekd_group_cfg **out);

/* The epoch containing c->now for group g. Reports failures. */
STEK_MUST_USE stek_status stekctl_epoch_now(stekctl *c, const stekd_group_cfg *g, uint64_t *e);

/*
 * The newest generation record of group: *gen and *start, or *gen = 0 when
 * the group has none. Reports failures.
 */
STEK_MUST_USE stek_status stekctl_newest_generation(stekctl *c, const char *group, uint32_t *gen,
                                                    int64_t *start);

/*
 * Destroys every generation of group below `below` that has keys or a
 * record in the token; *destroyed counts keys. Reports failures.
 */
STEK_MUST_USE stek_status stekctl_destroy_generations_below(stekctl *c, const char *group,
                                                            uint32_t below, unsigned *destroyed);

/*
 * Writes data to path atomically: a temp file in the same directory with
 * the final mode, fsync, rename. Readers never see a partial file.
 */
STEK_MUST_USE stek_status stekctl_write_file(const char *path, const void *data, size_t len,
                                             mode_t mode);

/*
 * Reads a whole regular file of at most max bytes into *out (free()).
 * STEK_ERR_IO when unreadable, STEK_ERR_INVALID_ARG when larger than max.
 */
STEK_MUST_USE stek_status stekctl_read_file(const char *path, size_t max, uint8_t **out,
                                            size_t *len);

/* Formats t as RFC 3339 UTC ("2026-01-01T00:00:00Z"); "-" when out of range. */
void stekctl_rfc3339(int64_t t, char out[32]);

/* The commands; argv[0] is the command's name. Each reports its own errors. */
STEK_MUST_USE stek_status stekctl_cmd_keys(stekctl *c, int argc, char **argv);
STEK_MUST_USE stek_status stekctl_cmd_fetch(stekctl *c, int argc, char **argv);
STEK_MUST_USE stek_status stekctl_cmd_transport_create(stekctl *c, int argc, char **argv);
STEK_MUST_USE stek_status stekctl_cmd_export_chain(stekctl *c, int argc, char **argv);
STEK_MUST_USE stek_status stekctl_cmd_import_chain(stekctl *c, int argc, char **argv);
STEK_MUST_USE stek_status stekctl_cmd_fleet(stekctl *c, int argc, char **argv);

#endif
