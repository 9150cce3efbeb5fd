/*
 * Host-side faults (issue 7), against a real stekd and SoftHSM token, two
 * libstek hosts and real OpenSSL handshakes:
 *
 *   - HSM outage longer than an epoch: stekd answers UNAVAILABLE (GetKeySet,
 *     and grpc.health NOT_SERVING), the hosts keep serving and resuming with
 *     the keys they hold, and when the token returns the schedule catches up:
 *     the keys the hosts received cover consecutive epochs, none skipped,
 *     none with two different names.
 *   - the cache disk: a full disk (a 16 KiB tmpfs, filled) and a read-only
 *     one under the sealed cache file are reported (cache_write_errors and a
 *     log line) and serving goes on; once the disk is writable again the next
 *     set is written. test_libstek_cache covers the missing directory.
 *     The tmpfs is mounted in a private mount namespace of this process, so
 *     nothing outlives it; without CAP_SYS_ADMIN the disk test is skipped.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "fx_tls.h"
#include "hostwrap.h"
#include "stek/stek.h"
#include "stek_client_internal.h"

#define EPOCH_S 3
#define LIFETIME_S 9
#define GROUP "edge"
#define GET "/stek.v1.KeyService/GetKeySet"

static fx_stekd d;
static fx_cert cert_a, cert_b;
static bool private_mounts; /* this process has its own mount namespace */
static const fx_stekd_group groups[] = {
    {GROUP, {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int setup(void **state)
{
    (void)state;
    const char *ua[] = {"spiffe://fleet/edge/a", NULL};
    const char *ub[] = {"spiffe://fleet/edge/b", NULL};
    fx_cert_opts oa = {.name = "edge-a", .uri_sans = ua};
    fx_cert_opts ob = {.name = "edge-b", .uri_sans = ub};
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1, NULL) != 0 || fx_stekd_start(&d) != 0 ||
        fx_stekd_host_cert(&d, &oa, &cert_a) != 0 || fx_stekd_host_cert(&d, &ob, &cert_b) != 0)
        return -1;
    return 0;
}

/* Runs even when an assertion failed: no stekd outlives the test. */
static int teardown(void **state)
{
    (void)state;
    fx_stekd_destroy(&d);
    return 0;
}

/* A host with the sealed cache at cache_path (NULL: none). */
static stek_client *host_client(const fx_cert *cert, const char *cache_path)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    if (stek_options_new(&o) != STEK_RESULT_OK)
        return NULL;
    stek_result res = stek_options_add_server(o, d.target);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_service_key(o, d.signing_pem_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_ca(o, d.ca.cert_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_cert(o, cert->cert_path, cert->key_path);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_group(o, GROUP);
    if (res == STEK_RESULT_OK)
        res = stek_options_set_server_name(o, "localhost");
    /* The host's own EC P-256 key doubles as the sealing key here. */
    if (res == STEK_RESULT_OK && cache_path != NULL)
        res = stek_options_set_cache(o, cache_path, cert->key_path);
    if (res == STEK_RESULT_OK)
        res = stek_client_new(o, &c);
    stek_options_free(o);
    if (res != STEK_RESULT_OK)
        fprintf(stderr, "client: %s\n", stek_result_name(res));
    return c;
}

static SSL_CTX *server_ctx(stek_client *c)
{
    SSL_CTX *ctx = fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
    if (ctx != NULL && stek_client_attach(c, ctx) != STEK_RESULT_OK) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static stek_counters counters(const stek_client *c)
{
    stek_counters k;
    memset(&k, 0, sizeof(k));
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    return k;
}

/* ---- continuous cross-host resumption ------------------------------------------ */

/* Round i: a full handshake on host i % 2, its session resumed on the other. */
typedef struct xloop {
    SSL_CTX *ctx[2];
    atomic_bool stop;
    atomic_uint full_failed, attempted, resumed, failed;
    atomic_llong last_fail_ms; /* CLOCK_MONOTONIC start of the last failed round */
    pthread_t thread;
} xloop;

static void *xloop_main(void *arg)
{
    xloop *l = arg;
    for (unsigned i = 0; !atomic_load(&l->stop); i++) {
        const int from = (int)(i & 1), to = from ^ 1;
        const int version = (i / 2) & 1 ? TLS1_2_VERSION : TLS1_3_VERSION;
        const int64_t started = mono_ms();
        fx_tls_result f = fx_tls_handshake(l->ctx[from], version, NULL, NULL);
        if (!f.ok || f.session == NULL) {
            atomic_fetch_add(&l->full_failed, 1);
            fprintf(stderr, "full handshake on host %d failed\n", from);
            SSL_SESSION_free(f.session);
            continue;
        }
        fx_tls_result x = fx_tls_handshake(l->ctx[to], version, NULL, f.session);
        atomic_fetch_add(&l->attempted, 1);
        if (x.ok && x.client_reused && x.server_reused) {
            atomic_fetch_add(&l->resumed, 1);
        } else {
            if (atomic_fetch_add(&l->failed, 1) == 0)
                fprintf(stderr, "resumption %d -> %d failed (the first)\n", from, to);
            atomic_store(&l->last_fail_ms, started);
        }
        SSL_SESSION_free(f.session);
        SSL_SESSION_free(x.session);
        struct timespec pace = {0, 5 * 1000000L}; /* let stekd and the hosts run */
        nanosleep(&pace, NULL);
    }
    return NULL;
}

static void xloop_start(xloop *l, SSL_CTX *a, SSL_CTX *b)
{
    memset(l, 0, sizeof(*l));
    l->ctx[0] = a;
    l->ctx[1] = b;
    assert_int_equal(pthread_create(&l->thread, NULL, xloop_main, l), 0);
}

static void xloop_stop(xloop *l)
{
    atomic_store(&l->stop, true);
    assert_int_equal(pthread_join(l->thread, NULL), 0);
}

/* ---- what the hosts received: key name per epoch -------------------------------- */

#define SEEN_MAX 64

typedef struct seen {
    size_t n;
    uint64_t epoch[SEEN_MAX];
    uint8_t name[SEEN_MAX][STEK_KEY_NAME_BYTES]; /* names only: never key material */
    unsigned conflicts;                          /* an epoch seen under two names */
} seen;

/* Records every key of the host's current snapshot (a keyring read section). */
static void sample(stek_client *c, seen *s)
{
    stek_keyring *kr = stek_client_keyring(c);
    unsigned slot = 0;
    const stek_ring *ring = stek_keyring_read_begin(kr, &slot);
    int g = ring != NULL ? stek_ring_group_index(ring, GROUP) : -1;
    for (size_t i = 0; g >= 0 && i < ring->groups[g].count; i++) {
        const size_t k = ring->groups[g].first + i;
        const uint8_t *name = stek_ring_entry(ring, k); /* name | hmac | aes */
        size_t j = 0;
        while (j < s->n && s->epoch[j] != ring->keys[k].epoch)
            j++;
        if (j < s->n) {
            if (memcmp(s->name[j], name, STEK_KEY_NAME_BYTES) != 0)
                s->conflicts++;
        } else if (s->n < SEEN_MAX) {
            s->epoch[s->n] = ring->keys[k].epoch;
            memcpy(s->name[s->n], name, STEK_KEY_NAME_BYTES);
            s->n++;
        }
    }
    stek_keyring_read_end(kr, slot);
}

/* Lowest and highest epoch seen; whether every epoch between was seen. */
static bool contiguous(const seen *s, uint64_t *lo, uint64_t *hi)
{
    *lo = UINT64_MAX;
    *hi = 0;
    for (size_t i = 0; i < s->n; i++) {
        *lo = s->epoch[i] < *lo ? s->epoch[i] : *lo;
        *hi = s->epoch[i] > *hi ? s->epoch[i] : *hi;
    }
    return s->n > 0 && *hi - *lo + 1 == s->n;
}

/* ---- stekd's answers ----------------------------------------------------------------- */

typedef struct probe {
    fx_grpc *ch;
    uint8_t *req;
    size_t req_len;
    grpc_status_code want;
    grpc_status_code last;
    stek_client *hosts[2];
    seen *seen[2];
    int64_t until_ms; /* for elapsed() */
    uint64_t epoch;   /* for epoch_reached() */
} probe;

static void sample_hosts(probe *p)
{
    for (int i = 0; i < 2; i++)
        sample(p->hosts[i], p->seen[i]);
}

static bool status_is(void *arg)
{
    probe *p = arg;
    sample_hosts(p);
    fx_grpc_result res = {0};
    if (fx_grpc_unary(p->ch, GET, p->req, p->req_len, 5000, &res) != 0)
        return false;
    p->last = res.status;
    fx_grpc_result_free(&res);
    return p->last == p->want;
}

static int health(fx_grpc *ch)
{
    int serving = -1;
    grpc_status_code st;
    return fx_grpc_health(ch, "", 5000, &serving, &st);
}

/* A span of the outage has passed; the hosts are sampled meanwhile. */
static bool elapsed(void *arg)
{
    probe *p = arg;
    sample_hosts(p);
    return mono_ms() >= p->until_ms;
}

/* Both hosts hold a set whose CURRENT epoch is at least p->epoch. */
static bool epoch_reached(void *arg)
{
    probe *p = arg;
    sample_hosts(p);
    return counters(p->hosts[0]).current_epoch >= p->epoch &&
           counters(p->hosts[1]).current_epoch >= p->epoch;
}

static void test_hsm_outage(void **state)
{
    (void)state;
    stek_client *a = host_client(&cert_a, NULL);
    stek_client *b = host_client(&cert_b, NULL);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(stek_client_wait_ready(a, 20000), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(b, 20000), STEK_RESULT_OK);
    SSL_CTX *ca = server_ctx(a), *cb = server_ctx(b);
    assert_non_null(ca);
    assert_non_null(cb);

    /* stekd probed as a third host would (fx_grpc): GetKeySet and health. */
    stek_host_eph *eph = NULL;
    uint8_t pub[STEK_P256_POINT_BYTES], nonce[16];
    assert_int_equal(stek_host_eph_generate(&eph), STEK_OK);
    assert_int_equal(stek_host_eph_public(eph, pub), STEK_OK);
    assert_int_equal(RAND_bytes(nonce, sizeof(nonce)), 1);
    static seen sa, sb;
    memset(&sa, 0, sizeof(sa));
    memset(&sb, 0, sizeof(sb));
    probe p = {.hosts = {a, b}, .seen = {&sa, &sb}};
    assert_int_equal(fx_grpc_open(&p.ch, d.target, d.ca.cert_path, cert_a.cert_path,
                                  cert_a.key_path, "localhost"),
                     0);
    assert_int_equal(fx_stek_request(GROUP, pub, sizeof(pub), nonce, sizeof(nonce), cert_a.key_path,
                                     &p.req, &p.req_len),
                     0);
    p.want = GRPC_STATUS_OK;
    assert_true(status_is(&p));
    assert_int_equal(health(p.ch), 1); /* SERVING */

    xloop l;
    xloop_start(&l, ca, cb);
    const uint64_t before = counters(a).current_epoch;

    /* The token goes away for more than an epoch. */
    const int64_t t_hide = mono_ms();
    const uint64_t e_hide = fx_stekd_epoch_now(&d);
    assert_int_equal(fx_token_hide(&d.tok), 0);
    p.want = GRPC_STATUS_UNAVAILABLE;
    assert_int_equal(fx_wait_until(status_is, &p, 10000), 0);
    const int64_t unavailable_ms = mono_ms() - t_hide;
    assert_int_equal(health(p.ch), 2); /* NOT_SERVING */
    p.until_ms = t_hide + EPOCH_S * 1000 + 700;
    assert_int_equal(fx_wait_until(elapsed, &p, (EPOCH_S + 10) * 1000), 0);
    p.want = GRPC_STATUS_UNAVAILABLE;
    assert_true(status_is(&p)); /* still out at the end of it */
    const uint64_t e_restore = fx_stekd_epoch_now(&d);
    const unsigned during_attempted = atomic_load(&l.attempted);
    const unsigned during_failed = atomic_load(&l.failed);
    assert_true(e_restore > e_hide); /* at least one rotation fell in the outage */
    assert_int_equal(fx_token_restore(&d.tok), 0);
    const int64_t t_restore = mono_ms();

    /* Back: stekd serves again, and both hosts catch up with the clock. */
    p.want = GRPC_STATUS_OK;
    assert_int_equal(fx_wait_until(status_is, &p, 20000), 0);
    const int64_t serving_ms = mono_ms() - t_restore;
    assert_int_equal(health(p.ch), 1);
    p.epoch = fx_stekd_epoch_now(&d);
    assert_int_equal(fx_wait_until(epoch_reached, &p, 30000), 0);
    const int64_t t_caught_up = mono_ms();
    const int64_t caught_up_ms = t_caught_up - t_restore;
    const unsigned catch_up_failed = atomic_load(&l.failed) - during_failed;
    /* One more rotation in steady state. */
    p.epoch++;
    assert_int_equal(fx_wait_until(epoch_reached, &p, (EPOCH_S + 10) * 1000), 0);
    sample_hosts(&p);
    xloop_stop(&l);

    stek_counters ka = counters(a), kb = counters(b);
    uint64_t lo_a, hi_a, lo_b, hi_b;
    const bool ca_ok = contiguous(&sa, &lo_a, &hi_a), cb_ok = contiguous(&sb, &lo_b, &hi_b);
    fprintf(stderr,
            "hsm outage: epochs %llu..%llu hidden at epoch %llu for %lld ms, UNAVAILABLE after "
            "%lld ms, serving again %lld ms and hosts caught up %lld ms after the restore; "
            "%u resumptions attempted (%u during the outage, %u failed; %u failed while "
            "the hosts caught up), %u resumed, %u failed; "
            "stale tickets a %llu b %llu; keys seen: a epochs %llu..%llu (%zu, %u conflicts), "
            "b epochs %llu..%llu (%zu, %u conflicts)\n",
            (unsigned long long)before, (unsigned long long)ka.current_epoch,
            (unsigned long long)e_hide, (long long)(t_restore - t_hide), (long long)unavailable_ms,
            (long long)serving_ms, (long long)caught_up_ms, atomic_load(&l.attempted),
            during_attempted, during_failed, catch_up_failed, atomic_load(&l.resumed),
            atomic_load(&l.failed), (unsigned long long)ka.tickets_stale,
            (unsigned long long)kb.tickets_stale, (unsigned long long)lo_a,
            (unsigned long long)hi_a, sa.n, sa.conflicts, (unsigned long long)lo_b,
            (unsigned long long)hi_b, sb.n, sb.conflicts);
    /* The hosts served through it: not one resumption failed while the
     * token was away. */
    assert_int_equal(atomic_load(&l.full_failed), 0);
    assert_int_equal(during_failed, 0);
    assert_true(during_attempted >= 10);
    /*
     * KNOWN GAP, measured and bounded here rather than hidden: the first set
     * after the outage carries a CURRENT key that no host held as `next`
     * (its epoch began while the token was away). The host that fetches it
     * first would encrypt under it at once, and the other cannot resume
     * those tickets until it fetches the set too (its reconnect backoff).
     * libstek now holds such a key back for min(epoch/2, 10 s) while a key
     * it held still decrypts (test_keyring: test_unseen_current_waits),
     * which covers most of it, but with this test's 3 s epochs a peer that
     * takes longer than 1.5 s can still miss some. So failures are allowed
     * only in rounds that started before both hosts had caught up; none
     * after.
     */
    if (catch_up_failed > 0)
        assert_true(atomic_load(&l.last_fail_ms) < t_caught_up);
    assert_int_equal(ka.no_key_encrypts + kb.no_key_encrypts, 0);
    assert_int_equal(ka.sets_rejected + kb.sets_rejected, 0);
    /* No epoch skipped, none under two names, the same keys on both hosts,
     * and the schedule went on past the outage. */
    assert_true(ca_ok);
    assert_true(cb_ok);
    assert_int_equal(sa.conflicts + sb.conflicts, 0);
    for (size_t i = 0; i < sa.n; i++)
        for (size_t j = 0; j < sb.n; j++)
            if (sa.epoch[i] == sb.epoch[j])
                assert_memory_equal(sa.name[i], sb.name[j], STEK_KEY_NAME_BYTES);
    assert_true(lo_a <= e_hide && hi_a >= e_restore + 2);
    assert_true(lo_b <= e_hide && hi_b >= e_restore + 2);

    free(p.req);
    fx_grpc_close(p.ch);
    stek_host_eph_free(eph);
    SSL_CTX_free(ca);
    SSL_CTX_free(cb);
    stek_client_free(a);
    stek_client_free(b);
}

/* ---- the cache disk ------------------------------------------------------------- */

typedef struct cache_wait {
    stek_client *c;
    uint64_t errors;  /* wait for cache_write_errors above this */
    const char *path; /* or for this file to be (re)written: */
    ino_t old_ino;    /* a new inode (written by rename), or any when 0 */
} cache_wait;

static bool more_errors(void *arg)
{
    cache_wait *w = arg;
    return counters(w->c).cache_write_errors > w->errors;
}

static bool written(void *arg)
{
    cache_wait *w = arg;
    struct stat sb;
    return stat(w->path, &sb) == 0 && sb.st_size > 0 && sb.st_ino != w->old_ino;
}

/* A ticket from c, resumed on c: the host serves. */
static void serves(SSL_CTX *ctx)
{
    fx_tls_result f = fx_tls_handshake(ctx, TLS1_3_VERSION, NULL, NULL);
    assert_true(f.ok);
    assert_non_null(f.session);
    fx_tls_result x = fx_tls_handshake(ctx, TLS1_3_VERSION, NULL, f.session);
    assert_true(x.ok && x.server_reused);
    SSL_SESSION_free(f.session);
    SSL_SESSION_free(x.session);
}

/* Fills the file system holding dir: writes until ENOSPC. */
static void fill(const char *dir)
{
    char path[FX_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/filler", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    char block[512] = {0};
    ssize_t w;
    while ((w = write(fd, block, sizeof(block))) > 0)
        ;
    assert_int_equal(errno, ENOSPC);
    while (write(fd, block, 1) > 0) /* the last bytes of the last page */
        ;
    close(fd);
}

/* Counts the lines of path holding both strings. */
static int lines_with(const char *path, const char *a, const char *b)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, a) != NULL && strstr(line, b) != NULL;
    fclose(f);
    return n;
}

static void test_cache_disk_full_and_read_only(void **state)
{
    (void)state;
    if (!private_mounts) {
        fprintf(stderr, "no private mount namespace (needs CAP_SYS_ADMIN): skipped\n");
        skip();
    }
    char dir[FX_PATH_MAX], disk[FX_PATH_MAX + 16], cache[FX_PATH_MAX + 32], log[FX_PATH_MAX + 32];
    assert_int_equal(fx_tmpdir("faults-disk", dir, sizeof(dir)), 0);
    snprintf(disk, sizeof(disk), "%s/disk", dir);
    snprintf(cache, sizeof(cache), "%s/keys.cache", disk);
    snprintf(log, sizeof(log), "%s/libstek.log", dir);
    assert_int_equal(mkdir(disk, 0700), 0);
    assert_int_equal(mount("tmpfs", disk, "tmpfs", 0, "size=16k,mode=0700"), 0);

    /* libstek logs on stderr: keep what it says during the test. */
    fflush(stderr);
    int saved = dup(2);
    int lfd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    assert_true(saved >= 0 && lfd >= 0);
    assert_int_equal(dup2(lfd, 2), 2);
    close(lfd);

    /* A full disk from the start. */
    fill(disk);
    stek_client *c = host_client(&cert_a, cache);
    assert_non_null(c);
    assert_int_equal(stek_client_wait_ready(c, 20000), STEK_RESULT_OK);
    SSL_CTX *ctx = server_ctx(c);
    assert_non_null(ctx);
    cache_wait w = {.c = c, .errors = 0, .path = cache};
    assert_int_equal(fx_wait_until(more_errors, &w, 10000), 0);
    stek_counters k = counters(c);
    const uint64_t full_errors = k.cache_write_errors;
    serves(ctx);
    struct stat sb;
    assert_int_not_equal(stat(cache, &sb), 0); /* nothing half-written left */

    /* Space again: the next set accepted is written. */
    char filler[FX_PATH_MAX + 32];
    snprintf(filler, sizeof(filler), "%s/filler", disk);
    assert_int_equal(unlink(filler), 0);
    assert_int_equal(fx_wait_until(written, &w, (EPOCH_S + 10) * 1000), 0);
    assert_int_equal(stat(cache, &sb), 0);

    /* Read-only: the next rewrite fails, reported; serving goes on. */
    assert_int_equal(mount(NULL, disk, NULL, MS_REMOUNT | MS_RDONLY, "size=16k"), 0);
    w.errors = counters(c).cache_write_errors;
    assert_int_equal(fx_wait_until(more_errors, &w, (EPOCH_S + 10) * 1000), 0);
    const uint64_t ro_errors = counters(c).cache_write_errors - w.errors;
    serves(ctx);
    struct stat kept;
    assert_int_equal(stat(cache, &kept), 0); /* the last good file stays */
    assert_int_equal(kept.st_ino, sb.st_ino);

    /* Writable again: written again (a new file renamed over). */
    assert_int_equal(mount(NULL, disk, NULL, MS_REMOUNT, "size=16k"), 0);
    w.old_ino = kept.st_ino;
    assert_int_equal(fx_wait_until(written, &w, (EPOCH_S + 10) * 1000), 0);
    serves(ctx);
    k = counters(c);
    SSL_CTX_free(ctx);
    stek_client_free(c);

    fflush(stderr);
    assert_int_equal(dup2(saved, 2), 2);
    close(saved);
    const int logged = lines_with(log, "cache", "not written");
    fprintf(stderr,
            "cache disk: %llu write errors on the full disk, %llu read-only, %d logged; "
            "%llu sets accepted; cache written once space was back and again once writable\n",
            (unsigned long long)full_errors, (unsigned long long)ro_errors, logged,
            (unsigned long long)k.sets_accepted);
    assert_true(full_errors >= 1);
    assert_true(ro_errors >= 1);
    assert_true(logged >= 2);
    assert_true((uint64_t)logged >= full_errors + ro_errors);
    assert_int_equal(k.cache_rejected, 0);
    assert_int_equal(umount(disk), 0);
    assert_int_equal(fx_rmtree(dir), 0);
}

int main(void)
{
    /* Before any thread: a private mount namespace, so the tmpfs of the
     * disk test disappears with this process whatever happens. */
    private_mounts =
        unshare(CLONE_NEWNS) == 0 && mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hsm_outage),
        cmocka_unit_test(test_cache_disk_full_and_read_only),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
