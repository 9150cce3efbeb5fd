#include "atomic_file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Syncs the directory holding path; best effort (the data itself is synced). */
static void sync_dir(const char *path)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
}

stek_status stek_file_replace(const char *path, const void *data, size_t len)
{
    stek_status st = STEK_OK;
    char tmp[PATH_MAX];
    STEK_ENSURE_REF(path);
    STEK_ENSURE(data != NULL || len == 0, STEK_ERR_INVALID_ARG);
    int n = snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path);
    STEK_ENSURE(n > 0 && (size_t)n < sizeof(tmp), STEK_ERR_INVALID_ARG);
    /* mkostemp opens with O_CREAT | O_EXCL and mode 0600. */
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "create %s: %s", tmp, strerror(errno));
    if (fchmod(fd, 0600) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "chmod %s: %s", tmp, strerror(errno));
    for (size_t done = 0; done < len;) {
        ssize_t w = write(fd, (const char *)data + done, len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "write %s: %s", tmp, w < 0 ? strerror(errno) : "short");
        done += (size_t)w;
    }
    if (fsync(fd) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "fsync %s: %s", tmp, strerror(errno));
    int rc = close(fd);
    fd = -1;
    if (rc != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "close %s: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "rename %s: %s", path, strerror(errno));
    tmp[0] = '\0'; /* renamed: nothing left to remove */
    sync_dir(path);
done:
    if (fd >= 0)
        close(fd);
    if (st != STEK_OK && tmp[0] != '\0')
        unlink(tmp);
    return st;
}
