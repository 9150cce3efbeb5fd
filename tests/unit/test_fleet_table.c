/*
 * The fleet table and the judgement of hosts (server/fleet.c), without
 * stekd: converged and lagging (behind, silent, older generations), since
 * when, the bound on hosts with least-recent eviction, expiry, and the
 * JSON document (no key name in it).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "fleet.h"

#define P 60
#define T0 1000000000LL /* the group's origin */
#define E 100           /* the group's current epoch */
#define NOW (T0 + E * P + 10)

static stekd_fleet_group group(void)
{
    stekd_fleet_group g = {
        .name = "edge",
        .sched = {.origin = T0, .epoch_s = P, .lifetime_s = 120},
        .epoch = E,
        .generation = 3,
        .gen_start = T0 + 50 * P,
        .have_names = true,
        .grace_s = 2,
    };
    memset(g.current_name, 0xC0, sizeof(g.current_name));
    memset(g.next_name, 0xD0, sizeof(g.next_name));
    return g;
}

static stekd_fleet_verdict judge(uint64_t gen, uint64_t epoch, int64_t last, uint32_t interval)
{
    stekd_fleet_group g = group();
    stekd_fleet_verdict v;
    stekd_fleet_judge(&g, gen, epoch, NOW - 1000, last, interval, NOW, &v);
    return v;
}

static void test_converged(void **state)
{
    (void)state;
    stekd_fleet_verdict v = judge(3, E, NOW - 1, 10);
    assert_false(v.lagging);
    assert_true(v.same_generation);
    assert_int_equal(v.offset, 0);
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_0);
    assert_int_equal(v.since, 0);
    /* A moment ahead of this replica (it rotated first): converged too. */
    v = judge(3, E + 1, NOW - 1, 10);
    assert_false(v.lagging);
    assert_int_equal(v.offset, 1);
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_0);
    /* A generation this replica has not seen: the replica is behind. */
    v = judge(4, 1, NOW - 1, 10);
    assert_false(v.lagging);
    assert_false(v.same_generation);
}

static void test_behind(void **state)
{
    (void)state;
    stekd_fleet_group g = group();
    stekd_fleet_verdict v;
    /* Holds E-1: behind since epoch E started, once the grace is over. */
    const int64_t start_e = T0 + E * P;
    stekd_fleet_judge(&g, 3, E - 1, start_e - 100, start_e - 1, 10, start_e + 1, &v);
    assert_false(v.lagging); /* within the grace: the new set is on its way */
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_M1);
    stekd_fleet_judge(&g, 3, E - 1, start_e - 100, start_e + 1, 10, start_e + 2, &v);
    assert_true(v.lagging && v.behind && !v.silent);
    assert_int_equal(v.since, start_e);
    assert_int_equal(v.offset, -1);
    v = judge(3, E - 2, NOW - 1, 10);
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_M2);
    assert_int_equal(v.since, T0 + (E - 1) * P);
    v = judge(3, E - 3, NOW - 1, 10);
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_OLDER);
    /* An older generation: behind since the new one started. */
    v = judge(2, E, NOW - 1, 10);
    assert_true(v.lagging && v.behind);
    assert_false(v.same_generation);
    assert_int_equal(v.bucket, STEKD_FLEET_OFFSET_OLDER);
    assert_int_equal(v.since, T0 + 50 * P);
    /* Nothing held: behind since its first report. */
    v = judge(0, 0, NOW - 1, 10);
    assert_true(v.lagging && v.behind);
    assert_int_equal(v.since, NOW - 1000);
}

static void test_silent(void **state)
{
    (void)state;
    /* Reports every 10 s: silent after 10 + 2 s, since its last report. */
    stekd_fleet_verdict v = judge(3, E, NOW - 12, 10);
    assert_false(v.lagging);
    v = judge(3, E, NOW - 13, 10);
    assert_true(v.lagging && v.silent && !v.behind);
    assert_int_equal(v.since, NOW - 13);
    /* An interval longer than the epoch: one epoch plus the grace. */
    v = judge(3, E, NOW - (P + 2), 3600);
    assert_false(v.lagging);
    v = judge(3, E, NOW - (P + 3), 3600);
    assert_true(v.silent);
    /* Both: since the earlier of the two. */
    v = judge(3, E - 1, T0 + E * P - 30, 10);
    assert_true(v.silent && v.behind);
    assert_int_equal(v.since, T0 + E * P - 30);
}

static stekd_fleet_report rep(const char *group, const char *identity, uint64_t epoch)
{
    static const uint8_t names[2][STEK_TICKET_NAME_BYTES] = {
        {0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0, 0xC0,
         0xC0},
        {0xAB, 0xCD, 0xEF, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0x01, 0x23, 0x45, 0x67,
         0x89},
    };
    stekd_fleet_report r = {
        .group = group,
        .identity = identity,
        .peer = "ipv4:10.0.0.7:51234",
        .generation = 3,
        .current_epoch = epoch,
        .names = names,
        .n_names = 2,
        .counters = {.tickets_resumed = 3, .tickets_renewed = 1, .miss_unknown = 4},
        .interval_s = 10,
    };
    return r;
}

static void test_table_bound_and_expiry(void **state)
{
    (void)state;
    stekd_fleet *f = NULL;
    assert_int_equal(stekd_fleet_new(0, 60, &f), STEK_ERR_INVALID_ARG);
    assert_int_equal(stekd_fleet_new(2, 60, &f), STEK_OK);
    stekd_fleet_group g = group();
    stekd_fleet_report a = rep("edge", "uri:a", E), b = rep("edge", "uri:b", E - 1),
                       c = rep("edge", "uri:c", E);
    assert_int_equal(stekd_fleet_put(f, &a, NOW - 3), STEK_OK);
    assert_int_equal(stekd_fleet_put(f, &b, NOW - 2), STEK_OK);
    /* a reports again: now b is the least recent, and goes for c. */
    assert_int_equal(stekd_fleet_put(f, &a, NOW - 1), STEK_OK);
    assert_int_equal(stekd_fleet_put(f, &c, NOW), STEK_OK);
    stekd_fleet_summary s;
    stekd_fleet_summarize(f, &g, NOW, &s);
    assert_int_equal(s.hosts, 2);
    assert_int_equal(s.converged, 2);
    assert_int_equal(s.by_offset[STEKD_FLEET_OFFSET_0], 2);
    stekd_fleet_stats st;
    stekd_fleet_get_stats(f, &st);
    assert_int_equal(st.hosts, 2);
    assert_int_equal(st.evicted, 1);
    /* Another group's hosts are not edge's. */
    stekd_fleet_report other = rep("api", "uri:a", E);
    assert_int_equal(stekd_fleet_put(f, &other, NOW), STEK_OK);
    stekd_fleet_summarize(f, &g, NOW, &s);
    assert_int_equal(s.hosts, 1);
    /* 60 s after their last report, entries are gone. */
    stekd_fleet_summarize(f, &g, NOW + 60, &s);
    assert_int_equal(s.hosts, 0);
    stekd_fleet_get_stats(f, &st);
    assert_int_equal(st.hosts, 0);
    assert_int_equal(st.expired, 2);
    /* Out of contract. */
    stekd_fleet_report bad = rep("edge", "uri:x", E);
    bad.n_names = STEKD_FLEET_MAX_NAMES + 1;
    assert_int_equal(stekd_fleet_put(f, &bad, NOW), STEK_ERR_INVALID_ARG);
    stekd_fleet_free(f);
}

static void test_many_hosts(void **state)
{
    (void)state;
    stekd_fleet *f = NULL;
    assert_int_equal(stekd_fleet_new(1000, 3600, &f), STEK_OK);
    stekd_fleet_group g = group();
    char id[32];
    for (int i = 0; i < 3000; i++) {
        snprintf(id, sizeof(id), "dns:h%d.example", i);
        stekd_fleet_report r = rep("edge", id, i % 2 ? E : E - 1);
        assert_int_equal(stekd_fleet_put(f, &r, NOW), STEK_OK);
    }
    stekd_fleet_summary s;
    stekd_fleet_summarize(f, &g, NOW, &s);
    assert_int_equal(s.hosts, 1000);
    assert_int_equal(s.by_offset[STEKD_FLEET_OFFSET_0], 500);
    assert_int_equal(s.by_offset[STEKD_FLEET_OFFSET_M1], 500);
    stekd_fleet_stats st;
    stekd_fleet_get_stats(f, &st);
    assert_int_equal(st.evicted, 2000);
    stekd_fleet_free(f);
}

static json_object *member(json_object *o, const char *key)
{
    json_object *v = NULL;
    assert_true(json_object_object_get_ex(o, key, &v));
    return v;
}

static void test_json(void **state)
{
    (void)state;
    stekd_fleet *f = NULL;
    assert_int_equal(stekd_fleet_new(10, 3600, &f), STEK_OK);
    stekd_fleet_group g = group();
    stekd_fleet_report b = rep("edge", "uri:b", E - 2), a = rep("edge", "uri:a", E);
    assert_int_equal(stekd_fleet_put(f, &b, NOW - 5), STEK_OK);
    assert_int_equal(stekd_fleet_put(f, &a, NOW - 1), STEK_OK);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(stekd_fleet_json(f, &g, NOW, &text, &len), STEK_OK);
    assert_int_equal(strlen(text), len);
    /* Names never leave stekd, in any spelling. */
    assert_null(strstr(text, "abcdef"));
    assert_null(strstr(text, "ABCDEF"));
    assert_null(strstr(text, "q83vASNF"));
    json_object *doc = json_tokener_parse(text);
    assert_non_null(doc);
    assert_string_equal(json_object_get_string(member(doc, "group")), "edge");
    assert_int_equal(json_object_get_int64(member(doc, "epoch")), E);
    assert_int_equal(json_object_get_int64(member(doc, "converged")), 1);
    assert_int_equal(json_object_get_int64(member(doc, "lagging")), 1);
    json_object *hosts = member(doc, "hosts");
    assert_int_equal(json_object_array_length(hosts), 2);
    json_object *ha = json_object_array_get_idx(hosts, 0); /* sorted by identity */
    json_object *hb = json_object_array_get_idx(hosts, 1);
    assert_string_equal(json_object_get_string(member(ha, "identity")), "uri:a");
    assert_string_equal(json_object_get_string(member(ha, "state")), "converged");
    assert_true(json_object_get_boolean(member(ha, "holds_current_key")));
    assert_false(json_object_get_boolean(member(ha, "holds_next_key")));
    assert_int_equal(json_object_get_int64(member(ha, "keys_held")), 2);
    assert_true(json_object_get_double(member(ha, "resumption_hit_ratio")) == 0.5);
    assert_string_equal(json_object_get_string(member(ha, "peer")), "ipv4:10.0.0.7:51234");
    assert_string_equal(json_object_get_string(member(hb, "state")), "lagging");
    assert_int_equal(json_object_get_int64(member(hb, "epoch_offset")), -2);
    assert_string_equal(json_object_get_string(member(hb, "epoch_bucket")), "-2");
    assert_int_equal(json_object_get_int64(member(hb, "lagging_since")), T0 + (E - 1) * P);
    json_object_put(doc);
    free(text);
    stekd_fleet_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_converged),  cmocka_unit_test(test_behind),
        cmocka_unit_test(test_silent),     cmocka_unit_test(test_table_bound_and_expiry),
        cmocka_unit_test(test_many_hosts), cmocka_unit_test(test_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
