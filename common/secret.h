/*
 * Secret memory: page-backed buffers that are mlocked (never swapped),
 * excluded from core dumps (MADV_DONTDUMP), and cleansed before they are
 * unlocked and unmapped. PINs, host ephemeral keys and unwrapped ticket keys
 * live only in these.
 *
 * Also the comparisons secrets need: constant time, and an all-zero check
 * (an all-zero key is treated as no key at all).
 */
#ifndef STEK_COMMON_SECRET_H
#define STEK_COMMON_SECRET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct stek_secret stek_secret;

#define STEK_SECRET_MAX_BYTES (1u << 20)

/*
 * Allocates a zeroed, locked, dump-excluded buffer of len bytes
 * (0 < len <= STEK_SECRET_MAX_BYTES). Returns STEK_OK and *out, which the
 * caller frees with stek_secret_free; STEK_ERR_INVALID_ARG for a bad len;
 * STEK_ERR_NOMEM when mapping or mlock fails (RLIMIT_MEMLOCK). The buffer is
 * never handed out unlocked. *out is NULL on any failure.
 * (Under ASan, mlock is intercepted and does nothing.)
 */
STEK_MUST_USE stek_status stek_secret_new(size_t len, stek_secret **out);

/* The buffer's bytes and length. s must not be NULL. */
uint8_t *stek_secret_data(stek_secret *s);
const uint8_t *stek_secret_cdata(const stek_secret *s);
size_t stek_secret_len(const stek_secret *s);

/*
 * Shrinks the logical length to len (<= the current length), cleansing the
 * bytes cut off. Returns STEK_ERR_INVALID_ARG when len is longer.
 */
STEK_MUST_USE stek_status stek_secret_truncate(stek_secret *s, size_t len);

/* Cleanses, unlocks and unmaps. NULL is a no-op. */
void stek_secret_free(stek_secret *s);

/* Cleanses len bytes in a way the compiler cannot elide. */
void stek_cleanse(void *p, size_t len);

/* Constant-time equality of two len-byte regions. */
bool stek_ct_equal(const void *a, const void *b, size_t len);

/* Constant-time test for an all-zero region (a zero key is no key). */
bool stek_ct_is_zero(const void *p, size_t len);

#endif
