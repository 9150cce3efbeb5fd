/*
 * The request signature: a host proves, with its mTLS certificate key, that
 * the ephemeral key and nonce in a request are its own. The signing input is
 * never a protobuf serialization:
 *
 *   "stek-req-v1" || u32be(len(group)) || group
 *                 || u32be(len(eph_pub)) || eph_pub
 *                 || u32be(len(nonce)) || nonce
 *
 * SHA-256 for every key type: ECDSA signatures are DER; RSA uses RSASSA-PSS
 * with MGF1-SHA-256 and a 32-byte salt. Shared by hosts (sign) and stekd
 * (verify against the peer certificate's public key).
 */
#ifndef STEK_COMMON_REQSIG_H
#define STEK_COMMON_REQSIG_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#include "status.h"

#define STEK_REQ_CONTEXT "stek-req-v1"
#define STEK_NONCE_MIN_BYTES 16
#define STEK_NONCE_MAX_BYTES 64
#define STEK_REQSIG_MAX_BYTES 1024 /* RSA-8192 PSS is 1024 bytes */

/*
 * Builds the signing input. Returns STEK_OK and *msg (free()) with *len, or
 * STEK_ERR_INVALID_ARG (NULL with a nonzero length, a field over 65535
 * bytes) / STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stek_reqsig_input(const char *group, const uint8_t *eph_pub,
                                            size_t eph_len, const uint8_t *nonce,
                                            size_t nonce_len, uint8_t **msg, size_t *len);

/*
 * Signs the request with the host's certificate key: EC P-256 or P-384
 * (named curves), or RSA of 2048 to 8192 bits. Returns STEK_OK with *sig
 * (free()) and *sig_len; STEK_ERR_INVALID_ARG for any other key (other
 * curves, RSA-PSS-only keys, Ed25519, ...); STEK_ERR_CRYPTO.
 */
STEK_MUST_USE stek_status stek_reqsig_sign(EVP_PKEY *key, const char *group,
                                           const uint8_t *eph_pub, size_t eph_len,
                                           const uint8_t *nonce, size_t nonce_len, uint8_t **sig,
                                           size_t *sig_len);

/*
 * Verifies sig with the peer certificate's public key. Returns STEK_OK;
 * STEK_ERR_VERIFY when the signature does not verify (wrong key, wrong
 * input, wrong padding or salt, garbage, empty); STEK_ERR_INVALID_ARG for
 * NULL arguments or an unsupported key type (as for signing);
 * STEK_ERR_CRYPTO when OpenSSL cannot set up. Never crashes on any bytes.
 * The nonce bounds below are the server's to enforce, not this function's.
 */
STEK_MUST_USE stek_status stek_reqsig_verify(EVP_PKEY *pub, const char *group,
                                             const uint8_t *eph_pub, size_t eph_len,
                                             const uint8_t *nonce, size_t nonce_len,
                                             const uint8_t *sig, size_t sig_len);

#endif
