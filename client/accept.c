/*
 * Host-side acceptance of a key set. See accept.h for the contract and the
 * order of the checks; the order is the point: nothing signed is parsed, and
 * nothing wrapped is touched, before the signature over the received bytes
 * has verified.
 */
#include "accept.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <errno.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "reqsig.h"
#include "stek/v1/stek.pb-c.h"

#define NS INT64_C(1000000000)

static const char *const reject_names[STEK_REJECT_COUNT] = {
    [STEK_REJECT_NONE] = "STEK_REJECT_NONE",
    [STEK_REJECT_MALFORMED] = "STEK_REJECT_MALFORMED",
    [STEK_REJECT_SIGNATURE] = "STEK_REJECT_SIGNATURE",
    [STEK_REJECT_CONTEXT] = "STEK_REJECT_CONTEXT",
    [STEK_REJECT_IDENTITY] = "STEK_REJECT_IDENTITY",
    [STEK_REJECT_EPH_KEY] = "STEK_REJECT_EPH_KEY",
    [STEK_REJECT_NONCE] = "STEK_REJECT_NONCE",
    [STEK_REJECT_GROUP] = "STEK_REJECT_GROUP",
    [STEK_REJECT_EPOCH] = "STEK_REJECT_EPOCH",
    [STEK_REJECT_ROLLBACK] = "STEK_REJECT_ROLLBACK",
    [STEK_REJECT_GENERATION_START] = "STEK_REJECT_GENERATION_START",
    [STEK_REJECT_UNWRAP] = "STEK_REJECT_UNWRAP",
    [STEK_REJECT_NAME] = "STEK_REJECT_NAME",
};

const char *stek_reject_name(stek_reject r)
{
    if ((unsigned)r >= STEK_REJECT_COUNT)
        return "STEK_REJECT_UNKNOWN";
    return reject_names[r];
}

static stek_status reject(stek_reject *why, stek_reject r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records a rejection: STEK_ERR_VERIFY, the reason, and "<REASON>: <detail>". */
static stek_status reject(stek_reject *why, stek_reject r, const char *fmt, ...)
{
    char detail[192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    *why = r;
    return stek_error_set(STEK_ERR_VERIFY, "key set rejected (%s): %s", stek_reject_name(r),
                          detail);
}

void stek_accepted_set_free(stek_accepted_set *s)
{
    if (s == NULL)
        return;
    stek_secret_free(s->material); /* cleanses */
    free(s->keys);
    free(s->identity);
    free(s);
}

const uint8_t *stek_accepted_entry(const stek_accepted_set *s, size_t i)
{
    if (s == NULL || s->material == NULL || i >= s->n_keys)
        return NULL;
    return stek_secret_cdata(s->material) + i * STEK_ACCEPT_ENTRY_BYTES;
}

/* ---- the context ---------------------------------------------------------- */

static bool is_ed25519(EVP_PKEY *k)
{
    return EVP_PKEY_is_a(k, "ED25519");
}

static bool is_p256(EVP_PKEY *k)
{
    char curve[64];
    size_t n = 0;
    if (!EVP_PKEY_is_a(k, "EC"))
        return false;
    bool ok = EVP_PKEY_get_utf8_string_param(k, OSSL_PKEY_PARAM_GROUP_NAME, curve, sizeof(curve),
                                             &n) == 1 &&
              strcmp(curve, "prime256v1") == 0;
    ERR_clear_error();
    return ok;
}

static stek_status ctx_check(const stek_accept_ctx *c)
{
    STEK_ENSURE_REF(c);
    STEK_ENSURE(c->service_pubs != NULL && c->n_service_pubs > 0, STEK_ERR_INVALID_ARG);
    for (size_t i = 0; i < c->n_service_pubs; i++) {
        EVP_PKEY *k = c->service_pubs[i];
        if (k == NULL || !(is_p256(k) || is_ed25519(k)))
            STEK_BAIL(STEK_ERR_INVALID_ARG,
                      "accept: pinned service key %zu is neither EC P-256 nor Ed25519", i);
    }
    STEK_ENSURE_REF(c->eph);
    STEK_ENSURE(c->nonce != NULL && c->nonce_len >= STEK_NONCE_MIN_BYTES &&
                    c->nonce_len <= STEK_NONCE_MAX_BYTES,
                STEK_ERR_INVALID_ARG);
    STEK_GUARD(stek_group_name_check(c->group));
    /* Room for now * 1e9 plus the slack, without overflow. */
    STEK_ENSURE(c->now >= 0 && c->now <= INT64_MAX / NS - STEK_ACCEPT_CLOCK_SLACK_S,
                STEK_ERR_INVALID_ARG);
    if (c->sched != NULL)
        STEK_GUARD(stek_sched_check(c->sched));
    return STEK_OK;
}

/* ---- the signature ---------------------------------------------------------- */

/*
 * True when one pinned key verifies sig over data. A signature that does not
 * verify (wrong key, garbage, empty) is an expected outcome, not an error;
 * only a failure to set up the verification is.
 */
static stek_status signature_verifies(const stek_accept_ctx *c, const uint8_t *data, size_t len,
                                      const uint8_t *sig, size_t sig_len, bool *ok)
{
    stek_status st = STEK_OK;
    *ok = false;
    for (size_t i = 0; i < c->n_service_pubs && !*ok; i++) {
        EVP_PKEY *k = c->service_pubs[i];
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        STEK_ENSURE(md != NULL, STEK_ERR_NOMEM);
        /* Ed25519 is PureEdDSA: no separate digest. */
        if (EVP_DigestVerifyInit(md, NULL, is_ed25519(k) ? NULL : EVP_sha256(), NULL, k) != 1)
            st = stek_error_set(STEK_ERR_CRYPTO, "accept: EVP_DigestVerifyInit(key %zu) failed", i);
        else
            *ok = sig_len > 0 && EVP_DigestVerify(md, sig, sig_len, data, len) == 1;
        EVP_MD_CTX_free(md);
        ERR_clear_error();
        STEK_GUARD(st);
    }
    return STEK_OK;
}

/* ---- the signed content ----------------------------------------------------- */

/* Step 3 and 4: the set is of this format and for this request. */
static stek_status check_binding(const stek_accept_ctx *c, const Stek__V1__SignedKeySet *s,
                                 stek_reject *why)
{
    if (s->context == NULL || strcmp(s->context, STEK_SET_CONTEXT_V1) != 0)
        return reject(why, STEK_REJECT_CONTEXT, "context is not \"%s\"", STEK_SET_CONTEXT_V1);
    if (s->kdf_profile != STEK_KDF_PROFILE_V1)
        return reject(why, STEK_REJECT_CONTEXT, "unknown kdf_profile %u", s->kdf_profile);
    if (s->group == NULL || strcmp(s->group, c->group) != 0)
        return reject(why, STEK_REJECT_GROUP, "set is for group '%.64s', want '%s'",
                      s->group ? s->group : "", c->group);
    if (s->host_identity == NULL || s->host_identity[0] == '\0')
        return reject(why, STEK_REJECT_IDENTITY, "set names no host identity");
    if (c->identity != NULL && strcmp(s->host_identity, c->identity) != 0)
        return reject(why, STEK_REJECT_IDENTITY, "set is for '%.96s', want '%.96s'",
                      s->host_identity, c->identity);
    if (c->identity == NULL && c->n_identities > 0) {
        bool mine = false;
        for (size_t i = 0; i < c->n_identities && !mine; i++)
            mine = strcmp(s->host_identity, c->identities[i]) == 0;
        if (!mine)
            return reject(why, STEK_REJECT_IDENTITY,
                          "set is for '%.96s', not an identity of this certificate",
                          s->host_identity);
    }

    uint8_t ours[STEK_P256_POINT_BYTES];
    STEK_GUARD(stek_host_eph_public(c->eph, ours));
    if (s->host_eph_pub.len != sizeof(ours) || s->host_eph_pub.data == NULL ||
        memcmp(s->host_eph_pub.data, ours, sizeof(ours)) != 0)
        return reject(why, STEK_REJECT_EPH_KEY, "set is wrapped to another ephemeral key");
    if (s->nonce.len != c->nonce_len || s->nonce.data == NULL ||
        !stek_ct_equal(s->nonce.data, c->nonce, c->nonce_len))
        return reject(why, STEK_REJECT_NONCE, "set answers another request (nonce differs)");
    return STEK_OK;
}

static bool fits_i64(uint64_t v)
{
    return v <= (uint64_t)INT64_MAX;
}

/*
 * Step 5: the key list is what the contract promises. Sets *cur to the index
 * of the one CURRENT key. Everything after this may index and subtract
 * without further checks.
 */
static stek_status check_keys(const Stek__V1__SignedKeySet *s, size_t *cur, stek_reject *why)
{
    if (s->generation == 0 || s->generation > UINT32_MAX)
        return reject(why, STEK_REJECT_MALFORMED, "generation %llu outside 1..2^32-1",
                      (unsigned long long)s->generation);
    if (s->issued_at == 0 || !fits_i64(s->issued_at) || !fits_i64(s->generation_start))
        return reject(why, STEK_REJECT_MALFORMED, "issued_at or generation_start out of range");
    if (s->n_keys == 0 || s->n_keys > STEK_ACCEPT_MAX_KEYS || s->keys == NULL)
        return reject(why, STEK_REJECT_MALFORMED, "%zu keys, want 1..%d", s->n_keys,
                      STEK_ACCEPT_MAX_KEYS);

    size_t n_current = 0;
    for (size_t i = 0; i < s->n_keys; i++) {
        const Stek__V1__Key *k = s->keys[i];
        if (k == NULL)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu missing", i);
        if (k->name.len != STEK_TICKET_NAME_BYTES || k->wrapped.len != STEK_WRAPPED_KEY_BYTES)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu: name %zu / wrapped %zu bytes", i,
                          k->name.len, k->wrapped.len);
        if (i > 0 && k->epoch <= s->keys[i - 1]->epoch)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu: epochs not ascending", i);
        if (!fits_i64(k->decrypt_until) || k->not_before >= k->encrypt_until ||
            k->encrypt_until > k->decrypt_until)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu: times out of order", i);
        switch (k->state) {
        case STEK__V1__KEY_STATE__KEY_STATE_CURRENT:
            n_current++;
            *cur = i;
            break;
        case STEK__V1__KEY_STATE__KEY_STATE_NEXT:
        case STEK__V1__KEY_STATE__KEY_STATE_DECRYPT_ONLY:
            break;
        default: /* protobuf-c stores unknown enum values as they came */
            return reject(why, STEK_REJECT_MALFORMED, "key %zu: state %d", i, (int)k->state);
        }
    }
    if (n_current != 1)
        return reject(why, STEK_REJECT_MALFORMED, "%zu CURRENT keys, want exactly one", n_current);
    /* Epochs ascend, so: DECRYPT_ONLY ..., CURRENT, then at most NEXT = CURRENT + 1. */
    for (size_t i = 0; i < *cur; i++)
        if (s->keys[i]->state != STEK__V1__KEY_STATE__KEY_STATE_DECRYPT_ONLY)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu before CURRENT is not DECRYPT_ONLY",
                          i);
    if (s->n_keys > *cur + 2 || (s->n_keys == *cur + 2 &&
                                 (s->keys[*cur + 1]->state != STEK__V1__KEY_STATE__KEY_STATE_NEXT ||
                                  s->keys[*cur + 1]->epoch != s->keys[*cur]->epoch + 1)))
        return reject(why, STEK_REJECT_MALFORMED, "keys after CURRENT: want at most its NEXT");
    return STEK_OK;
}

static bool epoch_near(uint64_t theirs, uint64_t ours)
{
    return theirs > ours ? theirs - ours <= 1 : ours - theirs <= 1;
}

/* T0 + e*P in ns, false when it does not fit. */
static bool key_start(int64_t t0, int64_t p, uint64_t e, int64_t *out)
{
    int64_t off = 0;
    return fits_i64(e) && !__builtin_mul_overflow((int64_t)e, p, &off) &&
           !__builtin_add_overflow(t0, off, out);
}

/* Step 6 with the group's schedule: our epoch, and every key on that schedule. */
static stek_status check_epoch_sched(const stek_accept_ctx *c, const Stek__V1__SignedKeySet *s,
                                     uint64_t e, stek_reject *why)
{
    uint64_t own = 0;
    if (c->now < c->sched->origin)
        return reject(why, STEK_REJECT_EPOCH, "our clock is before the schedule's origin");
    STEK_GUARD(stek_sched_epoch_at(c->sched, c->now, &own));
    if (!epoch_near(e, own))
        return reject(why, STEK_REJECT_EPOCH, "CURRENT epoch %llu, ours is %llu",
                      (unsigned long long)e, (unsigned long long)own);
    for (size_t i = 0; i < s->n_keys; i++) {
        const Stek__V1__Key *k = s->keys[i];
        stek_key_times t;
        stek_sched_key_times(c->sched, k->epoch, &t);
        int64_t nb = 0, eu = 0;
        if (__builtin_mul_overflow(t.not_before, NS, &nb) ||
            __builtin_mul_overflow(t.encrypt_until, NS, &eu) || (uint64_t)nb != k->not_before ||
            (uint64_t)eu != k->encrypt_until)
            return reject(why, STEK_REJECT_EPOCH, "key %zu: times are not our schedule's", i);
    }
    return STEK_OK;
}

/*
 * Step 6 without a schedule: T0 and P from the CURRENT key. An epoch number
 * larger than its not_before allows gives T0 < 0 and is rejected as
 * far-future; every other key must follow the same (T0, P).
 */
static stek_status check_epoch_derived(const stek_accept_ctx *c, const Stek__V1__SignedKeySet *s,
                                       size_t cur, stek_reject *why)
{
    const Stek__V1__Key *k = s->keys[cur];
    const int64_t p = (int64_t)(k->encrypt_until - k->not_before); /* > 0, fits (check_keys) */
    int64_t ep = 0;
    if (!fits_i64(k->epoch) || __builtin_mul_overflow((int64_t)k->epoch, p, &ep) ||
        ep > (int64_t)k->not_before)
        return reject(why, STEK_REJECT_EPOCH, "CURRENT epoch %llu is beyond its own key times",
                      (unsigned long long)k->epoch);
    const int64_t t0 = (int64_t)k->not_before - ep;
    const int64_t now = c->now * NS;
    if (now < t0)
        return reject(why, STEK_REJECT_EPOCH, "our clock is before the set's origin");
    const uint64_t own = (uint64_t)((now - t0) / p);
    if (!epoch_near(k->epoch, own))
        return reject(why, STEK_REJECT_EPOCH, "CURRENT epoch %llu, ours is %llu",
                      (unsigned long long)k->epoch, (unsigned long long)own);
    for (size_t i = 0; i < s->n_keys; i++) {
        int64_t nb = 0;
        if (!key_start(t0, p, s->keys[i]->epoch, &nb) || (uint64_t)nb != s->keys[i]->not_before ||
            s->keys[i]->encrypt_until - s->keys[i]->not_before != (uint64_t)p)
            return reject(why, STEK_REJECT_MALFORMED, "key %zu: times do not follow one schedule",
                          i);
    }
    return STEK_OK;
}

/* Step 7: anti-rollback, and a newer generation's signed start time. */
static stek_status check_generation(const stek_accept_ctx *c, const Stek__V1__SignedKeySet *s,
                                    uint64_t e, stek_reject *why)
{
    if (s->generation < c->generation_hwm)
        return reject(why, STEK_REJECT_ROLLBACK,
                      "generation %llu is below the high-water mark %llu",
                      (unsigned long long)s->generation, (unsigned long long)c->generation_hwm);
    if (s->generation == c->generation_hwm && c->current_epoch_hwm != 0 && e < c->current_epoch_hwm)
        return reject(why, STEK_REJECT_ROLLBACK, "CURRENT epoch %llu is below %llu, already seen",
                      (unsigned long long)e, (unsigned long long)c->current_epoch_hwm);
    if (s->generation > c->generation_hwm) {
        if (s->generation_start == 0)
            return reject(why, STEK_REJECT_GENERATION_START,
                          "new generation %llu carries no start time",
                          (unsigned long long)s->generation);
        if ((int64_t)s->generation_start > (c->now + STEK_ACCEPT_CLOCK_SLACK_S) * NS)
            return reject(why, STEK_REJECT_GENERATION_START,
                          "new generation %llu starts in the future",
                          (unsigned long long)s->generation);
    }
    return STEK_OK;
}

/* Step 8: KEK, unwrap and name every key into set->material. */
static stek_status unwrap_all(const stek_accept_ctx *c, const Stek__V1__SignedKeySet *s,
                              stek_accepted_set *set, stek_reject *why)
{
    stek_status st = STEK_OK;
    stek_secret *kek = NULL, *k = NULL;

    st = stek_host_kek_derive(c->eph, s->hsm_eph_pub.data, s->hsm_eph_pub.len, c->group,
                              (uint32_t)s->generation, &kek);
    if (st == STEK_ERR_BAD_POINT || st == STEK_ERR_VERIFY) {
        /* The detail lives in the slot reject() writes: copy it first. */
        char d[128];
        snprintf(d, sizeof(d), "%s", stek_error_detail());
        return reject(why, STEK_REJECT_UNWRAP, "hsm_eph_pub: %s", d);
    }
    STEK_GUARD(st);

    uint8_t *out = stek_secret_data(set->material);
    for (size_t i = 0; i < s->n_keys; i++) {
        const Stek__V1__Key *key = s->keys[i];
        st = stek_host_unwrap(kek, key->wrapped.data, key->wrapped.len, &k);
        if (st == STEK_ERR_VERIFY)
            STEK_GUARD_GOTO(reject(why, STEK_REJECT_UNWRAP, "key %zu (epoch %llu) does not unwrap",
                                   i, (unsigned long long)key->epoch));
        STEK_GUARD_GOTO(st);
        uint8_t name[STEK_TICKET_NAME_BYTES];
        STEK_GUARD_GOTO(stek_host_ticket_name(k, name));
        if (!stek_ct_equal(name, key->name.data, STEK_TICKET_NAME_BYTES))
            STEK_GUARD_GOTO(reject(why, STEK_REJECT_NAME,
                                   "key %zu (epoch %llu): name does not match the key", i,
                                   (unsigned long long)key->epoch));
        /* Install as name | K[16:48] | K[48:80]: the verified HMAC name, not K[0:16]. */
        uint8_t *e = out + i * STEK_ACCEPT_ENTRY_BYTES;
        memcpy(e, name, STEK_TICKET_NAME_BYTES);
        memcpy(e + STEK_TICKET_NAME_BYTES, stek_secret_cdata(k) + STEK_TICKET_NAME_BYTES,
               STEK_TICKET_HMAC_BYTES + STEK_TICKET_AES_BYTES);
        stek_secret_free(k);
        k = NULL;
    }

done:
    stek_secret_free(k);
    stek_secret_free(kek);
    return st;
}

/* The accepted set's shell: metadata copied, material allocated but empty. */
static stek_status set_new(const Stek__V1__SignedKeySet *s, size_t cur, stek_accepted_set **out)
{
    stek_accepted_set *set = calloc(1, sizeof(*set));
    STEK_ENSURE(set != NULL, STEK_ERR_NOMEM);
    stek_status st = STEK_OK;
    set->keys = calloc(s->n_keys, sizeof(*set->keys));
    set->identity = strdup(s->host_identity);
    STEK_ENSURE_GOTO(set->keys != NULL && set->identity != NULL, STEK_ERR_NOMEM);
    STEK_GUARD_GOTO(stek_secret_new(s->n_keys * STEK_ACCEPT_ENTRY_BYTES, &set->material));
    snprintf(set->group, sizeof(set->group), "%s", s->group);
    set->generation = s->generation;
    set->generation_start = (int64_t)s->generation_start;
    set->issued_at = (int64_t)s->issued_at;
    set->current = cur;
    set->current_epoch = s->keys[cur]->epoch;
    set->n_keys = s->n_keys;
    for (size_t i = 0; i < s->n_keys; i++) {
        const Stek__V1__Key *k = s->keys[i];
        set->keys[i].epoch = k->epoch;
        set->keys[i].state = (stek_key_state)k->state; /* values match (schedule.h) */
        set->keys[i].not_before = (int64_t)k->not_before;
        set->keys[i].encrypt_until = (int64_t)k->encrypt_until;
        set->keys[i].decrypt_until = (int64_t)k->decrypt_until;
    }
    *out = set;
    set = NULL;
done:
    stek_accepted_set_free(set);
    return st;
}

stek_status stek_accept(const stek_accept_ctx *c, const uint8_t *msg, size_t len,
                        stek_accepted_set **out, stek_reject *why, bool *heartbeat)
{
    static const uint8_t empty[1];
    stek_status st = STEK_OK;
    Stek__V1__KeySet *ks = NULL;
    Stek__V1__SignedKeySet *s = NULL;
    stek_accepted_set *set = NULL;
    size_t cur = 0;
    bool verified = false;

    STEK_ENSURE(out != NULL && why != NULL && heartbeat != NULL, STEK_ERR_INVALID_ARG);
    *out = NULL;
    *why = STEK_REJECT_NONE;
    *heartbeat = false;
    STEK_ENSURE(msg != NULL || len == 0, STEK_ERR_INVALID_ARG);
    STEK_GUARD(ctx_check(c));

    /* 1. The envelope. */
    ks = stek__v1__key_set__unpack(NULL, len, msg != NULL ? msg : empty);
    if (ks == NULL)
        STEK_GUARD_GOTO(reject(why, STEK_REJECT_MALFORMED, "not a stek.v1.KeySet"));
    if (ks->heartbeat != NULL) {
        if (ks->signed_set.len != 0 || ks->signature.len != 0)
            STEK_GUARD_GOTO(reject(why, STEK_REJECT_MALFORMED, "heartbeat with a signed set"));
        *heartbeat = true;
        goto done;
    }
    if (ks->signed_set.len == 0)
        STEK_GUARD_GOTO(reject(why, STEK_REJECT_MALFORMED, "neither a signed set nor a heartbeat"));

    /* 2. The signature over the bytes as received; never a re-serialization. */
    STEK_GUARD_GOTO(signature_verifies(c, ks->signed_set.data, ks->signed_set.len,
                                       ks->signature.data, ks->signature.len, &verified));
    if (!verified)
        STEK_GUARD_GOTO(
            reject(why, STEK_REJECT_SIGNATURE, "no pinned service key verifies the signature"));

    /* 3-7. Only now is the signed content parsed and judged. */
    s = stek__v1__signed_key_set__unpack(NULL, ks->signed_set.len, ks->signed_set.data);
    if (s == NULL)
        STEK_GUARD_GOTO(reject(why, STEK_REJECT_MALFORMED, "signed_set is not a SignedKeySet"));
    STEK_GUARD_GOTO(check_binding(c, s, why));
    STEK_GUARD_GOTO(check_keys(s, &cur, why));
    if (c->sched != NULL)
        STEK_GUARD_GOTO(check_epoch_sched(c, s, s->keys[cur]->epoch, why));
    else
        STEK_GUARD_GOTO(check_epoch_derived(c, s, cur, why));
    STEK_GUARD_GOTO(check_generation(c, s, s->keys[cur]->epoch, why));

    /* 8. Unwrap into locked memory. */
    STEK_GUARD_GOTO(set_new(s, cur, &set));
    STEK_GUARD_GOTO(unwrap_all(c, s, set, why));
    *out = set;
    set = NULL;

done:
    stek_accepted_set_free(set);
    if (s != NULL)
        stek__v1__signed_key_set__free_unpacked(s, NULL);
    if (ks != NULL)
        stek__v1__key_set__free_unpacked(ks, NULL);
    if (st == STEK_ERR_VERIFY && *why == STEK_REJECT_NONE)
        *why = STEK_REJECT_MALFORMED; /* a VERIFY from below that no check named */
    return st;
}

/* Appends "<type>:<value>" (the value may hold no NUL: a forged SAN). */
static stek_status add_identity(const char *type, const ASN1_IA5STRING *v, char **out, size_t *n)
{
    const int len = ASN1_STRING_length(v);
    const unsigned char *d = ASN1_STRING_get0_data(v);
    STEK_ENSURE(len > 0 && memchr(d, '\0', (size_t)len) == NULL, STEK_ERR_CONFIG);
    STEK_ENSURE(*n < STEK_MAX_CERT_IDENTITIES, STEK_ERR_CONFIG);
    size_t sz = strlen(type) + (size_t)len + 2;
    char *id = malloc(sz);
    STEK_ENSURE(id != NULL, STEK_ERR_NOMEM);
    snprintf(id, sz, "%s:%.*s", type, len, (const char *)d);
    out[(*n)++] = id;
    return STEK_OK;
}

stek_status stek_cert_identities(const char *cert_pem_path, char *out[STEK_MAX_CERT_IDENTITIES],
                                 size_t *n)
{
    stek_status st = STEK_OK;
    GENERAL_NAMES *sans = NULL;
    X509 *x = NULL;
    *n = 0;
    FILE *f = fopen(cert_pem_path, "re");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", cert_pem_path, strerror(errno));
    x = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (x == NULL)
        STEK_BAIL_GOTO(STEK_ERR_CRYPTO, "%s: not a PEM certificate", cert_pem_path);
    sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    /* URIs first, then DNS names: the order in which stekd matches. */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; sans != NULL && i < sk_GENERAL_NAME_num(sans); i++) {
            const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
            if (pass == 0 && gn->type == GEN_URI)
                STEK_GUARD_GOTO(add_identity("uri", gn->d.uniformResourceIdentifier, out, n));
            else if (pass == 1 && gn->type == GEN_DNS)
                STEK_GUARD_GOTO(add_identity("dns", gn->d.dNSName, out, n));
        }
    if (*n == 0)
        STEK_BAIL_GOTO(STEK_ERR_CONFIG, "%s: no URI or DNS subject alternative name",
                       cert_pem_path);
done:
    if (st != STEK_OK) {
        for (size_t i = 0; i < *n; i++)
            free(out[i]);
        *n = 0;
    }
    GENERAL_NAMES_free(sans);
    X509_free(x);
    return st;
}
