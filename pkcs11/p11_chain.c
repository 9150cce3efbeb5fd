/*
 * Group chain keys and the deterministic ratchet (KDF profile 1).
 *
 *   K(g,n,e)   = AES-ECB(R(g,n,e), 5 ticket blocks)  80 bytes, name|hmac|aes
 *   R(g,n,e+1) = AES-ECB(R(g,n,e), 2 chain blocks)   AES-256
 *
 * Every replica holding R(g,n,e) derives the same keys without talking to
 * the others. Once R(g,n,e) and K(g,n,e) are destroyed nothing in the token
 * can recreate K(g,n,e): that is the forward secrecy of the schedule.
 *
 * Races: two processes may step the same chain at once. Their outputs are
 * byte-identical duplicates; each object's CKA_ID carries a random tail and
 * every process keeps the lowest CKA_ID, so all agree on the survivor and
 * the global minimum is never destroyed.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "log.h"
#include "p11_chain.h"
#include "p11_internal.h"

#define EPOCH_MAX ((UINT64_C(1) << 48) - 1)

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;
static CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;

static uint32_t group_hash(const char *group)
{
    /* Callers checked the name, so it fits: "stek-group-v1" + 64 bytes. */
    uint8_t in[13 + STEK_GROUP_MAX_BYTES], md[SHA256_DIGEST_LENGTH];
    size_t len = strlen(group);
    memcpy(in, "stek-group-v1", 13);
    memcpy(in + 13, group, len);
    SHA256(in, 13 + len, md);
    return (uint32_t)md[0] << 24 | (uint32_t)md[1] << 16 | (uint32_t)md[2] << 8 | md[3];
}

/* purpose(1) index(1) group-hash(4) generation(4) epoch(6) */
static void kdf_block(uint8_t b[16], uint8_t purpose, uint8_t index, uint32_t gh, uint32_t gen,
                      uint64_t epoch)
{
    b[0] = purpose;
    b[1] = index;
    for (int i = 0; i < 4; i++) {
        b[2 + i] = (uint8_t)(gh >> (24 - 8 * i));
        b[6 + i] = (uint8_t)(gen >> (24 - 8 * i));
    }
    for (int i = 0; i < 6; i++)
        b[10 + i] = (uint8_t)(epoch >> (40 - 8 * i));
}

stek_status p11_kdf_blocks(const char *group, uint32_t generation, uint64_t epoch,
                           uint8_t ticket[P11_TICKET_BLOCKS * 16],
                           uint8_t chain[P11_CHAIN_BLOCKS * 16])
{
    STEK_GUARD(stek_group_name_check(group));
    STEK_ENSURE(epoch <= EPOCH_MAX, STEK_ERR_INVALID_ARG);
    uint32_t gh = group_hash(group);
    for (uint8_t i = 0; i < P11_TICKET_BLOCKS; i++)
        kdf_block(ticket + 16 * i, P11_PURPOSE_TICKET, i, gh, generation, epoch);
    for (uint8_t i = 0; i < P11_CHAIN_BLOCKS; i++)
        kdf_block(chain + 16 * i, P11_PURPOSE_CHAIN, i, gh, generation, epoch);

    /* ECB maps equal blocks to equal outputs: all seven must differ. */
    const uint8_t *all[P11_TICKET_BLOCKS + P11_CHAIN_BLOCKS];
    for (int i = 0; i < P11_TICKET_BLOCKS; i++)
        all[i] = ticket + 16 * i;
    for (int i = 0; i < P11_CHAIN_BLOCKS; i++)
        all[P11_TICKET_BLOCKS + i] = chain + 16 * i;
    for (int i = 0; i < P11_TICKET_BLOCKS + P11_CHAIN_BLOCKS; i++)
        for (int j = i + 1; j < P11_TICKET_BLOCKS + P11_CHAIN_BLOCKS; j++)
            STEK_ENSURE(memcmp(all[i], all[j], 16) != 0, STEK_ERR_INTERNAL);
    return STEK_OK;
}

/*
 * The chain-key template. CKA_WRAP_WITH_TRUSTED is set on every chain key,
 * not just the root: SoftHSM does not inherit it through a derive.
 */
static CK_ULONG chain_template(CK_ATTRIBUTE *t, const char *label, const uint8_t *id,
                               CK_KEY_TYPE *kt, CK_ULONG *len)
{
    *kt = CKK_AES;
    *len = 32;
    CK_ATTRIBUTE a[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_KEY_TYPE, kt, sizeof(*kt)},
        {CKA_VALUE_LEN, len, sizeof(*len)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &yes, sizeof(yes)}, /* ...but only under a trusted key: */
        {CKA_WRAP_WITH_TRUSTED, &yes, sizeof(yes)},
        {CKA_DERIVE, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_ID, (void *)id, P11_ID_BYTES},
    };
    memcpy(t, a, sizeof(a));
    return sizeof(a) / sizeof(a[0]);
}

/*
 * The ticket-key template: sensitive, extractable only to be wrapped (it has
 * no other use but CKA_SIGN, which the HSM-side key check value needs).
 */
static CK_ULONG ticket_template(CK_ATTRIBUTE *t, const char *label, const uint8_t *id,
                                CK_KEY_TYPE *kt, CK_ULONG *len)
{
    *kt = CKK_GENERIC_SECRET;
    *len = STEK_TICKET_KEY_BYTES;
    CK_ATTRIBUTE a[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_KEY_TYPE, kt, sizeof(*kt)},
        {CKA_VALUE_LEN, len, sizeof(*len)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_DERIVE, &no, sizeof(no)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_ID, (void *)id, P11_ID_BYTES},
    };
    memcpy(t, a, sizeof(a));
    return sizeof(a) / sizeof(a[0]);
}

/* Lists the keys labelled `label`, sorted by (epoch, CKA_ID). */
stek_status p11_keys_list(p11_sess *s, const char *label, p11_keyobj **out, size_t *count)
{
    *out = NULL;
    *count = 0;
    CK_ATTRIBUTE q[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_OBJECT_HANDLE *h = NULL;
    size_t n = 0;
    STEK_GUARD(p11_find(s, q, 2, &h, &n));
    if (n == 0)
        return STEK_OK;
    stek_status st = STEK_OK;
    p11_keyobj *keys = calloc(n, sizeof(*keys));
    STEK_ENSURE_GOTO(keys != NULL, STEK_ERR_NOMEM);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        CK_ULONG len = P11_ID_BYTES;
        stek_status ast = p11_get_attr(s, h[i], CKA_ID, keys[k].id, &len);
        /* Gone meanwhile (a racing process destroyed it): skip it. */
        if (ast == STEK_ERR_NOT_FOUND)
            continue;
        STEK_GUARD_GOTO(ast);
        /* Not made by us (wrong id shape): leave it for `keys --audit`. */
        if (len != P11_ID_BYTES)
            continue;
        keys[k].h = h[i];
        keys[k].epoch = p11_id_epoch(keys[k].id);
        k++;
    }
    /* Insertion sort: lists are a window of keys, a few dozen at most. */
    for (size_t i = 1; i < k; i++) {
        p11_keyobj x = keys[i];
        size_t j = i;
        while (j > 0 && memcmp(keys[j - 1].id, x.id, P11_ID_BYTES) > 0) {
            keys[j] = keys[j - 1];
            j--;
        }
        keys[j] = x;
    }
    *out = keys;
    *count = k;
    keys = NULL;
done:
    free(keys);
    free(h);
    return st;
}

/*
 * Destroys, among keys sorted by CKA_ID: every key with epoch < keep_from,
 * and every duplicate (same epoch, higher CKA_ID) of the others.
 */
static stek_status prune(p11_sess *s, const p11_keyobj *keys, size_t n, uint64_t keep_from,
                         unsigned *destroyed)
{
    for (size_t i = 0; i < n; i++) {
        bool dup = i > 0 && keys[i - 1].epoch == keys[i].epoch;
        if (keys[i].epoch < keep_from || dup) {
            STEK_GUARD(p11_destroy(s, keys[i].h));
            if (destroyed)
                (*destroyed)++;
        }
    }
    return STEK_OK;
}

static stek_status cleanup(p11_sess *s, const char *group, uint32_t generation)
{
    char label[STEK_P11_LABEL_MAX];
    p11_keyobj *keys = NULL;
    size_t n = 0;
    stek_status st = STEK_OK;

    STEK_GUARD(p11_label(label, "chain", group, generation));
    STEK_GUARD(p11_keys_list(s, label, &keys, &n));
    if (n > 0)
        STEK_GUARD_GOTO(prune(s, keys, n, keys[n - 1].epoch, NULL));
    free(keys);
    keys = NULL;

    STEK_GUARD(p11_label(label, "ticket", group, generation));
    STEK_GUARD(p11_keys_list(s, label, &keys, &n));
    STEK_GUARD_GOTO(prune(s, keys, n, 0, NULL));
done:
    free(keys);
    return st;
}

static bool has_epoch(const p11_keyobj *keys, size_t n, uint64_t epoch)
{
    for (size_t i = 0; i < n; i++)
        if (keys[i].epoch == epoch)
            return true;
    return false;
}

static stek_status derive_from(p11_sess *s, CK_OBJECT_HANDLE base, uint8_t *data, CK_ULONG len,
                               CK_ATTRIBUTE *t, CK_ULONG n)
{
    CK_KEY_DERIVATION_STRING_DATA sd = {data, len};
    CK_MECHANISM m = {CKM_AES_ECB_ENCRYPT_DATA, &sd, sizeof(sd)};
    CK_OBJECT_HANDLE out;
    return p11_derive(s, &m, base, t, n, &out);
}

/*
 * One step from the newest chain key R(e): K(e) unless present, R(e+1)
 * unless present, then cleanup. STEK_ERR_NOT_FOUND means R(e) vanished
 * under us (another process stepped past it); the caller re-reads.
 */
static stek_status step(p11_sess *s, const char *group, uint32_t generation,
                        const p11_keyobj *chain, const char *chain_label)
{
    uint64_t e = chain->epoch;
    uint8_t tblocks[P11_TICKET_BLOCKS * 16], cblocks[P11_CHAIN_BLOCKS * 16];
    char tlabel[STEK_P11_LABEL_MAX];
    p11_keyobj *tickets = NULL, *chains = NULL;
    size_t nt = 0, nc = 0;
    stek_status st = STEK_OK;
    CK_ATTRIBUTE t[24];
    CK_KEY_TYPE kt;
    CK_ULONG vlen, n;
    uint8_t id[P11_ID_BYTES];

    STEK_ENSURE(e < EPOCH_MAX, STEK_ERR_INVALID_ARG);
    STEK_GUARD(p11_kdf_blocks(group, generation, e, tblocks, cblocks));
    STEK_GUARD(p11_label(tlabel, "ticket", group, generation));

    STEK_GUARD_GOTO(p11_keys_list(s, tlabel, &tickets, &nt));
    if (!has_epoch(tickets, nt, e)) {
        STEK_GUARD_GOTO(p11_make_id(e, id));
        n = ticket_template(t, tlabel, id, &kt, &vlen);
        STEK_GUARD_GOTO(derive_from(s, chain->h, tblocks, sizeof(tblocks), t, n));
    }
    STEK_GUARD_GOTO(p11_keys_list(s, chain_label, &chains, &nc));
    if (!has_epoch(chains, nc, e + 1)) {
        STEK_GUARD_GOTO(p11_make_id(e + 1, id));
        n = chain_template(t, chain_label, id, &kt, &vlen);
        STEK_GUARD_GOTO(derive_from(s, chain->h, cblocks, sizeof(cblocks), t, n));
    }
    /* R(e+1) exists now, so every chain key below it may go. */
    STEK_GUARD_GOTO(cleanup(s, group, generation));
done:
    free(tickets);
    free(chains);
    return st;
}

/* Reads the newest chain key (lowest CKA_ID among the newest epoch). */
static stek_status newest(p11_sess *s, const char *label, p11_keyobj *out)
{
    p11_keyobj *keys = NULL;
    size_t n = 0;
    STEK_GUARD(p11_keys_list(s, label, &keys, &n));
    if (n == 0) {
        free(keys);
        STEK_BAIL(STEK_ERR_NOT_FOUND, "no chain key labelled %s", label);
    }
    size_t i = n - 1;
    while (i > 0 && keys[i - 1].epoch == keys[n - 1].epoch)
        i--;
    *out = keys[i];
    free(keys);
    return STEK_OK;
}

/* True when (g,n) has ticket keys: then a chain key must exist too. */
static bool chain_hidden(p11_sess *s, const char *group, uint32_t generation)
{
    char label[STEK_P11_LABEL_MAX];
    p11_keyobj *keys = NULL;
    size_t n = 0;
    if (p11_label(label, "ticket", group, generation) != STEK_OK ||
        p11_keys_list(s, label, &keys, &n) != STEK_OK)
        return false;
    free(keys);
    return n > 0;
}

stek_status stek_p11_root_create(stek_p11 *p11, const char *group, uint32_t generation,
                                 uint64_t epoch)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE(epoch < EPOCH_MAX, STEK_ERR_INVALID_ARG);
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, "chain", group, generation));

    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    p11_keyobj *keys = NULL;
    size_t n = 0;
    STEK_GUARD_GOTO(p11_keys_list(&s, label, &keys, &n));
    if (n > 0)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "group %s generation %u already has a chain key", group,
                       (unsigned)generation);

    uint8_t id[P11_ID_BYTES];
    STEK_GUARD_GOTO(p11_make_id(epoch, id));
    CK_ATTRIBUTE t[24], forced[25];
    CK_KEY_TYPE kt;
    CK_ULONG vlen;
    CK_ULONG nt = chain_template(t, label, id, &kt, &vlen);
    nt = p11_force_sensitive(t, nt, forced);
    CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h;
    st = P11_CALL(p11, C_GenerateKey, s.h, &m, forced, nt, &h);
    p11_sess_note(&s, st);
    if (st == STEK_OK)
        stek_log(STEK_LOG_INFO, "pkcs11", "created root chain key %s epoch %llu", label,
                 (unsigned long long)epoch);
done:
    free(keys);
    return p11_sess_done(&s, st);
}

stek_status stek_p11_chain_newest(stek_p11 *p11, const char *group, uint32_t generation,
                                  uint64_t *epoch)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(epoch);
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, "chain", group, generation));
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    p11_keyobj k;
    stek_status st = newest(&s, label, &k);
    if (st == STEK_OK)
        *epoch = k.epoch;
    return p11_sess_done(&s, st);
}

stek_status stek_p11_ratchet_advance(stek_p11 *p11, const char *group, uint32_t generation,
                                     uint64_t target)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE(target <= EPOCH_MAX, STEK_ERR_INVALID_ARG);
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, "chain", group, generation));
    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = STEK_OK;
    int attempt = 0;
    for (;;) {
        p11_keyobj cur;
        st = newest(&s, label, &cur);
        if (st == STEK_OK && cur.epoch >= target) {
            st = cleanup(&s, group, generation);
            if (st == STEK_OK)
                break;
        } else if (st == STEK_OK) {
            st = step(&s, group, generation, &cur, label);
            if (st == STEK_OK)
                continue;
        }
        /*
         * Another process stepping the same chain destroys R(e) under us, and
         * SoftHSM can hide its new objects for a moment while re-indexing, or
         * fail a derive: look again, a bounded number of times.
         */
        if ((st == STEK_ERR_NOT_FOUND || st == STEK_ERR_HSM) && p11_token_present(&s) &&
            p11_retry_backoff(attempt++))
            continue;
        break;
    }
    if (st == STEK_ERR_NOT_FOUND && chain_hidden(&s, group, generation)) {
        /* SoftHSM can keep an object that another process was still writing
         * invisible until re-initialization: refresh the whole view. */
        atomic_store(&p11->lost, true);
        st = stek_error_set(STEK_ERR_HSM_UNAVAILABLE,
                            "%s not visible though its ticket keys are; refreshing the token view",
                            label);
    }
    return p11_sess_done(&s, st);
}

stek_status stek_p11_chain_cleanup(stek_p11 *p11, const char *group, uint32_t generation)
{
    STEK_ENSURE_REF(p11);
    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = cleanup(&s, group, generation);
    return p11_sess_done(&s, st);
}

/* Finds the surviving K(g,n,e): the lowest CKA_ID of that epoch. */
static stek_status find_ticket_once(p11_sess *s, const char *label, uint64_t epoch,
                                    CK_OBJECT_HANDLE *h)
{
    p11_keyobj *keys = NULL;
    size_t n = 0;
    STEK_GUARD(p11_keys_list(s, label, &keys, &n));
    stek_status st = stek_error_set(STEK_ERR_NOT_FOUND, "no ticket key %s epoch %llu", label,
                                    (unsigned long long)epoch);
    for (size_t i = 0; i < n; i++) {
        if (keys[i].epoch == epoch) {
            *h = keys[i].h;
            st = STEK_OK;
            break;
        }
    }
    free(keys);
    return st;
}

static stek_status find_ticket(p11_sess *s, const char *group, uint32_t generation, uint64_t epoch,
                               CK_OBJECT_HANDLE *h)
{
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, "ticket", group, generation));
    stek_status st;
    /* A racing writer on the same token can hide the key for a moment. */
    for (int attempt = 0;; attempt++) {
        st = find_ticket_once(s, label, epoch, h);
        if (st != STEK_ERR_NOT_FOUND || attempt >= 2 || !p11_token_present(s) ||
            !p11_retry_backoff(attempt))
            break;
    }
    return st;
}

stek_status stek_p11_ticket_exists(stek_p11 *p11, const char *group, uint32_t generation,
                                   uint64_t epoch, bool *exists)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(exists);
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    CK_OBJECT_HANDLE h;
    stek_status st = find_ticket(&s, group, generation, epoch, &h);
    *exists = st == STEK_OK;
    if (st == STEK_ERR_NOT_FOUND)
        st = STEK_OK;
    return p11_sess_done(&s, st);
}

static stek_status destroy_label_before(p11_sess *s, const char *kind, const char *group,
                                        uint32_t generation, uint64_t epoch, unsigned *destroyed)
{
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, kind, group, generation));
    p11_keyobj *keys = NULL;
    size_t n = 0;
    STEK_GUARD(p11_keys_list(s, label, &keys, &n));
    stek_status st = STEK_OK;
    for (size_t i = 0; i < n && st == STEK_OK; i++) {
        if (keys[i].epoch < epoch) {
            st = p11_destroy(s, keys[i].h);
            if (st == STEK_OK && destroyed)
                (*destroyed)++;
        }
    }
    free(keys);
    return st;
}

stek_status stek_p11_ticket_destroy_before(stek_p11 *p11, const char *group, uint32_t generation,
                                           uint64_t epoch, unsigned *destroyed)
{
    STEK_ENSURE_REF(p11);
    if (destroyed)
        *destroyed = 0;
    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = destroy_label_before(&s, "ticket", group, generation, epoch, destroyed);
    return p11_sess_done(&s, st);
}

stek_status stek_p11_generation_destroy(stek_p11 *p11, const char *group, uint32_t generation,
                                        unsigned *destroyed)
{
    STEK_ENSURE_REF(p11);
    if (destroyed)
        *destroyed = 0;
    p11_sess s;
    STEK_GUARD(p11_sess_get_writer(p11, &s));
    stek_status st = destroy_label_before(&s, "chain", group, generation, UINT64_MAX, destroyed);
    if (st == STEK_OK)
        st = destroy_label_before(&s, "ticket", group, generation, UINT64_MAX, destroyed);
    if (st == STEK_OK)
        st = p11_generation_record_destroy(&s, group, generation);
    return p11_sess_done(&s, st);
}

stek_status stek_p11_ticket_check_value(stek_p11 *p11, const char *group, uint32_t generation,
                                        uint64_t epoch, uint8_t kcv[STEK_P11_KCV_BYTES])
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(kcv);
    static const char msg[] = "stek-kcv-v1";
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    for (int attempt = 0;; attempt++) {
        CK_OBJECT_HANDLE h;
        CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
        CK_ULONG len = STEK_P11_KCV_BYTES;
        st = find_ticket(&s, group, generation, epoch, &h);
        if (st == STEK_OK)
            st = P11_CALL(p11, C_SignInit, s.h, &m, h);
        if (st == STEK_OK)
            st = P11_CALL(p11, C_Sign, s.h, (CK_BYTE_PTR)msg, sizeof(msg) - 1, kcv, &len);
        if (st == STEK_OK && len != STEK_P11_KCV_BYTES)
            st = stek_error_set(STEK_ERR_HSM, "C_Sign: %lu bytes", (unsigned long)len);
        /* The duplicate we found may have been pruned by a racing process. */
        if (st != STEK_ERR_NOT_FOUND || attempt >= 2 || !p11_retry_backoff(attempt))
            break;
    }
    return p11_sess_done(&s, st);
}

/*
 * Maps each epoch to its surviving ticket key with one listing of the
 * generation (a listing costs a find plus one attribute read per key, so
 * per-epoch lookups would be quadratic). *out is freed with free().
 */
stek_status p11_tickets_resolve(p11_sess *s, const char *group, uint32_t generation,
                                const uint64_t *epochs, size_t n, CK_OBJECT_HANDLE **out)
{
    char label[STEK_P11_LABEL_MAX];
    STEK_GUARD(p11_label(label, "ticket", group, generation));
    *out = calloc(n ? n : 1, sizeof(**out));
    STEK_ENSURE(*out != NULL, STEK_ERR_NOMEM);
    stek_status st = STEK_OK;
    for (int attempt = 0;; attempt++) {
        p11_keyobj *keys = NULL;
        size_t nk = 0;
        STEK_GUARD(p11_keys_list(s, label, &keys, &nk));
        st = STEK_OK;
        for (size_t i = 0; i < n && st == STEK_OK; i++) {
            size_t j = 0;
            /* Sorted by CKA_ID: the first hit is the lowest, the survivor. */
            while (j < nk && keys[j].epoch != epochs[i])
                j++;
            if (j == nk)
                st = stek_error_set(STEK_ERR_NOT_FOUND, "no ticket key %s epoch %llu", label,
                                    (unsigned long long)epochs[i]);
            else
                (*out)[i] = keys[j].h;
        }
        free(keys);
        /* A racing writer on the same token can hide a key for a moment. */
        if (st != STEK_ERR_NOT_FOUND || attempt >= 2 || !p11_token_present(s) ||
            !p11_retry_backoff(attempt))
            break;
    }
    return st;
}

stek_status stek_p11_ticket_names(stek_p11 *p11, const char *group, uint32_t generation,
                                  const uint64_t *epochs, size_t n_epochs,
                                  uint8_t (*names)[STEK_TICKET_NAME_BYTES])
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE(n_epochs == 0 || (epochs != NULL && names != NULL), STEK_ERR_INVALID_ARG);
    static const char msg[] = STEK_TICKET_NAME_LABEL;
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE *h = NULL;
    STEK_GUARD_GOTO(p11_tickets_resolve(&s, group, generation, epochs, n_epochs, &h));
    for (size_t i = 0; i < n_epochs; i++) {
        uint8_t mac[32];
        CK_ULONG len = sizeof(mac);
        CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
        STEK_GUARD_GOTO(P11_CALL(p11, C_SignInit, s.h, &m, h[i]));
        STEK_GUARD_GOTO(P11_CALL(p11, C_Sign, s.h, (CK_BYTE_PTR)msg, sizeof(msg) - 1, mac, &len));
        STEK_ENSURE_GOTO(len == sizeof(mac), STEK_ERR_HSM);
        memcpy(names[i], mac, STEK_TICKET_NAME_BYTES);
    }
done:
    free(h);
    return p11_sess_done(&s, st);
}
