/*
 * Host side of the per-host wrapping (see kek.h): the in-memory ephemeral
 * P-256 key, the KEK recomputed with OpenSSL, and the RFC 5649 unwrap.
 * Pure OpenSSL, so the client library and the tests share it without ever
 * linking the PKCS#11 layer.
 *
 * The ephemeral private key is an OpenSSL EVP_PKEY; a process that calls
 * CRYPTO_secure_malloc_init first gets its scalar in OpenSSL's locked,
 * dump-excluded secure heap. Derived KEKs and unwrapped keys are stek_secret.
 */
#ifndef STEK_COMMON_HOSTWRAP_H
#define STEK_COMMON_HOSTWRAP_H

#include <stddef.h>
#include <stdint.h>

#include "kek.h"
#include "secret.h"
#include "status.h"

typedef struct stek_host_eph stek_host_eph;

/*
 * Generates a fresh P-256 key pair in memory. Returns STEK_OK and *out
 * (free with stek_host_eph_free), or STEK_ERR_CRYPTO / STEK_ERR_NOMEM.
 */
STEK_MUST_USE stek_status stek_host_eph_generate(stek_host_eph **out);

/* Writes the uncompressed public point. Returns STEK_OK or STEK_ERR_CRYPTO. */
STEK_MUST_USE stek_status stek_host_eph_public(const stek_host_eph *eph,
                                               uint8_t out[STEK_P256_POINT_BYTES]);

/* Frees the key pair (OpenSSL clears the private scalar). NULL is a no-op. */
void stek_host_eph_free(stek_host_eph *eph);

/*
 * Recomputes the KEK for one key set: ECDH(eph, hsm_pub) then the CBC
 * derivation of kek.h. hsm_pub is checked with stek_p256_point_check first.
 * Returns STEK_OK and *kek (STEK_KEK_BYTES, free with stek_secret_free);
 * STEK_ERR_BAD_POINT for an invalid hsm_pub; STEK_ERR_INVALID_ARG for a bad
 * group or a NULL argument; STEK_ERR_CRYPTO when OpenSSL fails.
 */
STEK_MUST_USE stek_status stek_host_kek_derive(const stek_host_eph *eph, const uint8_t *hsm_pub,
                                               size_t hsm_pub_len, const char *group,
                                               uint32_t generation, stek_secret **kek);

/*
 * Unwraps one RFC 5649 blob (exactly STEK_WRAPPED_KEY_BYTES: profile 1
 * keys are 80 bytes) under kek into a new secret of STEK_TICKET_KEY_BYTES.
 * Returns STEK_OK and *key (free with stek_secret_free); STEK_ERR_VERIFY
 * when the integrity check fails, a length is wrong, or the key is all
 * zeros; STEK_ERR_INVALID_ARG for a NULL argument or a KEK that is not
 * STEK_KEK_BYTES long. *key is NULL on failure.
 */
STEK_MUST_USE stek_status stek_host_unwrap(const stek_secret *kek, const uint8_t *blob,
                                           size_t blob_len, stek_secret **key);

/*
 * Computes a ticket key's name from its unwrapped 80 bytes:
 * HMAC-SHA256(key, STEK_TICKET_NAME_LABEL)[0:16], the same value the HSM
 * computes (stek_p11_ticket_names). Returns STEK_OK, STEK_ERR_INVALID_ARG for
 * a NULL argument or a key that is not STEK_TICKET_KEY_BYTES long, or
 * STEK_ERR_CRYPTO.
 */
STEK_MUST_USE stek_status stek_host_ticket_name(const stek_secret *key,
                                                uint8_t name[STEK_TICKET_NAME_BYTES]);

#endif
