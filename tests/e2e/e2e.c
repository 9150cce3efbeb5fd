#include "e2e.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef STEK_AGENT_BIN
#error "STEK_AGENT_BIN must name the stek-agent binary"
#endif

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "e2e: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return -1;
}

int e2e_require_binary(const char *path, const char *package)
{
    if (access(path, X_OK) == 0)
        return 0;
    return fail("%s is missing: install the Debian package \"%s\" (ci/packages.txt lists it; "
                "ci/install-deps.sh installs it). The e2e suite does not skip.",
                path, package);
}

int e2e_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail("socket: %s", strerror(errno));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port > 0 ? port : fail("no free port: %s", strerror(errno));
}

bool e2e_port_open(void *port_ptr)
{
    int port = *(int *)port_ptr;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return ok;
}

double e2e_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void e2e_wait_epoch_offset(const fx_stekd *d, double offset)
{
    double now = e2e_now();
    double next = ((double)((uint64_t)now / d->epoch_s) + 1) * d->epoch_s + offset;
    double left = next - now;
    struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
    /* Waiting for a wall-clock instant is the point here, not readiness. */
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int e2e_count_containing(const char *path, const char *needle)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    int n = 0;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) >= 0)
        if (strstr(line, needle) != NULL)
            n++;
    free(line);
    fclose(f);
    return n;
}

typedef struct log_wait {
    const char *path, *needle;
    int want;
} log_wait;

static bool log_has(void *arg)
{
    log_wait *w = arg;
    return e2e_count_containing(w->path, w->needle) >= w->want;
}

int e2e_wait_log(const char *path, const char *needle, int want, int timeout_ms)
{
    log_wait w = {path, needle, want};
    if (fx_wait_until(log_has, &w, timeout_ms) != 0)
        return fail("%s: no %d lines with \"%s\" within %d ms", path, want, needle, timeout_ms);
    return 0;
}

int e2e_count_key_files(const char *dir, const char *target)
{
    char prefix[128];
    snprintf(prefix, sizeof(prefix), "stek-%s-e", target);
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0)
            n++;
    closedir(d);
    return n;
}

char *e2e_read_file(const char *path)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (buf != NULL) {
        len = fread(buf, 1, cap - 1, f);
        buf[len] = '\0';
    }
    fclose(f);
    return buf;
}

static char last_log[FX_PATH_MAX + 48];

const char *e2e_last_log(void)
{
    return last_log;
}

e2e_outcome e2e_sclient(const char *dir, const char *ca, int port, const char *tls_flag,
                        const char *sess_in, const char *sess_out)
{
    static unsigned runs;
    char req[FX_PATH_MAX + 32], log[FX_PATH_MAX + 48], cmd[4 * FX_PATH_MAX + 256];
    snprintf(req, sizeof(req), "%s/http-request.txt", dir);
    if (access(req, R_OK) != 0 && fx_write_file(req, "GET / HTTP/1.0\r\n\r\n", 0600) != 0)
        return E2E_FAILED;
    snprintf(log, sizeof(log), "%s/sclient-%u.log", dir, runs++);
    memcpy(last_log, log, sizeof(last_log));
    /* A shell only to give s_client its request on stdin (fx_spawn gives /dev/null). */
    snprintf(cmd, sizeof(cmd),
             "exec openssl s_client -connect 127.0.0.1:%d -servername localhost -CAfile %s "
             "-verify_return_error -ign_eof %s%s%s%s%s < %s",
             port, ca, tls_flag, sess_in ? " -sess_in " : "", sess_in ? sess_in : "",
             sess_out ? " -sess_out " : "", sess_out ? sess_out : "", req);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    pid_t pid;
    int status = -1;
    if (fx_spawn(argv, log, &pid) != 0 || fx_wait_exit(pid, 15000, &status) != 0)
        return E2E_FAILED;
    const char *version = strcmp(tls_flag, "-tls1_3") == 0 ? "TLSv1.3" : "TLSv1.2";
    char new_line[32], reused_line[32];
    snprintf(new_line, sizeof(new_line), "New, %s,", version);
    snprintf(reused_line, sizeof(reused_line), "Reused, %s,", version);
    int n_new = fx_count_lines(log, new_line), n_reused = fx_count_lines(log, reused_line);
    bool http_ok = e2e_count_containing(log, " 200 OK") == 1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || n_new + n_reused != 1 || !http_ok) {
        fprintf(stderr,
                "e2e: s_client to port %d %s: status 0x%x, %d New / %d Reused, %s; see %s\n", port,
                tls_flag, status, n_new, n_reused, http_ok ? "HTTP 200" : "no HTTP 200", log);
        return E2E_FAILED;
    }
    return n_reused == 1 ? E2E_REUSED : E2E_NEW;
}

int e2e_write_agent_config(const char *path, const fx_stekd *d, const fx_cert *host,
                           const char *extra_root, const char *targets)
{
    char text[16384];
    int n = snprintf(text, sizeof(text),
                     "# stek-agent config written by the e2e test\n"
                     "stekd = {\n"
                     "  servers = [\"%s\"];\n"
                     "  server_name = \"localhost\";\n"
                     "  ca = \"%s\";\n"
                     "  cert = \"%s\";\n"
                     "  key = \"%s\";\n"
                     "  service_keys = [\"%s\"];\n"
                     "};\n"
                     "retry = { min = \"200ms\"; max = \"1s\"; };\n"
                     "%s\n"
                     "targets = (\n%s\n);\n",
                     d->target, d->ca.cert_path, host->cert_path, host->key_path,
                     d->signing_pem_path, extra_root, targets);
    if (n < 0 || (size_t)n >= sizeof(text))
        return fail("agent config too long");
    return fx_write_file(path, text, 0600);
}

int e2e_start_agent(const char *config, const char *log_path, pid_t *pid)
{
    char *argv[] = {STEK_AGENT_BIN, "--config", (char *)config, NULL};
    return fx_spawn(argv, log_path, pid);
}

int e2e_run_agent(char *const args[], const char *log_path, int timeout_ms)
{
    char *argv[16] = {STEK_AGENT_BIN};
    size_t n = 1;
    for (; args[n - 1] != NULL && n < 15; n++)
        argv[n] = args[n - 1];
    argv[n] = NULL;
    pid_t pid;
    int status = -1;
    if (fx_spawn(argv, log_path, &pid) != 0 || fx_wait_exit(pid, timeout_ms, &status) != 0)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
