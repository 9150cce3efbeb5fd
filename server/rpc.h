/*
 * stekd's gRPC transport (gRPC core 1.51, which is not a stable API: every
 * grpc_* call of the server lives in rpc.c). Mutual TLS with required,
 * verified client certificates; KeyService/GetKeySet, KeyService/WatchKeySet,
 * KeyService/ReportStatus and grpc.health.v1.Health/Check.
 */
#ifndef STEK_SERVER_RPC_H
#define STEK_SERVER_RPC_H

#include "handler.h"

typedef struct stekd_rpc stekd_rpc;

/*
 * Binds cfg->listen with the TLS settings of cfg and starts serving with
 * `threads` completion-queue threads. h (and everything it points to) must
 * outlive the server. Returns STEK_OK and *out; STEK_ERR_CONFIG for
 * unreadable certificates or keys, STEK_ERR_IO when the address cannot be
 * bound. Registers itself as h->state's listener so rotations reach watch
 * streams.
 */
STEK_MUST_USE stek_status stekd_rpc_start(const stekd_handler *h, unsigned threads,
                                          stekd_rpc **out);

/* The bound port (useful with "host:0"). */
int stekd_rpc_port(const stekd_rpc *r);

typedef struct stekd_rpc_stats {
    unsigned long watchers; /* open watch streams */
    unsigned long sets_sent, heartbeats_sent;
    unsigned long sets_staged; /* sets built ahead of a rotation */
    unsigned long staged_sent; /* of sets_sent, those built ahead */
} stekd_rpc_stats;

void stekd_rpc_get_stats(stekd_rpc *r, stekd_rpc_stats *out);

/*
 * Stops: ends watch streams with OK, lets in-flight calls finish for up to
 * grace_ms, cancels the rest, and frees everything. NULL is a no-op.
 */
void stekd_rpc_stop(stekd_rpc *r, int grace_ms);

#endif
