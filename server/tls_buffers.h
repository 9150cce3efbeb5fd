/*
 * OpenSSL frees idle connections' record buffers (SSL_MODE_RELEASE_BUFFERS)
 * on the SSL_CTXs gRPC creates; see tls_buffers.c.
 */
#ifndef STEK_SERVER_TLS_BUFFERS_H
#define STEK_SERVER_TLS_BUFFERS_H

#include <stdbool.h>

/* True once an SSL_CTX was created through stekd's SSL_CTX_new. */
bool stekd_tls_buffers_released(void);

#endif
