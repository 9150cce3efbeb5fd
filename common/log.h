/*
 * Logging: one line per event on stderr, "<RFC3339 time> <level> <component>: <text>".
 * Callers never pass secret material; the PKCS#11 layer logs call names and
 * CKR_ names, never attribute values.
 */
#ifndef STEK_COMMON_LOG_H
#define STEK_COMMON_LOG_H

typedef enum stek_log_level {
    STEK_LOG_DEBUG = 0,
    STEK_LOG_INFO,
    STEK_LOG_WARN,
    STEK_LOG_ERROR,
} stek_log_level;

/* Sets the minimum level written. The default comes from STEK_LOG_LEVEL
 * (debug|info|warn|error) at the first log call, else info. */
void stek_log_set_level(stek_log_level level);

/* Returns whether a message at level would be written. */
int stek_log_enabled(stek_log_level level);

/* Writes one line; the text is truncated at 1 KiB and newlines are replaced. */
void stek_log(stek_log_level level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
