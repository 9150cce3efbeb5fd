/*
 * stek's one error type, and the guard macros that keep call sites linear.
 *
 * Every internal function that can fail returns a stek_status marked
 * STEK_MUST_USE, so a forgotten check is a compile error under -Werror.
 * The code says *what* failed; a thread-local detail string says *why*
 * (for example "C_Login: CKR_PIN_INCORRECT"). The detail never holds
 * secret material: callers pass names, sizes and return-value names only.
 */
#ifndef STEK_COMMON_STATUS_H
#define STEK_COMMON_STATUS_H

#include <stdbool.h>
#include <stddef.h>

#define STEK_MUST_USE __attribute__((warn_unused_result))

typedef enum stek_status {
    STEK_OK = 0,
    STEK_ERR_INVALID_ARG,     /* caller passed something out of contract */
    STEK_ERR_NOMEM,           /* allocation or mlock failed */
    STEK_ERR_IO,              /* file system or process error */
    STEK_ERR_CONFIG,          /* configuration or environment is wrong */
    STEK_ERR_MODULE_LOAD,     /* PKCS#11 module missing or not a module */
    STEK_ERR_TOKEN_NOT_FOUND, /* no token with the configured label */
    STEK_ERR_PIN_MISSING,     /* no PIN in the named variable or file */
    STEK_ERR_PIN_INCORRECT,   /* the token rejected the PIN; never retried */
    STEK_ERR_PIN_LOCKED,      /* the token locked the PIN */
    STEK_ERR_HSM_UNAVAILABLE, /* token or session gone; retry later */
    STEK_ERR_HSM,             /* any other PKCS#11 failure */
    STEK_ERR_NOT_FOUND,       /* an expected object does not exist */
    STEK_ERR_EXISTS,          /* the object to create already exists */
    STEK_ERR_NOT_WRAPPABLE,   /* the wrapping key is not trusted for that key */
    STEK_ERR_BAD_POINT,       /* an EC point is malformed or off the curve */
    STEK_ERR_CRYPTO,          /* an OpenSSL primitive failed */
    STEK_ERR_VERIFY,          /* integrity check failed (unwrap, signature) */
    STEK_ERR_INTERNAL,        /* an invariant broke: a bug */
    STEK_STATUS_COUNT
} stek_status;

/* Returns the constant name of a status ("STEK_ERR_PIN_INCORRECT"). Never NULL. */
const char *stek_status_name(stek_status st);

/*
 * Records st with a printf-style detail in this thread's error slot and
 * returns st, so it can be the operand of a return statement.
 */
stek_status stek_error_set(stek_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* This thread's last detail string. Valid until the next stek_error_set. */
const char *stek_error_detail(void);

/* Clears this thread's error slot. */
void stek_error_clear(void);

/*
 * Deliberately drops a status: cleanup paths whose failure changes nothing
 * (destroying an ephemeral object, closing a session). A (void) cast does
 * not silence warn_unused_result in GCC, and should not look that easy.
 */
static inline void stek_status_ignore(stek_status st)
{
    (void)st;
}
#define STEK_IGNORE(expr) stek_status_ignore(expr)

/* Propagate a failure unchanged. */
#define STEK_GUARD(expr)                                                                           \
    do {                                                                                           \
        stek_status stek_guard_st_ = (expr);                                                       \
        if (stek_guard_st_ != STEK_OK)                                                             \
            return stek_guard_st_;                                                                 \
    } while (0)

/* Fail with err (and the condition's text as detail) unless cond holds. */
#define STEK_ENSURE(cond, err)                                                                     \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return stek_error_set((err), "%s:%d: %s", __FILE__, __LINE__, #cond);                  \
    } while (0)

/* Fail with err and a formatted detail. */
#define STEK_BAIL(err, ...) return stek_error_set((err), __VA_ARGS__)

/* Argument checks: the common case of STEK_ENSURE. */
#define STEK_ENSURE_REF(p) STEK_ENSURE((p) != NULL, STEK_ERR_INVALID_ARG)

/*
 * Forms for functions with a single `done:` cleanup label: they record the
 * status in `st` (which must be declared) and jump to done.
 */
#define STEK_GUARD_GOTO(expr)                                                                      \
    do {                                                                                           \
        st = (expr);                                                                               \
        if (st != STEK_OK)                                                                         \
            goto done;                                                                             \
    } while (0)

#define STEK_ENSURE_GOTO(cond, err)                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            st = stek_error_set((err), "%s:%d: %s", __FILE__, __LINE__, #cond);                    \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

#define STEK_BAIL_GOTO(err, ...)                                                                   \
    do {                                                                                           \
        st = stek_error_set((err), __VA_ARGS__);                                                   \
        goto done;                                                                                 \
    } while (0)

#endif
