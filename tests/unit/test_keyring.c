/*
 * libstek's keyring (client/keyring.h): deadlines from accepted sets,
 * encrypt-key selection on CLOCK_BOOTTIME, name lookup and miss causes,
 * several groups, and publication: a retired snapshot is cleansed, and
 * only after the readers that may hold it have left.
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

#include "keyring.h"

#define S 1000000000LL /* ns per second */

/* A deterministic, distinct entry for (group tag, epoch): name | hmac | aes. */
static void entry_for(uint8_t tag, uint64_t epoch, uint8_t out[STEK_RING_ENTRY_BYTES])
{
    for (size_t i = 0; i < STEK_RING_ENTRY_BYTES; i++)
        out[i] = (uint8_t)(tag * 31 + epoch * 7 + i + 1);
    out[0] = tag;
    out[1] = (uint8_t)epoch;
}

/*
 * Keys e0..e0+n-1 of a schedule with P = 10 s, L = 20 s, as seen at boot
 * time `base` = the start of epoch `cur`: key e encrypts from
 * base + (e-cur)*P until +P and decrypts until +P+L.
 */
typedef struct fake_group {
    stek_ring_key keys[8];
    uint8_t entries[8 * STEK_RING_ENTRY_BYTES];
    stek_ring_input in;
} fake_group;

static void fake(fake_group *f, const char *group, uint8_t tag, uint64_t gen, uint64_t e0, size_t n,
                 uint64_t cur, int64_t base)
{
    memset(f, 0, sizeof(*f));
    for (size_t i = 0; i < n; i++) {
        uint64_t e = e0 + i;
        int64_t from = base + ((int64_t)e - (int64_t)cur) * 10 * S;
        f->keys[i] = (stek_ring_key){
            .epoch = e, .enc_from = from, .enc_until = from + 10 * S, .dec_until = from + 30 * S};
        entry_for(tag, e, f->entries + i * STEK_RING_ENTRY_BYTES);
    }
    f->in = (stek_ring_input){.group = group,
                              .generation = gen,
                              .current_epoch = cur,
                              .n_keys = n,
                              .keys = f->keys,
                              .entries = f->entries};
}

static stek_ring *build(const stek_ring *prev, const stek_ring_input *in, int64_t now)
{
    stek_ring *r = NULL;
    assert_int_equal(stek_ring_build(prev, in, now, &r), STEK_OK);
    assert_non_null(r);
    return r;
}

static long enc_epoch(const stek_ring *r, uint32_t g, int64_t now, bool *stale)
{
    long i = stek_ring_encrypt_key(r, g, now, stale);
    return i < 0 ? -1 : (long)r->keys[i].epoch;
}

/* ---- deadlines ------------------------------------------------------------------- */

static void test_deadlines(void **state)
{
    (void)state;
    stek_accepted_key ak[2] = {
        {.epoch = 5,
         .state = STEK_KEY_CURRENT,
         .not_before = 1000 * S,
         .encrypt_until = 1010 * S,
         .decrypt_until = 1030 * S},
        {.epoch = 6,
         .state = STEK_KEY_NEXT,
         .not_before = 1010 * S,
         .encrypt_until = 1020 * S,
         .decrypt_until = 1040 * S},
    };
    stek_accepted_set set = {.issued_at = 1004 * S, .n_keys = 2, .keys = ak};
    stek_ring_key k[2];
    const int64_t boot = 50 * S;

    /* Wall clock equal to issued_at. */
    assert_int_equal(stek_ring_deadlines(&set, boot, 1004 * S, k), STEK_OK);
    assert_int_equal(k[0].epoch, 5);
    assert_int_equal(k[0].enc_from, boot - 4 * S);
    assert_int_equal(k[0].enc_until, boot + 6 * S);
    assert_int_equal(k[0].dec_until, boot + 26 * S);
    assert_int_equal(k[1].enc_from, boot + 6 * S);
    assert_int_equal(k[1].dec_until, boot + 36 * S);

    /* A wall clock ahead of issued_at (a set cached for a while) shortens. */
    assert_int_equal(stek_ring_deadlines(&set, boot, 1009 * S, k), STEK_OK);
    assert_int_equal(k[0].enc_until, boot + 1 * S);
    assert_int_equal(k[0].dec_until, boot + 21 * S);

    /* A wall clock behind (or frozen) does not stretch: issued_at rules. */
    assert_int_equal(stek_ring_deadlines(&set, boot, 900 * S, k), STEK_OK);
    assert_int_equal(k[0].dec_until, boot + 26 * S);

    /* Saturation instead of overflow. */
    ak[1].decrypt_until = INT64_MAX;
    assert_int_equal(stek_ring_deadlines(&set, INT64_MAX - 10, 0, k), STEK_OK);
    assert_int_equal(k[1].dec_until, INT64_MAX);

    assert_int_equal(stek_ring_deadlines(NULL, boot, 0, k), STEK_ERR_INVALID_ARG);
}

/* ---- selection ---------------------------------------------------------------------- */

static void test_encrypt_selection(void **state)
{
    (void)state;
    const int64_t base = 1000 * S;
    fake_group f;
    /* Epochs 8, 9 (decrypt-only), 10 (current), 11 (next). */
    fake(&f, "edge", 1, 1, 8, 4, 10, base);
    stek_ring *r = build(NULL, &f.in, base);
    assert_int_equal(r->n_groups, 1);
    assert_int_equal(r->n_keys, 4);
    assert_int_equal(r->seq, 1);
    assert_string_equal(r->groups[0].name, "edge");
    assert_int_equal(stek_ring_group_index(r, "edge"), 0);
    assert_int_equal(stek_ring_group_index(r, "other"), -1);

    bool stale = true;
    assert_int_equal(enc_epoch(r, 0, base, &stale), 10);
    assert_false(stale);
    assert_int_equal(enc_epoch(r, 0, base + 9 * S, &stale), 10);
    /* NEXT takes over at its boottime deadline, not before. */
    assert_int_equal(enc_epoch(r, 0, base + 10 * S, &stale), 11);
    assert_false(stale);
    /* No newer set: past 11's encrypt window, keep encrypting with 11
     * (stale) while it still decrypts... */
    assert_int_equal(enc_epoch(r, 0, base + 25 * S, &stale), 11);
    assert_true(stale);
    assert_int_equal(enc_epoch(r, 0, base + 40 * S - 1, &stale), 11);
    assert_true(stale);
    /* ... and never past its decrypt deadline. */
    assert_int_equal(enc_epoch(r, 0, base + 40 * S, &stale), -1);
    assert_int_equal(enc_epoch(r, 1, base, &stale), -1); /* no such group */
    assert_int_equal(stek_ring_encrypt_key(NULL, 0, base, &stale), -1);
    stek_ring_free(r);

    /* Only decrypt-only keys left (all past encrypt): the newest, stale. */
    fake(&f, "edge", 1, 1, 8, 2, 10, base);
    r = build(NULL, &f.in, base);
    assert_int_equal(enc_epoch(r, 0, base, &stale), 9);
    assert_true(stale);
    stek_ring_free(r);

    /* Only a NEXT key (its window not started): nothing to encrypt with. */
    fake(&f, "edge", 1, 1, 11, 1, 10, base);
    r = build(NULL, &f.in, base);
    assert_int_equal(enc_epoch(r, 0, base, &stale), -1);
    assert_int_equal(enc_epoch(r, 0, base + 10 * S, &stale), 11);
    stek_ring_free(r);
}

/*
 * After an outage across an epoch boundary the next set's CURRENT key is one
 * this host never held as NEXT; peers still on the older set cannot decrypt
 * it. It waits min(epoch/2, 10 s) while a key the host held still decrypts.
 * Not on a first set, not on a new generation, not when no older key helps.
 */
static void test_unseen_current_waits(void **state)
{
    (void)state;
    const int64_t now = 1000 * S;
    /* Held: epochs 5 (current) and 6 (next), epoch 6 starting at `now - 20 s`
     * ... i.e. the host was cut off; the new set has 6, 7 (current), 8. */
    fake_group held, upd;
    fake(&held, "edge", 1, 1, 5, 2, 5, now - 20 * S);
    stek_ring *prev = build(NULL, &held.in, now - 21 * S);
    fake(&upd, "edge", 1, 1, 6, 3, 7, now - 2 * S);
    stek_ring *r = build(prev, &upd.in, now);
    bool stale = false;
    /* Epoch 7 started 2 s ago but was never held: 6 (held as next) encrypts. */
    assert_int_equal(enc_epoch(r, 0, now, &stale), 6);
    assert_true(stale);
    assert_int_equal(enc_epoch(r, 0, now + 5 * S - 1, &stale), 6);
    /* min(half the 10 s epoch, 10 s) later, 7 takes over, until 8 starts. */
    assert_int_equal(enc_epoch(r, 0, now + 5 * S, &stale), 7);
    assert_false(stale);
    assert_int_equal(enc_epoch(r, 0, now + 8 * S, &stale), 8);
    /* Its tickets still decrypt by name throughout. */
    long i = -1;
    assert_int_equal(stek_ring_decrypt_key(r, stek_ring_entry(r, 1), now, &i),
                     STEK_RING_FOUND_OTHER);
    stek_ring_free(r);

    /* A first set: nothing older was held, so 7 encrypts at once. */
    r = build(NULL, &upd.in, now);
    assert_int_equal(enc_epoch(r, 0, now, &stale), 7);
    stek_ring_free(r);

    /* A new generation (rekey): the old keys are gone, 7 encrypts at once. */
    fake_group rekey;
    fake(&rekey, "edge", 2, 2, 6, 3, 7, now - 2 * S);
    r = build(prev, &rekey.in, now);
    assert_int_equal(enc_epoch(r, 0, now, &stale), 7);
    stek_ring_free(r);

    /* A set whose CURRENT key was held as NEXT: the usual rotation. */
    fake_group seen;
    fake(&seen, "edge", 1, 1, 5, 3, 6, now - 2 * S);
    stek_ring *prev2 = build(NULL, &seen.in, now - 3 * S);
    r = build(prev2, &seen.in, now);
    assert_int_equal(enc_epoch(r, 0, now, &stale), 6);
    stek_ring_free(r);
    stek_ring_free(prev2);
    stek_ring_free(prev);
}

static void test_lookup(void **state)
{
    (void)state;
    const int64_t base = 1000 * S;
    fake_group f;
    fake(&f, "edge", 1, 1, 8, 4, 10, base);
    stek_ring *r = build(NULL, &f.in, base);
    uint8_t e[STEK_RING_ENTRY_BYTES];
    long i = -2;

    entry_for(1, 10, e);
    assert_int_equal(stek_ring_decrypt_key(r, e, base, &i), STEK_RING_FOUND_CURRENT);
    assert_int_equal(r->keys[i].epoch, 10);
    assert_memory_equal(stek_ring_entry(r, (size_t)i), e, STEK_RING_ENTRY_BYTES);
    for (uint64_t ep = 8; ep <= 11; ep++) {
        if (ep == 10)
            continue;
        entry_for(1, ep, e);
        assert_int_equal(stek_ring_decrypt_key(r, e, base, &i), STEK_RING_FOUND_OTHER);
        assert_int_equal(r->keys[i].epoch, ep);
        assert_memory_equal(stek_ring_entry(r, (size_t)i), e, STEK_RING_ENTRY_BYTES);
    }
    /* After the rotation 11 is current and 10 must be renewed. */
    entry_for(1, 11, e);
    assert_int_equal(stek_ring_decrypt_key(r, e, base + 10 * S, &i), STEK_RING_FOUND_CURRENT);
    entry_for(1, 10, e);
    assert_int_equal(stek_ring_decrypt_key(r, e, base + 10 * S, &i), STEK_RING_FOUND_OTHER);
    /* Stale encrypt: the stale key resumes without renewal (it is what
     * encrypt uses anyway). */
    entry_for(1, 11, e);
    assert_int_equal(stek_ring_decrypt_key(r, e, base + 25 * S, &i), STEK_RING_FOUND_CURRENT);

    /* Past the decrypt deadline, still in this snapshot: never used. */
    entry_for(1, 8, e); /* decrypts until base + 10 s */
    assert_int_equal(stek_ring_decrypt_key(r, e, base + 10 * S, &i), STEK_RING_MISS_EXPIRED);
    assert_int_equal(i, -1);
    entry_for(1, 9, e); /* until base + 20 s */
    assert_int_equal(stek_ring_decrypt_key(r, e, base + 20 * S, &i), STEK_RING_MISS_EXPIRED);

    /* Unknown names. */
    entry_for(2, 10, e);
    assert_int_equal(stek_ring_decrypt_key(r, e, base, &i), STEK_RING_MISS_UNKNOWN);
    assert_int_equal(stek_ring_decrypt_key(NULL, e, base, &i), STEK_RING_MISS_UNKNOWN);

    /* A republish 25 s later drops 8 and 9, and remembers them as expired. */
    const int64_t t2 = base + 25 * S;
    stek_ring *r2 = build(r, NULL, t2);
    assert_int_equal(r2->seq, 2);
    assert_int_equal(r2->n_keys, 2);
    assert_int_equal(r2->keys[0].epoch, 10);
    entry_for(1, 9, e);
    assert_int_equal(stek_ring_decrypt_key(r2, e, t2, &i), STEK_RING_MISS_EXPIRED);
    entry_for(1, 8, e);
    assert_int_equal(stek_ring_decrypt_key(r2, e, t2, &i), STEK_RING_MISS_EXPIRED);

    /* A new generation replaces the group's keys: old names are another
     * generation's, and stay remembered over later builds. */
    fake_group g2;
    fake(&g2, "edge", 9, 2, 10, 2, 10, t2);
    stek_ring *r3 = build(r2, &g2.in, t2);
    assert_int_equal(r3->groups[0].generation, 2);
    assert_int_equal(r3->n_keys, 2);
    entry_for(1, 10, e);
    assert_int_equal(stek_ring_decrypt_key(r3, e, t2, &i), STEK_RING_MISS_OTHER_GENERATION);
    entry_for(1, 8, e);
    assert_int_equal(stek_ring_decrypt_key(r3, e, t2, &i), STEK_RING_MISS_EXPIRED);
    stek_ring *r4 = build(r3, NULL, t2 + S);
    entry_for(1, 11, e);
    assert_int_equal(stek_ring_decrypt_key(r4, e, t2 + S, &i), STEK_RING_MISS_OTHER_GENERATION);
    entry_for(9, 10, e);
    assert_int_equal(stek_ring_decrypt_key(r4, e, t2 + S, &i), STEK_RING_FOUND_CURRENT);

    stek_ring_free(r);
    stek_ring_free(r2);
    stek_ring_free(r3);
    stek_ring_free(r4);
}

static void test_groups(void **state)
{
    (void)state;
    const int64_t base = 1000 * S;
    fake_group a, b;
    fake(&a, "edge", 1, 1, 9, 3, 10, base);
    fake(&b, "api", 2, 3, 20, 3, 21, base);
    stek_ring *r1 = build(NULL, &a.in, base);
    stek_ring *r2 = build(r1, &b.in, base);
    assert_int_equal(r2->n_groups, 2);
    assert_int_equal(r2->n_keys, 6);
    int ga = stek_ring_group_index(r2, "edge"), gb = stek_ring_group_index(r2, "api");
    assert_int_equal(ga, 0);
    assert_int_equal(gb, 1);
    bool stale;
    assert_int_equal(enc_epoch(r2, (uint32_t)ga, base, &stale), 10);
    assert_int_equal(enc_epoch(r2, (uint32_t)gb, base, &stale), 21);
    uint8_t e[STEK_RING_ENTRY_BYTES];
    long i;
    entry_for(2, 20, e);
    assert_int_equal(stek_ring_decrypt_key(r2, e, base, &i), STEK_RING_FOUND_OTHER);
    assert_int_equal(r2->keys[i].group, (uint32_t)gb);

    /* Updating one group keeps the other's keys as they were. */
    fake(&a, "edge", 1, 1, 10, 3, 11, base + 10 * S);
    stek_ring *r3 = build(r2, &a.in, base + 10 * S);
    assert_int_equal(r3->n_groups, 2);
    assert_int_equal(enc_epoch(r3, 0, base + 10 * S, &stale), 11);
    entry_for(2, 21, e);
    assert_int_equal(stek_ring_decrypt_key(r3, e, base + 5 * S, &i), STEK_RING_FOUND_CURRENT);
    assert_memory_equal(stek_ring_entry(r3, (size_t)i), e, STEK_RING_ENTRY_BYTES);
    entry_for(1, 9, e); /* left edge's set, not expired: the service dropped it */
    assert_int_equal(stek_ring_decrypt_key(r3, e, base + 10 * S, &i), STEK_RING_MISS_EXPIRED);
    stek_ring_free(r1);
    stek_ring_free(r2);
    stek_ring_free(r3);
}

static void test_bad_input(void **state)
{
    (void)state;
    fake_group f;
    stek_ring *r = NULL;
    fake(&f, "Bad Group", 1, 1, 8, 2, 9, 0);
    assert_int_equal(stek_ring_build(NULL, &f.in, 0, &r), STEK_ERR_INVALID_ARG);
    fake(&f, "edge", 1, 1, 8, 2, 9, 0);
    f.keys[1].epoch = 8; /* not ascending */
    assert_int_equal(stek_ring_build(NULL, &f.in, 0, &r), STEK_ERR_INVALID_ARG);
    assert_null(r);
    assert_int_equal(stek_ring_build(NULL, NULL, 0, NULL), STEK_ERR_INVALID_ARG);
    /* Empty: a valid snapshot with nothing to encrypt. */
    r = build(NULL, NULL, 0);
    bool stale;
    assert_int_equal(stek_ring_encrypt_key(r, 0, 0, &stale), -1);
    stek_ring_free(r);
    /* More groups than a snapshot holds. */
    stek_ring *prev = NULL;
    for (int g = 0; g <= STEK_RING_MAX_GROUPS; g++) {
        char name[16];
        snprintf(name, sizeof(name), "g%d", g);
        fake(&f, name, (uint8_t)g, 1, 8, 2, 9, 0);
        stek_status st = stek_ring_build(prev, &f.in, 0, &r);
        if (g < STEK_RING_MAX_GROUPS) {
            assert_int_equal(st, STEK_OK);
            stek_ring_free(prev);
            prev = r;
        } else {
            assert_int_equal(st, STEK_ERR_INVALID_ARG);
        }
    }
    stek_ring_free(prev);
}

/* ---- publication ---------------------------------------------------------------------- */

typedef struct retire_log {
    atomic_int count;
    atomic_bool all_zero;
    uint64_t seqs[8];
} retire_log;

static void on_retire(void *arg, const stek_ring *r)
{
    retire_log *l = arg;
    int n = atomic_fetch_add(&l->count, 1);
    if (n < 8)
        l->seqs[n] = r->seq;
    if (r->material != NULL &&
        !stek_ct_is_zero(stek_secret_cdata(r->material), stek_secret_len(r->material)))
        atomic_store(&l->all_zero, false);
}

typedef struct publisher {
    stek_keyring *kr;
    stek_ring *next;
    atomic_bool done;
} publisher;

static void *publish_thread(void *arg)
{
    publisher *p = arg;
    stek_keyring_publish(p->kr, p->next);
    atomic_store(&p->done, true);
    return NULL;
}

static void test_publish_grace_and_cleanse(void **state)
{
    (void)state;
    stek_keyring *kr = NULL;
    assert_int_equal(stek_keyring_new(&kr), STEK_OK);
    retire_log log = {.all_zero = true};
    stek_keyring_set_retire_hook(kr, on_retire, &log);

    unsigned slot;
    assert_null(stek_keyring_read_begin(kr, &slot));
    stek_keyring_read_end(kr, slot);

    fake_group f;
    fake(&f, "edge", 1, 1, 8, 4, 10, 0);
    stek_ring *r1 = build(NULL, &f.in, 0);
    stek_keyring_publish(kr, r1);
    assert_ptr_equal(stek_keyring_peek(kr), r1);

    /* A reader holds r1 while r2 is published on another thread: the
     * writer must wait for it before retiring r1. */
    const stek_ring *held = stek_keyring_read_begin(kr, &slot);
    assert_ptr_equal(held, r1);
    uint8_t copy[STEK_RING_ENTRY_BYTES];
    memcpy(copy, stek_ring_entry(held, 0), sizeof(copy));

    publisher p = {.kr = kr, .next = build(r1, NULL, 0)};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, publish_thread, &p), 0);
    struct timespec ts = {0, 100 * 1000000L};
    nanosleep(&ts, NULL);
    /* Swapped already (new readers get r2), but r1 not retired. */
    assert_false(atomic_load(&p.done));
    assert_int_equal(atomic_load(&log.count), 0);
    assert_memory_equal(stek_ring_entry(held, 0), copy, sizeof(copy));
    unsigned slot2;
    const stek_ring *fresh = stek_keyring_read_begin(kr, &slot2);
    assert_ptr_equal(fresh, p.next);
    stek_keyring_read_end(kr, slot2);
    assert_false(atomic_load(&p.done));

    stek_keyring_read_end(kr, slot);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(atomic_load(&p.done));
    assert_int_equal(atomic_load(&log.count), 1);
    assert_int_equal(log.seqs[0], 1);
    assert_true(atomic_load(&log.all_zero));

    /* Freeing the keyring retires (and cleanses) the last one too. */
    stek_keyring_free(kr);
    assert_int_equal(atomic_load(&log.count), 2);
    assert_int_equal(log.seqs[1], 2);
    assert_true(atomic_load(&log.all_zero));
}

/* Readers on two threads while the writer publishes: every snapshot a
 * reader sees is intact (no torn or freed reads; ASan checks the rest). */
typedef struct reader_arg {
    stek_keyring *kr;
    atomic_bool *stop;
    atomic_long reads;
} reader_arg;

static void *reader_thread(void *arg)
{
    reader_arg *a = arg;
    while (!atomic_load(a->stop)) {
        unsigned slot;
        const stek_ring *r = stek_keyring_read_begin(a->kr, &slot);
        if (r != NULL) {
            bool stale;
            long i = stek_ring_encrypt_key(r, 0, 0, &stale);
            uint8_t e[STEK_RING_ENTRY_BYTES];
            if (i >= 0) {
                entry_for(1, r->keys[i].epoch, e);
                if (memcmp(e, stek_ring_entry(r, (size_t)i), sizeof(e)) != 0)
                    abort();
            }
        }
        stek_keyring_read_end(a->kr, slot);
        atomic_fetch_add(&a->reads, 1);
    }
    return NULL;
}

static void test_publish_concurrent(void **state)
{
    (void)state;
    stek_keyring *kr = NULL;
    assert_int_equal(stek_keyring_new(&kr), STEK_OK);
    retire_log log = {.all_zero = true};
    stek_keyring_set_retire_hook(kr, on_retire, &log);
    atomic_bool stop = false;
    reader_arg ra[2] = {{kr, &stop, 0}, {kr, &stop, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, reader_thread, &ra[i]), 0);
    /* Both readers must be reading before the writer starts: on a loaded
     * machine the 300 publishes could otherwise finish before either
     * thread ran once (a deadline, not a guess: 10 s). */
    for (int spins = 0; atomic_load(&ra[0].reads) == 0 || atomic_load(&ra[1].reads) == 0; spins++) {
        assert_true(spins < 10000);
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    fake_group f;
    for (int n = 0; n < 300; n++) {
        fake(&f, "edge", 1, 1, (uint64_t)n, 3, (uint64_t)n + 1, 0);
        stek_keyring_publish(kr, build(stek_keyring_peek(kr), &f.in, 0));
    }
    atomic_store(&stop, true);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    assert_true(ra[0].reads > 0 && ra[1].reads > 0);
    assert_int_equal(atomic_load(&log.count), 299);
    assert_true(atomic_load(&log.all_zero));
    stek_keyring_free(kr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deadlines),
        cmocka_unit_test(test_encrypt_selection),
        cmocka_unit_test(test_unseen_current_waits),
        cmocka_unit_test(test_lookup),
        cmocka_unit_test(test_groups),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_publish_grace_and_cleanse),
        cmocka_unit_test(test_publish_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
