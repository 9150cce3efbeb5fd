/*
 * One key-set request, from raw bytes and the mTLS peer to a gRPC status and
 * a signed set. No gRPC calls here (only its status codes): rpc.c owns the
 * transport and hands over the peer's certificate and typed SANs.
 *
 * Order of checks, each with its status:
 *   malformed protobuf, empty or oversized group, bad nonce  INVALID_ARGUMENT
 *   certificate without EKU clientAuth                       PERMISSION_DENIED
 *   no typed SAN allowed for the group (known or not)        PERMISSION_DENIED
 *   eph_pub not an uncompressed P-256 point                  FAILED_PRECONDITION
 *   request signature not by the peer certificate's key      UNAUTHENTICATED
 *   HSM unavailable, or the schedule refused a jump          UNAVAILABLE
 */
#ifndef STEK_SERVER_HANDLER_H
#define STEK_SERVER_HANDLER_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/status.h>
#include <openssl/x509.h>

#include "keyset.h"
#include "reqsig.h"
#include "state.h"

#define STEKD_IDENTITY_MAX 600

typedef struct stekd_peer {
    X509 *cert;              /* the verified client certificate (borrowed) */
    const char *const *uris; /* URI SANs, as gRPC reports them (peer_uri) */
    size_t n_uris;
    const char *const *dns; /* DNS SANs (peer_dns) */
    size_t n_dns;
} stekd_peer;

typedef struct stekd_handler {
    const stekd_config *cfg;
    stek_p11 *p11;
    stekd_state *state;
    stekd_cache *cache;
} stekd_handler;

/* A validated request, kept by a watch stream to build later sets. */
typedef struct stekd_request {
    char group[STEK_GROUP_MAX_BYTES + 1];
    char identity[STEKD_IDENTITY_MAX];
    uint8_t eph_pub[STEK_P256_POINT_BYTES];
    uint8_t nonce[STEK_NONCE_MAX_BYTES];
    size_t nonce_len;
} stekd_request;

typedef struct stekd_reply {
    grpc_status_code code;
    char details[256]; /* for the status; never a secret */
    stekd_keyset *ks;  /* on GRPC_STATUS_OK: the set to send (a reference) */
} stekd_reply;

/*
 * Validates a GetKeySetRequest or WatchKeySetRequest (same layout) from peer
 * and fills *req. Returns GRPC_STATUS_OK, or the status for the first failed
 * check with details.
 */
grpc_status_code stekd_handle_validate(const stekd_handler *h, const stekd_peer *peer,
                                       const uint8_t *bytes, size_t len, stekd_request *req,
                                       char *details, size_t details_len);

/*
 * Builds (or takes from the cache) the current set for a validated request.
 * Fills out->code and, on OK, out->ks (release with stekd_keyset_unref).
 * *version, if not NULL, gets the view version the set came from.
 */
void stekd_handle_keyset(const stekd_handler *h, const stekd_request *req, stekd_reply *out,
                         uint64_t *version);

/* The version of the group's current view (0 when unknown). */
uint64_t stekd_handle_view_version(const stekd_handler *h, const char *group);

#endif
