/*
 * libstek against hostile key sets, through its public API (the shared
 * libstek): a real stekd (group "edge", epochs 3 s), and between it and the
 * client a tampering proxy (tests/fixture/fx_proxy) that holds the test's
 * certificates. One fresh client per case, pointed at the proxy, with its
 * own attached server SSL_CTX and real OpenSSL handshakes in memory:
 *
 *   - PASS: the client accepts through the proxy, so the proxy itself works
 *     and the cases below fail for what they change; then signatures start
 *     failing mid-stream: rejected, the client's epoch stays, and the keys
 *     it already holds keep resuming;
 *   - a flipped signature, a set wrapped to another ephemeral key, a set
 *     made for another host: rejected for that reason alone, counted, and
 *     nothing installed (no ticket, not ready, no epoch, no generation);
 *   - an older set replayed on the stream after a newer one: a rollback,
 *     and the client's epoch does not go back;
 *   - a second stekd (its own token, CA and signing key, pinned alone)
 *     whose clock runs a day (FAR_EPOCHS epochs) ahead: every set is
 *     rejected as far-future and the client never becomes ready.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/ssl.h>

#include "fx_proxy.h"
#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#define EPOCH_S 3
#define LIFETIME_S 12 /* an early ticket still decrypts after the waits below */
#define GROUP "edge"
/* The far-future stekd: hour-long epochs, a day ahead. Few epochs, since
 * stekd ratchets a jump in one go, at a cost quadratic in its length. */
#define FAR_EPOCH_S 3600
#define FAR_EPOCHS 24
/* Long enough for a client to connect, be refused, and count it. */
#define REJECT_WAIT_MS 15000
/* Time for one rotation to reach the client, with slack. */
#define ROTATION_WAIT_MS ((EPOCH_S + 5) * 1000)

static fx_stekd d, far;
static fx_cert victim, other, far_host;
static fx_proxy *proxy;

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

/* ---- helpers ------------------------------------------------------------------------- */

static stek_client *client_for(const fx_cert *cert, const char *target, const fx_stekd *service)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, service->ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, service->signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
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

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

typedef struct rejections {
    const stek_client *c;
    stek_rejection why;
    uint64_t at_least;
} rejections;

static bool rejected_enough(void *arg)
{
    const rejections *w = arg;
    stek_counters k;
    return stek_client_get_counters(w->c, &k) == STEK_RESULT_OK &&
           k.sets_rejected_by[w->why] >= w->at_least;
}

static void wait_rejected(const stek_client *c, stek_rejection why, uint64_t at_least, int ms)
{
    rejections w = {c, why, at_least};
    if (fx_wait_until(rejected_enough, &w, ms) != 0) {
        stek_counters k = counters(c);
        fprintf(stderr,
                "want %llu rejection(s) for reason %d; have: accepted %llu, rejected %llu "
                "(this reason %llu), ready %d, generation %llu, epoch %llu\n",
                (unsigned long long)at_least, (int)why, (unsigned long long)k.sets_accepted,
                (unsigned long long)k.sets_rejected, (unsigned long long)k.sets_rejected_by[why],
                (int)k.ready, (unsigned long long)k.generation,
                (unsigned long long)k.current_epoch);
        fail();
    }
}

/*
 * Raises s's max_jump (the fixture writes 2) so that stekd, on a clock
 * FAR_EPOCHS ahead, advances its chain there itself at its first refresh
 * rather than refusing the jump: the set it serves is then as valid as any,
 * only far ahead of the host's clock.
 */
static int raise_max_jump(const fx_stekd *s)
{
    char buf[8192], out[8300];
    FILE *f = fopen(s->config_path, "r");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *at = strstr(buf, "max_jump = 2;");
    if (at == NULL)
        return -1;
    *at = '\0';
    snprintf(out, sizeof(out), "%smax_jump = %d;%s", buf, 2 * FAR_EPOCHS,
             at + strlen("max_jump = 2;"));
    return fx_write_file(s->config_path, out, 0600);
}

/*
 * What a client that accepted nothing looks like: no key, no epoch, no
 * generation, and full handshakes without a ticket. Every rejection was for
 * `why`.
 */
static void assert_nothing_installed(stek_client *c, SSL_CTX *ctx, stek_rejection why)
{
    /* A bounded wait for what must not happen. */
    assert_int_equal(stek_client_wait_ready(c, 1000), STEK_RESULT_TIMEOUT);
    stek_counters k = counters(c);
    assert_false(k.ready);
    assert_int_equal(k.sets_accepted, 0);
    assert_int_equal(k.current_epoch, 0);
    assert_int_equal(k.generation, 0);
    assert_int_equal(k.last_fetch_unix, 0);
    assert_true(k.sets_rejected_by[why] >= 1);
    assert_int_equal(k.sets_rejected, k.sets_rejected_by[why]);

    fx_tls_result full = fx_tls_handshake(ctx, TLS1_3_VERSION, NULL, NULL);
    assert_true(full.ok);
    assert_false(full.client_reused);
    assert_non_null(full.session);
    assert_false(SSL_SESSION_has_ticket(full.session));
    stek_counters k1 = counters(c);
    assert_true(k1.no_key_encrypts > k.no_key_encrypts);
    assert_int_equal(k1.tickets_issued, 0);
    SSL_SESSION_free(full.session);
}

/* ---- fixtures ------------------------------------------------------------------------ */

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    const char *uri_v[] = {"spiffe://fleet/edge/victim", NULL};
    const char *uri_o[] = {"spiffe://fleet/edge/other", NULL};
    fx_cert_opts ov = {.name = "edge-victim", .key_type = FX_KEY_EC_P256, .uri_sans = uri_v};
    fx_cert_opts oo = {.name = "edge-other", .key_type = FX_KEY_RSA_2048, .uri_sans = uri_o};
    if (fx_stekd_host_cert(&d, &ov, &victim) != 0 || fx_stekd_host_cert(&d, &oo, &other) != 0)
        return -1;
    /* The proxy shows stekd's own certificate (a name libstek accepts) and
     * holds both hosts' keys, as an attacker with them would. */
    fx_proxy_opts po = {
        .upstream = d.target,
        .upstream_name = "localhost",
        .ca_pem_path = d.ca.cert_path,
        .cert_pem_path = d.server.cert_path,
        .key_pem_path = d.server.key_path,
        .host_cert_pem_path = victim.cert_path,
        .host_key_pem_path = victim.key_path,
        .other_cert_pem_path = other.cert_path,
        .other_key_pem_path = other.key_path,
    };
    return fx_proxy_start(&po, &proxy);
}

static int teardown(void **state)
{
    (void)state;
    fx_proxy_stop(proxy);
    fx_stekd_destroy(&far);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- tests --------------------------------------------------------------------------- */

/*
 * Through the proxy unchanged, the client accepts (the proxy works). Then
 * the signatures of the sets that follow fail: they are rejected, the
 * client's epoch and generation stay those of the last good set although
 * stekd moves on, and a ticket issued before still resumes.
 */
static void test_pass_then_bad_signatures(void **state)
{
    (void)state;
    fx_proxy_set_mode(proxy, FX_PROXY_PASS);
    fx_proxy_stats s0, s1;
    fx_proxy_get_stats(proxy, &s0);
    stek_client *c = client_for(&victim, fx_proxy_target(proxy), &d);
    SSL_CTX *ctx = server_ctx();
    assert_non_null(c);
    assert_non_null(ctx);
    assert_int_equal(stek_client_wait_ready(c, REJECT_WAIT_MS), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(c, ctx), STEK_RESULT_OK);
    stek_counters k = counters(c);
    assert_true(k.sets_accepted >= 1);
    assert_int_equal(k.sets_rejected, 0);
    assert_int_equal(k.generation, 1);
    uint64_t own = fx_stekd_epoch_now(&d);
    assert_true(k.current_epoch + 1 >= own && k.current_epoch <= own + 1);
    fx_proxy_get_stats(proxy, &s1);
    assert_true(s1.calls > s0.calls);
    assert_true(s1.sets > s0.sets);
    assert_int_equal(s1.flipped, s0.flipped);

    fx_tls_result full = fx_tls_handshake(ctx, TLS1_3_VERSION, NULL, NULL);
    assert_true(full.ok);
    assert_true(SSL_SESSION_has_ticket(full.session));

    fx_proxy_set_mode(proxy, FX_PROXY_FLIP_SIGNATURE);
    /* The first bad set can follow a good one still in flight; from then on
     * every set is bad, so nothing may move between the first and second. */
    wait_rejected(c, STEK_REJECTED_SIGNATURE, 1, ROTATION_WAIT_MS);
    stek_counters k1 = counters(c);
    wait_rejected(c, STEK_REJECTED_SIGNATURE, 2, ROTATION_WAIT_MS);
    stek_counters k2 = counters(c);
    assert_int_equal(k2.sets_accepted, k1.sets_accepted);
    assert_int_equal(k2.current_epoch, k1.current_epoch);
    assert_int_equal(k2.generation, 1);
    assert_int_equal(k2.sets_rejected, k2.sets_rejected_by[STEK_REJECTED_SIGNATURE]);
    /* stekd is past the client's epoch: the rejected sets were newer. */
    assert_true(fx_stekd_epoch_now(&d) > k2.current_epoch);
    fx_proxy_stats s2;
    fx_proxy_get_stats(proxy, &s2);
    assert_true(s2.flipped >= s1.flipped + 2);

    /* The keys accepted before still serve. */
    assert_true(k2.ready);
    fx_tls_result res = fx_tls_handshake(ctx, TLS1_3_VERSION, NULL, full.session);
    assert_true(res.ok);
    assert_true(res.client_reused);
    assert_true(res.server_reused);
    fprintf(stderr,
            "bad signatures: client stays at epoch %llu, stekd at %llu; old ticket resumed\n",
            (unsigned long long)k2.current_epoch, (unsigned long long)fx_stekd_epoch_now(&d));
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(res.session);
    fx_proxy_set_mode(proxy, FX_PROXY_PASS);
    stek_client_free(c);
    SSL_CTX_free(ctx);
}

/* A fresh client that only ever sees sets tampered in one way. */
static void hostile_from_start(fx_proxy_mode mode, stek_rejection why, const char *what)
{
    fx_proxy_stats s0, s1;
    fx_proxy_get_stats(proxy, &s0);
    fx_proxy_set_mode(proxy, mode);
    stek_client *c = client_for(&victim, fx_proxy_target(proxy), &d);
    SSL_CTX *ctx = server_ctx();
    assert_non_null(c);
    assert_non_null(ctx);
    assert_int_equal(stek_client_attach(c, ctx), STEK_RESULT_OK);
    wait_rejected(c, why, 1, REJECT_WAIT_MS);
    assert_nothing_installed(c, ctx, why);
    fx_proxy_get_stats(proxy, &s1);
    /* The proxy did what the case is about. */
    switch (mode) {
    case FX_PROXY_FLIP_SIGNATURE:
        assert_true(s1.flipped > s0.flipped);
        break;
    case FX_PROXY_OTHER_HOST:
        assert_true(s1.other_host > s0.other_host);
        break;
    case FX_PROXY_OTHER_EPH_KEY:
        assert_true(s1.other_eph_key > s0.other_eph_key);
        break;
    default:
        fail();
    }
    assert_int_equal(s1.upstream_fails, s0.upstream_fails); /* stekd answered */
    stek_counters k = counters(c);
    fprintf(stderr, "%s: %llu set(s) rejected, none accepted\n", what,
            (unsigned long long)k.sets_rejected);
    fx_proxy_set_mode(proxy, FX_PROXY_PASS);
    stek_client_free(c);
    SSL_CTX_free(ctx);
}

static void test_tampered_signature(void **state)
{
    (void)state;
    hostile_from_start(FX_PROXY_FLIP_SIGNATURE, STEK_REJECTED_SIGNATURE, "flipped signature");
}

static void test_other_ephemeral_key(void **state)
{
    (void)state;
    hostile_from_start(FX_PROXY_OTHER_EPH_KEY, STEK_REJECTED_EPH_KEY, "another ephemeral key");
}

static void test_other_host(void **state)
{
    (void)state;
    hostile_from_start(FX_PROXY_OTHER_HOST, STEK_REJECTED_IDENTITY, "another host's set");
}

/*
 * After a newer set, the stream's first (older) set again: same request,
 * valid signature, an epoch behind what the client holds. A rollback; the
 * client keeps the newer set's epoch and keys.
 */
static void test_replay_older(void **state)
{
    (void)state;
    fx_proxy_stats s0, s1;
    fx_proxy_get_stats(proxy, &s0);
    fx_proxy_set_mode(proxy, FX_PROXY_REPLAY_OLDER);
    stek_client *c = client_for(&victim, fx_proxy_target(proxy), &d);
    SSL_CTX *ctx = server_ctx();
    assert_non_null(c);
    assert_non_null(ctx);
    assert_int_equal(stek_client_wait_ready(c, REJECT_WAIT_MS), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(c, ctx), STEK_RESULT_OK);
    uint64_t e0 = counters(c).current_epoch;
    assert_true(e0 > 0);

    wait_rejected(c, STEK_REJECTED_ROLLBACK, 1, ROTATION_WAIT_MS);
    stek_counters k = counters(c);
    fx_proxy_get_stats(proxy, &s1);
    assert_true(s1.replayed > s0.replayed);
    /* The newer set was accepted, the replayed one not: the epoch is the
     * newer one's, not e0 again. */
    assert_true(k.sets_accepted >= 2);
    assert_true(k.current_epoch > e0);
    assert_int_equal(k.generation, 1);
    assert_int_equal(k.sets_rejected, k.sets_rejected_by[STEK_REJECTED_ROLLBACK]);
    assert_true(k.ready);
    /* Tickets are issued and resume under the keys held. */
    fx_tls_result full = fx_tls_handshake(ctx, TLS1_2_VERSION, NULL, NULL);
    assert_true(full.ok);
    assert_true(SSL_SESSION_has_ticket(full.session));
    fx_tls_result res = fx_tls_handshake(ctx, TLS1_2_VERSION, NULL, full.session);
    assert_true(res.ok);
    assert_true(res.client_reused);
    fprintf(stderr, "replay: epoch %llu replayed after %llu; rejected as a rollback\n",
            (unsigned long long)e0, (unsigned long long)k.current_epoch);
    SSL_SESSION_free(full.session);
    SSL_SESSION_free(res.session);
    fx_proxy_set_mode(proxy, FX_PROXY_PASS);
    stek_client_free(c);
    SSL_CTX_free(ctx);
}

/*
 * A stekd whose clock runs a day ahead (STEKD_TEST_CLOCK_OFFSET,
 * and a max_jump that lets it follow that clock). Its sets are properly
 * signed by its own key, which the client pins, alone.
 */
static void test_far_future_epoch(void **state)
{
    (void)state;
    assert_int_equal(fx_stekd_setup(&far, FAR_EPOCH_S, FAR_EPOCH_S, groups, 1, NULL), 0);
    assert_int_equal(raise_max_jump(&far), 0);
    char offset[32];
    snprintf(offset, sizeof(offset), "%d", FAR_EPOCHS * FAR_EPOCH_S);
    assert_int_equal(setenv("STEKD_TEST_CLOCK_OFFSET", offset, 1), 0);
    int rc = fx_stekd_start(&far);
    unsetenv("STEKD_TEST_CLOCK_OFFSET");
    assert_int_equal(rc, 0);

    const char *uri[] = {"spiffe://fleet/edge/far", NULL};
    fx_cert_opts o = {.name = "edge-far", .key_type = FX_KEY_EC_P256, .uri_sans = uri};
    assert_int_equal(fx_stekd_host_cert(&far, &o, &far_host), 0);
    stek_client *c = client_for(&far_host, far.target, &far);
    SSL_CTX *ctx = server_ctx();
    assert_non_null(c);
    assert_non_null(ctx);
    assert_int_equal(stek_client_attach(c, ctx), STEK_RESULT_OK);
    wait_rejected(c, STEK_REJECTED_EPOCH, 1, REJECT_WAIT_MS);
    assert_nothing_installed(c, ctx, STEK_REJECTED_EPOCH);
    fprintf(stderr, "far future: stekd %d epochs of %d s ahead; %llu set(s) rejected\n", FAR_EPOCHS,
            FAR_EPOCH_S, (unsigned long long)counters(c).sets_rejected);
    stek_client_free(c);
    SSL_CTX_free(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pass_then_bad_signatures),
        cmocka_unit_test(test_tampered_signature),
        cmocka_unit_test(test_other_ephemeral_key),
        cmocka_unit_test(test_replay_older),
        cmocka_unit_test(test_other_host),
        cmocka_unit_test(test_far_future_epoch),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
