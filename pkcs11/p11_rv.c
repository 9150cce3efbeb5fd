/*
 * CK_RV names and their mapping to stek_status: the reason no CK_RV ever
 * leaves pkcs11/. Messages carry CKR_ names, never bare numbers.
 */
#include <stdio.h>
#include <time.h>

#include "log.h"
#include "p11_internal.h"

#define RV(x)                                                                                      \
    {                                                                                              \
        x, #x                                                                                      \
    }
static const struct {
    CK_RV rv;
    const char *name;
} rv_names[] = {
    RV(CKR_OK),
    RV(CKR_CANCEL),
    RV(CKR_HOST_MEMORY),
    RV(CKR_SLOT_ID_INVALID),
    RV(CKR_GENERAL_ERROR),
    RV(CKR_FUNCTION_FAILED),
    RV(CKR_ARGUMENTS_BAD),
    RV(CKR_ATTRIBUTE_READ_ONLY),
    RV(CKR_ATTRIBUTE_SENSITIVE),
    RV(CKR_ATTRIBUTE_TYPE_INVALID),
    RV(CKR_ATTRIBUTE_VALUE_INVALID),
    RV(CKR_DATA_INVALID),
    RV(CKR_DATA_LEN_RANGE),
    RV(CKR_DEVICE_ERROR),
    RV(CKR_DEVICE_MEMORY),
    RV(CKR_DEVICE_REMOVED),
    RV(CKR_ENCRYPTED_DATA_INVALID),
    RV(CKR_ENCRYPTED_DATA_LEN_RANGE),
    RV(CKR_FUNCTION_NOT_SUPPORTED),
    RV(CKR_KEY_HANDLE_INVALID),
    RV(CKR_KEY_SIZE_RANGE),
    RV(CKR_KEY_TYPE_INCONSISTENT),
    RV(CKR_KEY_FUNCTION_NOT_PERMITTED),
    RV(CKR_KEY_NOT_WRAPPABLE),
    RV(CKR_KEY_UNEXTRACTABLE),
    RV(CKR_MECHANISM_INVALID),
    RV(CKR_MECHANISM_PARAM_INVALID),
    RV(CKR_OBJECT_HANDLE_INVALID),
    RV(CKR_OPERATION_ACTIVE),
    RV(CKR_OPERATION_NOT_INITIALIZED),
    RV(CKR_PIN_INCORRECT),
    RV(CKR_PIN_INVALID),
    RV(CKR_PIN_LEN_RANGE),
    RV(CKR_PIN_EXPIRED),
    RV(CKR_PIN_LOCKED),
    RV(CKR_SESSION_CLOSED),
    RV(CKR_SESSION_COUNT),
    RV(CKR_SESSION_HANDLE_INVALID),
    RV(CKR_SESSION_READ_ONLY),
    RV(CKR_SESSION_EXISTS),
    RV(CKR_SIGNATURE_INVALID),
    RV(CKR_SIGNATURE_LEN_RANGE),
    RV(CKR_TEMPLATE_INCOMPLETE),
    RV(CKR_TEMPLATE_INCONSISTENT),
    RV(CKR_TOKEN_NOT_PRESENT),
    RV(CKR_TOKEN_NOT_RECOGNIZED),
    RV(CKR_TOKEN_WRITE_PROTECTED),
    RV(CKR_UNWRAPPING_KEY_HANDLE_INVALID),
    RV(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT),
    RV(CKR_USER_ALREADY_LOGGED_IN),
    RV(CKR_USER_NOT_LOGGED_IN),
    RV(CKR_USER_PIN_NOT_INITIALIZED),
    RV(CKR_USER_TYPE_INVALID),
    RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
    RV(CKR_WRAPPED_KEY_INVALID),
    RV(CKR_WRAPPED_KEY_LEN_RANGE),
    RV(CKR_WRAPPING_KEY_HANDLE_INVALID),
    RV(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
    RV(CKR_BUFFER_TOO_SMALL),
    RV(CKR_CRYPTOKI_NOT_INITIALIZED),
    RV(CKR_CRYPTOKI_ALREADY_INITIALIZED),
};
#undef RV

const char *p11_rv_name(CK_RV rv)
{
    static _Thread_local char unknown[32];
    for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++)
        if (rv_names[i].rv == rv)
            return rv_names[i].name;
    snprintf(unknown, sizeof(unknown), "CKR_0x%lx", (unsigned long)rv);
    return unknown;
}

/* Errors after which the token, or our view of it, cannot be trusted. */
static bool rv_means_lost(CK_RV rv)
{
    switch (rv) {
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
        return true;
    default:
        return false;
    }
}

static stek_status rv_status(CK_RV rv)
{
    if (rv_means_lost(rv))
        return STEK_ERR_HSM_UNAVAILABLE;
    switch (rv) {
    case CKR_OK:
        return STEK_OK;
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
        return STEK_ERR_NOMEM;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
        return STEK_ERR_PIN_INCORRECT;
    case CKR_PIN_LOCKED:
        return STEK_ERR_PIN_LOCKED;
    case CKR_KEY_NOT_WRAPPABLE:
    case CKR_KEY_UNEXTRACTABLE:
        return STEK_ERR_NOT_WRAPPABLE;
    case CKR_ARGUMENTS_BAD:
    case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_DATA_INVALID:
    case CKR_DATA_LEN_RANGE:
        return STEK_ERR_INVALID_ARG;
    case CKR_KEY_HANDLE_INVALID:
    case CKR_OBJECT_HANDLE_INVALID:
        return STEK_ERR_NOT_FOUND;
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_SIGNATURE_INVALID:
        return STEK_ERR_VERIFY;
    default:
        return STEK_ERR_HSM;
    }
}

stek_status p11_rv(stek_p11 *p11, const char *call, CK_RV rv)
{
    if (stek_log_enabled(STEK_LOG_DEBUG))
        stek_log(STEK_LOG_DEBUG, "pkcs11", "%s -> %s", call, p11_rv_name(rv));
    if (rv == CKR_OK)
        return STEK_OK;
    if (p11 != NULL && rv_means_lost(rv))
        atomic_store(&p11->lost, true);
    return stek_error_set(rv_status(rv), "%s: %s", call, p11_rv_name(rv));
}

/* ---- call timing -------------------------------------------------------- */

/* Per thread: a C_* call never runs inside another one on the same thread. */
static _Thread_local uint64_t call_t0_ns;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void p11_call_begin(stek_p11 *p11)
{
    /* Without an observer, a call costs no clock reads. */
    if (p11 != NULL && atomic_load_explicit(&p11->observer, memory_order_relaxed) != NULL)
        call_t0_ns = mono_ns();
}

stek_status p11_call_end(stek_p11 *p11, const char *call, CK_RV rv)
{
    stek_p11_call_observer fn = p11 != NULL ? atomic_load(&p11->observer) : NULL;
    if (fn != NULL) {
        uint64_t now = mono_ns();
        fn(p11->observer_arg, call, now > call_t0_ns ? now - call_t0_ns : 0, rv == CKR_OK);
    }
    return p11_rv(p11, call, rv);
}

void stek_p11_set_call_observer(stek_p11 *p11, stek_p11_call_observer fn, void *arg)
{
    if (p11 == NULL)
        return;
    p11->observer_arg = arg;
    atomic_store(&p11->observer, fn);
}
