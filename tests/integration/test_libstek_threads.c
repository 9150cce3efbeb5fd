/*
 * libstek's concurrency, for ThreadSanitizer (make test-tsan) as much as for
 * the plain suite: a real stekd rotating every second, two hosts (EC and
 * RSA certificates) each with a client attached to its own server SSL_CTX,
 * and two handshake threads that each get a ticket from one host and
 * resume it on the other, TLS 1.2 and 1.3 alternately, while rotations
 * arrive on the clients' background threads and a third thread reads the
 * counters. The keyring's snapshots are published and retired under the
 * handshakes' feet; TSan checks that every access is ordered.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/ssl.h>

#include "fx_stekd.h"
#include "fx_tls.h"
#include "stek/stek.h"

#define EPOCH_S 1
#define LIFETIME_S 3
#define GROUP "edge"
/* Rotations every handshake thread must live through. */
#define ROTATIONS 3
#define DEADLINE_S 60

static fx_stekd d;
static fx_cert cert_a, cert_b;
static stek_client *client_a, *client_b;
static SSL_CTX *server_a, *server_b;

static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

static stek_client *client_for(const fx_cert *cert)
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
    client_a = client_for(&cert_a);
    client_b = client_for(&cert_b);
    server_a = server_ctx();
    server_b = server_ctx();
    if (client_a == NULL || client_b == NULL || server_a == NULL || server_b == NULL)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    stek_client_free(client_a);
    stek_client_free(client_b);
    SSL_CTX_free(server_a);
    SSL_CTX_free(server_b);
    fx_stekd_destroy(&d);
    return 0;
}

/* ---- the threads ------------------------------------------------------------------- */

static atomic_bool stop;

typedef struct hs_thread {
    SSL_CTX *issue, *resume; /* get a ticket here, resume it there */
    unsigned long attempts, failed, resumed, no_ticket;
} hs_thread;

static void *handshakes(void *arg)
{
    hs_thread *t = arg;
    for (unsigned long i = 0; !atomic_load(&stop); i++) {
        int version = (i & 1) ? TLS1_3_VERSION : TLS1_2_VERSION;
        fx_tls_result full = fx_tls_handshake(t->issue, version, NULL, NULL);
        t->attempts++;
        if (!full.ok) {
            t->failed++;
            continue;
        }
        if (!SSL_SESSION_has_ticket(full.session)) {
            t->no_ticket++;
        } else {
            fx_tls_result res = fx_tls_handshake(t->resume, version, NULL, full.session);
            if (!res.ok)
                t->failed++;
            else if (res.server_reused)
                t->resumed++;
            SSL_SESSION_free(res.session);
        }
        SSL_SESSION_free(full.session);
    }
    return NULL;
}

/* Reads the counters while everything else runs: they are atomics. */
static void *reader(void *arg)
{
    unsigned long *reads = arg;
    while (!atomic_load(&stop)) {
        stek_counters k;
        if (stek_client_get_counters(client_a, &k) == STEK_RESULT_OK &&
            stek_client_get_counters(client_b, &k) == STEK_RESULT_OK)
            (*reads)++;
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL); /* pacing only: nothing waits on this */
    }
    return NULL;
}

static uint64_t epoch_of(const stek_client *c)
{
    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k.current_epoch;
}

static void test_handshakes_during_rotations(void **state)
{
    (void)state;
    assert_int_equal(stek_client_wait_ready(client_a, 30000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(client_b, 30000), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_a, server_a), STEK_RESULT_OK);
    assert_int_equal(stek_client_attach(client_b, server_b), STEK_RESULT_OK);

    const uint64_t e0 = epoch_of(client_a);
    hs_thread t[2] = {{.issue = server_a, .resume = server_b},
                      {.issue = server_b, .resume = server_a}};
    pthread_t th[2], rd;
    unsigned long reads = 0;
    atomic_store(&stop, false);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, handshakes, &t[i]), 0);
    assert_int_equal(pthread_create(&rd, NULL, reader, &reads), 0);

    /* Until both hosts have taken ROTATIONS rotations, or the deadline. */
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    uint64_t ea = e0, eb = e0;
    do {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL); /* polling interval of the condition below */
        ea = epoch_of(client_a);
        eb = epoch_of(client_b);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((ea < e0 + ROTATIONS || eb < e0 + ROTATIONS) &&
             now.tv_sec - start.tv_sec < DEADLINE_S);
    atomic_store(&stop, true);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    assert_int_equal(pthread_join(rd, NULL), 0);

    stek_counters ka, kb;
    assert_int_equal(stek_client_get_counters(client_a, &ka), STEK_RESULT_OK);
    assert_int_equal(stek_client_get_counters(client_b, &kb), STEK_RESULT_OK);
    for (int i = 0; i < 2; i++)
        fprintf(stderr,
                "thread %d: %lu handshake pairs, %lu resumed on the other host, %lu without a "
                "ticket, %lu failed\n",
                i, t[i].attempts, t[i].resumed, t[i].no_ticket, t[i].failed);
    fprintf(stderr,
            "epochs %llu -> %llu (a) / %llu (b); counter reads %lu; a: issued %llu resumed %llu "
            "renewed %llu misses %llu/%llu/%llu; b: issued %llu resumed %llu renewed %llu\n",
            (unsigned long long)e0, (unsigned long long)ea, (unsigned long long)eb, reads,
            (unsigned long long)ka.tickets_issued, (unsigned long long)ka.tickets_resumed,
            (unsigned long long)ka.tickets_renewed, (unsigned long long)ka.miss_unknown,
            (unsigned long long)ka.miss_expired, (unsigned long long)ka.miss_bad_mac,
            (unsigned long long)kb.tickets_issued, (unsigned long long)kb.tickets_resumed,
            (unsigned long long)kb.tickets_renewed);

    /* Rotations did arrive during the handshakes. */
    assert_true(ea >= e0 + ROTATIONS);
    assert_true(eb >= e0 + ROTATIONS);
    for (int i = 0; i < 2; i++) {
        assert_true(t[i].attempts >= 10);
        assert_int_equal(t[i].failed, 0);
        assert_int_equal(t[i].no_ticket, 0);
        /* `next` is published an epoch ahead, so the other host can
         * decrypt every fresh ticket even right at a rotation. */
        assert_int_equal(t[i].resumed, t[i].attempts);
    }
    assert_int_equal(ka.miss_bad_mac + kb.miss_bad_mac, 0);
    assert_int_equal(ka.sets_rejected + kb.sets_rejected, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshakes_during_rotations),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
