/*
 * Shared by the stek-agent end-to-end tests: a real stekd (fx_stekd), real
 * nginx or HAProxy processes started on loopback under the test's temp dir,
 * one stek-agent per server, and `openssl s_client` resuming sessions.
 * int functions return 0 or -1 after printing "e2e: <why>", as fx.h's.
 */
#ifndef STEK_TESTS_E2E_H
#define STEK_TESTS_E2E_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "fx_stekd.h"

#define E2E_EPOCH_S 4
#define E2E_LIFETIME_S 8
#define E2E_GROUP "edge"

typedef enum e2e_outcome { E2E_FAILED, E2E_NEW, E2E_REUSED } e2e_outcome;

/* Fails (returns -1 with a clear message) when the binary is missing: never a skip. */
int e2e_require_binary(const char *path, const char *package);

/* A free loopback TCP port (bound to port 0, then closed). */
int e2e_free_port(void);

/* True once 127.0.0.1:port accepts a TCP connection (for fx_wait_until). */
bool e2e_port_open(void *port_ptr);

/* Unix time, with ms precision. */
double e2e_now(void);

/* Sleeps until the wall clock is `offset` seconds into the next epoch of d. */
void e2e_wait_epoch_offset(const fx_stekd *d, double offset);

/*
 * One `openssl s_client` (tls_flag "-tls1_2" or "-tls1_3") to 127.0.0.1:port,
 * sending one HTTP/1.0 request (so the server answers and closes; -ign_eof
 * makes s_client read until then, TLS 1.3 tickets included). sess_in and
 * sess_out may be NULL. The output goes to a new log in dir.
 */
e2e_outcome e2e_sclient(const char *dir, const char *ca, int port, const char *tls_flag,
                        const char *sess_in, const char *sess_out);

/* The log of the last e2e_sclient run. */
const char *e2e_last_log(void);

/* Counts lines of path containing needle; 0 when the file does not exist. */
int e2e_count_containing(const char *path, const char *needle);

/* Waits until path has at least `want` lines containing needle. */
int e2e_wait_log(const char *path, const char *needle, int want, int timeout_ms);

/* Counts "stek-<target>-e*.key" files in dir; -1 when dir cannot be read. */
int e2e_count_key_files(const char *dir, const char *target);

/* Reads a whole small file into a malloc'd NUL-terminated string, or NULL. */
char *e2e_read_file(const char *path);

/*
 * Writes an agent config to path: stekd settings for d with the host
 * certificate host, retry 200ms..1s, `extra_root` lines at the top level
 * (may be ""), and the targets text (the inside of targets = ( ... )).
 */
int e2e_write_agent_config(const char *path, const fx_stekd *d, const fx_cert *host,
                           const char *extra_root, const char *targets);

/* Starts stek-agent (STEK_AGENT_BIN) with its log at log_path. */
int e2e_start_agent(const char *config, const char *log_path, pid_t *pid);

/* Runs stek-agent with args to completion (up to timeout_ms); returns its exit code or -1. */
int e2e_run_agent(char *const args[], const char *log_path, int timeout_ms);

#endif
