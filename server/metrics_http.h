/*
 * The plain-HTTP /metrics endpoint, served with libmicrohttpd on its own
 * address (config "metrics.listen"), apart from the mTLS gRPC port: a
 * Prometheus server scrapes it without a fleet certificate. Besides the
 * registry's text it serves one read-only JSON document, the fleet table
 * that `stekctl fleet` prints (hosts' identities and what they hold; never
 * a key or a key name). Every MHD_* call of stekd is in metrics_http.c.
 *
 *   GET /metrics          200, text/plain; version=0.0.4 (HEAD too)
 *   GET /fleet?group=G    200, application/json; 400 without a group,
 *                         404 for a group not configured
 *   other paths           404
 *   other methods         405
 */
#ifndef STEK_SERVER_METRICS_HTTP_H
#define STEK_SERVER_METRICS_HTTP_H

#include "metrics.h"

typedef struct stekd_metrics_http stekd_metrics_http;

/*
 * The answer to GET /fleet?group=G: an HTTP status, 200 with *body (JSON,
 * malloc'd; the server frees it) and *len, or 404 for a group that is not
 * configured, 500 when it cannot be made (*body NULL).
 */
typedef unsigned (*stekd_metrics_http_fleet_fn)(void *arg, const char *group, char **body,
                                                size_t *len);

/*
 * Binds addr ("host:port", "[v6]:port"; port 0 picks a free one) and
 * serves m, and fleet (NULL: /fleet is 404) with fleet_arg, from one
 * internal thread. Signals must already be blocked in the calling thread
 * (the server's thread inherits its mask). Returns STEK_OK and *out;
 * STEK_ERR_CONFIG for an address that is not host:port or does not
 * resolve; STEK_ERR_IO when it cannot be bound (the detail names it).
 */
STEK_MUST_USE stek_status stekd_metrics_http_start(const char *addr, stekd_metrics *m,
                                                   stekd_metrics_http_fleet_fn fleet,
                                                   void *fleet_arg, stekd_metrics_http **out);

/* The bound port. */
int stekd_metrics_http_port(const stekd_metrics_http *s);

/* Stops serving, waits for the thread, closes the socket. NULL is a no-op. */
void stekd_metrics_http_stop(stekd_metrics_http *s);

#endif
