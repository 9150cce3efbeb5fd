/*
 * Group access policy: typed patterns matched with fnmatch(3). '*' is the
 * only wildcard. A URI '*' stays within one path segment (FNM_PATHNAME); a
 * DNS '*' is one whole label, and DNS names compare case-insensitively.
 */
#include "policy.h"

#include <fnmatch.h>
#include <stdio.h>
#include <string.h>

#define PATTERN_MAX_BYTES 512
/* RFC 1035: 253 characters in text form; anything longer is not a name. */
#define DNS_NAME_MAX_BYTES 253

/* The characters of a DNS name (underscore appears in service names). */
static bool dns_char_ok(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
}

/*
 * Why the pattern is malformed, or NULL when it is fine; on success *type
 * and *body (the part after the prefix) are set. Does not touch the error
 * slot, so matching can use it without clobbering a caller's detail.
 */
static const char *pattern_defect(const char *pattern, stekd_id_type *type, const char **body)
{
    if (pattern == NULL)
        return "pattern is NULL";
    if (strncmp(pattern, "uri:", 4) == 0)
        *type = STEKD_ID_URI;
    else if (strncmp(pattern, "dns:", 4) == 0)
        *type = STEKD_ID_DNS;
    else
        return "pattern needs a type prefix \"uri:\" or \"dns:\"";
    *body = pattern + 4;

    size_t len = strnlen(*body, PATTERN_MAX_BYTES + 1);
    if (len == 0)
        return "pattern is empty after its type prefix";
    if (len > PATTERN_MAX_BYTES)
        return "pattern is longer than 512 bytes";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)(*body)[i];
        if (c <= 0x20 || c >= 0x7f)
            return "pattern has a space, control or non-ASCII character";
        /* fnmatch would treat these as wildcards or escapes; only '*' is documented. */
        if (c == '?' || c == '[' || c == ']' || c == '\\')
            return "pattern has '?', '[', ']' or '\\': '*' is the only wildcard";
    }
    /* With FNM_PATHNAME "**" is just "*"; reject it rather than let it look recursive. */
    if (strstr(*body, "**") != NULL)
        return "pattern has \"**\": '*' never crosses a separator";
    if (*type == STEKD_ID_URI)
        return NULL;

    for (size_t i = 0; i < len; i++)
        if (!dns_char_ok((*body)[i]) && (*body)[i] != '*')
            return "DNS pattern has a character outside [A-Za-z0-9._-*]";
    /* Every label non-empty, and a label with '*' is exactly "*". */
    const char *label = *body;
    for (;;) {
        const char *dot = strchr(label, '.');
        size_t n = dot != NULL ? (size_t)(dot - label) : strlen(label);
        if (n == 0)
            return "DNS pattern has an empty label";
        if (memchr(label, '*', n) != NULL && n != 1)
            return "DNS pattern's '*' must be a whole label";
        if (dot == NULL)
            break;
        label = dot + 1;
    }
    return NULL;
}

stek_status stekd_policy_check_pattern(const char *pattern)
{
    stekd_id_type type;
    const char *body;
    const char *why = pattern_defect(pattern, &type, &body);
    if (why != NULL)
        STEK_BAIL(STEK_ERR_CONFIG, "%s", why);
    return STEK_OK;
}

/*
 * Copies s into out with '.' turned into '/', so FNM_PATHNAME keeps '*'
 * within a label. False when s is too long, has an empty label, or has a
 * character no DNS name has: a '/' in the value would otherwise split a
 * label in two, and a '*' (a wildcard SAN) would be matched as a literal.
 */
static bool dots_to_slashes(const char *s, bool is_pattern, char *out, size_t cap)
{
    size_t len = strnlen(s, cap);
    if (len >= cap)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!dns_char_ok(s[i]) && !(is_pattern && s[i] == '*'))
            return false;
        /* '*' matches an empty label, so ".edge.example" must not reach fnmatch. */
        if (s[i] == '.' && (i == 0 || i + 1 == len || s[i + 1] == '.'))
            return false;
        out[i] = s[i] == '.' ? '/' : s[i];
    }
    out[len] = '\0';
    return true;
}

bool stekd_policy_match(const char *pattern, stekd_id_type type, const char *value)
{
    stekd_id_type ptype;
    const char *body;
    if (value == NULL || value[0] == '\0' || pattern_defect(pattern, &ptype, &body) != NULL)
        return false;
    if (ptype != type)
        return false;
    if (type == STEKD_ID_URI)
        return fnmatch(body, value, FNM_PATHNAME) == 0;

    char p[PATTERN_MAX_BYTES + 1], v[DNS_NAME_MAX_BYTES + 1];
    if (!dots_to_slashes(body, true, p, sizeof(p)) || !dots_to_slashes(value, false, v, sizeof(v)))
        return false;
    return fnmatch(p, v, FNM_PATHNAME | FNM_CASEFOLD) == 0;
}

bool stekd_policy_allows(char *const *patterns, size_t n, stekd_id_type type, const char *value)
{
    if (patterns == NULL)
        return false;
    for (size_t i = 0; i < n; i++)
        if (stekd_policy_match(patterns[i], type, value))
            return true;
    return false;
}
