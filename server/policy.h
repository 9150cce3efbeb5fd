/*
 * Group access policy: which host identities may fetch a group's keys.
 *
 * A host's identity is a typed SAN of its mTLS certificate, as gRPC reports
 * it (peer_uri, peer_dns); there is no CN fallback. Patterns are typed too:
 *   "uri:spiffe://fleet/edge/\*"  '*' matches within one path segment
 *   "dns:*.edge.example"         '*' matches exactly one DNS label
 * Matching is fnmatch(3) with FNM_PATHNAME for URIs; DNS names compare
 * case-insensitively, with '.' as the separator '*' cannot cross.
 */
#ifndef STEK_SERVER_POLICY_H
#define STEK_SERVER_POLICY_H

#include <stdbool.h>
#include <stddef.h>

#include "status.h"

typedef enum stekd_id_type {
    STEKD_ID_URI,
    STEKD_ID_DNS,
} stekd_id_type;

/*
 * Checks a pattern's syntax: "uri:" or "dns:" then a non-empty pattern of
 * printable ASCII without spaces, at most 512 bytes; a DNS pattern's '*'
 * must be a whole label. Returns STEK_OK or STEK_ERR_CONFIG with a detail.
 */
STEK_MUST_USE stek_status stekd_policy_check_pattern(const char *pattern);

/* True when identity (type, value) matches pattern. A malformed pattern never matches. */
bool stekd_policy_match(const char *pattern, stekd_id_type type, const char *value);

/* True when the identity matches any of the n patterns. */
bool stekd_policy_allows(char *const *patterns, size_t n, stekd_id_type type, const char *value);

#endif
