/*
 * libstek internals for in-tree programs built on the client (stek-agent).
 * Not part of the public API: nothing here is exported from the shared
 * libstek (these functions are not STEK_API, and libstek is compiled with
 * hidden visibility); link stek_client_static to use them.
 */
#ifndef STEK_CLIENT_INTERNAL_H
#define STEK_CLIENT_INTERNAL_H

#include "keyring.h"
#include "stek/stek.h"

/*
 * The client's keyring, for read sections (stek_keyring_read_begin/_end)
 * only: the client's own threads are its only writers. Valid until
 * stek_client_free. The snapshots it publishes hold every group's key
 * material: callers keep what they copy out in locked memory.
 */
stek_keyring *stek_client_keyring(stek_client *c);

#endif
