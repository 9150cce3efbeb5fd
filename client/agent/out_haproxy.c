/*
 * HAProxy: its runtime API over the stats socket, and its tls-ticket-keys
 * file for restarts.
 *
 * HAProxy 2.6 keeps a ring of 3 keys per tls-ticket-keys reference
 * (TLS_TICKETS_NO) and encrypts with the second newest: loading a file of
 * keys k1..kn keeps the last three and encrypts with k(n-1); `set ssl
 * tls-key <ref> <key>` overwrites the oldest slot with the new key, which
 * becomes the newest, and moves encryption to the former newest. So the
 * ring must be [previous, current, next]: next is distributed one epoch
 * ahead, and a ticket decrypts for about one epoch after its key stops
 * encrypting (tune.ssl.lifetime <= the epoch; docs/agent.md). Each push
 * shifts the ring, so a repeated or missed push would make next the
 * encrypting key: the agent reads `show tls-keys <ref>` (oldest first,
 * then the encrypting key, then the newest) and pushes exactly the keys
 * that are missing, then reads the ring back to check.
 *
 * HAProxy's key layout is name | aes | hmac (80 bytes for AES-256), base64
 * on one line; the agent converts from name | hmac | aes. Keys travel only
 * over the socket (never on a command line) and are built in locked memory.
 * A missing previous or next key (the first epoch of a generation, an
 * outage) is filled with the encrypting key itself; when no key is live, a
 * random key no peer holds replaces the expired ones.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "agent.h"

#define RING 3
#define B64_KEY_CHARS 108 /* base64 of 80 bytes */
#define IO_TIMEOUT_MS 5000
#define REPLY_MAX 16384

/* The ring the view asks for: entries (name | hmac | aes) in slot order. */
typedef struct ring_want {
    const uint8_t *entry[RING];
} ring_want;

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Sends one command (the socket's non-interactive mode: one command per
 * connection) and reads the reply until HAProxy closes. The command may
 * hold a key: it is written from the caller's (locked) buffer, nothing is
 * copied. The reply is a secret too (show tls-keys prints keys).
 */
static stek_status cli(const agent_target_cfg *t, const char *cmd, size_t cmd_len,
                       stek_secret *reply, size_t *reply_len)
{
    stek_status st = STEK_OK;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(t->socket) >= sizeof(sa.sun_path))
        STEK_BAIL(STEK_ERR_CONFIG, "socket path too long: %s", t->socket);
    memcpy(sa.sun_path, t->socket, strlen(t->socket) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "connect %s: %s", t->socket, strerror(errno));
    size_t off = 0;
    while (off < cmd_len) {
        ssize_t n = send(fd, cmd + off, cmd_len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "send to %s: %s", t->socket, strerror(errno));
        off += (size_t)n;
    }
    uint8_t *buf = stek_secret_data(reply);
    size_t cap = stek_secret_len(reply) - 1, got = 0;
    const int64_t deadline = mono_ms() + IO_TIMEOUT_MS;
    for (;;) {
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: no complete reply within %d ms", t->socket,
                           IO_TIMEOUT_MS);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, (int)left);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            continue;
        if (got == cap)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: reply longer than %zu bytes", t->socket, cap);
        ssize_t n = recv(fd, buf + got, cap - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "recv from %s: %s", t->socket, strerror(errno));
        if (n == 0)
            break;
        got += (size_t)n;
    }
    buf[got] = '\0';
    *reply_len = got;
done:
    close(fd);
    return st;
}

/* name | hmac | aes -> base64(name | aes | hmac) into out (B64_KEY_CHARS + NUL). */
static stek_status encode_haproxy(const uint8_t *entry, char *out)
{
    stek_secret *raw = NULL;
    STEK_GUARD(stek_secret_new(AGENT_ENTRY_BYTES, &raw));
    uint8_t *r = stek_secret_data(raw);
    memcpy(r, entry, AGENT_NAME_BYTES);
    memcpy(r + 16, entry + 48, 32); /* aes */
    memcpy(r + 48, entry + 16, 32); /* hmac */
    int n = EVP_EncodeBlock((unsigned char *)out, r, AGENT_ENTRY_BYTES);
    stek_secret_free(raw);
    STEK_ENSURE(n == B64_KEY_CHARS, STEK_ERR_CRYPTO);
    return STEK_OK;
}

/*
 * Parses `show tls-keys <ref>`: lines "<id>.<n> <base64>" in ring order
 * (oldest, encrypting, newest); '#' lines are headers. Keeps the names only.
 */
static stek_status parse_ring(const agent_target_cfg *t, char *text, uint8_t names[RING][16],
                              size_t *n_out)
{
    stek_status st = STEK_OK;
    stek_secret *dec = NULL;
    STEK_GUARD(stek_secret_new(128, &dec));
    size_t n = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line != NULL;
         line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#' || line[0] == '\0')
            continue;
        char *sp = strchr(line, ' ');
        if (sp == NULL)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: unexpected reply to show tls-keys: %.40s", t->socket,
                           line);
        const char *b64 = sp + 1;
        size_t len = strcspn(b64, " \r\n");
        STEK_ENSURE_GOTO(n < RING, STEK_ERR_IO);
        /* 80-byte keys only (AES-256): a 48-byte (AES-128) ring is not ours. */
        if (len != B64_KEY_CHARS)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: ring key %zu is not an 80-byte key", t->socket, n);
        int m = EVP_DecodeBlock(stek_secret_data(dec), (const unsigned char *)b64, (int)len);
        STEK_ENSURE_GOTO(m >= AGENT_NAME_BYTES, STEK_ERR_IO);
        memcpy(names[n++], stek_secret_cdata(dec), AGENT_NAME_BYTES);
    }
    *n_out = n;
done:
    stek_secret_free(dec);
    return st;
}

static stek_status show_ring(const agent_target_cfg *t, stek_secret *reply, uint8_t names[RING][16])
{
    char cmd[4200];
    int len = snprintf(cmd, sizeof(cmd), "show tls-keys %s\n", t->keys_ref);
    STEK_ENSURE(len > 0 && (size_t)len < sizeof(cmd), STEK_ERR_CONFIG);
    size_t got = 0, n = 0;
    STEK_GUARD(cli(t, cmd, (size_t)len, reply, &got));
    char *text = (char *)stek_secret_data(reply);
    if (strstr(text, "Unable to locate") != NULL || strstr(text, "unable to locate") != NULL)
        STEK_BAIL(STEK_ERR_CONFIG, "%s: HAProxy has no tls-ticket-keys reference \"%s\"", t->socket,
                  t->keys_ref);
    STEK_GUARD(parse_ring(t, text, names, &n));
    if (n != RING)
        STEK_BAIL(STEK_ERR_IO, "%s: show tls-keys %s gave %zu keys, not %d", t->socket, t->keys_ref,
                  n, RING);
    return STEK_OK;
}

static stek_status push_key(const agent_target_cfg *t, const uint8_t *entry, stek_secret *reply)
{
    stek_status st = STEK_OK;
    stek_secret *cmd = NULL;
    size_t cap = strlen(t->keys_ref) + B64_KEY_CHARS + 64;
    STEK_GUARD(stek_secret_new(cap, &cmd));
    char *c = (char *)stek_secret_data(cmd);
    int len = snprintf(c, cap, "set ssl tls-key %s ", t->keys_ref);
    STEK_ENSURE_GOTO(len > 0 && (size_t)len + B64_KEY_CHARS + 2 < cap, STEK_ERR_INTERNAL);
    STEK_GUARD_GOTO(encode_haproxy(entry, c + len));
    len += B64_KEY_CHARS;
    c[len++] = '\n';
    size_t got = 0;
    STEK_GUARD_GOTO(cli(t, c, (size_t)len, reply, &got));
    if (strstr((const char *)stek_secret_cdata(reply), "updated") == NULL)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: set ssl tls-key refused: %.80s", t->socket,
                       (const char *)stek_secret_cdata(reply));
done:
    stek_secret_free(cmd);
    return st;
}

/* The tls-ticket-keys file: the three ring keys, oldest first, so a restart encrypts with current.
 */
static stek_status write_keys_file(const agent_target_cfg *t, const ring_want *w)
{
    stek_secret *text = NULL;
    STEK_GUARD(stek_secret_new(RING * (B64_KEY_CHARS + 1), &text));
    char *p = (char *)stek_secret_data(text);
    stek_status st = STEK_OK;
    for (size_t i = 0; i < RING && st == STEK_OK; i++) {
        /* encode_haproxy writes B64_KEY_CHARS and a NUL, which the newline replaces. */
        char line[B64_KEY_CHARS + 1];
        st = encode_haproxy(w->entry[i], line);
        memcpy(p + i * (B64_KEY_CHARS + 1), line, B64_KEY_CHARS);
        p[i * (B64_KEY_CHARS + 1) + B64_KEY_CHARS] = '\n';
        stek_cleanse(line, sizeof(line));
    }
    if (st == STEK_OK)
        st = agent_replace_secret_file(t->keys_file, p, RING * (B64_KEY_CHARS + 1));
    stek_secret_free(text);
    return st;
}

static bool ring_equal(uint8_t have[RING][16], size_t from, const ring_want *w, size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (memcmp(have[from + i], w->entry[i], AGENT_NAME_BYTES) != 0)
            return false;
    return true;
}

stek_status out_haproxy_apply(const agent_target_cfg *t, const agent_view *v)
{
    stek_status st = STEK_OK;
    stek_secret *reply = NULL, *filler = NULL;
    ring_want w;
    if (v->n == 0) {
        /* Nothing live: a random key nobody else holds pushes the expired ones out. */
        STEK_GUARD(stek_secret_new(AGENT_ENTRY_BYTES, &filler));
        STEK_ENSURE_GOTO(RAND_priv_bytes(stek_secret_data(filler), AGENT_ENTRY_BYTES) == 1,
                         STEK_ERR_CRYPTO);
        w.entry[0] = w.entry[1] = w.entry[2] = stek_secret_cdata(filler);
    } else {
        long prev = agent_view_prev(v), next = agent_view_next(v);
        w.entry[1] = agent_entry(v, 0);
        w.entry[0] = prev >= 0 ? agent_entry(v, (size_t)prev) : w.entry[1];
        w.entry[2] = next >= 0 ? agent_entry(v, (size_t)next) : w.entry[1];
    }
    /* The file first: a restart from now on starts with the right ring. */
    STEK_GUARD_GOTO(write_keys_file(t, &w));
    STEK_GUARD_GOTO(stek_secret_new(REPLY_MAX, &reply));
    uint8_t have[RING][16];
    STEK_GUARD_GOTO(show_ring(t, reply, have));
    /*
     * After k pushes the ring is have[k..2] followed by the k keys pushed:
     * the fewest k for which the kept part already matches the start of
     * what we want.
     */
    size_t k = 0;
    while (k < RING && !ring_equal(have, k, &w, RING - k))
        k++;
    for (size_t i = RING - k; i < RING; i++)
        STEK_GUARD_GOTO(push_key(t, w.entry[i], reply));
    if (k > 0) {
        STEK_GUARD_GOTO(show_ring(t, reply, have));
        if (!ring_equal(have, 0, &w, RING))
            STEK_BAIL_GOTO(STEK_ERR_IO,
                           "%s: the ring is not as pushed (another writer on %s?); "
                           "retrying",
                           t->socket, t->keys_ref);
    }
done:
    stek_secret_free(reply);
    stek_secret_free(filler);
    return st;
}
