/*
 * libstek virtual hosts, end to end through the public API: a real stekd
 * with two groups ("site-a", "site-b") both allowing the host, ONE
 * stek_client serving both groups with a server-name map (a.example ->
 * site-a, b.example -> site-b), attached to ONE listener SSL_CTX, and real
 * OpenSSL handshakes over in-memory BIO pairs with the client's SNI set.
 * Each name's tickets resume under that name, never under the other's; a
 * second server (its own client and context, same map) resumes them too.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#define EPOCH_S 6
#define LIFETIME_S 12

static fx_stekd d;
static fx_cert cert_a, cert_b;
static stek_client *client_1, *client_2;
static SSL_CTX *server_1, *server_2;
/* A listener whose SNI callback switches b.example connections to their
 * own context (server_3_b), as virtual-host servers do. Only server_3, the
 * initial context, has a client attached (client_1). */
static SSL_CTX *server_3, *server_3_b;

static const fx_stekd_group groups[] = {
    {"site-a", {"uri:spiffe://fleet/web/*", NULL}},
    {"site-b", {"uri:spiffe://fleet/web/*", NULL}},
};

/* Default group site-a, further group site-b, and the map. */
static stek_result options_for(const fx_cert *cert, stek_options **out)
{
    stek_options *o = NULL;
    stek_result r = stek_options_new(&o);
    if (r != STEK_RESULT_OK)
        return r;
    r = stek_options_add_server(o, d.target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, "site-a");
    if (r == STEK_RESULT_OK)
        r = stek_options_add_group(o, "site-b");
    if (r == STEK_RESULT_OK)
        r = stek_options_map_server_name(o, "a.example", "site-a");
    if (r == STEK_RESULT_OK)
        r = stek_options_map_server_name(o, "B.Example", "site-b");
    if (r != STEK_RESULT_OK) {
        stek_options_free(o);
        return r;
    }
    *out = o;
    return STEK_RESULT_OK;
}

static stek_client *client_for(const fx_cert *cert)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    stek_result r = options_for(cert, &o);
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    if (r != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(r));
    return c;
}

static SSL_CTX *server_ctx(void)
{
    return fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
}

/* The SNI callback of server_3: b.example gets its own context. */
static int switch_ctx(SSL *s, int *alert, void *arg)
{
    (void)alert;
    (void)arg;
    const char *name = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    if (name != NULL && OPENSSL_strcasecmp(name, "b.example") == 0 &&
        SSL_set_SSL_CTX(s, server_3_b) != server_3_b)
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    return SSL_TLSEXT_ERR_OK;
}

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    const char *uri_a[] = {"spiffe://fleet/web/1", NULL};
    const char *uri_b[] = {"spiffe://fleet/web/2", NULL};
    fx_cert_opts oa = {.name = "web-1", .key_type = FX_KEY_EC_P256, .uri_sans = uri_a};
    fx_cert_opts ob = {.name = "web-2", .key_type = FX_KEY_RSA_2048, .uri_sans = uri_b};
    if (fx_stekd_host_cert(&d, &oa, &cert_a) != 0 || fx_stekd_host_cert(&d, &ob, &cert_b) != 0)
        return -1;
    client_1 = client_for(&cert_a);
    client_2 = client_for(&cert_b);
    server_1 = server_ctx();
    server_2 = server_ctx();
    server_3 = server_ctx();
    server_3_b = server_ctx();
    if (client_1 == NULL || client_2 == NULL || server_1 == NULL || server_2 == NULL ||
        server_3 == NULL || server_3_b == NULL)
        return -1;
    SSL_CTX_set_tlsext_servername_callback(server_3, switch_ctx);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    stek_client_free(client_1);
    stek_client_free(client_2);
    SSL_CTX_free(server_1);
    SSL_CTX_free(server_2);
    SSL_CTX_free(server_3);
    SSL_CTX_free(server_3_b);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- in-memory handshakes ------------------------------------------------------------ */

typedef fx_tls_result hs_result;

static hs_result handshake(SSL_CTX *sctx, int version, const char *sni, SSL_SESSION *resume)
{
    return fx_tls_handshake(sctx, version, sni, resume);
}

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

/* ---- tests --------------------------------------------------------------------------- */

static void test_ready_and_attach(void **state)
{
    (void)state;
    /* Ready means both groups have a key. */
    assert_int_equal(stek_client_wait_ready(client_1, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(client_2, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_1, server_1), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_2, server_2), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_1, server_3), STEK_RESULT_OK);
    stek_counters k = counters(client_1);
    assert_true(k.ready);
    assert_true(k.stream_up);
    /* One set per group at least. */
    assert_true(k.sets_accepted >= 2);
    assert_int_equal(k.sets_rejected, 0);
    assert_int_equal(k.generation, 1);
}

/* A full handshake under `issue`, then offers of its ticket. */
static void isolation(int version, const char *issue, const char *other)
{
    stek_counters k0 = counters(client_1), m0 = counters(client_2);
    hs_result full = handshake(server_1, version, issue, NULL);
    assert_true(full.ok);
    assert_false(full.client_reused);
    assert_non_null(full.session);
    assert_true(SSL_SESSION_has_ticket(full.session));

    /* Same name, same listener: resumes. */
    hs_result same = handshake(server_1, version, issue, full.session);
    assert_true(same.ok);
    assert_true(same.client_reused);
    assert_true(same.server_reused);

    /* The other name, same listener: a full handshake (with a new ticket,
     * of the other group). */
    stek_counters k1 = counters(client_1);
    hs_result cross = handshake(server_1, version, other, full.session);
    assert_true(cross.ok);
    assert_false(cross.client_reused);
    assert_false(cross.server_reused);
    assert_non_null(cross.session);
    assert_true(SSL_SESSION_has_ticket(cross.session));
    stek_counters k2 = counters(client_1);
    assert_int_equal(k2.miss_other_group, k1.miss_other_group + 1);
    assert_int_equal(k2.tickets_resumed + k2.tickets_renewed,
                     k1.tickets_resumed + k1.tickets_renewed);

    /* That new ticket resumes under its own name, not under the first. */
    hs_result back = handshake(server_1, version, other, cross.session);
    assert_true(back.ok);
    assert_true(back.client_reused);
    hs_result back_cross = handshake(server_1, version, issue, cross.session);
    assert_true(back_cross.ok);
    assert_false(back_cross.client_reused);

    /* Server 2 (its own client and context): the same isolation. */
    hs_result there = handshake(server_2, version, issue, full.session);
    assert_true(there.ok);
    assert_true(there.client_reused);
    assert_true(there.server_reused);
    hs_result there_cross = handshake(server_2, version, other, full.session);
    assert_true(there_cross.ok);
    assert_false(there_cross.client_reused);

    stek_counters k3 = counters(client_1), m1 = counters(client_2);
    /* server 1: same + back resumed; cross + back_cross refused. */
    assert_int_equal(k3.tickets_resumed + k3.tickets_renewed,
                     k0.tickets_resumed + k0.tickets_renewed + 2);
    assert_int_equal(k3.miss_other_group, k0.miss_other_group + 2);
    assert_int_equal(m1.tickets_resumed + m1.tickets_renewed,
                     m0.tickets_resumed + m0.tickets_renewed + 1);
    assert_int_equal(m1.miss_other_group, m0.miss_other_group + 1);
    assert_int_equal(k3.miss_unknown + k3.miss_expired + k3.miss_other_generation, 0);
    assert_int_equal(m1.miss_unknown + m1.miss_expired + m1.miss_other_generation, 0);
    assert_int_equal(k3.no_key_encrypts + m1.no_key_encrypts, 0);
    fprintf(stderr, "TLS 0x%x %s: resumed %llu renewed %llu other-group misses %llu\n", version,
            issue, (unsigned long long)k3.tickets_resumed, (unsigned long long)k3.tickets_renewed,
            (unsigned long long)k3.miss_other_group);
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(same.session);
    SSL_SESSION_free(cross.session);
    SSL_SESSION_free(back.session);
    SSL_SESSION_free(back_cross.session);
    SSL_SESSION_free(there.session);
    SSL_SESSION_free(there_cross.session);
}

static void test_a_then_b_tls13(void **state)
{
    (void)state;
    isolation(TLS1_3_VERSION, "a.example", "b.example");
}

static void test_b_then_a_tls13(void **state)
{
    (void)state;
    isolation(TLS1_3_VERSION, "b.example", "a.example");
}

static void test_a_then_b_tls12(void **state)
{
    (void)state;
    isolation(TLS1_2_VERSION, "a.example", "b.example");
}

static void test_b_then_a_tls12(void **state)
{
    (void)state;
    isolation(TLS1_2_VERSION, "b.example", "a.example");
}

/* Server names match case-insensitively; an unmapped name (or none) is the
 * default group's (site-a). */
static void test_default_group(void **state)
{
    (void)state;
    hs_result full = handshake(server_1, TLS1_3_VERSION, "A.EXAMPLE", NULL);
    assert_true(full.ok);
    hs_result other = handshake(server_2, TLS1_3_VERSION, "www.unmapped.example", full.session);
    assert_true(other.ok);
    assert_true(other.client_reused);
    hs_result b = handshake(server_2, TLS1_3_VERSION, "b.EXAMPLE", full.session);
    assert_true(b.ok);
    assert_false(b.client_reused);
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(other.session);
    SSL_SESSION_free(b.session);
}

/*
 * An SNI callback switches b.example to another SSL_CTX that has no client
 * attached. OpenSSL still runs the initial context's callbacks, and
 * libstek still issues and resumes b.example's tickets under site-b's keys:
 * they resume on server_1 (no switching) under b.example, not under
 * a.example, and a.example tickets do not resume under b.example.
 */
static void switched(int version)
{
    stek_counters k0 = counters(client_1);
    hs_result b = handshake(server_3, version, "b.example", NULL);
    assert_true(b.ok);
    assert_false(b.client_reused);
    assert_non_null(b.session);
    assert_true(SSL_SESSION_has_ticket(b.session));
    hs_result b_again = handshake(server_3, version, "b.example", b.session);
    assert_true(b_again.ok);
    assert_true(b_again.server_reused);
    hs_result b_there = handshake(server_1, version, "b.example", b.session);
    assert_true(b_there.ok);
    assert_true(b_there.server_reused);
    hs_result b_as_a = handshake(server_1, version, "a.example", b.session);
    assert_true(b_as_a.ok);
    assert_false(b_as_a.server_reused);

    hs_result a = handshake(server_3, version, "a.example", NULL);
    assert_true(a.ok);
    assert_non_null(a.session);
    assert_true(SSL_SESSION_has_ticket(a.session));
    hs_result a_as_b = handshake(server_3, version, "b.example", a.session);
    assert_true(a_as_b.ok);
    assert_false(a_as_b.server_reused);
    hs_result a_again = handshake(server_1, version, "a.example", a.session);
    assert_true(a_again.ok);
    assert_true(a_again.server_reused);

    stek_counters k1 = counters(client_1);
    assert_int_equal(k1.tickets_resumed + k1.tickets_renewed,
                     k0.tickets_resumed + k0.tickets_renewed + 3);
    assert_int_equal(k1.miss_other_group, k0.miss_other_group + 2);
    assert_int_equal(k1.no_key_encrypts, k0.no_key_encrypts);
    hs_result *all[] = {&b, &b_again, &b_there, &b_as_a, &a, &a_as_b, &a_again};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        SSL_SESSION_free(all[i]->session);
}

static void test_switched_context_tls13(void **state)
{
    (void)state;
    switched(TLS1_3_VERSION);
}

static void test_switched_context_tls12(void **state)
{
    (void)state;
    switched(TLS1_2_VERSION);
}

static void test_options(void **state)
{
    (void)state;
    stek_options *o = NULL;
    stek_client *c = NULL;
    assert_int_equal(options_for(&cert_a, &o), STEK_RESULT_OK);
    assert_int_equal(stek_options_add_group(o, "Bad Group"), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_add_group(o, NULL), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_map_server_name(o, "", "site-a"), STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_map_server_name(o, "x.example", "Bad Group"),
                     STEK_RESULT_INVALID_ARGUMENT);
    assert_int_equal(stek_options_map_server_name(NULL, "x.example", "site-a"),
                     STEK_RESULT_INVALID_ARGUMENT);
    /* A name mapped to a group that was not added. */
    assert_int_equal(stek_options_map_server_name(o, "c.example", "site-c"), STEK_RESULT_OK);
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_CONFIG);
    assert_null(c);
    /* Adding it makes the options good (the client is made, then freed). */
    assert_int_equal(stek_options_add_group(o, "site-c"), STEK_RESULT_OK);
    assert_int_equal(stek_options_add_group(o, "site-a"), STEK_RESULT_OK); /* the default: no-op */
    assert_int_equal(stek_client_new(o, &c), STEK_RESULT_OK);
    stek_client_free(c);
    stek_options_free(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ready_and_attach),
        cmocka_unit_test(test_a_then_b_tls13),
        cmocka_unit_test(test_b_then_a_tls13),
        cmocka_unit_test(test_a_then_b_tls12),
        cmocka_unit_test(test_b_then_a_tls12),
        cmocka_unit_test(test_default_group),
        cmocka_unit_test(test_switched_context_tls13),
        cmocka_unit_test(test_switched_context_tls12),
        cmocka_unit_test(test_options),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
