/*
 * PINs come from an environment variable or a file, never argv or the
 * config file, and live only in locked memory.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "p11_internal.h"

#define PIN_MAX_BYTES 256

static stek_status pin_from_file(const char *path, stek_secret *buf, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_PIN_MISSING, "PIN file %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) == 0 && (sb.st_mode & (S_IRWXG | S_IRWXO)) != 0)
        stek_log(STEK_LOG_WARN, "pkcs11", "PIN file %s is readable by group or others", path);
    ssize_t n = read(fd, stek_secret_data(buf), stek_secret_len(buf));
    int e = errno;
    close(fd);
    if (n < 0)
        STEK_BAIL(STEK_ERR_PIN_MISSING, "PIN file %s: %s", path, strerror(e));
    /* A full buffer means the file is longer than any PIN we accept. */
    STEK_ENSURE((size_t)n < stek_secret_len(buf), STEK_ERR_PIN_MISSING);
    *len = (size_t)n;
    return STEK_OK;
}

stek_status p11_pin_read(const char *env, const char *file, stek_secret **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    if ((env == NULL || *env == '\0') && (file == NULL || *file == '\0'))
        STEK_BAIL(STEK_ERR_PIN_MISSING, "no PIN source: set a PIN environment variable or file");

    stek_secret *buf = NULL;
    STEK_GUARD(stek_secret_new(PIN_MAX_BYTES, &buf));
    stek_status st = STEK_OK;
    size_t len = 0;
    uint8_t *p = stek_secret_data(buf);

    if (file != NULL && *file != '\0') {
        STEK_GUARD_GOTO(pin_from_file(file, buf, &len));
    } else {
        const char *v = getenv(env);
        if (v == NULL || *v == '\0')
            STEK_BAIL_GOTO(STEK_ERR_PIN_MISSING, "PIN variable %s is not set", env);
        len = strlen(v);
        STEK_ENSURE_GOTO(len < PIN_MAX_BYTES, STEK_ERR_PIN_MISSING);
        memcpy(p, v, len);
    }
    /* Files usually end in a newline that is not part of the PIN. */
    while (len > 0 && (p[len - 1] == '\n' || p[len - 1] == '\r'))
        len--;
    if (len == 0)
        STEK_BAIL_GOTO(STEK_ERR_PIN_MISSING, "PIN source is empty");
    STEK_GUARD_GOTO(stek_secret_truncate(buf, len));
    *out = buf;
    buf = NULL;
done:
    stek_secret_free(buf);
    return st;
}
