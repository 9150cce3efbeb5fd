/*
 * Checks on the server's own config file for settings that shared ticket
 * keys make unsafe or slow: 0-RTT (one ClientHello with early data can be
 * replayed on every server holding the keys, RFC 8446 section 8), nginx's
 * worker_shutdown_timeout (old workers keep old keys until they exit) and
 * HAProxy's tune.ssl.lifetime (its ring decrypts for about one epoch).
 *
 * This is a scan for a few directives, not a parser of either format: it
 * splits the file into words (comments dropped) and looks at a directive's
 * next word. It does not follow include files; docs/agent.md says so.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

#define MAX_CONFIG_BYTES (4u << 20)

/* "90", "90s", "1m30s", "500ms" (nginx and HAProxy time syntax) in seconds, rounded up; -1 if not a
 * time. */
static int64_t parse_time(const char *w, size_t len, bool bare_is_ms)
{
    int64_t total_ms = 0;
    size_t i = 0;
    if (len == 0)
        return -1;
    while (i < len) {
        if (!isdigit((unsigned char)w[i]))
            return -1;
        int64_t v = 0;
        while (i < len && isdigit((unsigned char)w[i]) && v < 1000000000)
            v = v * 10 + (w[i++] - '0');
        int64_t mult;
        if (i + 2 <= len && strncmp(w + i, "ms", 2) == 0) {
            mult = 1, i += 2;
        } else if (i < len && w[i] == 's') {
            mult = 1000, i++;
        } else if (i < len && w[i] == 'm') {
            mult = 60000, i++;
        } else if (i < len && w[i] == 'h') {
            mult = 3600000, i++;
        } else if (i < len && w[i] == 'd') {
            mult = 86400000, i++;
        } else if (i == len) {
            mult = bare_is_ms ? 1 : 1000;
        } else {
            return -1;
        }
        total_ms += v * mult;
    }
    return (total_ms + 999) / 1000;
}

static bool is_sep(char c)
{
    return isspace((unsigned char)c) || c == ';' || c == '{' || c == '}';
}

/* The next word of text at *pos (comments skipped); false at the end. */
static bool next_word(const char *text, size_t n, size_t *pos, const char **w, size_t *len)
{
    size_t i = *pos;
    for (;;) {
        while (i < n && is_sep(text[i]))
            i++;
        if (i < n && text[i] == '#') {
            while (i < n && text[i] != '\n')
                i++;
            continue;
        }
        break;
    }
    if (i >= n)
        return false;
    size_t start = i;
    while (i < n && !is_sep(text[i]) && text[i] != '#')
        i++;
    *w = text + start;
    *len = i - start;
    *pos = i;
    return true;
}

static bool word_is(const char *w, size_t len, const char *s)
{
    return strlen(s) == len && strncmp(w, s, len) == 0;
}

stek_status agent_check_server_config(agent_kind kind, const char *path, agent_server_checks *out)
{
    stek_status st = STEK_OK;
    memset(out, 0, sizeof(*out));
    char *text = NULL;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", path, strerror(errno));
    text = malloc(MAX_CONFIG_BYTES);
    STEK_ENSURE_GOTO(text != NULL, STEK_ERR_NOMEM);
    size_t n = fread(text, 1, MAX_CONFIG_BYTES, f);
    STEK_ENSURE_GOTO(!ferror(f), STEK_ERR_IO);
    size_t pos = 0, len = 0, vlen = 0;
    const char *w = NULL, *v = NULL;
    while (next_word(text, n, &pos, &w, &len)) {
        if (kind == AGENT_NGINX && word_is(w, len, "ssl_early_data")) {
            if (next_word(text, n, &pos, &v, &vlen) && word_is(v, vlen, "on"))
                out->early_data = true;
        } else if (kind == AGENT_NGINX && word_is(w, len, "worker_shutdown_timeout")) {
            if (next_word(text, n, &pos, &v, &vlen)) {
                out->has_shutdown_timeout = true;
                out->shutdown_timeout_s = parse_time(v, vlen, false);
            }
        } else if (kind == AGENT_HAPROXY && word_is(w, len, "allow-0rtt")) {
            out->early_data = true;
        } else if (kind == AGENT_HAPROXY && word_is(w, len, "tune.ssl.lifetime")) {
            if (next_word(text, n, &pos, &v, &vlen)) {
                out->has_ssl_lifetime = true;
                out->ssl_lifetime_s = parse_time(v, vlen, false);
            }
        }
    }
done:
    free(text);
    fclose(f);
    return st;
}
