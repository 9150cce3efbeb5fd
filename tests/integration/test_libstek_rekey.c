/*
 * A rekey, end to end through libstek's public API: a real stekd (group
 * "edge", epochs 5 s, decrypt window 30 s), two TLS servers on libstek with
 * their own host certificates (A: EC P-256, B: RSA 2048), each with its own
 * stek_client and server SSL_CTX, and real OpenSSL handshakes in memory.
 *
 * Tickets of generation 1 resume across both servers. Then `stekctl rekey
 * edge` runs on stekd's token while stekd serves; stekd picks the new
 * generation up at its next refresh (every second) and pushes it on the
 * watch streams. Once both servers hold generation 2, the old tickets, whose
 * keys are well inside their decrypt window, no longer resume on either
 * (full handshakes, counted as miss_other_generation), and new tickets
 * resume across both.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/ssl.h>

#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

#define EPOCH_S 5
#define LIFETIME_S 30 /* old keys stay in their window: only the rekey drops them */
#define GROUP "edge"

static fx_stekd d;
static fx_cert cert_a, cert_b;
static stek_client *client_a, *client_b;
static SSL_CTX *server_a, *server_b;
static char state_dir[FX_PATH_MAX + 16];
/* Generation 1 tickets, issued by A, kept across the rekey. */
static SSL_SESSION *old12, *old13;

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

static stek_client *client_for(const fx_cert *cert, const char *dir)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result r = stek_options_add_server(o, d.target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, GROUP);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_options_set_state_dir(o, dir);
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

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 || fx_stekd_start(&d) != 0)
        return -1;
    const char *uri_a[] = {"spiffe://fleet/edge/a", NULL};
    const char *uri_b[] = {"spiffe://fleet/edge/b", NULL};
    fx_cert_opts oa = {.name = "edge-a", .key_type = FX_KEY_EC_P256, .uri_sans = uri_a};
    fx_cert_opts ob = {.name = "edge-b", .key_type = FX_KEY_RSA_2048, .uri_sans = uri_b};
    if (fx_stekd_host_cert(&d, &oa, &cert_a) != 0 || fx_stekd_host_cert(&d, &ob, &cert_b) != 0)
        return -1;
    snprintf(state_dir, sizeof(state_dir), "%s/state", d.dir);
    if (mkdir(state_dir, 0700) != 0)
        return -1;
    client_a = client_for(&cert_a, state_dir);
    client_b = client_for(&cert_b, NULL);
    server_a = server_ctx();
    server_b = server_ctx();
    if (client_a == NULL || client_b == NULL || server_a == NULL || server_b == NULL)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    SSL_SESSION_free(old12);
    SSL_SESSION_free(old13);
    stek_client_free(client_a);
    stek_client_free(client_b);
    SSL_CTX_free(server_a);
    SSL_CTX_free(server_b);
    fx_stekd_destroy(&d);
    return 0;
}

/* A ticket from `from` that resumes on `to`; returns the session (free it). */
static SSL_SESSION *resumes_across(SSL_CTX *from, SSL_CTX *to, int version)
{
    fx_tls_result full = fx_tls_handshake(from, version, NULL, NULL);
    assert_true(full.ok);
    assert_false(full.client_reused);
    assert_non_null(full.session);
    assert_true(SSL_SESSION_has_ticket(full.session));
    fx_tls_result res = fx_tls_handshake(to, version, NULL, full.session);
    assert_true(res.ok);
    assert_true(res.client_reused);
    assert_true(res.server_reused);
    SSL_SESSION_free(res.session);
    return full.session;
}

/* A ticket that must not resume on ctx: a full handshake, counted as a miss
 * of another generation by c. */
static void other_generation(stek_client *c, SSL_CTX *ctx, int version, SSL_SESSION *old)
{
    stek_counters k0 = counters(c);
    fx_tls_result res = fx_tls_handshake(ctx, version, NULL, old);
    assert_true(res.ok);
    assert_false(res.client_reused);
    assert_false(res.server_reused);
    /* A full handshake still gets a new ticket, under generation 2. */
    assert_non_null(res.session);
    assert_true(SSL_SESSION_has_ticket(res.session));
    stek_counters k1 = counters(c);
    assert_int_equal(k1.miss_other_generation, k0.miss_other_generation + 1);
    assert_int_equal(k1.miss_unknown, k0.miss_unknown);
    assert_int_equal(k1.miss_expired, k0.miss_expired);
    assert_int_equal(k1.tickets_resumed + k1.tickets_renewed,
                     k0.tickets_resumed + k0.tickets_renewed);
    SSL_SESSION_free(res.session);
}

static void test_generation_one(void **state)
{
    (void)state;
    assert_int_equal(stek_client_wait_ready(client_a, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(client_b, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_a, server_a), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_b, server_b), STEK_RESULT_OK);
    assert_int_equal(counters(client_a).generation, 1);
    assert_int_equal(counters(client_b).generation, 1);
    old12 = resumes_across(server_a, server_b, TLS1_2_VERSION);
    old13 = resumes_across(server_a, server_b, TLS1_3_VERSION);
    SSL_SESSION_free(resumes_across(server_b, server_a, TLS1_3_VERSION));
}

typedef struct gen_wait {
    stek_client *a, *b;
    uint64_t generation;
} gen_wait;

static bool both_at(void *arg)
{
    gen_wait *w = arg;
    stek_counters ka, kb;
    return stek_client_get_counters(w->a, &ka) == STEK_RESULT_OK &&
           stek_client_get_counters(w->b, &kb) == STEK_RESULT_OK &&
           ka.generation == w->generation && kb.generation == w->generation && ka.ready && kb.ready;
}

static int stekctl_rekey(void)
{
    /* As of two epochs ago: generation 2's chain key sits two epochs
     * behind, so stekd's next refresh must step it four, past max_jump
     * (2), as when epoch boundaries pass between a rekey and that refresh.
     * A generation with no key in the token yet is stepped anyway. */
    char when[32];
    snprintf(when, sizeof(when), "%lld", (long long)time(NULL) - 2 * EPOCH_S);
    char *argv[] = {STEKCTL_PATH, "--config", d.config_path, "--now", when, "rekey", GROUP, NULL};
    char log[FX_PATH_MAX + 32];
    snprintf(log, sizeof(log), "%s/stekctl.log", d.dir);
    pid_t pid;
    int status = -1;
    if (fx_token_activate(&d.tok) != 0 || fx_spawn(argv, log, &pid) != 0 ||
        fx_wait_exit(pid, 30000, &status) != 0)
        return -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "stekctl rekey failed; see %s\n", log);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void test_rekey_drops_old_generation(void **state)
{
    (void)state;
    assert_non_null(old12);
    assert_non_null(old13);
    stek_counters a0 = counters(client_a), b0 = counters(client_b);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(stekctl_rekey(), 0);
    gen_wait w = {client_a, client_b, 2};
    assert_int_equal(fx_wait_until(both_at, &w, 15000), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    fprintf(stderr, "rekey: both servers on generation 2 %lld ms after stekctl started\n",
            (long long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
    stek_counters a1 = counters(client_a), b1 = counters(client_b);
    assert_true(a1.sets_accepted > a0.sets_accepted);
    assert_true(b1.sets_accepted > b0.sets_accepted);
    assert_int_equal(a1.sets_rejected, 0);
    assert_int_equal(b1.sets_rejected, 0);

    /* The old tickets resume nowhere, at once: their keys are gone. */
    other_generation(client_a, server_a, TLS1_2_VERSION, old12);
    other_generation(client_b, server_b, TLS1_2_VERSION, old12);
    other_generation(client_a, server_a, TLS1_3_VERSION, old13);
    other_generation(client_b, server_b, TLS1_3_VERSION, old13);

    /* New tickets resume across both, in both directions. */
    SSL_SESSION_free(resumes_across(server_a, server_b, TLS1_2_VERSION));
    SSL_SESSION_free(resumes_across(server_b, server_a, TLS1_2_VERSION));
    SSL_SESSION_free(resumes_across(server_a, server_b, TLS1_3_VERSION));
    SSL_SESSION_free(resumes_across(server_b, server_a, TLS1_3_VERSION));
    assert_int_equal(counters(client_a).generation, 2);
    assert_int_equal(counters(client_b).generation, 2);

    /* A's high-water mark moved with it. */
    char path[FX_PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s.generation", state_dir, GROUP);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    unsigned long long g = 0;
    assert_int_equal(fscanf(f, "%llu", &g), 1);
    fclose(f);
    assert_int_equal(g, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generation_one),
        cmocka_unit_test(test_rekey_drops_old_generation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
