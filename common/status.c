#include "status.h"

#include <stdarg.h>
#include <stdio.h>

static const char *const names[STEK_STATUS_COUNT] = {
    [STEK_OK] = "STEK_OK",
    [STEK_ERR_INVALID_ARG] = "STEK_ERR_INVALID_ARG",
    [STEK_ERR_NOMEM] = "STEK_ERR_NOMEM",
    [STEK_ERR_IO] = "STEK_ERR_IO",
    [STEK_ERR_CONFIG] = "STEK_ERR_CONFIG",
    [STEK_ERR_MODULE_LOAD] = "STEK_ERR_MODULE_LOAD",
    [STEK_ERR_TOKEN_NOT_FOUND] = "STEK_ERR_TOKEN_NOT_FOUND",
    [STEK_ERR_PIN_MISSING] = "STEK_ERR_PIN_MISSING",
    [STEK_ERR_PIN_INCORRECT] = "STEK_ERR_PIN_INCORRECT",
    [STEK_ERR_PIN_LOCKED] = "STEK_ERR_PIN_LOCKED",
    [STEK_ERR_HSM_UNAVAILABLE] = "STEK_ERR_HSM_UNAVAILABLE",
    [STEK_ERR_HSM] = "STEK_ERR_HSM",
    [STEK_ERR_NOT_FOUND] = "STEK_ERR_NOT_FOUND",
    [STEK_ERR_EXISTS] = "STEK_ERR_EXISTS",
    [STEK_ERR_NOT_WRAPPABLE] = "STEK_ERR_NOT_WRAPPABLE",
    [STEK_ERR_BAD_POINT] = "STEK_ERR_BAD_POINT",
    [STEK_ERR_CRYPTO] = "STEK_ERR_CRYPTO",
    [STEK_ERR_VERIFY] = "STEK_ERR_VERIFY",
    [STEK_ERR_INTERNAL] = "STEK_ERR_INTERNAL",
};

/* Big enough for a call name, a CKR_ name and a label; longer is cut. */
static _Thread_local char detail[256];

const char *stek_status_name(stek_status st)
{
    if ((unsigned)st >= STEK_STATUS_COUNT || names[st] == NULL)
        return "STEK_ERR_UNKNOWN";
    return names[st];
}

stek_status stek_error_set(stek_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    return st;
}

const char *stek_error_detail(void)
{
    return detail;
}

void stek_error_clear(void)
{
    detail[0] = '\0';
}
