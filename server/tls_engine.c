/*
 * The only ENGINE code in stek. ENGINE is deprecated in OpenSSL 3 but it is
 * how gRPC 1.51 reaches a TLS key in a token, so its effects are undone here,
 * in one small file, with the deprecation warnings suppressed for it alone.
 */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "tls_engine.h"

#include <openssl/engine.h>
#include <openssl/err.h>

#include "log.h"

void stekd_tls_engine_withdraw_defaults(void)
{
    ENGINE *e = ENGINE_by_id("pkcs11");
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
