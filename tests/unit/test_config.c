/*
 * config.h: the parsed values and defaults, path resolution, and an error
 * with the right FILE:LINE for every kind of mistake. Error configs mark
 * the line the detail must name with "#<".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

#define LISTEN "listen = \"127.0.0.1:0\";\n"
#define TLS "tls = { cert = \"/c.pem\"; key = \"/k.pem\"; client_ca = \"/ca.pem\"; };\n"
#define HSM "hsm = { module = \"/m.so\"; token = \"t\"; };\n"
#define GROUPS                                                                                     \
    "groups = ( { name = \"edge\"; epoch = \"1h\"; allow = [ \"uri:spiffe://f/*\" ]; } );\n"

static char dir[PATH_MAX];       /* this run's temp dir, resolved */
static char path[PATH_MAX + 16]; /* dir/stekd.conf */

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("STEK_TEST_TMPDIR");
    char tmpl[PATH_MAX];
    snprintf(tmpl, sizeof(tmpl), "%s/stek-conf-XXXXXX", base != NULL ? base : "/tmp");
    if (mkdtemp(tmpl) == NULL || realpath(tmpl, dir) == NULL)
        return -1;
    snprintf(path, sizeof(path), "%s/stekd.conf", dir);
    return 0;
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int teardown(void **state)
{
    (void)state;
    return nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static void write_conf(const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static stekd_config *load_ok(const char *text)
{
    write_conf(text);
    stekd_config *cfg = NULL;
    if (stekd_config_load(path, &cfg) != STEK_OK)
        fail_msg("rejected: %s", stek_error_detail());
    assert_non_null(cfg);
    return cfg;
}

/* The 1-based line holding "#<", or 0. */
static int marked_line(const char *text)
{
    const char *m = strstr(text, "#<");
    if (m == NULL)
        return 0;
    int line = 1;
    for (const char *c = text; c < m; c++)
        line += *c == '\n';
    return line;
}

/* Loading text fails with STEK_ERR_CONFIG, at the marked line, with word in the detail. */
static void expect_fail(const char *text, const char *word)
{
    write_conf(text);
    stekd_config *cfg = (stekd_config *)1;
    stek_status st = stekd_config_load(path, &cfg);
    const char *d = stek_error_detail();
    if (st != STEK_ERR_CONFIG)
        fail_msg("got %s for:\n%s", stek_status_name(st), text);
    assert_null(cfg);
    char where[PATH_MAX + 64];
    int line = marked_line(text);
    if (line > 0)
        snprintf(where, sizeof(where), "%s:%d: ", path, line);
    else
        snprintf(where, sizeof(where), "%s: ", path);
    if (getenv("STEK_TEST_VERBOSE") != NULL)
        print_message("%s\n", d);
    if (strncmp(d, where, strlen(where)) != 0)
        fail_msg("detail \"%s\" does not start with \"%s\"", d, where);
    if (strstr(d, word) == NULL)
        fail_msg("detail \"%s\" lacks \"%s\"", d, word);
}

/* A config whose one group has `body` (which may carry the marker) after its name. */
static void expect_group_fail(const char *body, const char *word)
{
    char text[2048];
    snprintf(text, sizeof(text),
             LISTEN TLS HSM "groups = (\n  { name = \"edge\";\n"
                            "    %s\n  }\n);\n",
             body);
    expect_fail(text, word);
}

static void test_full_valid(void **state)
{
    (void)state;
    stekd_config *c =
        load_ok("# all of it\n"
                "listen = \"0.0.0.0:7443\";\n"
                "tls = { cert = \"server.pem\"; key = \"keys/server-key.pem\";\n"
                "        client_ca = \"/etc/stek/fleet-ca.pem\"; };\n"
                "hsm = { module = \"lib/libsofthsm2.so\"; token = \"stek-prod\";\n"
                "        pin_env = \"MY_PIN\"; so_pin_env = \"_SO_PIN2\"; };\n"
                "schedule = { max_jump = 5; heartbeat = \"15m\"; jitter = \"250ms\"; };\n"
                "limits = { max_request_bytes = 8192; wrap_cache_entries = 77;\n"
                "           max_watchers = 200; };\n"
                "groups = (\n"
                "  { name = \"edge\"; epoch = \"1h\"; decrypt_lifetime = \"2d\";\n"
                "    origin = \"2026-01-01T00:00:00Z\";\n"
                "    allow = [ \"uri:spiffe://fleet/edge/*\", \"dns:*.edge.example\" ]; },\n"
                "  { name = \"api.v2\"; epoch = 90; decrypt_lifetime = 0;\n"
                "    origin = 1700000000; allow = ( \"dns:api.example\" ); }\n"
                ");\n");
    char want[PATH_MAX + 64];
    assert_string_equal(c->path, path);
    assert_string_equal(c->listen, "0.0.0.0:7443");
    snprintf(want, sizeof(want), "%s/server.pem", dir);
    assert_string_equal(c->tls_cert, want);
    snprintf(want, sizeof(want), "%s/keys/server-key.pem", dir);
    assert_string_equal(c->tls_key, want);
    assert_string_equal(c->tls_client_ca, "/etc/stek/fleet-ca.pem");
    snprintf(want, sizeof(want), "%s/lib/libsofthsm2.so", dir);
    assert_string_equal(c->hsm_module, want);
    assert_string_equal(c->hsm_token, "stek-prod");
    assert_string_equal(c->pin_env, "MY_PIN");
    assert_string_equal(c->so_pin_env, "_SO_PIN2");
    assert_int_equal(c->max_jump, 5);
    assert_int_equal(c->heartbeat_s, 900);
    assert_int_equal(c->jitter_ms, 250);
    assert_int_equal(c->max_request_bytes, 8192);
    assert_int_equal(c->wrap_cache_entries, 77);
    assert_int_equal(c->max_watchers, 200);

    assert_int_equal(c->n_groups, 2);
    const stekd_group_cfg *g = &c->groups[0];
    assert_string_equal(g->name, "edge");
    assert_int_equal(g->sched.epoch_s, 3600);
    assert_int_equal(g->sched.lifetime_s, 2 * 86400);
    assert_int_equal(g->sched.origin, 1767225600);
    assert_int_equal(g->n_allow, 2);
    assert_string_equal(g->allow[0], "uri:spiffe://fleet/edge/*");
    assert_string_equal(g->allow[1], "dns:*.edge.example");
    g = &c->groups[1];
    assert_string_equal(g->name, "api.v2");
    assert_int_equal(g->sched.epoch_s, 90);
    assert_int_equal(g->sched.lifetime_s, 0);
    assert_int_equal(g->sched.origin, 1700000000);
    assert_int_equal(g->n_allow, 1);
    assert_string_equal(g->allow[0], "dns:api.example");

    assert_ptr_equal(stekd_config_group(c, "api.v2"), &c->groups[1]);
    assert_ptr_equal(stekd_config_group(c, "edge"), &c->groups[0]);
    assert_null(stekd_config_group(c, "edg"));
    assert_null(stekd_config_group(c, NULL));
    assert_null(stekd_config_group(NULL, "edge"));
    stekd_config_free(c);
    stekd_config_free(NULL);
}

static void test_defaults(void **state)
{
    (void)state;
    stekd_config *c =
        load_ok(LISTEN "tls = { cert = \"/c.pem\"; key = \"pkcs11:token=stek;object=tls\";\n"
                       "        client_ca = \"./ca.pem\"; };\n"
                       "hsm = { module = \"libsofthsm2.so\"; token = \"t\"; };\n" GROUPS);
    /* A pkcs11: URI is not a path; a bare module name is left to dlopen's search. */
    assert_string_equal(c->tls_key, "pkcs11:token=stek;object=tls");
    assert_string_equal(c->hsm_module, "libsofthsm2.so");
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "%s/./ca.pem", dir);
    assert_string_equal(c->tls_client_ca, want);
    assert_string_equal(c->pin_env, "STEK_PIN");
    assert_string_equal(c->so_pin_env, "STEK_SO_PIN");
    assert_int_equal(c->max_jump, 2);
    assert_int_equal(c->heartbeat_s, 30);
    assert_int_equal(c->jitter_ms, 2000);
    assert_int_equal(c->max_request_bytes, 4096);
    assert_int_equal(c->wrap_cache_entries, 10000);
    assert_int_equal(c->max_watchers, 10000);
    assert_int_equal(c->n_groups, 1);
    assert_int_equal(c->groups[0].sched.lifetime_s, 18 * 3600);
    assert_int_equal(c->groups[0].sched.origin, 0);
    stekd_config_free(c);

    /* Empty sections keep the defaults too; jitter in whole seconds is scaled. */
    c = load_ok(LISTEN TLS HSM GROUPS "schedule = { jitter = 3; };\nlimits = { };\n");
    assert_int_equal(c->jitter_ms, 3000);
    assert_int_equal(c->max_jump, 2);
    assert_int_equal(c->max_watchers, 10000);
    stekd_config_free(c);
}

static void test_relative_config_path(void **state)
{
    (void)state;
    /* A config named relative to the cwd resolves its paths to absolute ones. */
    write_conf(
        LISTEN
        "tls = { cert = \"c.pem\"; key = \"k.pem\"; client_ca = \"ca.pem\"; };\n" HSM GROUPS);
    char cwd[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(dir), 0);
    stekd_config *c = NULL;
    stek_status st = stekd_config_load("stekd.conf", &c);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(st, STEK_OK);
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "%s/c.pem", dir);
    assert_string_equal(c->tls_cert, want);
    assert_string_equal(c->path, "stekd.conf");
    stekd_config_free(c);
}

static void test_example_file(void **state)
{
    (void)state;
    const char *ex = STEK_SOURCE_DIR "/docs/stekd.conf.example";
    stekd_config *c = NULL;
    if (stekd_config_load(ex, &c) != STEK_OK)
        fail_msg("%s: %s", ex, stek_error_detail());
    assert_string_equal(c->listen, "127.0.0.1:7443");
    assert_string_equal(c->tls_cert, STEK_SOURCE_DIR "/docs/tls/server.pem");
    assert_string_equal(c->hsm_module, "/usr/lib/softhsm/libsofthsm2.so");
    assert_string_equal(c->hsm_token, "stek");
    assert_int_equal(c->max_jump, 2);
    assert_int_equal(c->heartbeat_s, 30);
    assert_int_equal(c->jitter_ms, 2000);
    assert_int_equal(c->n_groups, 2);
    const stekd_group_cfg *g = stekd_config_group(c, "edge");
    assert_non_null(g);
    assert_int_equal(g->sched.epoch_s, 3600);
    assert_int_equal(g->sched.lifetime_s, 18 * 3600);
    assert_int_equal(g->sched.origin, 1767225600);
    assert_int_equal(g->n_allow, 2);
    assert_non_null(stekd_config_group(c, "api"));
    stekd_config_free(c);
}

static void test_syntax_error(void **state)
{
    (void)state;
    /*
     * Not `cert "/c.pem";` (a missing '='): libconfig 1.5 leaks the string
     * token on that error, which LeakSanitizer would pin on this test.
     */
    expect_fail(LISTEN "tls = { cert = \"/c.pem\"; key = ; }; #<\n" HSM GROUPS, "syntax error");
    expect_fail("listen = \"127.0.0.1:0\" = 3; #<\n" TLS HSM GROUPS, "syntax error");
    expect_fail(LISTEN TLS HSM GROUPS "\nschedule = { max_jump = ; }; #<\n", "syntax error");
    /* libconfig refuses a setting given twice. */
    expect_fail(LISTEN TLS HSM GROUPS "listen = \"x:1\"; #<\n", "duplicate");
}

static void test_unknown_settings(void **state)
{
    (void)state;
    expect_fail(LISTEN TLS HSM GROUPS "\nlisten_addr = \"x:1\"; #<\n",
                "unknown setting \"listen_addr\"");
    expect_group_fail("epcoh = \"1h\"; #<\n    allow = [ \"uri:x\" ];",
                      "unknown setting \"groups[0].epcoh\"");
    expect_fail(LISTEN "tls = {\n cert = \"/c\"; key = \"/k\"; client_ca = \"/ca\";\n"
                       " certs = \"/x\"; #<\n};\n" HSM GROUPS,
                "unknown setting \"tls.certs\"");
    expect_fail(LISTEN TLS "hsm = { module = \"/m.so\"; token = \"t\";\n slot = 0; }; #<\n" GROUPS,
                "unknown setting \"hsm.slot\"");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = {\n  maxjump = 3; #<\n};\n",
                "unknown setting \"schedule.maxjump\"");
    expect_fail(LISTEN TLS HSM GROUPS "limits = { max_requests = 3; }; #<\n",
                "unknown setting \"limits.max_requests\"");
    /* Names are case-sensitive: "Listen" is not "listen". */
    expect_fail("Listen = \"x:1\"; #<\n" TLS HSM GROUPS, "unknown setting \"Listen\"");
}

static void test_missing_settings(void **state)
{
    (void)state;
    expect_fail(TLS HSM GROUPS, "missing required setting \"listen\"");
    expect_fail(LISTEN TLS HSM, "missing required setting \"groups\"");
    expect_fail(LISTEN HSM GROUPS, "missing required setting \"tls\"");
    expect_fail(LISTEN TLS GROUPS, "missing required setting \"hsm\"");
    expect_fail("", "missing required setting \"listen\"");
    expect_fail(LISTEN "tls = { key = \"/k\"; client_ca = \"/ca\"; }; #<\n" HSM GROUPS,
                "missing required setting \"tls.cert\"");
    expect_fail(LISTEN "tls = { cert = \"/c\"; client_ca = \"/ca\"; }; #<\n" HSM GROUPS,
                "missing required setting \"tls.key\"");
    expect_fail(LISTEN "tls = { cert = \"/c\"; key = \"/k\"; }; #<\n" HSM GROUPS,
                "missing required setting \"tls.client_ca\"");
    expect_fail(LISTEN TLS "hsm = { token = \"t\"; }; #<\n" GROUPS,
                "missing required setting \"hsm.module\"");
    expect_fail(LISTEN TLS "hsm = { module = \"/m.so\"; }; #<\n" GROUPS,
                "missing required setting \"hsm.token\"");
    expect_fail(LISTEN TLS HSM "groups = ( ); #<\n", "at least one group");
    expect_fail(LISTEN TLS HSM "groups = (\n { epoch = \"1h\"; allow = [ \"uri:x\" ]; } #<\n);\n",
                "missing required setting \"groups[0].name\"");
    expect_fail(LISTEN TLS HSM "groups = (\n { name = \"e\"; allow = [ \"uri:x\" ]; } #<\n);\n",
                "missing required setting \"groups[0].epoch\"");
    expect_fail(LISTEN TLS HSM "groups = (\n { name = \"e\"; epoch = \"1h\"; } #<\n);\n",
                "missing required setting \"groups[0].allow\"");
    expect_group_fail("epoch = \"1h\"; allow_x = 1; #<", "unknown setting");
}

static void test_wrong_types(void **state)
{
    (void)state;
    expect_fail("listen = 7443; #<\n" TLS HSM GROUPS, "\"listen\" must be a string");
    expect_fail("listen = \"\"; #<\n" TLS HSM GROUPS, "must not be empty");
    expect_fail(LISTEN "tls = \"/c.pem\"; #<\n" HSM GROUPS, "\"tls\" must be a group");
    expect_fail(LISTEN TLS HSM "groups = { name = \"e\"; }; #<\n", "\"groups\" must be a list");
    expect_fail(LISTEN TLS HSM "groups = ( \"edge\" ); #<\n", "\"groups[0]\" must be a group");
    expect_group_fail("epoch = 1.5; #<", "must be a duration");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = { max_jump = \"2\"; }; #<\n",
                "must be an integer");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = { max_jump = 0; }; #<\n",
                "\"schedule.max_jump\" is out of range");
    expect_fail(LISTEN TLS HSM GROUPS "limits = { max_request_bytes = 100; }; #<\n",
                "\"limits.max_request_bytes\" is out of range");
    expect_fail(LISTEN TLS HSM GROUPS "limits = { max_watchers = -1; }; #<\n", "out of range");
    expect_fail(LISTEN TLS
                "hsm = { module = \"/m\"; token = \"t\"; pin_env = \"1PIN\"; }; #<\n" GROUPS,
                "environment variable name");
    expect_fail(LISTEN TLS
                "hsm = { module = \"/m\"; token = \"t\"; so_pin_env = \"A-B\"; }; #<\n" GROUPS,
                "environment variable name");
    expect_fail(
        LISTEN TLS
        "hsm = { module = \"/m\";\n token = \"a-token-label-longer-than-32-bytes\"; }; #<\n" GROUPS,
        "token label");
}

static void test_bad_durations(void **state)
{
    (void)state;
    expect_group_fail("epoch = \"10x\"; #<", "\"groups[0].epoch\": bad duration \"10x\"");
    expect_group_fail("epoch = \"-5s\"; #<", "bad duration \"-5s\": it is negative");
    expect_group_fail("epoch = -5; #<", "negative");
    expect_group_fail("epoch = \"0s\"; #<", "\"groups[0].epoch\" is out of range (1s to 30d)");
    expect_group_fail("epoch = 0; #<", "out of range");
    expect_group_fail("epoch = \"99999999999999999999s\"; #<", "too large");
    expect_group_fail("epoch = \"31d\"; #<", "out of range");
    expect_group_fail("epoch = \"1h \"; #<", "unknown unit");
    expect_group_fail("epoch = \"\"; #<", "bad duration");
    expect_group_fail("epoch = \"1h\";\n decrypt_lifetime = \"31d\"; #<", "out of range");
    expect_group_fail("epoch = \"1h\";\n decrypt_lifetime = \"18hours\"; #<", "unknown unit");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = {\n heartbeat = \"0s\"; #<\n};\n",
                "\"schedule.heartbeat\" is out of range");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = { jitter = \"2x\"; }; #<\n", "ms, s, m, h or d");
    expect_fail(LISTEN TLS HSM GROUPS "schedule = { jitter = \"2h\"; }; #<\n", "out of range");
}

static void test_bad_origin(void **state)
{
    (void)state;
    expect_group_fail("epoch = \"1h\"; origin = -1; #<", "before 1970");
    expect_group_fail("epoch = \"1h\"; origin = \"2026-02-31T00:00:00Z\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = \"2026-01-01 00:00:00Z\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = \"2026-01-01T00:00:00+01:00\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = \"2026-01-01T00:00:00\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = \"2026-1-01T00:00:00Z\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = \" 2026-01-01T00:00:00Z\"; #<", "bad time");
    expect_group_fail("epoch = \"1h\"; origin = true; #<", "Unix seconds");
    /* Past stek_sched_check's bound on T0. */
    expect_fail(LISTEN TLS HSM
                "groups = (\n { name = \"late\"; epoch = \"1h\"; #<\n"
                "   origin = \"2300-01-01T00:00:00Z\"; allow = [ \"uri:x\" ]; }\n);\n",
                "group \"late\": bad schedule");
}

/* A set must stay small: ceil(L/P) + 2 keys, at most STEKD_MAX_KEYS_PER_SET. */
static void test_keys_per_set_bounded(void **state)
{
    (void)state;
    expect_fail(LISTEN TLS HSM "groups = (\n { name = \"huge\"; epoch = \"1s\"; #<\n"
                               "   decrypt_lifetime = \"2h\"; allow = [ \"uri:x\" ]; }\n);\n",
                "7202 keys per set; at most 1024");
    /* 1022 past epochs + 2 is exactly the limit. */
    stekd_config *c = load_ok(LISTEN TLS HSM "groups = (\n { name = \"edge\"; epoch = \"1s\";\n"
                                             "   decrypt_lifetime = \"1022s\";"
                                             " allow = [ \"uri:x\" ]; }\n);\n");
    stekd_config_free(c);
}

static void test_bad_group_names(void **state)
{
    (void)state;
    expect_fail(
        LISTEN TLS HSM
        "groups = (\n { name = \"Edge\"; #<\n   epoch = \"1h\"; allow = [ \"uri:x\" ]; }\n);\n",
        "bad group name \"Edge\"");
    expect_fail(LISTEN TLS HSM
                "groups = ( { name = \"\"; epoch = \"1h\"; allow = [ \"uri:x\" ]; } ); #<\n",
                "bad group name");
    expect_fail(LISTEN TLS HSM
                "groups = ( { name = \"a b\"; epoch = \"1h\"; allow = [ \"uri:x\" ]; } ); #<\n",
                "bad group name");
    expect_fail(LISTEN TLS HSM
                "groups = ( { name = "
                "\"a23456789012345678901234567890123456789012345678901234567890123456789\"; "
                "epoch = \"1h\"; allow = [ \"uri:x\" ]; } ); #<\n",
                "bad group name");
    expect_fail(LISTEN TLS HSM
                "groups = ( { name = 5; epoch = \"1h\"; allow = [ \"uri:x\" ]; } ); #<\n",
                "must be a string");
    expect_fail(LISTEN TLS HSM "groups = (\n"
                               " { name = \"edge\"; epoch = \"1h\"; allow = [ \"uri:x\" ]; },\n"
                               " { name = \"api\"; epoch = \"1h\"; allow = [ \"uri:y\" ]; },\n"
                               " { name = \"edge\"; #<\n"
                               "   epoch = \"2h\"; allow = [ \"uri:z\" ]; }\n);\n",
                "\"groups[2].name\": duplicate group \"edge\"");
}

static void test_bad_patterns(void **state)
{
    (void)state;
    expect_fail(LISTEN TLS HSM "groups = ( { name = \"e\"; epoch = \"1h\";\n"
                               "  allow = [ \"uri:spiffe://f/*\",\n"
                               "            \"spiffe://f/x\" ]; } ); #<\n",
                "\"groups[0].allow[1]\": bad pattern \"spiffe://f/x\"");
    expect_group_fail("epoch = \"1h\"; allow = [ \"dns:a*.x\" ]; #<", "whole label");
    expect_group_fail("epoch = \"1h\"; allow = [ \"uri:a/**\" ]; #<", "**");
    expect_group_fail("epoch = \"1h\"; allow = [ 5 ]; #<", "must be a string");
    expect_group_fail("epoch = \"1h\"; allow = [ ]; #<", "empty");
    expect_fail(LISTEN TLS HSM
                "groups = ( { name = \"e\"; epoch = \"1h\"; allow = \"uri:x\"; } ); #<\n",
                "must be a list of patterns");
}

static void test_pins_refused(void **state)
{
    (void)state;
    const char *why = "PINs are never read from the config file; use the environment variable "
                      "or --pin-file";
    expect_fail(LISTEN TLS
                "hsm = { module = \"/m.so\"; token = \"t\";\n  pin = \"1234\"; #<\n};\n" GROUPS,
                why);
    assert_null(strstr(stek_error_detail(), "1234"));
    expect_fail("pin = \"1234\"; #<\n" LISTEN TLS HSM GROUPS, why);
    assert_null(strstr(stek_error_detail(), "1234"));
    expect_fail(LISTEN TLS
                "hsm = { module = \"/m.so\"; token = \"t\"; so_pin = 99887766; }; #<\n" GROUPS,
                "so_pin: PINs are never read");
    assert_null(strstr(stek_error_detail(), "99887766"));
    /* Anywhere: in a group, in an unknown section, in any case. */
    expect_group_fail("epoch = \"1h\"; PIN = \"1234\"; #<", "PINs are never read");
    expect_fail(LISTEN TLS HSM GROUPS "extra = { deep = ( { so_pin = \"1\"; } ) }; #<\n",
                "PINs are never read");
    /* A PIN is reported even when an unknown setting comes first. */
    expect_fail("bogus = 1;\n" LISTEN TLS HSM GROUPS "pin = \"1234\"; #<\n", "PINs are never read");
}

static void test_file_errors(void **state)
{
    (void)state;
    char missing[PATH_MAX + 32];
    snprintf(missing, sizeof(missing), "%s/nope.conf", dir);
    stekd_config *c = (stekd_config *)1;
    assert_int_equal(stekd_config_load(missing, &c), STEK_ERR_IO);
    assert_null(c);
    assert_non_null(strstr(stek_error_detail(), missing));
    assert_non_null(strstr(stek_error_detail(), strerror(ENOENT)));
    assert_int_equal(stekd_config_load(dir, &c), STEK_ERR_IO);
    assert_non_null(strstr(stek_error_detail(), "regular file"));
    assert_int_equal(stekd_config_load(NULL, &c), STEK_ERR_INVALID_ARG);
    assert_int_equal(stekd_config_load(path, NULL), STEK_ERR_INVALID_ARG);
}

static void test_parse_duration(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t seconds;
    } ok[] = {
        {"0", 0},
        {"90", 90},
        {"90s", 90},
        {"15m", 900},
        {"18h", 64800},
        {"2d", 172800},
        {"0s", 0},
        {"007s", 7},
        {"30d", 2592000},
        {"1000000d", 86400000000ULL},
        {"9223372036854775807", INT64_MAX},
        {"106751991167300d", 106751991167300ULL * 86400},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        uint64_t s = 1;
        if (stekd_parse_duration(ok[i].text, &s) != STEK_OK)
            fail_msg("%s: %s", ok[i].text, stek_error_detail());
        assert_int_equal(s, ok[i].seconds);
    }
    static const char *const bad[] = {
        "",
        "s",
        "10x",
        "-5s",
        "+5s",
        " 5s",
        "5 s",
        "5s ",
        "5S",
        "5ms",
        "5sec",
        "1.5h",
        "0x10",
        "1h30m",
        "5ss",
        "d",
        "9223372036854775808",
        "99999999999999999999s",
        "106751991167301d",
        "18446744073709551616",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t s = 42;
        if (stekd_parse_duration(bad[i], &s) != STEK_ERR_CONFIG)
            fail_msg("accepted \"%s\"", bad[i]);
        assert_non_null(strstr(stek_error_detail(), "bad duration"));
    }
    uint64_t s;
    assert_int_equal(stekd_parse_duration(NULL, &s), STEK_ERR_CONFIG);
    assert_int_equal(stekd_parse_duration("5s", NULL), STEK_ERR_INVALID_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_valid),           cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_relative_config_path), cmocka_unit_test(test_example_file),
        cmocka_unit_test(test_syntax_error),         cmocka_unit_test(test_unknown_settings),
        cmocka_unit_test(test_missing_settings),     cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_bad_durations),        cmocka_unit_test(test_bad_origin),
        cmocka_unit_test(test_keys_per_set_bounded), cmocka_unit_test(test_bad_group_names),
        cmocka_unit_test(test_bad_patterns),         cmocka_unit_test(test_pins_refused),
        cmocka_unit_test(test_file_errors),          cmocka_unit_test(test_parse_duration),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
