/*
 * The only ENGINE code in stek (see p11engine.h). ENGINE is deprecated in
 * OpenSSL 3 but it is how gRPC 1.51 reaches a TLS key in a token, and how
 * libp11 exposes token keys as EVP_PKEYs, so it is confined to this file with
 * the deprecation warnings suppressed for it alone.
 */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "p11engine.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/engine.h>
#include <openssl/err.h>

#include "log.h"

#define P11_ENGINE_ID "pkcs11"
#define LOADER_ENGINE_ID "stek-pkcs11"
#define URI_PREFIX "pkcs11:"

bool stek_p11engine_is_uri(const char *s)
{
    return s != NULL && strncmp(s, URI_PREFIX, strlen(URI_PREFIX)) == 0;
}

/* The URI up to its query, which may hold the PIN: what details may show. */
static int uri_shown(const char *uri)
{
    size_t n = strcspn(uri, "?");
    return n > 200 ? 200 : (int)n;
}

/*
 * The pkcs11 engine, with one functional reference held for the life of the
 * process: libp11 frees its PKCS#11 context at the engine's last
 * ENGINE_finish, and every key it loaded refers to that context. (gRPC
 * never finishes the engine either.)
 */
static pthread_once_t p11_once = PTHREAD_ONCE_INIT;
static ENGINE *p11;

static void p11_init(void)
{
    ENGINE *e = ENGINE_by_id(P11_ENGINE_ID);
    if (e == NULL)
        return;
    if (ENGINE_init(e) != 1) {
        ENGINE_free(e);
        return;
    }
    ENGINE_free(e); /* the structural reference; the functional one stays */
    p11 = e;
}

static stek_status p11_engine(ENGINE **out)
{
    pthread_once(&p11_once, p11_init);
    if (p11 == NULL) {
        ERR_clear_error();
        STEK_BAIL(STEK_ERR_CONFIG,
                  "OpenSSL engine \"%s\" unavailable "
                  "(is libengine-pkcs11-openssl installed?)",
                  P11_ENGINE_ID);
    }
    *out = p11;
    return STEK_OK;
}

stek_status stek_p11engine_load_private_key(const char *uri, EVP_PKEY **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(stek_p11engine_is_uri(uri), STEK_ERR_INVALID_ARG);
    ENGINE *e = NULL;
    STEK_GUARD(p11_engine(&e));
    /* No UI: the PIN comes from the URI (pin-source or pin-value), never
     * from a prompt. */
    EVP_PKEY *k = ENGINE_load_private_key(e, uri, NULL, NULL);
    if (k == NULL) {
        ERR_clear_error();
        STEK_BAIL(STEK_ERR_NOT_FOUND, "%.*s: no such private key, or the token refused the PIN",
                  uri_shown(uri), uri);
    }
    *out = k;
    return STEK_OK;
}

/* ---- the loader engine handed to gRPC ----------------------------------------------- */

static EVP_PKEY *loader_load(ENGINE *self, const char *key_id, UI_METHOD *ui, void *cb_data)
{
    (void)self;
    (void)ui;
    (void)cb_data;
    EVP_PKEY *k = NULL;
    stek_status st = stek_p11engine_load_private_key(key_id, &k);
    if (st != STEK_OK)
        stek_log(STEK_LOG_ERROR, "p11engine", "TLS key: %s", stek_error_detail());
    return k;
}

static pthread_once_t loader_once = PTHREAD_ONCE_INIT;
static bool loader_ok;

static void loader_init(void)
{
    ENGINE *e = ENGINE_by_id(LOADER_ENGINE_ID);
    if (e != NULL) { /* registered by another copy of this code */
        ENGINE_free(e);
        loader_ok = true;
        return;
    }
    ERR_clear_error();
    e = ENGINE_new();
    /* ENGINE_add keeps its own structural reference: the engine stays
     * registered for the life of the process. */
    loader_ok = e != NULL && ENGINE_set_id(e, LOADER_ENGINE_ID) == 1 &&
                ENGINE_set_name(e, "stek: pkcs11: keys through the pkcs11 engine") == 1 &&
                ENGINE_set_load_privkey_function(e, loader_load) == 1 && ENGINE_add(e) == 1;
    ENGINE_free(e);
    if (!loader_ok)
        ERR_clear_error();
}

stek_status stek_p11engine_grpc_key(const char *uri, char **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(stek_p11engine_is_uri(uri), STEK_ERR_INVALID_ARG);
    pthread_once(&loader_once, loader_init);
    if (!loader_ok)
        STEK_BAIL(STEK_ERR_CRYPTO, "cannot register the %s engine", LOADER_ENGINE_ID);
    size_t n = strlen("engine:" LOADER_ENGINE_ID ":") + strlen(uri) + 1;
    char *s = malloc(n);
    STEK_ENSURE(s != NULL, STEK_ERR_NOMEM);
    snprintf(s, n, "engine:%s:%s", LOADER_ENGINE_ID, uri);
    *out = s;
    return STEK_OK;
}

/* ---- stekd ------------------------------------------------------------------------------ */

void stek_p11engine_withdraw_defaults(void)
{
    ENGINE *e = ENGINE_by_id(P11_ENGINE_ID);
    if (e == NULL) {
        ERR_clear_error();
        return;
    }
    ENGINE_unregister_RSA(e);
    ENGINE_unregister_EC(e);
    ENGINE_unregister_DSA(e);
    ENGINE_unregister_DH(e);
    ENGINE_unregister_RAND(e);
    ENGINE_unregister_ciphers(e);
    ENGINE_unregister_digests(e);
    ENGINE_unregister_pkey_meths(e);
    ENGINE_unregister_pkey_asn1_meths(e);
    ENGINE_free(e);
    stek_log(STEK_LOG_INFO, "stekd", "TLS key served from the token through the pkcs11 engine");
}
