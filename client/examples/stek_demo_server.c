/*
 * stek-demo-server: a minimal TLS server on libstek, for `make demo`.
 *
 * Every instance started with the same --group gets the same session-ticket
 * keys from stekd, so a ticket issued by one instance resumes on another.
 * It serves one connection at a time: TLS handshake, a fixed HTTP/1.0
 * answer, close. After each connection it prints one line on stdout:
 *
 *     a: TLSv1.3 full handshake [issued 1 resumed 0 renewed 0 misses 0 epoch 177...]
 *     b: TLSv1.3 resumed [issued 0 resumed 1 renewed 0 misses 0 epoch 177...]
 *
 * (the bracket only when libstek's counters changed). Status and errors go
 * to stderr. It stops on SIGTERM/SIGINT, or after --max-seconds.
 *
 * Only the public API (stek/stek.h) and OpenSSL are used. Exit status: 0
 * after a clean stop, 1 when it cannot run (no keys, cannot listen), 2 for
 * bad usage or unreadable/unusable files.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "stek/stek.h"

#define EXIT_RUN 1
#define EXIT_USAGE 2
#define READY_TIMEOUT_MS 10000
#define IO_TIMEOUT_S 5        /* per socket read/write of one connection */
#define DRAIN_TIMEOUT_MS 1000 /* waiting for the client's close after ours */
#define POLL_MS 200

typedef struct args {
    const char *name, *listen, *port_file, *tls_cert, *tls_key;
    const char *stekd[STEK_MAX_SERVERS];
    int n_stekd;
    const char *ca, *host_cert, *host_key, *service_key, *group, *stekd_name, *state_dir;
    long max_seconds;
} args;

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: stek-demo-server --name NAME --listen HOST:PORT --port-file FILE\n"
               "         --tls-cert FILE --tls-key FILE\n"
               "         --stekd HOST:PORT [--stekd HOST:PORT ...]\n"
               "         --ca FILE --host-cert FILE --host-key FILE --service-key FILE\n"
               "         --group NAME [--stekd-name NAME] [--state-dir DIR] [--max-seconds N]\n"
               "  --tls-cert/--tls-key  this TLS server's certificate chain and key (PEM)\n"
               "  --stekd               a stekd replica (repeat for each)\n"
               "  --ca                  the CA that issued stekd's certificate\n"
               "  --host-cert/--host-key this host's mTLS identity towards stekd\n"
               "  --service-key         pinned stekd signing public key (PEM)\n"
               "  --stekd-name          name checked in stekd's certificate (e.g. localhost)\n"
               "  --max-seconds         stop after N seconds (default 600)\n");
}

static int parse_args(int argc, char **argv, args *a)
{
    static const struct option opts[] = {
        {"name", required_argument, NULL, 'n'},
        {"listen", required_argument, NULL, 'l'},
        {"port-file", required_argument, NULL, 'P'},
        {"tls-cert", required_argument, NULL, 'c'},
        {"tls-key", required_argument, NULL, 'k'},
        {"stekd", required_argument, NULL, 's'},
        {"ca", required_argument, NULL, 'a'},
        {"host-cert", required_argument, NULL, 'C'},
        {"host-key", required_argument, NULL, 'K'},
        {"service-key", required_argument, NULL, 'S'},
        {"group", required_argument, NULL, 'g'},
        {"stekd-name", required_argument, NULL, 'N'},
        {"state-dir", required_argument, NULL, 'd'},
        {"max-seconds", required_argument, NULL, 'm'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof(*a));
    a->max_seconds = 600;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'n':
            a->name = optarg;
            break;
        case 'l':
            a->listen = optarg;
            break;
        case 'P':
            a->port_file = optarg;
            break;
        case 'c':
            a->tls_cert = optarg;
            break;
        case 'k':
            a->tls_key = optarg;
            break;
        case 'a':
            a->ca = optarg;
            break;
        case 'C':
            a->host_cert = optarg;
            break;
        case 'K':
            a->host_key = optarg;
            break;
        case 'S':
            a->service_key = optarg;
            break;
        case 'g':
            a->group = optarg;
            break;
        case 'N':
            a->stekd_name = optarg;
            break;
        case 'd':
            a->state_dir = optarg;
            break;
        case 's':
            if (a->n_stekd == STEK_MAX_SERVERS) {
                fprintf(stderr, "stek-demo-server: at most %d --stekd\n", STEK_MAX_SERVERS);
                return -1;
            }
            a->stekd[a->n_stekd++] = optarg;
            break;
        case 'm': {
            char *end = NULL;
            errno = 0;
            a->max_seconds = strtol(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0' || a->max_seconds < 1) {
                fprintf(stderr, "stek-demo-server: --max-seconds: not a positive number: %s\n",
                        optarg);
                return -1;
            }
            break;
        }
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "stek-demo-server: unexpected argument: %s\n", argv[optind]);
        return -1;
    }
    const struct {
        const char *flag, *value;
    } required[] = {
        {"--name", a->name},
        {"--listen", a->listen},
        {"--port-file", a->port_file},
        {"--tls-cert", a->tls_cert},
        {"--tls-key", a->tls_key},
        {"--stekd", a->n_stekd > 0 ? a->stekd[0] : NULL},
        {"--ca", a->ca},
        {"--host-cert", a->host_cert},
        {"--host-key", a->host_key},
        {"--service-key", a->service_key},
        {"--group", a->group},
    };
    int missing = 0;
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        if (required[i].value == NULL || required[i].value[0] == '\0') {
            fprintf(stderr, "stek-demo-server: missing %s\n", required[i].flag);
            missing++;
        }
    }
    if (missing > 0) {
        usage(stderr);
        return -1;
    }
    /* Unreadable files are reported here, by flag, before anything starts. */
    const struct {
        const char *flag, *path;
    } files[] = {
        {"--tls-cert", a->tls_cert},
        {"--tls-key", a->tls_key},
        {"--ca", a->ca},
        {"--host-cert", a->host_cert},
        {"--host-key", a->host_key},
        {"--service-key", a->service_key},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        FILE *f = fopen(files[i].path, "r");
        if (f == NULL) {
            fprintf(stderr, "stek-demo-server: %s %s: %s\n", files[i].flag, files[i].path,
                    strerror(errno));
            bad++;
        } else {
            fclose(f);
        }
    }
    struct stat st;
    if (a->state_dir != NULL && (stat(a->state_dir, &st) != 0 || !S_ISDIR(st.st_mode))) {
        fprintf(stderr, "stek-demo-server: --state-dir %s: not a directory\n", a->state_dir);
        bad++;
    }
    return bad > 0 ? -1 : 0;
}

/* ---- libstek ---------------------------------------------------------------------- */

static stek_result make_client(const args *a, stek_client **out)
{
    stek_options *o = NULL;
    stek_result r = stek_options_new(&o);
    for (int i = 0; r == STEK_RESULT_OK && i < a->n_stekd; i++)
        r = stek_options_add_server(o, a->stekd[i]);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, a->ca);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, a->host_cert, a->host_key);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, a->service_key);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, a->group);
    if (r == STEK_RESULT_OK && a->stekd_name != NULL)
        r = stek_options_set_server_name(o, a->stekd_name);
    if (r == STEK_RESULT_OK && a->state_dir != NULL)
        r = stek_options_set_state_dir(o, a->state_dir);
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, out);
    stek_options_free(o); /* the client keeps its own copy */
    return r;
}

static uint64_t misses(const stek_counters *k)
{
    return k->miss_unknown + k->miss_expired + k->miss_other_generation + k->miss_other_group +
           k->miss_bad_mac;
}

static bool counters_changed(const stek_counters *x, const stek_counters *y)
{
    return x->tickets_issued != y->tickets_issued || x->tickets_resumed != y->tickets_resumed ||
           x->tickets_renewed != y->tickets_renewed || misses(x) != misses(y) ||
           x->current_epoch != y->current_epoch;
}

/* ---- TLS and sockets --------------------------------------------------------------- */

static SSL_CTX *make_ssl_ctx(const args *a)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        return NULL;
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, a->tls_cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, a->tls_key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* No server-side session cache: every resumption comes from a ticket,
     * which is the point of the demo (another process issued it). */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

/* Opens a listening socket on "HOST:PORT" ("[v6]:PORT" too). */
static int listen_on(const char *spec)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    size_t hlen = colon != NULL ? (size_t)(colon - spec) : 0;
    if (colon == NULL || hlen == 0 || hlen >= sizeof(host) || colon[1] == '\0') {
        fprintf(stderr, "stek-demo-server: --listen %s: expected HOST:PORT\n", spec);
        return -1;
    }
    memcpy(host, spec, hlen);
    host[hlen] = '\0';
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = '\0';
    }
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, colon + 1, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "stek-demo-server: --listen %s: %s\n", spec, gai_strerror(gai));
        return -1;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *ai = res; ai != NULL && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 16) != 0) {
            err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        fprintf(stderr, "stek-demo-server: --listen %s: %s\n", spec, strerror(err));
    return fd;
}

static int bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -1;
}

/* Writes the port to path atomically: readers never see a partial file. */
static int write_port_file(const char *path, int port)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return -1;
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "%d\n", port);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        (void)unlink(tmp);
        return -1;
    }
    return 0;
}

static void set_io_timeout(int fd, long ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* Why an SSL call failed, in a few words. */
static const char *ssl_failure(SSL *ssl, int rc, char *buf, size_t len)
{
    int e = SSL_get_error(ssl, rc);
    unsigned long code = ERR_peek_last_error();
    if (code != 0) {
        ERR_error_string_n(code, buf, len);
    } else if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ||
               (e == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK))) {
        /* A blocking socket's SO_RCVTIMEO/SO_SNDTIMEO expired. */
        snprintf(buf, len, "timed out after %d s", IO_TIMEOUT_S);
    } else if (e == SSL_ERROR_SYSCALL && errno != 0) {
        snprintf(buf, len, "%s", strerror(errno));
    } else {
        snprintf(buf, len, "connection closed by the client (SSL error %d)", e);
    }
    ERR_clear_error();
    return buf;
}

/*
 * One connection: handshake (which also sends the session tickets), the
 * answer at once (the client may send nothing), our close_notify, then
 * whatever the client sent (its request, its close_notify) is read and
 * dropped for a short while, so that close() does not reset the connection
 * under a client that is still reading. Returns the SSL on success (for the
 * caller's report; SSL_free it), NULL after a logged failure.
 */
static SSL *serve_one(SSL_CTX *ctx, int fd, const char *name)
{
    char why[256];
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1) {
        fprintf(stderr, "%s: SSL_new failed\n", name);
        SSL_free(ssl);
        return NULL;
    }
    set_io_timeout(fd, IO_TIMEOUT_S * 1000L);
    errno = 0;
    int rc = SSL_accept(ssl);
    if (rc != 1) {
        if (!stop_requested)
            fprintf(stderr, "%s: handshake failed: %s\n", name,
                    ssl_failure(ssl, rc, why, sizeof(why)));
        SSL_free(ssl);
        return NULL;
    }
    char body[512];
    int n = snprintf(body, sizeof(body),
                     "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from %s\n", name);
    if (n < 0 || (size_t)n >= sizeof(body))
        n = (int)strlen(body);
    errno = 0;
    rc = SSL_write(ssl, body, n);
    if (rc != n) {
        fprintf(stderr, "%s: write failed: %s\n", name, ssl_failure(ssl, rc, why, sizeof(why)));
    } else {
        (void)SSL_shutdown(ssl); /* sends close_notify */
        set_io_timeout(fd, DRAIN_TIMEOUT_MS);
        char sink[1024];
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (SSL_read(ssl, sink, sizeof(sink)) <= 0)
                break; /* the client's close_notify, EOF, or the drain timeout */
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 >
                DRAIN_TIMEOUT_MS)
                break;
        }
        ERR_clear_error();
    }
    return ssl;
}

static double elapsed_s(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

int main(int argc, char **argv)
{
    args a;
    if (parse_args(argc, argv, &a) != 0)
        return EXIT_USAGE;

    /* A client that goes away mid-write must not kill the server. */
    signal(SIGPIPE, SIG_IGN);
    /* SIGTERM/SIGINT: a flag, and no SA_RESTART so poll()/accept() return
     * EINTR. They are blocked while libstek starts its threads (which
     * inherit the mask), so only this thread takes them. */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    int rc = EXIT_RUN, lfd = -1;
    SSL_CTX *ctx = NULL;
    stek_client *client = NULL;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    stek_result r = make_client(&a, &client);
    pthread_sigmask(SIG_UNBLOCK, &sigs, NULL);
    if (r != STEK_RESULT_OK) {
        fprintf(stderr,
                "%s: libstek: %s (check --ca, --host-cert/--host-key, --service-key, "
                "--group, --state-dir)\n",
                a.name, stek_result_name(r));
        rc = r == STEK_RESULT_NO_MEMORY || r == STEK_RESULT_INTERNAL ? EXIT_RUN : EXIT_USAGE;
        goto done;
    }
    ctx = make_ssl_ctx(&a);
    if (ctx == NULL) {
        char err[256];
        ERR_error_string_n(ERR_peek_last_error(), err, sizeof(err));
        fprintf(stderr, "%s: --tls-cert %s / --tls-key %s: %s\n", a.name, a.tls_cert, a.tls_key,
                err);
        rc = EXIT_USAGE;
        goto done;
    }

    /* The demo is about tickets: without keys it has nothing to show. */
    r = stek_client_wait_ready(client, READY_TIMEOUT_MS);
    if (r != STEK_RESULT_OK) {
        stek_counters k = {0};
        (void)stek_client_get_counters(client, &k);
        fprintf(stderr,
                "%s: no ticket keys from stekd within %d s (%s): %s; "
                "key sets accepted %llu, rejected %llu (see libstek's log above)\n",
                a.name, READY_TIMEOUT_MS / 1000, stek_result_name(r),
                k.stream_up ? "connected to stekd, but no usable key set"
                            : "could not get a key set from any --stekd",
                (unsigned long long)k.sets_accepted, (unsigned long long)k.sets_rejected);
        goto done;
    }
    /* After wait_ready, so that attach knows the keys' lifetime. */
    r = stek_client_attach(client, ctx);
    if (r != STEK_RESULT_OK) {
        fprintf(stderr, "%s: stek_client_attach: %s\n", a.name, stek_result_name(r));
        goto done;
    }

    lfd = listen_on(a.listen);
    if (lfd < 0)
        goto done;
    int port = bound_port(lfd);
    if (port < 0 || write_port_file(a.port_file, port) != 0) {
        fprintf(stderr, "%s: --port-file %s: %s\n", a.name, a.port_file, strerror(errno));
        goto done;
    }
    stek_counters last = {0};
    (void)stek_client_get_counters(client, &last);
    fprintf(stderr, "%s: listening on port %d, group %s, epoch %llu (stops after %ld s)\n", a.name,
            port, a.group, (unsigned long long)last.current_epoch, a.max_seconds);

    while (!stop_requested && elapsed_s(&t0) < (double)a.max_seconds) {
        struct pollfd p = {.fd = lfd, .events = POLLIN};
        int pr = poll(&p, 1, POLL_MS);
        if (pr < 0 && errno != EINTR) {
            fprintf(stderr, "%s: poll: %s\n", a.name, strerror(errno));
            goto done;
        }
        if (pr <= 0)
            continue;
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC); /* blocking: no SOCK_NONBLOCK */
        if (cfd < 0)
            continue; /* EAGAIN (client gone), EINTR, ECONNABORTED...: next round */
        SSL *ssl = serve_one(ctx, cfd, a.name);
        if (ssl != NULL) {
            stek_counters k = {0};
            (void)stek_client_get_counters(client, &k);
            printf("%s: %s %s", a.name, SSL_get_version(ssl),
                   SSL_session_reused(ssl) ? "resumed" : "full handshake");
            if (counters_changed(&k, &last))
                printf(" [issued %llu resumed %llu renewed %llu misses %llu epoch %llu]",
                       (unsigned long long)k.tickets_issued, (unsigned long long)k.tickets_resumed,
                       (unsigned long long)k.tickets_renewed, (unsigned long long)misses(&k),
                       (unsigned long long)k.current_epoch);
            printf("\n");
            fflush(stdout);
            last = k;
            SSL_free(ssl);
        }
        close(cfd);
    }
    fprintf(stderr, "%s: stopping (%s)\n", a.name,
            stop_requested ? "signal" : "--max-seconds reached");
    rc = 0;

done:
    if (lfd >= 0)
        close(lfd);
    /* No handshake runs any more; the client detaches from ctx. */
    stek_client_free(client);
    SSL_CTX_free(ctx);
    return rc;
}
