/*
 * libstek's sealed cache file (client/cache.h): seal and unseal round trips
 * with EC P-256 and RSA sealing keys read from PEM files, and rejection of
 * every file that must not be used: missing (normal), truncated, random
 * bytes, any flipped byte, another host's, sealed under another key, below
 * a high-water mark, all keys expired. Files are mode 0600, leave no
 * temporary file behind, and never hold a key in the clear.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "cache.h"

#define S 1000000000LL /* ns per second */

static char dir[512];
static char path[600];
static EVP_PKEY *ec_priv, *ec_pub, *ec_other, *rsa_priv, *rsa_pub, *rsa_other;
static uint8_t host_id[STEK_CACHE_HOST_ID_BYTES];
static int64_t now; /* wall clock, ns */

/* ---- helpers ---------------------------------------------------------------------------- */

/* Writes k to a PEM file and reads it back: the sealing key as a file. */
static EVP_PKEY *key_via_file(EVP_PKEY *k, const char *name)
{
    char p[600];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    if (f == NULL || PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) != 1) {
        if (f != NULL)
            fclose(f);
        return NULL;
    }
    fclose(f);
    f = fopen(p, "r");
    EVP_PKEY *r = f != NULL ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    if (f != NULL)
        fclose(f);
    unlink(p);
    return r;
}

static EVP_PKEY *gen(const char *type, const char *arg, const char *name)
{
    EVP_PKEY *k = strcmp(type, "RSA") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048)
                                           : EVP_PKEY_Q_keygen(NULL, NULL, type, arg);
    EVP_PKEY *r = k != NULL ? key_via_file(k, name) : NULL;
    EVP_PKEY_free(k);
    return r;
}

/* A distinct entry per (group tag, key index): name | hmac | aes. */
static void entry_for(uint8_t tag, size_t i, uint8_t *out)
{
    for (size_t j = 0; j < STEK_RING_ENTRY_BYTES; j++)
        out[j] = (uint8_t)(tag * 37 + i * 11 + j * 3 + 5);
}

/*
 * Contents with two groups: "edge" (generation 3, keys of epochs 10..13)
 * and "api" (generation 1, epochs 20..21), P = 10 s, L = 20 s, the current
 * key starting `age` seconds ago, so that keys expire as age grows.
 */
static stek_cache_contents *contents(int64_t age_s)
{
    stek_cache_contents *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    memcpy(c->host_id, host_id, sizeof(host_id));
    c->written_at = now;
    c->n_keys = 6;
    c->keys = calloc(c->n_keys, sizeof(*c->keys));
    assert_non_null(c->keys);
    assert_int_equal(stek_secret_new(c->n_keys * STEK_RING_ENTRY_BYTES, &c->material), STEK_OK);
    const struct {
        const char *name;
        uint64_t gen, e0, cur;
        size_t n;
    } gs[] = {{"edge", 3, 10, 12, 4}, {"api", 1, 20, 21, 2}};
    size_t k = 0;
    for (size_t g = 0; g < 2; g++) {
        stek_cache_group *cg = &c->groups[c->n_groups++];
        snprintf(cg->name, sizeof(cg->name), "%s", gs[g].name);
        cg->generation = gs[g].gen;
        cg->current_epoch = gs[g].cur;
        cg->sched = (stek_sched){.origin = 1000, .epoch_s = 10, .lifetime_s = 20};
        cg->first = k;
        for (size_t i = 0; i < gs[g].n; i++, k++) {
            int64_t from =
                now - age_s * S + ((int64_t)(gs[g].e0 + i) - (int64_t)gs[g].cur) * 10 * S;
            c->keys[k] = (stek_cache_key){.epoch = gs[g].e0 + i,
                                          .not_before = from,
                                          .encrypt_until = from + 10 * S,
                                          .decrypt_until = from + 30 * S};
            entry_for((uint8_t)g, i, stek_secret_data(c->material) + k * STEK_RING_ENTRY_BYTES);
        }
        cg->count = gs[g].n;
    }
    return c;
}

static const char *const groups2[] = {"edge", "api"};
static const uint64_t no_hwm[] = {0, 0};

static stek_cache_expect expect(void)
{
    return (stek_cache_expect){.host_id = host_id,
                               .wall_now = now,
                               .n_groups = 2,
                               .groups = groups2,
                               .generation_hwm = no_hwm};
}

static uint8_t *slurp(const char *p, size_t *len)
{
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    uint8_t *buf = malloc(STEK_CACHE_MAX_FILE_BYTES);
    assert_non_null(buf);
    *len = fread(buf, 1, STEK_CACHE_MAX_FILE_BYTES, f);
    fclose(f);
    return buf;
}

static void spill(const char *p, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static bool contains(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
    for (size_t i = 0; i + m <= n; i++)
        if (memcmp(hay + i, needle, m) == 0)
            return true;
    return false;
}

/* Reads path and expects a rejection; returns the reason. */
static stek_cache_reject rejected(EVP_PKEY *priv, const stek_cache_expect *x)
{
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    stek_status st = stek_cache_read(path, priv, x, &out, &why);
    if (st != STEK_ERR_VERIFY)
        fprintf(stderr, "expected a rejection, got %s (%s)\n", stek_status_name(st),
                stek_error_detail());
    assert_int_equal(st, STEK_ERR_VERIFY);
    assert_null(out);
    assert_int_not_equal(why, STEK_CACHE_OK);
    return why;
}

static void assert_same(const stek_cache_contents *a, const stek_cache_contents *b)
{
    assert_memory_equal(a->host_id, b->host_id, STEK_CACHE_HOST_ID_BYTES);
    assert_int_equal(a->written_at, b->written_at);
    assert_int_equal(a->n_groups, b->n_groups);
    assert_int_equal(a->n_keys, b->n_keys);
    for (size_t g = 0; g < a->n_groups; g++) {
        assert_string_equal(a->groups[g].name, b->groups[g].name);
        assert_int_equal(a->groups[g].generation, b->groups[g].generation);
        assert_int_equal(a->groups[g].current_epoch, b->groups[g].current_epoch);
        assert_int_equal(a->groups[g].sched.origin, b->groups[g].sched.origin);
        assert_int_equal(a->groups[g].sched.epoch_s, b->groups[g].sched.epoch_s);
        assert_int_equal(a->groups[g].sched.lifetime_s, b->groups[g].sched.lifetime_s);
        assert_int_equal(a->groups[g].first, b->groups[g].first);
        assert_int_equal(a->groups[g].count, b->groups[g].count);
    }
    for (size_t i = 0; i < a->n_keys; i++) {
        assert_int_equal(a->keys[i].epoch, b->keys[i].epoch);
        assert_int_equal(a->keys[i].not_before, b->keys[i].not_before);
        assert_int_equal(a->keys[i].encrypt_until, b->keys[i].encrypt_until);
        assert_int_equal(a->keys[i].decrypt_until, b->keys[i].decrypt_until);
    }
    assert_memory_equal(stek_secret_cdata(a->material), stek_secret_cdata(b->material),
                        a->n_keys * STEK_RING_ENTRY_BYTES);
}

/* The directory holds exactly the cache file: no temporary file is left. */
static void only_the_cache_file(void)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    size_t n = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        assert_string_equal(e->d_name, "keys.cache");
        n++;
    }
    closedir(d);
    assert_int_equal(n, 1);
}

/* ---- fixtures ------------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("STEK_TEST_TMPDIR");
    snprintf(dir, sizeof(dir), "%s/test_cache-XXXXXX", base != NULL ? base : "/tmp");
    if (mkdtemp(dir) == NULL)
        return -1;
    snprintf(path, sizeof(path), "%s/keys.cache", dir);
    ec_priv = gen("EC", "P-256", "ec.pem");
    ec_other = gen("EC", "P-256", "ec2.pem");
    rsa_priv = gen("RSA", NULL, "rsa.pem");
    rsa_other = gen("RSA", NULL, "rsa2.pem");
    if (ec_priv == NULL || ec_other == NULL || rsa_priv == NULL || rsa_other == NULL ||
        stek_cache_sealing_public(ec_priv, &ec_pub) != STEK_OK ||
        stek_cache_sealing_public(rsa_priv, &rsa_pub) != STEK_OK)
        return -1;
    if (RAND_bytes(host_id, sizeof(host_id)) != 1)
        return -1;
    now = stek_walltime_ns();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    EVP_PKEY_free(ec_priv);
    EVP_PKEY_free(ec_pub);
    EVP_PKEY_free(ec_other);
    EVP_PKEY_free(rsa_priv);
    EVP_PKEY_free(rsa_pub);
    EVP_PKEY_free(rsa_other);
    unlink(path);
    rmdir(dir);
    return 0;
}

/* ---- tests -------------------------------------------------------------------------------------
 */

static void round_trip(EVP_PKEY *priv, EVP_PKEY *pub)
{
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, pub, c), STEK_OK);

    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    only_the_cache_file();

    /* No key half appears in the file's bytes. */
    size_t len = 0;
    uint8_t *file = slurp(path, &len);
    for (size_t i = 0; i < c->n_keys; i++) {
        const uint8_t *e = stek_secret_cdata(c->material) + i * STEK_RING_ENTRY_BYTES;
        assert_false(contains(file, len, e + STEK_RING_NAME_BYTES, STEK_RING_HMAC_BYTES));
        assert_false(contains(file, len, e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES,
                              STEK_RING_AES_BYTES));
    }
    free(file);

    stek_cache_expect x = expect();
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_REJECT_COUNT;
    assert_int_equal(stek_cache_read(path, priv, &x, &out, &why), STEK_OK);
    assert_int_equal(why, STEK_CACHE_OK);
    assert_non_null(out);
    assert_same(c, out);
    stek_cache_contents_free(out);

    /* Rewritten over itself, still one file. */
    assert_int_equal(stek_cache_write(path, pub, c), STEK_OK);
    only_the_cache_file();
    stek_cache_contents_free(c);
}

static void test_round_trip_ec(void **state)
{
    (void)state;
    round_trip(ec_priv, ec_pub);
}

static void test_round_trip_rsa(void **state)
{
    (void)state;
    round_trip(rsa_priv, rsa_pub);
}

/* Sealing needs only the public half: a public-only key seals, and cannot unseal. */
static void test_public_half_seals(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    stek_cache_expect x = expect();
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    assert_int_not_equal(stek_cache_read(path, ec_pub, &x, &out, &why), STEK_OK);
    assert_null(out);
    assert_int_equal(stek_cache_read(path, ec_priv, &x, &out, &why), STEK_OK);
    stek_cache_contents_free(out);
    stek_cache_contents_free(c);
}

static void test_missing_file(void **state)
{
    (void)state;
    unlink(path);
    stek_cache_expect x = expect();
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_REJECT_COUNT;
    assert_int_equal(stek_cache_read(path, ec_priv, &x, &out, &why), STEK_ERR_NOT_FOUND);
    assert_null(out);
    assert_int_equal(why, STEK_CACHE_OK);
}

static void test_truncated(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    size_t len = 0;
    uint8_t *file = slurp(path, &len);
    const size_t cuts[] = {0, 1, 2, 5, 16, 40, len / 2, len - 17, len - 16, len - 2, len - 1};
    stek_cache_expect x = expect();
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        spill(path, file, cuts[i]);
        stek_cache_reject why = rejected(ec_priv, &x);
        assert_true(why == STEK_CACHE_CORRUPT || why == STEK_CACHE_TAMPERED);
    }
    /* And one byte too many. */
    file[len] = 0;
    spill(path, file, len + 1);
    stek_cache_reject why = rejected(ec_priv, &x);
    assert_true(why == STEK_CACHE_CORRUPT || why == STEK_CACHE_TAMPERED);
    free(file);
    stek_cache_contents_free(c);
}

static void test_random_bytes(void **state)
{
    (void)state;
    stek_cache_expect x = expect();
    uint8_t buf[4096];
    const size_t lens[] = {1, 7, 64, 300, 1000, 4096};
    for (int round = 0; round < 20; round++) {
        size_t len = lens[round % 6];
        assert_int_equal(RAND_bytes(buf, (int)len), 1);
        spill(path, buf, len);
        stek_cache_reject why = rejected(round % 2 ? rsa_priv : ec_priv, &x);
        assert_true(why == STEK_CACHE_CORRUPT || why == STEK_CACHE_TAMPERED);
    }
    /* A directory where the file should be: unreadable, not a crash. */
    unlink(path);
    assert_int_equal(mkdir(path, 0700), 0);
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_UNREADABLE);
    rmdir(path);
}

/* One flipped byte anywhere: every position of the file,
 * with a bit pattern varying by position. */
static void flips(EVP_PKEY *priv, EVP_PKEY *pub)
{
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, pub, c), STEK_OK);
    size_t len = 0;
    uint8_t *file = slurp(path, &len);
    stek_cache_expect x = expect();
    size_t tried = 0;
    for (size_t pos = 0; pos < len; pos++) {
        uint8_t was = file[pos];
        file[pos] ^= (uint8_t)(1u << (pos % 8)) | (pos % 3 == 0 ? 0x80 : 0);
        spill(path, file, len);
        stek_cache_reject why = rejected(priv, &x);
        assert_true(why == STEK_CACHE_CORRUPT || why == STEK_CACHE_TAMPERED);
        file[pos] = was;
        tried++;
    }
    /* The last byte (the tag's) too. */
    file[len - 1] ^= 1;
    spill(path, file, len);
    assert_int_equal(rejected(priv, &x), STEK_CACHE_TAMPERED);
    fprintf(stderr, "%zu of %zu byte positions flipped, all rejected\n", tried + 1, len);
    free(file);
    stek_cache_contents_free(c);
}

static void test_flipped_byte_ec(void **state)
{
    (void)state;
    flips(ec_priv, ec_pub);
}

static void test_flipped_byte_rsa(void **state)
{
    (void)state;
    flips(rsa_priv, rsa_pub);
}

static void test_foreign_host(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    uint8_t other[STEK_CACHE_HOST_ID_BYTES];
    memcpy(other, host_id, sizeof(other));
    other[31] ^= 1;
    stek_cache_expect x = expect();
    x.host_id = other;
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_FOREIGN);
    stek_cache_contents_free(c);
}

static void test_wrong_sealing_key(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    stek_cache_expect x = expect();
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    assert_int_equal(rejected(ec_other, &x), STEK_CACHE_TAMPERED);
    assert_int_equal(rejected(rsa_priv, &x), STEK_CACHE_TAMPERED);
    assert_int_equal(stek_cache_write(path, rsa_pub, c), STEK_OK);
    assert_int_equal(rejected(rsa_other, &x), STEK_CACHE_TAMPERED);
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_TAMPERED);
    stek_cache_contents_free(c);
}

static void test_below_high_water_mark(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    stek_cache_expect x = expect();
    const uint64_t at[] = {3, 1}; /* equal to the file's: fine */
    x.generation_hwm = at;
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    assert_int_equal(stek_cache_read(path, ec_priv, &x, &out, &why), STEK_OK);
    stek_cache_contents_free(out);
    const uint64_t above[] = {4, 1}; /* edge was rekeyed since */
    x.generation_hwm = above;
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_STALE);
    stek_cache_contents_free(c);
}

static void test_expiry(void **state)
{
    (void)state;
    stek_cache_expect x = expect();
    /* 25 s on: edge's keys of epochs 10 and 11 are past their window (api's
     * 20 too); the rest is installed. */
    stek_cache_contents *c = contents(25);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    assert_int_equal(stek_cache_read(path, ec_priv, &x, &out, &why), STEK_OK);
    assert_int_equal(out->n_keys, 3);
    assert_int_equal(out->groups[0].count, 2);
    assert_int_equal(out->keys[out->groups[0].first].epoch, 12);
    assert_int_equal(out->groups[1].count, 1);
    assert_int_equal(out->keys[out->groups[1].first].epoch, 21);
    for (size_t i = 0; i < out->n_keys; i++)
        assert_true(out->keys[i].decrypt_until > now);
    /* The entries moved with their keys. */
    uint8_t e[STEK_RING_ENTRY_BYTES];
    entry_for(0, 2, e);
    assert_memory_equal(stek_secret_cdata(out->material), e, sizeof(e));
    stek_cache_contents_free(out);
    stek_cache_contents_free(c);

    /* 60 s on, every key is past its window. */
    c = contents(60);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_STALE);
    stek_cache_contents_free(c);

    /* A file written "later" than our clock (the clock was set back): its
     * own time is the base, so the keys do not live longer. */
    c = contents(25);
    c->written_at = now + 20 * S;
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_STALE);
    stek_cache_contents_free(c);
}

/* Only the reader's groups come back; none of them in the file is stale. */
static void test_other_groups(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, ec_pub, c), STEK_OK);
    const char *const only_api[] = {"api"};
    const uint64_t hwm[] = {0};
    stek_cache_expect x = expect();
    x.n_groups = 1;
    x.groups = only_api;
    x.generation_hwm = hwm;
    stek_cache_contents *out = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    assert_int_equal(stek_cache_read(path, ec_priv, &x, &out, &why), STEK_OK);
    assert_int_equal(out->n_groups, 1);
    assert_string_equal(out->groups[0].name, "api");
    assert_int_equal(out->n_keys, 2);
    stek_cache_contents_free(out);
    const char *const none[] = {"web"};
    x.groups = none;
    assert_int_equal(rejected(ec_priv, &x), STEK_CACHE_STALE);
    stek_cache_contents_free(c);
}

static void test_deadlines_and_ring(void **state)
{
    (void)state;
    stek_cache_contents *c = contents(0);
    stek_ring_key k[4];
    const int64_t boot = 5000 * S;
    assert_int_equal(stek_cache_deadlines(c, 0, boot, now, k), STEK_OK);
    assert_int_equal(k[2].epoch, 12);
    assert_int_equal(k[2].enc_from, boot);
    assert_int_equal(k[2].enc_until, boot + 10 * S);
    assert_int_equal(k[2].dec_until, boot + 30 * S);
    /* A wall clock 5 s behind the writer's: the writer's time is the base. */
    assert_int_equal(stek_cache_deadlines(c, 0, boot, now - 5 * S, k), STEK_OK);
    assert_int_equal(k[2].dec_until, boot + 30 * S);
    /* 5 s ahead: 5 s less to live. */
    assert_int_equal(stek_cache_deadlines(c, 0, boot, now + 5 * S, k), STEK_OK);
    assert_int_equal(k[2].dec_until, boot + 25 * S);
    assert_int_equal(stek_cache_deadlines(c, 2, boot, now, k), STEK_ERR_INVALID_ARG);

    /* From a keyring snapshot: deadlines back to wall-clock times. */
    stek_ring_input in = {.group = "edge",
                          .generation = 3,
                          .current_epoch = 12,
                          .n_keys = 4,
                          .keys = k,
                          .entries = stek_secret_cdata(c->material)};
    assert_int_equal(stek_cache_deadlines(c, 0, boot, now, k), STEK_OK);
    stek_ring *r = NULL;
    /* 11 s on, epoch 10's key (decrypt_until 10 s on) is gone. */
    assert_int_equal(stek_ring_build(NULL, &in, boot + 11 * S, &r), STEK_OK);
    stek_cache_contents *fr = NULL;
    assert_int_equal(stek_cache_from_ring(r, boot + 11 * S, now + 11 * S, host_id, &fr), STEK_OK);
    assert_int_equal(fr->n_groups, 1);
    assert_int_equal(fr->n_keys, 3);
    assert_int_equal(fr->written_at, now + 11 * S);
    assert_int_equal(fr->keys[1].epoch, 12);
    assert_int_equal(fr->keys[1].decrypt_until, c->keys[2].decrypt_until);
    assert_int_equal(fr->keys[1].not_before, c->keys[2].not_before);
    assert_memory_equal(stek_secret_cdata(fr->material),
                        stek_secret_cdata(c->material) + STEK_RING_ENTRY_BYTES,
                        3 * STEK_RING_ENTRY_BYTES);
    stek_cache_contents_free(fr);
    stek_ring_free(r);
    /* No snapshot: no keys. */
    assert_int_equal(stek_cache_from_ring(NULL, boot, now, host_id, &fr), STEK_OK);
    assert_int_equal(fr->n_keys, 0);
    stek_cache_contents_free(fr);
    stek_cache_contents_free(c);
}

static void test_sealing_key_kinds(void **state)
{
    (void)state;
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    EVP_PKEY *rsa1k = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    assert_non_null(p384);
    assert_non_null(ed);
    assert_non_null(rsa1k);
    EVP_PKEY *pub = NULL;
    assert_int_equal(stek_cache_sealing_public(p384, &pub), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_cache_sealing_public(ed, &pub), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_cache_sealing_public(rsa1k, &pub), STEK_ERR_INVALID_ARG);
    assert_null(pub);
    stek_cache_contents *c = contents(0);
    assert_int_equal(stek_cache_write(path, p384, c), STEK_ERR_INVALID_ARG);
    stek_cache_contents_free(c);
    EVP_PKEY_free(p384);
    EVP_PKEY_free(ed);
    EVP_PKEY_free(rsa1k);
    assert_string_equal(stek_cache_reject_name(STEK_CACHE_STALE), "STEK_CACHE_STALE");
    assert_string_equal(stek_cache_reject_name(STEK_CACHE_REJECT_COUNT), "STEK_CACHE_UNKNOWN");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_ec),
        cmocka_unit_test(test_round_trip_rsa),
        cmocka_unit_test(test_public_half_seals),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_flipped_byte_ec),
        cmocka_unit_test(test_flipped_byte_rsa),
        cmocka_unit_test(test_foreign_host),
        cmocka_unit_test(test_wrong_sealing_key),
        cmocka_unit_test(test_below_high_water_mark),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_other_groups),
        cmocka_unit_test(test_deadlines_and_ring),
        cmocka_unit_test(test_sealing_key_kinds),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
