/*
 * /metrics and /fleet over libmicrohttpd. The socket is bound here rather
 * than by MHD, so a busy or wrong address fails start-up with its errno,
 * and the port is known when it was 0.
 */
#include "metrics_http.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <microhttpd.h>

#include "log.h"

/* One scraper, a few spare: a scrape takes milliseconds. */
#define MAX_CONNECTIONS 16
#define CONNECTION_TIMEOUT_S 10

struct stekd_metrics_http {
    struct MHD_Daemon *d;
    stekd_metrics *m;
    stekd_metrics_http_fleet_fn fleet;
    void *fleet_arg;
    int port;
};

__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char text[256];
    vsnprintf(text, sizeof(text), fmt, ap);
    stek_log(STEK_LOG_WARN, "metrics", "%s", text);
}

static enum MHD_Result reply_text(struct MHD_Connection *c, unsigned int code, const char *text,
                                  bool allow_header)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    if (r == NULL)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
    if (allow_header)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return ret;
}

/* GET /fleet?group=G: MHD decodes the query; the group is checked by the callback. */
static enum MHD_Result reply_fleet(stekd_metrics_http *s, struct MHD_Connection *c)
{
    const char *group = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "group");
    if (group == NULL || group[0] == '\0')
        return reply_text(c, MHD_HTTP_BAD_REQUEST, "usage: /fleet?group=GROUP\n", false);
    char *body = NULL;
    size_t len = 0;
    unsigned code = s->fleet(s->fleet_arg, group, &body, &len);
    if (code != MHD_HTTP_OK || body == NULL) {
        free(body);
        return reply_text(
            c, code == MHD_HTTP_NOT_FOUND ? MHD_HTTP_NOT_FOUND : MHD_HTTP_INTERNAL_SERVER_ERROR,
            code == MHD_HTTP_NOT_FOUND ? "no such group\n" : "cannot render the fleet\n", false);
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
    (void)version;
    (void)upload_data;
    stekd_metrics_http *s = cls;
    static int headers_seen;
    /* The first call only announces the headers; answer on the next one. */
    if (*req_cls == NULL) {
        *req_cls = &headers_seen;
        return MHD_YES;
    }
    if (*upload_data_size != 0)
        return MHD_NO; /* a body on GET: not a scraper; drop the connection */
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return reply_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n", true);
    if (s->fleet != NULL && strcmp(url, "/fleet") == 0)
        return reply_fleet(s, c);
    if (strcmp(url, "/metrics") != 0)
        return reply_text(c, MHD_HTTP_NOT_FOUND, "not found; metrics are at /metrics\n", false);

    char *text = NULL;
    size_t len = 0;
    if (stekd_metrics_render(s->m, &text, &len) != STEK_OK) {
        stek_log(STEK_LOG_WARN, "metrics", "scrape: %s", stek_error_detail());
        return reply_text(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "cannot render metrics\n", false);
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* "host:port" or "[v6]:port" into its parts; an empty host is every address. */
static stek_status split_address(const char *addr, char *host, size_t host_len, char *port,
                                 size_t port_len)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || colon[1] == '\0' || strlen(colon + 1) >= port_len)
        STEK_BAIL(STEK_ERR_CONFIG, "metrics.listen \"%.64s\" is not host:port", addr);
    const char *h = addr;
    size_t n = (size_t)(colon - addr);
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= host_len)
        STEK_BAIL(STEK_ERR_CONFIG, "metrics.listen \"%.64s\": host too long", addr);
    memcpy(host, h, n);
    host[n] = '\0';
    snprintf(port, port_len, "%s", colon + 1);
    return STEK_OK;
}

/* A listening TCP socket on addr; *port gets the bound port. */
static stek_status bind_listen(const char *addr, int *fd, int *port)
{
    char host[256], svc[16];
    STEK_GUARD(split_address(addr, host, sizeof(host), svc, sizeof(svc)));
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host[0] != '\0' ? host : NULL, svc, &hints, &ai);
    if (rc != 0)
        STEK_BAIL(STEK_ERR_CONFIG, "metrics.listen \"%.64s\": %s", addr, gai_strerror(rc));

    stek_status st = STEK_OK;
    int one = 1;
    *fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*fd < 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "metrics: socket: %s", strerror(errno));
    /* SO_REUSEADDR only skips TIME_WAIT after a restart; a second live
     * listener on the port still fails with EADDRINUSE. */
    if (setsockopt(*fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(*fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(*fd, 64) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "cannot listen on %s for metrics: %s", addr, strerror(errno));
    struct sockaddr_storage sa;
    socklen_t sa_len = sizeof(sa);
    if (getsockname(*fd, (struct sockaddr *)&sa, &sa_len) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "metrics: getsockname: %s", strerror(errno));
    *port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                           : ((struct sockaddr_in *)&sa)->sin_port);
done:
    if (st != STEK_OK && *fd >= 0) {
        close(*fd);
        *fd = -1;
    }
    freeaddrinfo(ai);
    return st;
}

stek_status stekd_metrics_http_start(const char *addr, stekd_metrics *m,
                                     stekd_metrics_http_fleet_fn fleet, void *fleet_arg,
                                     stekd_metrics_http **out)
{
    STEK_ENSURE(addr != NULL && m != NULL && out != NULL, STEK_ERR_INVALID_ARG);
    *out = NULL;
    stekd_metrics_http *s = calloc(1, sizeof(*s));
    STEK_ENSURE(s != NULL, STEK_ERR_NOMEM);
    s->m = m;
    s->fleet = fleet;
    s->fleet_arg = fleet_arg;
    int fd = -1;
    stek_status st = bind_listen(addr, &fd, &s->port);
    if (st != STEK_OK) {
        free(s);
        return st;
    }
    /* The logger goes first, so start-up messages reach stekd's log too. */
    s->d = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                            on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                            MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned int)MAX_CONNECTIONS, MHD_OPTION_CONNECTION_TIMEOUT,
                            (unsigned int)CONNECTION_TIMEOUT_S, MHD_OPTION_END);
    if (s->d == NULL) {
        /* Whether MHD closed fd on this path is not documented: leave it;
         * stekd exits right after. */
        free(s);
        STEK_BAIL(STEK_ERR_IO, "metrics: cannot start the HTTP server on %s", addr);
    }
    *out = s;
    return STEK_OK;
}

int stekd_metrics_http_port(const stekd_metrics_http *s)
{
    return s->port;
}

void stekd_metrics_http_stop(stekd_metrics_http *s)
{
    if (s == NULL)
        return;
    MHD_stop_daemon(s->d); /* joins its thread and closes the listening socket */
    free(s);
}
