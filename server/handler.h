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
 *
 * A host's ReportStatus goes through the same validation (its embedded
 * key-set request), then into the fleet table (fleet.h).
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
    /* The verified client certificate as gRPC reports it (PEM, borrowed).
     * It is parsed only when a request is not already known to be valid. */
    const char *cert_pem;
    size_t cert_pem_len;
    const char *const *uris; /* URI SANs, as gRPC reports them (peer_uri) */
    size_t n_uris;
    const char *const *dns; /* DNS SANs (peer_dns) */
    size_t n_dns;
} stekd_peer;

typedef struct stekd_vcache stekd_vcache;
typedef struct stekd_metrics stekd_metrics; /* metrics.h */
typedef struct stekd_audit stekd_audit;     /* audit.h */
typedef struct stekd_fleet stekd_fleet;     /* fleet.h */
typedef struct stekd_fleet_group stekd_fleet_group;

typedef struct stekd_handler {
    const stekd_config *cfg;
    stek_p11 *p11;
    stekd_state *state;
    stekd_cache *cache;
    stekd_vcache *vcache;   /* validated requests; NULL disables */
    stekd_metrics *metrics; /* NULL: no metrics */
    stekd_audit *audit;     /* NULL: no audit log */
    stekd_fleet *fleet;     /* hosts' reports; NULL: reports are answered, not kept */
} stekd_handler;

/*
 * The validated-request cache. A host that keeps its ephemeral key resends
 * the same signed request bytes; once they passed every check for one
 * client certificate, the same (certificate, bytes) pair is valid again
 * (policy and schedule do not depend on the request), so a repeat skips
 * certificate parsing, the point check and the signature check. Keyed on
 * SHA-256(certificate PEM || request bytes): any other byte, a bad
 * signature included, misses. Direct-mapped, `entries` slots, entries older
 * than STEKD_KEYSET_MAX_AGE_S are ignored. Only successes are stored.
 */
#define STEKD_VCACHE_ENTRIES 4096
STEK_MUST_USE stek_status stekd_vcache_new(size_t entries, stekd_vcache **out);
void stekd_vcache_free(stekd_vcache *v);

/* A validated request, kept by a watch stream to build later sets. */
#define STEKD_CERT_SHA256_BYTES 32

typedef struct stekd_request {
    char group[STEK_GROUP_MAX_BYTES + 1];
    char identity[STEKD_IDENTITY_MAX];
    uint8_t eph_pub[STEK_P256_POINT_BYTES];
    uint8_t nonce[STEK_NONCE_MAX_BYTES];
    size_t nonce_len;
    uint8_t cert_sha256[STEKD_CERT_SHA256_BYTES]; /* of the client certificate's DER, for audit */
} stekd_request;

typedef struct stekd_reply {
    grpc_status_code code;
    char details[256]; /* for the status; never a secret */
    stekd_keyset *ks;  /* on GRPC_STATUS_OK: the set to send (a reference) */
    /* On GRPC_STATUS_OK, what the set holds (for the audit log). */
    uint32_t generation;
    uint64_t epoch_first, epoch_last, epoch_current;
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

/* Fills *out as the OK reply sending ks, a set built from v (takes the
 * caller's reference to ks). */
void stekd_reply_ok(const stekd_view *v, stekd_keyset *ks, stekd_reply *out);

/*
 * Builds req's set from `staged` (a published view's staged view: what the
 * next epoch will serve) ahead of the boundary, for a watch stream to send
 * once a published view is the same as `staged` (stekd_view_same). Not
 * cached: it goes to one stream once. Returns STEK_OK and *out (release
 * with stekd_keyset_unref), or the HSM's error; the caller then builds at
 * the boundary as before.
 */
STEK_MUST_USE stek_status stekd_handle_stage(const stekd_handler *h, const stekd_request *req,
                                             const stekd_view *staged, stekd_keyset **out);

/*
 * One ReportStatusRequest from peer (connection address peer_addr, may be
 * ""). Its key_set_request is validated by stekd_handle_validate, so a
 * report gets exactly GetKeySet's checks and statuses (and a host that
 * resends its watch request costs no signature check); then the report's
 * own fields (INVALID_ARGUMENT: a key name that is not 16 bytes, more than
 * STEKD_FLEET_MAX_NAMES, an interval outside 1..3600 s, a generation
 * beyond 32 bits). It is filed in h->fleet under the validated group and
 * identity: a host can only ever report for itself. Never
 * RESOURCE_EXHAUSTED: a full table evicts. Returns GRPC_STATUS_OK or the
 * refusal, with details.
 */
grpc_status_code stekd_handle_report(const stekd_handler *h, const stekd_peer *peer,
                                     const char *peer_addr, const uint8_t *bytes, size_t len,
                                     char *details, size_t details_len);

/*
 * Where `group` stands at now, for judging its hosts (fleet.h): its
 * current epoch and generation from its view, or from the schedule alone
 * while the view is unavailable. False when the group is not configured.
 */
bool stekd_handle_fleet_group(const stekd_handler *h, const char *group, int64_t now,
                              stekd_fleet_group *out);

#endif
