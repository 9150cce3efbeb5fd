/*
 * The plain-HTTP /metrics endpoint, served with libmicrohttpd on its own
 * address (config "metrics.listen"), apart from the mTLS gRPC port: a
 * Prometheus server scrapes it without a fleet certificate, and it never
 * serves anything but the registry's text. Every MHD_* call of stekd is in
 * metrics_http.c.
 *
 *   GET /metrics   200, text/plain; version=0.0.4 (HEAD too)
 *   other paths    404
 *   other methods  405
 */
#ifndef STEK_SERVER_METRICS_HTTP_H
#define STEK_SERVER_METRICS_HTTP_H

#include "metrics.h"

typedef struct stekd_metrics_http stekd_metrics_http;

/*
 * Binds addr ("host:port", "[v6]:port"; port 0 picks a free one) and
 * serves m from one internal thread. Signals must already be blocked in the
 * calling thread (the server's thread inherits its mask). Returns STEK_OK
 * and *out; STEK_ERR_CONFIG for an address that is not host:port or does
 * not resolve; STEK_ERR_IO when it cannot be bound (the detail names it).
 */
STEK_MUST_USE stek_status stekd_metrics_http_start(const char *addr, stekd_metrics *m,
                                                   stekd_metrics_http **out);

/* The bound port. */
int stekd_metrics_http_port(const stekd_metrics_http *s);

/* Stops serving, waits for the thread, closes the socket. NULL is a no-op. */
void stekd_metrics_http_stop(stekd_metrics_http *s);

#endif
