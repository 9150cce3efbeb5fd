/*
 * The key-encryption-key contract shared by the HSM side (pkcs11/) and the
 * host side (common/hostwrap.c). Both must produce the same bytes, so the
 * layouts live in one place.
 *
 *   Z    = ECDH(P-256) shared x-coordinate, 32 bytes (CKD_NULL)
 *   ctx  = hsm_pub(65) || host_pub(65) || u8 len(group) || group
 *          || u32be generation || "stek-kek-v1"
 *   iv   = SHA-256(ctx)[0:16]
 *   KEK  = AES-256-CBC(key = Z, iv, label blocks), no padding, 32 bytes
 *          (CKM_AES_CBC_ENCRYPT_DATA in the HSM); CBC chaining makes both
 *          halves of the KEK depend on ctx.
 *   blob = AES-256-KWP(KEK, ticket key)   (RFC 5649, CKM_AES_KEY_WRAP_PAD)
 *
 * The two label blocks are "stek-kek-v1" followed by zero bytes, with the
 * block index (0, 1) in the last byte, so they differ from each other.
 */
#ifndef STEK_COMMON_KEK_H
#define STEK_COMMON_KEK_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define STEK_P256_POINT_BYTES 65 /* uncompressed: 0x04 || X || Y */
#define STEK_ECDH_Z_BYTES 32
#define STEK_KEK_BYTES 32
#define STEK_KEK_IV_BYTES 16
#define STEK_KEK_LABEL_BYTES 32
#define STEK_TICKET_NAME_BYTES 16
#define STEK_TICKET_HMAC_BYTES 32
#define STEK_TICKET_AES_BYTES 32
/* Laid out name | hmac | aes, as OpenSSL and nginx use it. */
#define STEK_TICKET_KEY_BYTES                                                                      \
    (STEK_TICKET_NAME_BYTES + STEK_TICKET_HMAC_BYTES + STEK_TICKET_AES_BYTES)
/* RFC 5649 output for an 80-byte key: one 8-byte integrity block more. */
#define STEK_WRAPPED_KEY_BYTES (STEK_TICKET_KEY_BYTES + 8)
#define STEK_GROUP_MAX_BYTES 64
/* The ticket key name is HMAC-SHA256(K, this)[0:16] (see stek_p11_ticket_names). */
#define STEK_TICKET_NAME_LABEL "stek-name-v1"
#define STEK_KEK_CONTEXT_LABEL "stek-kek-v1"

/*
 * Checks that pt is an uncompressed P-256 point on the curve and not the
 * point at infinity. Returns STEK_OK, STEK_ERR_BAD_POINT with a detail
 * naming the defect (length, prefix, coordinate range, not on curve), or
 * STEK_ERR_CRYPTO when OpenSSL cannot allocate. Never crashes on any input,
 * including NULL with len 0.
 */
STEK_MUST_USE stek_status stek_p256_point_check(const uint8_t *pt, size_t len);

/*
 * Checks a group name: 1..STEK_GROUP_MAX_BYTES bytes of [a-z0-9._-].
 * Returns STEK_OK or STEK_ERR_INVALID_ARG.
 */
STEK_MUST_USE stek_status stek_group_name_check(const char *group);

/*
 * Computes iv = SHA-256(ctx)[0:16] for the context above. The group must
 * pass stek_group_name_check. Returns STEK_OK, STEK_ERR_INVALID_ARG or
 * STEK_ERR_CRYPTO.
 */
STEK_MUST_USE stek_status stek_kek_iv(const uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                                      const uint8_t host_pub[STEK_P256_POINT_BYTES],
                                      const char *group, uint32_t generation,
                                      uint8_t iv[STEK_KEK_IV_BYTES]);

/* Writes the two fixed label blocks. */
void stek_kek_label_blocks(uint8_t out[STEK_KEK_LABEL_BYTES]);

#endif
