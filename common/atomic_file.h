/*
 * Replacing a small file atomically: readers see the old content or the
 * new, never a mix or a truncated file, even across a crash.
 */
#ifndef STEK_COMMON_ATOMIC_FILE_H
#define STEK_COMMON_ATOMIC_FILE_H

#include <stddef.h>

#include "status.h"

/*
 * Writes len bytes (len may be 0) to a new temporary file "<path>.XXXXXX"
 * in path's directory (created O_CREAT | O_EXCL, mode 0600), syncs it,
 * renames it over path, and syncs the directory so the rename survives a
 * crash. On failure the temporary file is removed and path is untouched.
 * Returns STEK_OK; STEK_ERR_INVALID_ARG for a NULL or over-long path;
 * STEK_ERR_IO with the failing step and errno in the detail.
 */
STEK_MUST_USE stek_status stek_file_replace(const char *path, const void *data, size_t len);

#endif
