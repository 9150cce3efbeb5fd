/*
 * stekd's TLS key in a token: gRPC 1.51 loads a private key written as
 * "engine:pkcs11:<pkcs11 URI>" through OpenSSL's (deprecated) ENGINE API.
 */
#ifndef STEK_SERVER_TLS_ENGINE_H
#define STEK_SERVER_TLS_ENGINE_H

/*
 * gRPC loads an engine key with ENGINE_set_default(ENGINE_METHOD_ALL), which
 * makes the pkcs11 engine the default for every algorithm in the whole
 * process, so stekd's own EC and RSA code would be sent to the token. The
 * loaded key keeps its own reference to the engine; this withdraws the
 * process-wide defaults. Call once after the server credentials are in use.
 */
void stekd_tls_engine_withdraw_defaults(void);

#endif
