/*
 * Private to pkcs11/ (and its tests): the KDF block layout and the key
 * listing the chain, wrap and admin modules share.
 */
#ifndef STEK_PKCS11_P11_CHAIN_H
#define STEK_PKCS11_P11_CHAIN_H

#include "p11_internal.h"

#define P11_TICKET_BLOCKS 5     /* 80 bytes: name | hmac | aes */
#define P11_CHAIN_BLOCKS 2      /* 32 bytes: the next AES-256 chain key */
#define P11_PURPOSE_TICKET 0x4b /* 'K' */
#define P11_PURPOSE_CHAIN 0x52  /* 'R' */

/*
 * Builds the seven input blocks of one ratchet step for (g,n,e). Each block
 * is purpose(1) | index(1) | SHA-256("stek-group-v1" || g)[0:4] |
 * u32be(n) | u48be(e). Fails with STEK_ERR_INTERNAL if any two blocks are
 * equal (ECB would then give equal outputs), STEK_ERR_INVALID_ARG for a bad
 * group or an epoch of 2^48 or more.
 */
STEK_MUST_USE stek_status p11_kdf_blocks(const char *group, uint32_t generation, uint64_t epoch,
                                         uint8_t ticket[P11_TICKET_BLOCKS * 16],
                                         uint8_t chain[P11_CHAIN_BLOCKS * 16]);

typedef struct p11_keyobj {
    CK_OBJECT_HANDLE h;
    uint8_t id[P11_ID_BYTES];
    uint64_t epoch;
} p11_keyobj;

/*
 * Lists the secret keys labelled `label` whose CKA_ID has stek's shape,
 * sorted by CKA_ID (so by epoch, then by the random tail). *out is freed
 * with free(); it may be NULL with *count 0.
 */
STEK_MUST_USE stek_status p11_keys_list(p11_sess *s, const char *label, p11_keyobj **out,
                                        size_t *count);

/*
 * Maps each epoch to its surviving ticket key of (g,n) with one listing.
 * Retries briefly when a racing writer hides a key. Returns STEK_OK with *out
 * (n handles, free()), or STEK_ERR_NOT_FOUND naming the missing epoch.
 */
STEK_MUST_USE stek_status p11_tickets_resolve(p11_sess *s, const char *group, uint32_t generation,
                                              const uint64_t *epochs, size_t n,
                                              CK_OBJECT_HANDLE **out);

#endif
