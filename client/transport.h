/*
 * libstek's gRPC client side: every grpc_* call of the client lives in
 * transport.c (gRPC core is not a stable API; Debian 12 pins 1.51). Private
 * to libstek. This header needs no gRPC header: statuses are plain ints in
 * gRPC's numbering (grpc/status.h: 0 OK, 4 DEADLINE_EXCEEDED,
 * 7 PERMISSION_DENIED, 14 UNAVAILABLE, ...).
 *
 * A stek_transport is ONE channel to ONE stekd address with mutual TLS.
 * Failover across replicas is the caller's: one transport per address. The
 * channel connects lazily at the first call, so a refused connection or TLS
 * handshake shows up as that call's status (UNAVAILABLE), not at open.
 *
 * Results: a call that completed with a non-OK gRPC status, or could not
 * connect, returns STEK_ERR_IO and the gRPC status separately; the caller
 * decides what is retryable (UNAVAILABLE, DEADLINE_EXCEEDED) and what is not
 * (PERMISSION_DENIED, INVALID_ARGUMENT, UNAUTHENTICATED). The details text
 * is the server's short reason, never a secret.
 *
 * Threads: open and close from one thread. Between them, get, report and
 * watch_start may run concurrently on one transport (a gRPC channel is thread-safe, and
 * every call has its own completion queue). A watch stream is used by one
 * thread at a time. Every stream must be freed before its transport closes.
 *
 * Every wait is bounded: unary calls by their deadline, stream reads and
 * status waits by their timeout. Freeing cancels and collects every pending
 * completion (bounded too); if gRPC never hands one back, the call is leaked
 * with a logged error rather than freed under gRPC's feet.
 */
#ifndef STEK_CLIENT_TRANSPORT_H
#define STEK_CLIENT_TRANSPORT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "hostwrap.h"
#include "status.h"

#define STEK_METHOD_GET "/stek.v1.KeyService/GetKeySet"
#define STEK_METHOD_WATCH "/stek.v1.KeyService/WatchKeySet"
#define STEK_METHOD_REPORT "/stek.v1.KeyService/ReportStatus"
/* Largest answer accepted from the wire: well above STEK_ACCEPT_MAX_KEYS keys. */
#define STEK_TRANSPORT_MAX_MESSAGE_BYTES (1024 * 1024)
/* The gRPC status reported when a call never completed (no gRPC status at all). */
#define STEK_TRANSPORT_NO_STATUS (-1)

typedef struct stek_transport_opts {
    const char *target;      /* one replica, "host:port" (gRPC target syntax) */
    const char *ca_pem_path; /* the CA that issued stekd's certificate */
    /* The host's mTLS identity: certificate chain (PEM file) and its
     * private key, a PEM file or a pkcs11: URI. A PEM key is read into
     * locked memory and handed to gRPC, which keeps its own copy for the
     * channel's lifetime. A pkcs11: key is handed to gRPC as an engine key
     * string (stek_p11engine_grpc_key), which gRPC loads through libp11 when
     * it connects; the key never leaves the token. */
    const char *cert_pem_path;
    const char *key_pem_path;
    /* Optional: the name checked against stekd's certificate instead of the
     * target's host part (GRPC_SSL_TARGET_NAME_OVERRIDE_ARG). */
    const char *server_name_override;
    /* Optional: cap on gRPC's reconnect backoff, ms (0 = 5000). Kept short
     * because libstek does its own backoff with jitter across replicas; a
     * long internal one would fail calls fast long after stekd is back. */
    int max_reconnect_backoff_ms;
} stek_transport_opts;

typedef struct stek_transport stek_transport;
typedef struct stek_watch stek_watch;

/*
 * Reads the PEM files and creates the channel (no network yet). Returns
 * STEK_OK and *out (stek_transport_close); STEK_ERR_INVALID_ARG for a
 * missing option; STEK_ERR_IO when a file cannot be read (missing, empty,
 * over 1 MiB); STEK_ERR_NOMEM; STEK_ERR_CRYPTO when gRPC refuses the
 * credentials. Holds one grpc_init reference until closed.
 */
STEK_MUST_USE stek_status stek_transport_open(const stek_transport_opts *o, stek_transport **out);

/* Destroys the channel and drops the grpc_init reference. NULL is a no-op. */
void stek_transport_close(stek_transport *t);

/*
 * One GetKeySet call with the serialized request (stek_request_build),
 * bounded by timeout_ms (> 0), the call's gRPC deadline.
 *   STEK_OK: status OK with an answer; *resp (malloc'd, free()) and
 *     *resp_len hold the serialized KeySet, *grpc_status is 0.
 *   STEK_ERR_IO: the call ended without an answer: a non-OK status in
 *     *grpc_status (UNAVAILABLE when stekd is down or the handshake failed,
 *     DEADLINE_EXCEEDED, or the server's refusal), or
 *     STEK_TRANSPORT_NO_STATUS when gRPC never completed it.
 *   STEK_ERR_INVALID_ARG, STEK_ERR_NOMEM, STEK_ERR_INTERNAL (a gRPC API misuse).
 * details (may be NULL with dlen 0) gets the status details, NUL-terminated
 * and truncated; grpc_status may be NULL.
 */
STEK_MUST_USE stek_status stek_transport_get(stek_transport *t, const uint8_t *req, size_t len,
                                             int timeout_ms, uint8_t **resp, size_t *resp_len,
                                             int *grpc_status, char *details, size_t dlen);

/*
 * One ReportStatus call with a serialized request (stek_report_build),
 * bounded by timeout_ms (> 0), and given up (cancelled, within about 50 ms)
 * as soon as *cancel turns true (cancel may be NULL). Same results as
 * stek_transport_get, but the (empty) answer is not returned: STEK_OK
 * means status OK; a cancelled call is STEK_ERR_IO with status CANCELLED.
 */
STEK_MUST_USE stek_status stek_transport_report(stek_transport *t, const uint8_t *req, size_t len,
                                                int timeout_ms, const atomic_bool *cancel,
                                                int *grpc_status, char *details, size_t dlen);

/*
 * Starts a WatchKeySet stream: queues the request and the half-close
 * without waiting on the network. The stream has no overall deadline: it
 * lives until the server ends it or the caller frees it, and the caller's
 * read timeouts (heartbeats) are what notice a dead stream. Returns STEK_OK
 * and *out (stek_transport_watch_cancel_free); a stream that cannot connect
 * still starts, and its reads then return 0 with the reason in
 * stek_transport_watch_status. STEK_ERR_INVALID_ARG / NOMEM / INTERNAL.
 */
STEK_MUST_USE stek_status stek_transport_watch_start(stek_transport *t, const uint8_t *req,
                                                     size_t len, stek_watch **out);

/*
 * Waits up to timeout_ms for the next message of the stream.
 *   1: *msg (malloc'd, free(); a 1-byte allocation for an empty message)
 *      and *len hold one serialized KeySet;
 *   0: the stream has ended; stek_transport_watch_status tells how;
 *  -1: nothing within timeout_ms, or a local error (stek_error_detail
 *      says which). After a timeout the read stays queued, so the next
 *      call resumes waiting for the same message: a timeout does not break
 *      the stream.
 */
int stek_transport_watch_read(stek_watch *w, int timeout_ms, uint8_t **msg, size_t *len);

/*
 * Waits up to timeout_ms for the stream's final status. Returns STEK_OK
 * with *grpc_status and details once the call has ended; STEK_ERR_IO when
 * it has not ended within timeout_ms (*grpc_status is then
 * STEK_TRANSPORT_NO_STATUS). grpc_status and details may be NULL.
 */
STEK_MUST_USE stek_status stek_transport_watch_status(stek_watch *w, int timeout_ms,
                                                      int *grpc_status, char *details, size_t dlen);

/* Cancels the stream if still open, collects its completions and frees. NULL is a no-op. */
void stek_transport_watch_cancel_free(stek_watch *w);

/*
 * Builds a serialized stek.v1.GetKeySetRequest (WatchKeySetRequest has the
 * same fields and numbers, so the bytes serve both): group, eph's public
 * point, nonce, and the request signature by cert_key (the private key of
 * the mTLS certificate; stek_reqsig_sign: EC P-256/P-384 or RSA 2048..8192).
 * Returns STEK_OK with *out (malloc'd, free()) and *out_len;
 * STEK_ERR_INVALID_ARG for a bad group (stek_group_name_check), a nonce
 * outside 16..64 bytes, a NULL argument or an unsupported key;
 * STEK_ERR_NOMEM; STEK_ERR_CRYPTO.
 */
STEK_MUST_USE stek_status stek_request_build(const char *group, const stek_host_eph *eph,
                                             const uint8_t *nonce, size_t nonce_len,
                                             EVP_PKEY *cert_key, uint8_t **out, size_t *out_len);

/* ---- fleet reports (ReportStatus) ----------------------------------------- */

#define STEK_REPORT_MAX_NAMES 64 /* stekd refuses more */

/* A host's ticket counters (stek_counters' ticket fields). */
typedef struct stek_report_counters {
    uint64_t tickets_issued, tickets_stale, tickets_resumed, tickets_renewed;
    uint64_t miss_unknown, miss_expired, miss_other_generation, miss_other_group, miss_bad_mac;
    uint64_t no_key_encrypts;
} stek_report_counters;

/* What a host reports for one group. No key material: names only. */
typedef struct stek_report {
    const uint8_t *key_set_request; /* the group's signed request, as watched with */
    size_t key_set_request_len;
    uint64_t generation, current_epoch;             /* 0, 0: nothing installed yet */
    const uint8_t (*names)[STEK_TICKET_NAME_BYTES]; /* ascending epochs */
    size_t n_names;                                 /* <= STEK_REPORT_MAX_NAMES */
    stek_report_counters counters;
    uint32_t interval_s; /* the next periodic report, 1..3600 */
} stek_report;

/*
 * Serializes a stek.v1.ReportStatusRequest. Returns STEK_OK with *out
 * (malloc'd, free()) and *out_len; STEK_ERR_INVALID_ARG (no request, too
 * many names); STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stek_report_build(const stek_report *r, uint8_t **out, size_t *out_len);

#endif
