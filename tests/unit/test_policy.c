/* policy.h: typed SAN patterns, their syntax check, and matching. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include "policy.h"

#define URI STEKD_ID_URI
#define DNS STEKD_ID_DNS

static void test_uri_segment_wildcard(void **state)
{
    (void)state;
    const char *p = "uri:spiffe://fleet/edge/*";
    assert_true(stekd_policy_match(p, URI, "spiffe://fleet/edge/a"));
    assert_true(stekd_policy_match(p, URI, "spiffe://fleet/edge/host-17.dc1"));
    /* '*' never crosses a '/'. */
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edge/a/b"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edgeX/a"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edge"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/api/a"));
    assert_false(stekd_policy_match(p, URI, "spiffe://other/edge/a"));
    /* URIs are compared as written. */
    assert_false(stekd_policy_match(p, URI, "SPIFFE://fleet/edge/a"));
    /* A wildcard in the middle stays in its segment too. */
    const char *mid = "uri:spiffe://fleet/*/web";
    assert_true(stekd_policy_match(mid, URI, "spiffe://fleet/dc1/web"));
    assert_false(stekd_policy_match(mid, URI, "spiffe://fleet/dc1/x/web"));
}

static void test_uri_exact(void **state)
{
    (void)state;
    const char *p = "uri:spiffe://fleet/edge/a";
    assert_true(stekd_policy_match(p, URI, "spiffe://fleet/edge/a"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edge/ab"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edge/"));
    assert_false(stekd_policy_match(p, URI, "spiffe://fleet/edge/a/"));
    assert_false(stekd_policy_match(p, URI, ""));
    assert_false(stekd_policy_match(p, URI, NULL));
}

static void test_dns_wildcard_one_label(void **state)
{
    (void)state;
    const char *p = "dns:*.edge.example";
    assert_true(stekd_policy_match(p, DNS, "a.edge.example"));
    assert_true(stekd_policy_match(p, DNS, "host-1.edge.example"));
    assert_false(stekd_policy_match(p, DNS, "a.b.edge.example"));
    assert_false(stekd_policy_match(p, DNS, "edge.example"));
    assert_false(stekd_policy_match(p, DNS, ".edge.example"));
    assert_false(stekd_policy_match(p, DNS, "a.edge.example."));
    /* '*' would match an empty label: names with one never match. */
    assert_false(stekd_policy_match("dns:*.*.example", DNS, ".b.example"));
    assert_false(stekd_policy_match("dns:a.*.example", DNS, "a..example"));
    assert_false(stekd_policy_match(p, DNS, "a.edge.example.evil"));
    assert_false(stekd_policy_match(p, DNS, "aedge.example"));
    /* Not DNS names: a '/' would split a label, a '*' is a wildcard SAN. */
    assert_false(stekd_policy_match("dns:*.*.edge.example", DNS, "a/b.edge.example"));
    assert_false(stekd_policy_match(p, DNS, "*.edge.example"));
    /* Inner wildcards are one label too. */
    assert_true(stekd_policy_match("dns:web.*.example", DNS, "web.dc1.example"));
    assert_false(stekd_policy_match("dns:web.*.example", DNS, "web.dc1.x.example"));
    assert_true(stekd_policy_match("dns:*.*.example", DNS, "a.b.example"));
    /* A name longer than DNS allows never matches. */
    char longname[300];
    memset(longname, 'a', sizeof(longname));
    memcpy(longname + sizeof(longname) - 14, ".edge.example", 14);
    assert_false(stekd_policy_match(p, DNS, longname));
}

static void test_dns_exact_and_case(void **state)
{
    (void)state;
    assert_true(stekd_policy_match("dns:a.edge.example", DNS, "a.edge.example"));
    assert_true(stekd_policy_match("dns:a.edge.example", DNS, "A.Edge.EXAMPLE"));
    assert_true(stekd_policy_match("dns:*.EDGE.example", DNS, "Host.edge.Example"));
    assert_false(stekd_policy_match("dns:a.edge.example", DNS, "b.edge.example"));
    assert_false(stekd_policy_match("dns:a.edge.example", DNS, "a.edge.exampl"));
    assert_false(stekd_policy_match("dns:a.edge.example", DNS, ""));
    assert_false(stekd_policy_match("dns:a.edge.example", DNS, NULL));
}

static void test_type_mismatch(void **state)
{
    (void)state;
    /* A DNS identity never matches a URI pattern, even one that would match its text. */
    assert_false(stekd_policy_match("uri:a.edge.example", DNS, "a.edge.example"));
    assert_false(stekd_policy_match("uri:*", DNS, "a"));
    assert_false(stekd_policy_match("dns:a.edge.example", URI, "a.edge.example"));
    assert_false(stekd_policy_match("dns:*", URI, "a"));
    assert_true(stekd_policy_match("dns:*", DNS, "a"));
    assert_true(stekd_policy_match("uri:*", URI, "a"));
}

static void test_malformed_never_matches(void **state)
{
    (void)state;
    assert_false(stekd_policy_match(NULL, URI, "spiffe://fleet/edge/a"));
    assert_false(stekd_policy_match("", URI, ""));
    assert_false(stekd_policy_match("spiffe://fleet/edge/a", URI, "spiffe://fleet/edge/a"));
    assert_false(stekd_policy_match("URI:spiffe://fleet/edge/a", URI, "spiffe://fleet/edge/a"));
    assert_false(stekd_policy_match("san:x", URI, "x"));
    assert_false(stekd_policy_match("uri:", URI, ""));
    assert_false(stekd_policy_match("dns:a*.x", DNS, "ab.x"));
    assert_false(stekd_policy_match("uri:spiffe://fleet/**", URI, "spiffe://fleet/a"));
    assert_false(stekd_policy_match("uri:spiffe://fleet/?", URI, "spiffe://fleet/a"));
    assert_false(stekd_policy_match("uri:spiffe://fleet/[a]", URI, "spiffe://fleet/a"));
    assert_false(stekd_policy_match("uri:a b", URI, "a b"));
    assert_false(stekd_policy_match("dns:a..x", DNS, "a..x"));
}

static void test_allows_list(void **state)
{
    (void)state;
    char *pats[] = {"uri:spiffe://fleet/edge/*", "bogus", "dns:*.edge.example"};
    assert_true(stekd_policy_allows(pats, 3, URI, "spiffe://fleet/edge/a"));
    assert_true(stekd_policy_allows(pats, 3, DNS, "h.edge.example"));
    assert_false(stekd_policy_allows(pats, 3, URI, "spiffe://fleet/api/a"));
    assert_false(stekd_policy_allows(pats, 3, DNS, "h.api.example"));
    assert_false(stekd_policy_allows(pats, 3, URI, "bogus"));
    /* Only the first n count. */
    assert_false(stekd_policy_allows(pats, 1, DNS, "h.edge.example"));
    assert_false(stekd_policy_allows(pats, 0, URI, "spiffe://fleet/edge/a"));
    assert_false(stekd_policy_allows(NULL, 0, URI, "spiffe://fleet/edge/a"));
    char *none[] = {NULL};
    assert_false(stekd_policy_allows(none, 1, URI, "spiffe://fleet/edge/a"));
}

static void test_check_pattern_valid(void **state)
{
    (void)state;
    const char *ok[] = {
        "uri:spiffe://fleet/edge/*",
        "uri:spiffe://fleet/edge/a",
        "uri:*",
        "uri:spiffe://fleet/*/web",
        "dns:*.edge.example",
        "dns:a.edge.example",
        "dns:*",
        "dns:*.*.example",
        "dns:_svc.Edge-1.example",
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        if (stekd_policy_check_pattern(ok[i]) != STEK_OK)
            fail_msg("%s: %s", ok[i], stek_error_detail());
    }
    char max[4 + 512 + 1];
    memcpy(max, "uri:", 4);
    memset(max + 4, 'a', 512);
    max[4 + 512] = '\0';
    assert_int_equal(stekd_policy_check_pattern(max), STEK_OK);
}

static void expect_bad(const char *pattern, const char *detail_word)
{
    if (stekd_policy_check_pattern(pattern) != STEK_ERR_CONFIG)
        fail_msg("accepted: %s", pattern != NULL ? pattern : "(null)");
    if (strstr(stek_error_detail(), detail_word) == NULL)
        fail_msg("%s: detail \"%s\" lacks \"%s\"", pattern != NULL ? pattern : "(null)",
                 stek_error_detail(), detail_word);
}

static void test_check_pattern_invalid(void **state)
{
    (void)state;
    expect_bad(NULL, "NULL");
    expect_bad("", "prefix");
    expect_bad("spiffe://fleet/edge/*", "prefix");
    expect_bad("*.edge.example", "prefix");
    expect_bad("ip:10.0.0.1", "prefix");
    expect_bad("URI:spiffe://x", "prefix");
    expect_bad("uri:", "empty");
    expect_bad("dns:", "empty");
    expect_bad("uri:spiffe://fleet/a b", "space");
    expect_bad("uri: spiffe://fleet/a", "space");
    expect_bad("uri:spiffe://fleet/a\t", "space");
    expect_bad("uri:spiffe://fleet/\x01", "control");
    expect_bad("uri:spiffe://fleet/\xc3\xa9", "non-ASCII");
    expect_bad("uri:spiffe://fleet/**", "**");
    expect_bad("dns:**.edge.example", "**");
    expect_bad("dns:a*.x", "whole label");
    expect_bad("dns:*a.x", "whole label");
    expect_bad("dns:a.b*c.x", "whole label");
    expect_bad("dns:a..x", "empty label");
    expect_bad("dns:.a.x", "empty label");
    expect_bad("dns:a.x.", "empty label");
    expect_bad("dns:a/b.x", "DNS pattern");
    expect_bad("dns:a:b.x", "DNS pattern");
    expect_bad("uri:spiffe://fleet/?", "only wildcard");
    expect_bad("uri:spiffe://fleet/[ab]", "only wildcard");
    expect_bad("uri:spiffe://fleet/\\*", "only wildcard");

    char big[4 + 513 + 1];
    memcpy(big, "dns:", 4);
    memset(big + 4, 'a', 513);
    big[4 + 513] = '\0';
    expect_bad(big, "512");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uri_segment_wildcard),
        cmocka_unit_test(test_uri_exact),
        cmocka_unit_test(test_dns_wildcard_one_label),
        cmocka_unit_test(test_dns_exact_and_case),
        cmocka_unit_test(test_type_mismatch),
        cmocka_unit_test(test_malformed_never_matches),
        cmocka_unit_test(test_allows_list),
        cmocka_unit_test(test_check_pattern_valid),
        cmocka_unit_test(test_check_pattern_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
