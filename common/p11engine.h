/*
 * Private keys held in a PKCS#11 token, named by pkcs11: URIs (RFC 7512) and
 * reached through OpenSSL's pkcs11 engine (libp11's libengine-pkcs11-openssl,
 * engine id "pkcs11"). The engine finds its module through p11-kit-proxy, so
 * a token is reachable when its module is registered with p11-kit (SoftHSM2
 * registers itself). The PIN comes from the URI only: "?pin-source=file:..."
 * or "?pin-value=...".
 *
 * ENGINE is deprecated in OpenSSL 3, but it is how gRPC 1.51 reaches a TLS key
 * in a token, so all of stek's ENGINE code is in p11engine.c, compiled with the
 * deprecation warnings suppressed for that file alone.
 *
 * Threads: every function may be called from any thread.
 */
#ifndef STEK_COMMON_P11ENGINE_H
#define STEK_COMMON_P11ENGINE_H

#include <stdbool.h>

#include <openssl/evp.h>

#include "status.h"

/* Whether s names a key in a token ("pkcs11:..."), rather than a PEM file. */
bool stek_p11engine_is_uri(const char *s);

/*
 * Loads the private key named by uri through the pkcs11 engine. The key's
 * operations (sign, decrypt, derive) run in the token; the EVP_PKEY also
 * holds its public half. The engine is initialized once and stays so for
 * the life of the process (keys it loaded refer to it). Returns STEK_OK and
 * *out (EVP_PKEY_free); STEK_ERR_INVALID_ARG when uri is not a pkcs11: URI;
 * STEK_ERR_CONFIG when the engine cannot be loaded (package
 * libengine-pkcs11-openssl missing); STEK_ERR_NOT_FOUND when the engine
 * finds no such key (no token, wrong PIN, no object: libp11 does not say
 * which). The detail names the URI without its query (no PIN).
 */
STEK_MUST_USE stek_status stek_p11engine_load_private_key(const char *uri, EVP_PKEY **out);

/*
 * The private-key string to give gRPC 1.51 for a key in a token:
 * "engine:stek-pkcs11:<uri>". gRPC loads such a key with ENGINE_by_id,
 * ENGINE_set_default(ENGINE_METHOD_ALL) and ENGINE_load_private_key, and it
 * does so whenever it creates a subchannel, on its own threads. Naming the
 * pkcs11 engine itself would make it the default for every algorithm in the
 * process (the application's own TLS included) each time. So the string
 * names a small engine registered here, "stek-pkcs11", that implements no
 * algorithm (ENGINE_set_default has nothing to register) and only loads
 * keys, through the pkcs11 engine. Returns STEK_OK and *out (malloc'd,
 * free()); STEK_ERR_INVALID_ARG; STEK_ERR_NOMEM; STEK_ERR_CRYPTO when the
 * engine cannot be registered.
 */
STEK_MUST_USE stek_status stek_p11engine_grpc_key(const char *uri, char **out);

/*
 * For a server that gave gRPC "engine:pkcs11:<uri>" (stekd): once gRPC has
 * loaded the key, withdraws the pkcs11 engine's process-wide defaults that
 * gRPC set (ENGINE_set_default(ENGINE_METHOD_ALL)), so the process's own EC
 * and RSA code is not sent to the token. The loaded key keeps its own
 * reference to the engine. Call once after the server credentials are in
 * use (a server loads its key once, at start).
 */
void stek_p11engine_withdraw_defaults(void);

#endif
