/*
 * Secret hygiene, proved against real processes (issue 7):
 *
 *   - a live stekd that served ticket keys (by GetKeySet and, after a
 *     rotation, by WatchKeySet) holds none of their bytes anywhere in its
 *     memory: every readable mapping is read through /proc/PID/mem;
 *   - a libstek client in this process no longer holds a key's bytes
 *     anywhere in this process's memory once the key is retired;
 *   - a stekd whose clock runs a day ahead destroys (and creates) no HSM
 *     object;
 *   - no file the run produced (stekd's log at debug level, the audit log,
 *     stekctl's output, libstek's log) holds any key, raw, hex or base64.
 *
 * Each scan has a positive control: the same scan finds the keys where this
 * process deliberately keeps them, so a scanner that reads nothing cannot
 * pass. The scanner keeps no key: it matches a 4-byte prefix, then compares
 * the SHA-256 of the bytes at that spot with the SHA-256 of the key part.
 *
 * Keys of group "edge" are unwrapped here (the stekd scans); keys of group
 * "lib" only ever reach this process through libstek (the host scan), so
 * the test's own unwrapping cannot leave the bytes the host scan looks for.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "fx_tls.h"
#include "hostwrap.h"
#include "keyring.h"
#include "stek/stek.h"
#include "stek/v1/stek.pb-c.h"
#include "stek_client_internal.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

extern char **environ;

#define EPOCH_S 2
#define LIFETIME_S 4
#define GET "/stek.v1.KeyService/GetKeySet"
#define WATCH "/stek.v1.KeyService/WatchKeySet"
/* Larger readable mappings are sanitizer shadow or reservations (ASan's
 * high shadow is terabytes): they hold metadata, not program data. */
#define SCAN_MAX_REGION (4ULL << 30)
#define SCAN_CHUNK (1u << 20)
#define SCAN_OVERLAP 128 /* > the longest part (80 bytes) */

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL}},
    {"lib", {"uri:spiffe://fleet/lib/*", NULL}},
};

static fx_stekd d;
static fx_cert edge_cert, lib_cert;
static stek_host_eph *eph;
static uint8_t eph_pub[STEK_P256_POINT_BYTES];
static fx_grpc *ch;

/* ---- the test's own copies of the keys ------------------------------------- */

/*
 * Every key this test knows, each in its own locked page, kept until the
 * log scan. "edge" keys are whole (80 bytes: K0 | hmac | aes); the "lib"
 * key is what libstek installs past the public name (hmac | aes).
 */
#define HELD_MAX 32
typedef struct held_key {
    stek_secret *s;
    bool whole; /* 80-byte K, else hmac | aes */
    char what[48];
} held_key;
static held_key held[HELD_MAX];
static size_t n_held;

static void held_free_all(void)
{
    for (size_t i = 0; i < n_held; i++)
        stek_secret_free(held[i].s);
    memset(held, 0, sizeof(held));
    n_held = 0;
}

/* The secret parts of a held key: offsets and lengths into its bytes. */
typedef struct part {
    size_t off, len;
    const char *name;
} part;
static const part whole_parts[] = {
    {0, 80, "K"}, {0, 16, "K[0:16]"}, {16, 32, "hmac"}, {48, 32, "aes"}};
static const part installed_parts[] = {{0, 64, "hmac|aes"}, {0, 32, "hmac"}, {32, 32, "aes"}};

static const part *parts_of(const held_key *h, size_t *n)
{
    *n = h->whole ? 4 : 3;
    return h->whole ? whole_parts : installed_parts;
}

/* ---- fingerprints: a prefix and a SHA-256, never the bytes ----------------- */

#define FP_MAX 160
typedef struct fp {
    uint32_t prefix; /* the part's first 4 bytes */
    uint32_t len;
    uint8_t sha[32];
    char what[64];
} fp;

typedef struct fpset {
    size_t n;
    fp e[FP_MAX];
    uint8_t first2[65536 / 8]; /* bitmap of the parts' first two bytes */
} fpset;

static void sha256(const uint8_t *p, size_t len, uint8_t out[32])
{
    assert_int_equal(EVP_Digest(p, len, out, NULL, EVP_sha256(), NULL), 1);
}

static void fp_add(fpset *s, const uint8_t *p, size_t len, const char *what)
{
    assert_true(s->n < FP_MAX);
    assert_true(len >= 4);
    fp *f = &s->e[s->n++];
    memcpy(&f->prefix, p, 4);
    /* A zero prefix would make every zero page a candidate (chance 2^-32). */
    assert_true(f->prefix != 0);
    f->len = (uint32_t)len;
    sha256(p, len, f->sha);
    snprintf(f->what, sizeof(f->what), "%s", what);
    unsigned b = (unsigned)p[0] | (unsigned)p[1] << 8;
    s->first2[b >> 3] |= (uint8_t)(1u << (b & 7));
}

static void fp_add_held(fpset *s, const held_key *h)
{
    size_t n;
    const part *ps = parts_of(h, &n);
    for (size_t i = 0; i < n; i++) {
        char what[64];
        snprintf(what, sizeof(what), "%s %s", h->what, ps[i].name);
        fp_add(s, stek_secret_cdata(h->s) + ps[i].off, ps[i].len, what);
    }
}

/* ---- the memory scanner ---------------------------------------------------- */

typedef struct scan_result {
    size_t regions, regions_read, regions_failed, regions_too_large;
    uint64_t bytes, heap_bytes, stack_bytes, anon_bytes;
    bool heap_listed;
    size_t hits[FP_MAX];
    uintptr_t first_hit[FP_MAX];
    char first_region[FP_MAX][96];
    double seconds;
} scan_result;

typedef struct range {
    uintptr_t lo, hi;
} range;

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool excluded(uintptr_t a, const range *ex, size_t n_ex)
{
    for (size_t i = 0; i < n_ex; i++)
        if (a >= ex[i].lo && a < ex[i].hi)
            return true;
    return false;
}

/* Matches in buf[0..limit) (bytes up to buf_len are readable); buf starts at addr. */
static void match(const fpset *s, const uint8_t *buf, size_t limit, size_t buf_len, uintptr_t addr,
                  const range *ex, size_t n_ex, const char *region, scan_result *r)
{
    for (size_t i = 0; i + 4 <= buf_len && i < limit; i++) {
        unsigned b = (unsigned)buf[i] | (unsigned)buf[i + 1] << 8;
        if (!(s->first2[b >> 3] & (1u << (b & 7))))
            continue;
        uint32_t v;
        memcpy(&v, buf + i, 4);
        for (size_t k = 0; k < s->n; k++) {
            const fp *f = &s->e[k];
            if (f->prefix != v || i + f->len > buf_len || excluded(addr + i, ex, n_ex))
                continue;
            uint8_t h[32];
            sha256(buf + i, f->len, h);
            if (memcmp(h, f->sha, 32) != 0)
                continue;
            if (r->hits[k]++ == 0) {
                r->first_hit[k] = addr + i;
                snprintf(r->first_region[k], sizeof(r->first_region[k]), "%s", region);
            }
        }
    }
}

/*
 * Reads every readable mapping of pid through /proc/PID/mem (pread) and
 * counts where each fingerprint's bytes occur. Matches starting inside ex
 * are not counted (this process's deliberate copies); the scanner's own
 * buffer is never read.
 */
static void scan_process(pid_t pid, const fpset *s, const range *ex_in, size_t n_ex_in,
                         scan_result *r)
{
    memset(r, 0, sizeof(*r));
    double t0 = mono_s();
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    FILE *maps = fopen(path, "r");
    assert_non_null(maps);
    snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
    int mem = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(mem >= 0);
    size_t cap = SCAN_CHUNK + SCAN_OVERLAP;
    uint8_t *buf = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(buf != MAP_FAILED);
    range ex[8];
    assert_true(n_ex_in < 8);
    if (n_ex_in > 0)
        memcpy(ex, ex_in, n_ex_in * sizeof(*ex));
    size_t n_ex = n_ex_in;
    const bool self = pid == getpid();
    const range own = {(uintptr_t)buf, (uintptr_t)buf + cap};

    char line[512];
    while (fgets(line, sizeof(line), maps) != NULL) {
        unsigned long lo, hi;
        char perms[8] = "", name[400] = "";
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %399[^\n]", &lo, &hi, perms, name) < 3)
            continue;
        r->regions++;
        if (perms[0] != 'r')
            continue;
        if (self && lo < own.hi && own.lo < hi)
            continue; /* the scan buffer itself */
        if (hi - lo > SCAN_MAX_REGION) {
            r->regions_too_large++;
            continue;
        }
        const char *nm = name;
        while (*nm == ' ')
            nm++;
        char region[96];
        snprintf(region, sizeof(region), "%lx-%lx %s %s", lo, hi, perms, *nm ? nm : "[anon]");
        bool heap = strcmp(nm, "[heap]") == 0, stack = strncmp(nm, "[stack", 6) == 0,
             anon = *nm == '\0';
        r->heap_listed |= heap;

        uint64_t got = 0;
        bool failed = false;
        size_t carry = 0;
        for (unsigned long at = lo; at < hi;) {
            size_t want = hi - at < SCAN_CHUNK ? hi - at : SCAN_CHUNK;
            ssize_t n = pread(mem, buf + carry, want, (off_t)at);
            if (n <= 0) {
                failed = true;
                carry = 0;
                at += want;
                continue;
            }
            got += (uint64_t)n;
            size_t len = carry + (size_t)n;
            bool last = at + (unsigned long)n >= hi;
            size_t limit = last ? len : (len > SCAN_OVERLAP ? len - SCAN_OVERLAP : 0);
            match(s, buf, limit, len, at - carry, ex, n_ex, region, r);
            carry = len - limit;
            memmove(buf, buf + limit, carry);
            at += (unsigned long)n;
        }
        r->bytes += got;
        r->regions_read += got > 0;
        r->regions_failed += failed;
        if (heap)
            r->heap_bytes += got;
        if (stack)
            r->stack_bytes += got;
        if (anon)
            r->anon_bytes += got;
    }
    /* The buffer held copies of what it read, keys included (the controls). */
    OPENSSL_cleanse(buf, cap);
    munmap(buf, cap);
    close(mem);
    fclose(maps);
    r->seconds = mono_s() - t0;
}

static size_t total_hits(const fpset *s, const scan_result *r)
{
    size_t t = 0;
    for (size_t k = 0; k < s->n; k++)
        t += r->hits[k];
    return t;
}

static void report(const char *who, const fpset *s, const scan_result *r)
{
    fprintf(stderr,
            "scan %s: %zu mappings, %zu read (%.1f MiB; heap %.1f, stack %.2f, anon %.1f MiB), "
            "%zu unreadable, %zu too large, %zu parts, %zu hits, %.2f s\n",
            who, r->regions, r->regions_read, (double)r->bytes / 1048576.0,
            (double)r->heap_bytes / 1048576.0, (double)r->stack_bytes / 1048576.0,
            (double)r->anon_bytes / 1048576.0, r->regions_failed, r->regions_too_large, s->n,
            total_hits(s, r), r->seconds);
    for (size_t k = 0; k < s->n; k++)
        if (r->hits[k] > 0)
            fprintf(stderr, "  %s: %zu hit(s), first at 0x%" PRIxPTR " in %s\n", s->e[k].what,
                    r->hits[k], r->first_hit[k], r->first_region[k]);
}

/* The scan read what matters: the heap (when there is one), the stack, anonymous memory. */
static void assert_coverage(const scan_result *r)
{
    assert_true(r->stack_bytes > 0);
    assert_true(r->anon_bytes > 0);
    if (r->heap_listed)
        assert_true(r->heap_bytes > 0);
#if !defined(__SANITIZE_ADDRESS__)
    /* glibc's malloc: the main arena is the [heap]. (ASan's allocator has none.) */
    assert_true(r->heap_listed);
#endif
}

/* ---- stekd: fetch, verify nothing, unwrap ----------------------------------- */

static int setup(void **state)
{
    (void)state;
    /* Everything that logs, logs all it can: the log scan covers debug lines. */
    setenv("STEK_LOG_LEVEL", "debug", 1);
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 2, "audit_log = \"audit.log\";\n") != 0 ||
        fx_stekd_start(&d) != 0)
        return -1;
    const char *eu[] = {"spiffe://fleet/edge/a", NULL}, *lu[] = {"spiffe://fleet/lib/a", NULL};
    fx_cert_opts eo = {.name = "edge-a", .uri_sans = eu}, lo = {.name = "lib-a", .uri_sans = lu};
    if (fx_stekd_host_cert(&d, &eo, &edge_cert) != 0 || fx_stekd_host_cert(&d, &lo, &lib_cert) != 0)
        return -1;
    if (stek_host_eph_generate(&eph) != STEK_OK || stek_host_eph_public(eph, eph_pub) != STEK_OK)
        return -1;
    return fx_grpc_open(&ch, d.target, d.ca.cert_path, edge_cert.cert_path, edge_cert.key_path,
                        "localhost");
}

static int teardown(void **state)
{
    (void)state;
    fx_grpc_close(ch);
    stek_host_eph_free(eph);
    held_free_all();
    fx_stekd_destroy(&d);
    return 0;
}

static void edge_request(uint8_t **req, size_t *len)
{
    uint8_t nonce[16];
    assert_int_equal(RAND_bytes(nonce, sizeof(nonce)), 1);
    assert_int_equal(fx_stek_request("edge", eph_pub, sizeof(eph_pub), nonce, sizeof(nonce),
                                     edge_cert.key_path, req, len),
                     0);
}

/* Unwraps every key of a KeySet message not yet held; returns its CURRENT epoch. */
static uint64_t hold_keys_of(const uint8_t *msg, size_t len)
{
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    assert_non_null(ks);
    assert_null(ks->heartbeat);
    Stek__V1__SignedKeySet *s =
        stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    stek__v1__key_set__free_unpacked(ks, NULL);
    assert_non_null(s);
    stek_secret *kek = NULL;
    assert_int_equal(stek_host_kek_derive(eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len, s->group,
                                          (uint32_t)s->generation, &kek),
                     STEK_OK);
    uint64_t current = 0;
    for (size_t i = 0; i < s->n_keys; i++) {
        if (s->keys[i]->state == STEK__V1__KEY_STATE__KEY_STATE_CURRENT)
            current = s->keys[i]->epoch;
        char what[48];
        snprintf(what, sizeof(what), "edge epoch %" PRIu64, s->keys[i]->epoch);
        bool have = false;
        for (size_t j = 0; j < n_held; j++)
            have |= strcmp(held[j].what, what) == 0;
        if (have)
            continue;
        assert_true(n_held < HELD_MAX);
        held_key *h = &held[n_held];
        assert_int_equal(
            stek_host_unwrap(kek, s->keys[i]->wrapped.data, s->keys[i]->wrapped.len, &h->s),
            STEK_OK);
        h->whole = true;
        snprintf(h->what, sizeof(h->what), "%s", what);
        n_held++;
    }
    stek_secret_free(kek);
    stek__v1__signed_key_set__free_unpacked(s, NULL);
    assert_true(current > 0);
    return current;
}

/*
 * stekd's whole memory holds none of the held keys (none of K, K[0:16],
 * hmac, aes). Two controls: stekd's memory does hold strings it must hold
 * (its argv's config path, the group's policy pattern), so the scan reads
 * that process; and this process's memory, where the held copies live,
 * holds every key part.
 */
static void assert_stekd_clean(const char *when)
{
    static fpset s;
    memset(&s, 0, sizeof(s));
    for (size_t i = 0; i < n_held; i++)
        if (held[i].whole)
            fp_add_held(&s, &held[i]);
    const size_t n_keys = s.n;
    const char *policy = groups[0].allow[0];
    fp_add(&s, (const uint8_t *)d.config_path, strlen(d.config_path), "control: config path");
    fp_add(&s, (const uint8_t *)policy, strlen(policy), "control: edge policy");
    static scan_result r;
    char who[96];
    snprintf(who, sizeof(who), "stekd pid %d %s", (int)d.pid, when);
    scan_process(d.pid, &s, NULL, 0, &r);
    report(who, &s, &r);
    assert_coverage(&r);
    assert_true(r.bytes > (1u << 20));
    for (size_t k = 0; k < s.n; k++)
        if (k < n_keys)
            assert_int_equal(r.hits[k], 0);
        else
            assert_true(r.hits[k] >= 1);

    scan_process(getpid(), &s, NULL, 0, &r);
    report("self (control: the held copies)", &s, &r);
    assert_coverage(&r);
    for (size_t k = 0; k < s.n; k++)
        assert_true(r.hits[k] >= 1);
}

static void test_stekd_memory_after_get(void **state)
{
    (void)state;
    uint8_t *req = NULL;
    size_t len = 0;
    edge_request(&req, &len);
    fx_grpc_result res = {0};
    assert_int_equal(fx_grpc_unary(ch, GET, req, len, 10000, &res), 0);
    free(req);
    assert_int_equal(res.status, GRPC_STATUS_OK);
    hold_keys_of(res.body, res.body_len);
    fx_grpc_result_free(&res);
    assert_true(n_held >= 2);
    assert_stekd_clean("after GetKeySet");
}

/*
 * The HSM PIN reaches stekd in the variable the config names; stekd keeps
 * it in locked memory and overwrites and drops the variable, so the PIN is
 * not in /proc/PID/environ (which anyone with ptrace rights, and core files,
 * would show). Control: the variable is in the test's own environment.
 */
static void test_stekd_environ_has_no_pin(void **state)
{
    (void)state;
    assert_non_null(getenv(d.tok.pin_env));
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/environ", (int)d.pid);
    FILE *f = fopen(path, "re");
    assert_non_null(f);
    static char env[1 << 16];
    size_t n = fread(env, 1, sizeof(env) - 1, f);
    fclose(f);
    assert_true(n > 0);
    assert_true(n < sizeof(env) - 1);
    assert_null(memmem(env, n, d.tok.pin, strlen(d.tok.pin)));
    /* The kernel shows the process's initial environment block: the
     * variable's name stays there, its value is zeros now. */
    /* Something else of the environment is there: the file was read. */
    assert_non_null(memmem(env, n, "SOFTHSM2_CONF=", 14));
}

static void test_stekd_memory_after_watch_rotation(void **state)
{
    (void)state;
    uint8_t *req = NULL;
    size_t len = 0;
    edge_request(&req, &len);
    fx_grpc_stream *st = NULL;
    assert_int_equal(fx_grpc_stream_start(ch, WATCH, req, len, 60000, &st), 0);
    free(req);
    uint8_t *msg = NULL;
    size_t mlen = 0;
    assert_int_equal(fx_grpc_stream_read(st, 5000, &msg, &mlen), 1);
    uint64_t e0 = hold_keys_of(msg, mlen), e = e0;
    free(msg);
    double deadline = mono_s() + 3 * EPOCH_S + 3;
    while (e == e0 && mono_s() < deadline) {
        assert_int_equal(fx_grpc_stream_read(st, 3000, &msg, &mlen), 1);
        Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, mlen, msg);
        assert_non_null(ks);
        bool beat = ks->heartbeat != NULL;
        stek__v1__key_set__free_unpacked(ks, NULL);
        if (!beat)
            e = hold_keys_of(msg, mlen);
        free(msg);
    }
    fx_grpc_stream_cancel_and_free(st);
    assert_true(e > e0);
    fprintf(stderr, "watch: rotation %" PRIu64 " -> %" PRIu64 ", %zu keys held\n", e0, e, n_held);
    assert_stekd_clean("after a watched rotation");
}

/* ---- stekctl, run with separate stdout and stderr files in d.dir ------------ */

static int run_ctl(const char *tag, char *const args[], char *out, size_t cap)
{
    char out_path[FX_PATH_MAX + 64], err_path[FX_PATH_MAX + 64];
    snprintf(out_path, sizeof(out_path), "%s/stekctl-%s.out", d.dir, tag);
    snprintf(err_path, sizeof(err_path), "%s/stekctl-%s.log", d.dir, tag);
    char *argv[32] = {STEKCTL_PATH, "--config", d.config_path};
    size_t n = 3;
    for (size_t i = 0; args[i] != NULL; i++) {
        assert_true(n < 31);
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    posix_spawn_file_actions_t fa;
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    assert_int_equal(posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    assert_int_equal(rc, 0);
    int status = 0;
    assert_int_equal(fx_wait_exit(pid, 30000, &status), 0);
    FILE *f = fopen(out_path, "r");
    assert_non_null(f);
    size_t got = fread(out, 1, cap - 1, f);
    out[got] = '\0';
    fclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* stekctl fetch: a host's view of an "edge" set (its output goes to the log scan). */
static void test_stekctl_fetch(void **state)
{
    (void)state;
    static char out[16384];
    char *args[] = {"fetch",
                    "edge",
                    "--target",
                    d.target,
                    "--ca",
                    d.ca.cert_path,
                    "--cert",
                    edge_cert.cert_path,
                    "--key",
                    edge_cert.key_path,
                    "--pubkey",
                    d.signing_pem_path,
                    "--server-name",
                    "localhost",
                    NULL};
    assert_int_equal(run_ctl("fetch", args, out, sizeof(out)), 0);
    assert_non_null(strstr(out, "signature    valid"));
}

/* ---- the host: libstek in this process ------------------------------------- */

static int saved_stderr = -1;
static char lib_log[FX_PATH_MAX + 32];

/* libstek logs to stderr: send it to a file of the run for the log scan. */
static int redirect_stderr(void **state)
{
    (void)state;
    snprintf(lib_log, sizeof(lib_log), "%s/libstek.log", d.dir);
    int fd = open(lib_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    fflush(stderr);
    saved_stderr = dup(2);
    int rc = saved_stderr >= 0 && dup2(fd, 2) == 2 ? 0 : -1;
    close(fd);
    return rc;
}

static int restore_stderr(void **state)
{
    (void)state;
    if (saved_stderr < 0)
        return 0;
    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    saved_stderr = -1;
    /* Show what was logged meanwhile (it holds no key: the log scan says so). */
    FILE *f = fopen(lib_log, "r");
    char line[1024];
    while (f != NULL && fgets(line, sizeof(line), f) != NULL)
        fputs(line, stderr);
    if (f != NULL)
        fclose(f);
    return 0;
}

static stek_client *lib_client(void)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    assert_int_equal(stek_options_new(&o), STEK_RESULT_OK);
    stek_result r = stek_options_add_server(o, d.target);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_ca(o, d.ca.cert_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_cert(o, lib_cert.cert_path, lib_cert.key_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_service_key(o, d.signing_pem_path);
    if (r == STEK_RESULT_OK)
        r = stek_options_set_group(o, "lib");
    if (r == STEK_RESULT_OK)
        r = stek_options_set_server_name(o, "localhost");
    if (r == STEK_RESULT_OK)
        r = stek_client_new(o, &c);
    stek_options_free(o);
    assert_int_equal(r, STEK_RESULT_OK);
    return c;
}

static SSL_CTX *server_ctx(void)
{
    SSL_CTX *ctx = fx_tls_server_ctx(d.server.cert_path, d.server.key_path);
    assert_non_null(ctx);
    return ctx;
}

/*
 * Copies the key "lib" encrypts with now (hmac | aes, past the public name)
 * into the test's one held copy, and its name into name.
 */
static void hold_current_lib_key(stek_client *c, uint8_t name[STEK_RING_NAME_BYTES],
                                 uint64_t *epoch)
{
    stek_keyring *kr = stek_client_keyring(c);
    unsigned slot;
    const stek_ring *r = stek_keyring_read_begin(kr, &slot);
    assert_non_null(r);
    int g = stek_ring_group_index(r, "lib");
    assert_true(g >= 0);
    bool stale = true;
    long i = stek_ring_encrypt_key(r, (uint32_t)g, stek_boottime_ns(), &stale);
    assert_true(i >= 0);
    assert_false(stale);
    assert_true(n_held < HELD_MAX);
    held_key *h = &held[n_held];
    assert_int_equal(stek_secret_new(64, &h->s), STEK_OK);
    const uint8_t *e = stek_ring_entry(r, (size_t)i);
    memcpy(name, e, STEK_RING_NAME_BYTES);
    memcpy(stek_secret_data(h->s), e + STEK_RING_NAME_BYTES, 64);
    *epoch = r->keys[i].epoch;
    stek_keyring_read_end(kr, slot);
    h->whole = false;
    snprintf(h->what, sizeof(h->what), "lib epoch %" PRIu64, *epoch);
    n_held++;
}

typedef struct installed_arg {
    stek_client *c;
    const uint8_t *name;
} installed_arg;

static bool key_gone(void *arg)
{
    installed_arg *a = arg;
    stek_keyring *kr = stek_client_keyring(a->c);
    unsigned slot;
    const stek_ring *r = stek_keyring_read_begin(kr, &slot);
    bool gone = true;
    for (size_t i = 0; r != NULL && i < r->n_keys; i++)
        gone &= memcmp(stek_ring_entry(r, i), a->name, STEK_RING_NAME_BYTES) != 0;
    stek_keyring_read_end(kr, slot);
    return gone;
}

typedef struct clean_arg {
    const fpset *s;
    const range *ex;
    scan_result *r;
    int scans;
} clean_arg;

static bool self_clean(void *arg)
{
    clean_arg *a = arg;
    scan_process(getpid(), a->s, a->ex, 1, a->r);
    a->scans++;
    return total_hits(a->s, a->r) == 0;
}

/*
 * A key libstek installed is in this process's memory while installed
 * (beyond the test's own copy), and nowhere once it is retired.
 */
static void test_host_memory_after_retire(void **state)
{
    (void)state;
    stek_client *c = lib_client();
    SSL_CTX *ctx = server_ctx();
    assert_int_equal(stek_client_attach(c, ctx), STEK_RESULT_OK);
    assert_int_equal(stek_client_wait_ready(c, 15000), STEK_RESULT_OK);

    uint8_t name[STEK_RING_NAME_BYTES];
    uint64_t epoch = 0;
    hold_current_lib_key(c, name, &epoch);
    const held_key *mine = &held[n_held - 1];
    const range ex = {(uintptr_t)stek_secret_cdata(mine->s),
                      (uintptr_t)stek_secret_cdata(mine->s) + stek_secret_len(mine->s)};

    /* The key works: tickets under it are issued and resumed (TLS 1.3 and 1.2). */
    const int versions[] = {TLS1_3_VERSION, TLS1_2_VERSION};
    for (size_t v = 0; v < 2; v++) {
        fx_tls_result full = fx_tls_handshake(ctx, versions[v], NULL, NULL);
        assert_true(full.ok);
        assert_non_null(full.session);
        fx_tls_result again = fx_tls_handshake(ctx, versions[v], NULL, full.session);
        assert_true(again.ok);
        assert_true(again.server_reused);
        SSL_SESSION_free(full.session);
        SSL_SESSION_free(again.session);
    }

    static fpset s;
    memset(&s, 0, sizeof(s));
    fp_add_held(&s, mine);
    static scan_result r;
    scan_process(getpid(), &s, &ex, 1, &r);
    report("self while installed (control: libstek's keyring)", &s, &r);
    assert_coverage(&r);
    for (size_t k = 0; k < s.n; k++)
        assert_true(r.hits[k] >= 1);

    /* Retired: past its decrypt deadline, (epoch + 1) * P + L. */
    double t0 = mono_s();
    installed_arg ia = {c, name};
    assert_int_equal(fx_wait_until(key_gone, &ia, (2 * EPOCH_S + LIFETIME_S + 5) * 1000), 0);
    double retired = mono_s();
    /* Bounded, not immediate: the writer cleanses after a grace period. */
    clean_arg ca = {&s, &ex, &r, 0};
    int rc = fx_wait_until(self_clean, &ca, 5000);
    report("self after retirement", &s, &r);
    fprintf(stderr,
            "lib epoch %" PRIu64 ": retired %.1f s after the control, clean after %d scan(s)\n",
            epoch, retired - t0, ca.scans);
    assert_int_equal(rc, 0);
    assert_coverage(&r);

    stek_counters k;
    assert_int_equal(stek_client_get_counters(c, &k), STEK_RESULT_OK);
    assert_true(k.tickets_resumed + k.tickets_renewed >= 2);
    stek_client_free(c);
    SSL_CTX_free(ctx);
}

/* ---- a replica a day ahead --------------------------------------------------- */

static int cmp_rows(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Every HSM object stekctl lists: "kind group generation epoch name", sorted. */
static size_t hsm_objects(const char *tag, char (*out)[96], size_t cap)
{
    static char text[65536];
    char *args[] = {"keys", "--json", NULL};
    assert_int_equal(run_ctl(tag, args, text, sizeof(text)), 0);
    json_object *root = json_tokener_parse(text);
    assert_non_null(root);
    assert_true(json_object_is_type(root, json_type_array));
    size_t n = json_object_array_length(root);
    assert_true(n <= cap);
    for (size_t i = 0; i < n; i++) {
        json_object *o = json_object_array_get_idx(root, i), *v;
        const char *f[5] = {"kind", "group", "generation", "epoch", "name"};
        char *p = out[i];
        size_t left = sizeof(out[i]);
        for (size_t j = 0; j < 5; j++) {
            const char *val =
                json_object_object_get_ex(o, f[j], &v) ? json_object_get_string(v) : "-";
            int w = snprintf(p, left, "%s%s", j ? " " : "", val);
            assert_true(w > 0 && (size_t)w < left);
            p += w;
            left -= (size_t)w;
        }
    }
    json_object_put(root);
    qsort(out, n, sizeof(out[0]), cmp_rows);
    return n;
}

typedef struct refusal_arg {
    fx_grpc *ch;
    grpc_status_code status;
    char details[256];
} refusal_arg;

static bool refuses(void *arg)
{
    refusal_arg *a = arg;
    uint8_t *req = NULL;
    size_t len = 0;
    edge_request(&req, &len);
    fx_grpc_result res = {0};
    int rc = fx_grpc_unary(a->ch, GET, req, len, 5000, &res);
    free(req);
    a->status = res.status;
    snprintf(a->details, sizeof(a->details), "%s", res.details);
    fx_grpc_result_free(&res);
    return rc == 0 && a->status == GRPC_STATUS_UNAVAILABLE;
}

/* A stekd whose clock runs a day ahead neither destroys nor creates an HSM object. */
static void test_day_ahead_destroys_nothing(void **state)
{
    (void)state;
    fx_grpc_close(ch);
    ch = NULL;
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 10000, &code), 0);
    assert_int_equal(code, 0);
    static char before[64][96], after[64][96];
    size_t nb = hsm_objects("keys-before", before, 64);
    assert_true(nb >= 4); /* per group: a chain key and at least current and next */

    assert_int_equal(setenv("STEKD_TEST_CLOCK_OFFSET", "86400", 1), 0);
    int rc = fx_stekd_start(&d);
    unsetenv("STEKD_TEST_CLOCK_OFFSET");
    assert_int_equal(rc, 0);
    refusal_arg ra = {0};
    assert_int_equal(fx_grpc_open(&ra.ch, d.target, d.ca.cert_path, edge_cert.cert_path,
                                  edge_cert.key_path, "localhost"),
                     0);
    rc = fx_wait_until(refuses, &ra, 15000);
    fprintf(stderr, "day ahead: GetKeySet status %d (%s)\n", (int)ra.status, ra.details);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(ra.details, "refusing to advance"));
    int serving = -1;
    assert_int_equal(fx_grpc_health(ra.ch, "", 5000, &serving, NULL), 2); /* NOT_SERVING */
    fx_grpc_close(ra.ch);
    assert_int_equal(fx_stekd_stop(&d, 10000, &code), 0);
    assert_int_equal(code, 0);

    size_t na = hsm_objects("keys-after", after, 64);
    fprintf(stderr, "day ahead: %zu HSM objects before, %zu after\n", nb, na);
    assert_int_equal(na, nb);
    for (size_t i = 0; i < nb; i++)
        assert_string_equal(after[i], before[i]);
}

/* ---- every file of the run --------------------------------------------------- */

#define PAT_MAX 2048
#define PATS_PER_PART 8 /* raw, hex, and base64 and base64url at three alignments */
typedef struct pattern {
    char *bytes;
    size_t len;
    bool hex; /* matched in either case */
    size_t hits;
    char what[80];
} pattern;
static pattern pats[PAT_MAX];
static size_t n_pats;

static void pat_add(const void *p, size_t len, bool hex, const char *what, const char *enc)
{
    assert_true(n_pats < PAT_MAX);
    pattern *q = &pats[n_pats++];
    q->bytes = malloc(len);
    assert_non_null(q->bytes);
    memcpy(q->bytes, p, len);
    q->len = len;
    q->hex = hex;
    q->hits = 0;
    snprintf(q->what, sizeof(q->what), "%s (%s)", what, enc);
}

/* base64 (or base64url) of `shift` zero bytes then p; returns the length. */
static size_t b64_at(const uint8_t *p, size_t len, size_t shift, bool url, char *out)
{
    uint8_t in[2 + 80] = {0};
    memcpy(in + shift, p, len);
    int n = EVP_EncodeBlock((unsigned char *)out, in, (int)(shift + len));
    OPENSSL_cleanse(in, sizeof(in));
    assert_true(n > 0);
    for (int i = 0; url && i < n; i++)
        out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
    return (size_t)n;
}

/*
 * A part as it would appear raw, in hex, or inside base64 text (standard
 * and URL alphabets) at each of the three alignments: only the characters
 * fully determined by the part's own bits. PATS_PER_PART patterns, in the
 * order raw, hex, then (base64, base64url) for shifts 0, 1, 2.
 */
static void pat_add_encodings(const uint8_t *p, size_t len, const char *what)
{
    pat_add(p, len, false, what, "raw");
    char hex[2 * 80 + 1];
    for (size_t i = 0; i < len; i++)
        snprintf(hex + 2 * i, 3, "%02x", p[i]);
    pat_add(hex, 2 * len, true, what, "hex");
    OPENSSL_cleanse(hex, sizeof(hex));
    for (size_t shift = 0; shift < 3; shift++)
        for (int url = 0; url < 2; url++) {
            char b64[4 * ((2 + 80 + 2) / 3) + 1];
            b64_at(p, len, shift, url, b64);
            size_t first = (8 * shift + 5) / 6, end = (8 * (shift + len)) / 6;
            char enc[32];
            snprintf(enc, sizeof(enc), "%s+%zu", url ? "base64url" : "base64", shift);
            pat_add(b64 + first, end - first, false, what, enc);
            OPENSSL_cleanse(b64, sizeof(b64));
        }
}

static void pats_free(void)
{
    for (size_t i = 0; i < n_pats; i++) {
        OPENSSL_cleanse(pats[i].bytes, pats[i].len);
        free(pats[i].bytes);
    }
    n_pats = 0;
}

static size_t files_scanned, file_hits;
static uint64_t file_bytes;
static bool saw_stekd_log, saw_audit_log, saw_ctl_log, saw_lib_log;

static int scan_file(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)ftw;
    if (type != FTW_F || !S_ISREG(sb->st_mode))
        return 0;
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t len = (size_t)sb->st_size;
    char *text = malloc(len + 1), *lower = malloc(len + 1);
    assert_non_null(text);
    assert_non_null(lower);
    size_t got = fread(text, 1, len, f);
    fclose(f);
    for (size_t i = 0; i < got; i++)
        lower[i] = text[i] >= 'A' && text[i] <= 'Z' ? (char)(text[i] - 'A' + 'a') : text[i];
    files_scanned++;
    file_bytes += got;
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    saw_stekd_log |= strcmp(base, "stekd.log") == 0 && got > 0;
    saw_audit_log |= strcmp(base, "audit.log") == 0 && got > 0;
    saw_ctl_log |= strncmp(base, "stekctl-", 8) == 0 && got > 0;
    saw_lib_log |= strcmp(base, "libstek.log") == 0 && got > 0;
    for (size_t i = 0; i < n_pats; i++)
        if (memmem(pats[i].hex ? lower : text, got, pats[i].bytes, pats[i].len) != NULL) {
            pats[i].hits++;
            file_hits++;
            fprintf(stderr, "key in file %s: %s\n", path, pats[i].what);
        }
    free(text);
    free(lower);
    return 0;
}

/*
 * Last, with every process stopped: no file under the run's directory (logs
 * at debug level, the audit log, stekctl's output, libstek's log, and the
 * token, certificates and configs besides) holds any key seen in the run.
 */
static void test_no_key_in_any_file(void **state)
{
    (void)state;
    for (size_t i = 0; i < n_held; i++) {
        size_t n;
        const part *ps = parts_of(&held[i], &n);
        for (size_t j = 0; j < n; j++) {
            char what[80];
            snprintf(what, sizeof(what), "%s %s", held[i].what, ps[j].name);
            pat_add_encodings(stek_secret_cdata(held[i].s) + ps[j].off, ps[j].len, what);
        }
    }
    assert_true(n_held >= 3);
    assert_int_equal(nftw(d.dir, scan_file, 16, FTW_PHYS), 0);
    fprintf(stderr, "files: %zu scanned (%.1f KiB) for %zu patterns of %zu keys, %zu hits\n",
            files_scanned, (double)file_bytes / 1024.0, n_pats, n_held, file_hits);
    assert_true(saw_stekd_log);
    assert_true(saw_audit_log);
    assert_true(saw_ctl_log);
    assert_true(saw_lib_log);
    assert_int_equal(file_hits, 0);

    /*
     * Control: the first key's aes half written raw, in upper-case hex, and
     * inside base64 text at each alignment (and base64url once) is found.
     */
    const held_key *h = &held[0];
    assert_true(h->whole);
    const uint8_t *aes = stek_secret_cdata(h->s) + 48;
    const size_t aes_first = 3 * PATS_PER_PART; /* parts: K, K[0:16], hmac, aes */
    char dir[FX_PATH_MAX + 16], planted[FX_PATH_MAX + 32];
    snprintf(dir, sizeof(dir), "%s/control", d.dir);
    snprintf(planted, sizeof(planted), "%s/planted", dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    FILE *f = fopen(planted, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(aes, 1, 32, f), 32);
    fputc('\n', f);
    for (size_t i = 0; i < 32; i++)
        fprintf(f, "%02X", aes[i]);
    for (size_t shift = 0; shift < 3; shift++) {
        char b64[4 * ((2 + 80 + 2) / 3) + 1];
        size_t n = b64_at(aes, 32, shift, false, b64);
        fprintf(f, "\nx=%.*s", (int)n, b64);
        n = b64_at(aes, 32, shift, shift == 1, b64);
        fprintf(f, "\nx=%.*s", (int)n, b64);
        OPENSSL_cleanse(b64, sizeof(b64));
    }
    fclose(f);
    for (size_t i = 0; i < n_pats; i++)
        pats[i].hits = 0;
    files_scanned = 0;
    assert_int_equal(nftw(dir, scan_file, 16, FTW_PHYS), 0);
    assert_int_equal(files_scanned, 1);
    const size_t want[] = {0, 1, 2, 4, 5, 6}; /* raw, hex, base64+0/+1/+2, base64url+1 */
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        if (pats[aes_first + want[i]].hits == 0)
            fprintf(stderr, "control: %s not found\n", pats[aes_first + want[i]].what);
        assert_true(pats[aes_first + want[i]].hits >= 1);
    }
    /* The planted file holds key bytes: drop them before the directory goes. */
    assert_int_equal(truncate(planted, 0), 0);
    assert_int_equal(unlink(planted), 0);
    pats_free();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stekd_memory_after_get),
        cmocka_unit_test(test_stekd_memory_after_watch_rotation),
        cmocka_unit_test(test_stekd_environ_has_no_pin),
        cmocka_unit_test(test_stekctl_fetch),
        cmocka_unit_test_setup_teardown(test_host_memory_after_retire, redirect_stderr,
                                        restore_stderr),
        cmocka_unit_test(test_day_ahead_destroys_nothing),
        cmocka_unit_test(test_no_key_in_any_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
