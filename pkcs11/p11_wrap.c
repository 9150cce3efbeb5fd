/*
 * Per-host wrapping inside the HSM (kek.h has the byte contract):
 *   1. an HSM ephemeral P-256 key pair (session objects);
 *   2. Z = ECDH1_DERIVE(CKD_NULL) with the host's ephemeral point;
 *   3. KEK = AES_CBC_ENCRYPT_DATA(Z, iv = SHA-256(ctx)[0:16], label blocks);
 *   4. blob = AES_KEY_WRAP_PAD(KEK, K) for each ticket key.
 * Every intermediate is a sensitive, non-extractable session object, so no
 * plaintext key ever exists outside the HSM. Z and the KEK are destroyed
 * before return.
 *
 * The ephemeral key pair may be shared by the sets built within
 * eph_reuse_ms of each other (stek_p11_set_eph_reuse_ms): the KEK still
 * differs per host, because ctx and Z both take the host's point, and the
 * private half is destroyed once its window has passed and its last set is
 * built. Sharing it saves a key generation per set and, on SoftHSM 2.6, two
 * of the four objects it never frees (docs/benchmarks.md).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "p11_chain.h"
#include "p11_internal.h"

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;
static CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
static CK_KEY_TYPE aes_type = CKK_AES;
static CK_ULONG aes256_len = 32;

static stek_status eph_keypair(p11_sess *s, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv)
{
    CK_ATTRIBUTE pub_t[] = {
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_EC_PARAMS, (void *)p11_p256_oid, sizeof(p11_p256_oid)},
    };
    CK_ATTRIBUTE priv_t[] = {
        {CKA_TOKEN, &no, sizeof(no)},       {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)}, {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_DERIVE, &yes, sizeof(yes)},    {CKA_SIGN, &no, sizeof(no)},
    };
    CK_MECHANISM m = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    stek_status st = P11_CALL(s->p11, C_GenerateKeyPair, s->h, &m, pub_t, 2, priv_t, 6, pub, priv);
    p11_sess_note(s, st);
    return st;
}

/* A session-only AES-256 secret: used for Z (derive) and the KEK (wrap). */
static CK_ULONG session_aes_template(CK_ATTRIBUTE *t, bool for_wrap)
{
    CK_ATTRIBUTE a[] = {
        {CKA_CLASS, &secret_class, sizeof(secret_class)},
        {CKA_KEY_TYPE, &aes_type, sizeof(aes_type)},
        {CKA_VALUE_LEN, &aes256_len, sizeof(aes256_len)},
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_DERIVE, for_wrap ? &no : &yes, sizeof(yes)},
        {CKA_WRAP, for_wrap ? &yes : &no, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
    };
    memcpy(t, a, sizeof(a));
    return sizeof(a) / sizeof(a[0]);
}

static stek_status derive_kek(p11_sess *s, CK_OBJECT_HANDLE eph_priv, const uint8_t *host_pub,
                              const uint8_t *hsm_pub, const char *group, uint32_t generation,
                              CK_OBJECT_HANDLE *z, CK_OBJECT_HANDLE *kek)
{
    CK_ATTRIBUTE t[12];
    CK_ULONG n = session_aes_template(t, false);
    CK_ECDH1_DERIVE_PARAMS ecdh = {CKD_NULL, 0, NULL, STEK_P256_POINT_BYTES, (CK_BYTE_PTR)host_pub};
    CK_MECHANISM m = {CKM_ECDH1_DERIVE, &ecdh, sizeof(ecdh)};
    STEK_GUARD(p11_derive(s, &m, eph_priv, t, n, z));

    CK_AES_CBC_ENCRYPT_DATA_PARAMS cbc;
    uint8_t label[STEK_KEK_LABEL_BYTES];
    STEK_GUARD(stek_kek_iv(hsm_pub, host_pub, group, generation, cbc.iv));
    stek_kek_label_blocks(label);
    cbc.pData = label;
    cbc.length = sizeof(label);
    CK_MECHANISM cm = {CKM_AES_CBC_ENCRYPT_DATA, &cbc, sizeof(cbc)};
    n = session_aes_template(t, true);
    return p11_derive(s, &cm, *z, t, n, kek);
}

/* ---- the shared ephemeral key ------------------------------------------- */

/*
 * It lives in a session of its own, outside the pool: the pool closes a
 * session that saw an error, and a session object dies with its session.
 * Other sessions of this process may use it (PKCS#11 session objects are
 * visible to every session of the application).
 */
struct p11_eph {
    CK_SESSION_HANDLE h;
    CK_OBJECT_HANDLE priv;
    uint8_t point[STEK_P256_POINT_BYTES];
    struct timespec born; /* CLOCK_MONOTONIC */
    unsigned users;       /* builds holding it (eph_mu) */
    bool retired;         /* no new users; the last one closes it (eph_mu) */
};

static long long elapsed_ms(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)(now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000;
}

/* Destroys the private key and closes its session; frees e. */
static void eph_close(stek_p11 *p11, p11_eph *e)
{
    if (e == NULL)
        return;
    p11_sess s = {.p11 = p11, .h = e->h};
    if (e->priv != CK_INVALID_HANDLE)
        STEK_IGNORE(p11_destroy(&s, e->priv));
    if (e->h != CK_INVALID_HANDLE)
        STEK_IGNORE(P11_CALL(p11, C_CloseSession, e->h));
    free(e);
}

static stek_status eph_new(stek_p11 *p11, p11_eph **out)
{
    p11_eph *e = calloc(1, sizeof(*e));
    STEK_ENSURE(e != NULL, STEK_ERR_NOMEM);
    e->h = CK_INVALID_HANDLE;
    e->priv = CK_INVALID_HANDLE;
    stek_status st = STEK_OK;
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE;
    p11_sess s = {.p11 = p11, .h = CK_INVALID_HANDLE};
    STEK_GUARD_GOTO(P11_CALL(p11, C_OpenSession, p11->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                             NULL, NULL, &e->h));
    s.h = e->h;
    STEK_GUARD_GOTO(eph_keypair(&s, &pub, &e->priv));
    STEK_GUARD_GOTO(p11_read_ec_point(&s, pub, e->point));
    clock_gettime(CLOCK_MONOTONIC, &e->born);
    atomic_fetch_add(&p11->eph_generated, 1);
done:
    /* The point is read; only the private half is needed from here. */
    if (pub != CK_INVALID_HANDLE)
        STEK_IGNORE(p11_destroy(&s, pub));
    if (st != STEK_OK) {
        eph_close(p11, e);
        return st;
    }
    *out = e;
    return STEK_OK;
}

/* The current key if it is past its window (eph_mu held). */
static bool eph_expired_locked(stek_p11 *p11)
{
    return p11->eph != NULL &&
           elapsed_ms(&p11->eph->born) >= (long long)atomic_load(&p11->eph_reuse_ms);
}

/*
 * Hands out the current key no more (eph_mu held). Returns it when no build
 * holds it, for the caller to close after unlocking; else its last build
 * closes it (eph_release).
 */
static p11_eph *eph_retire_locked(stek_p11 *p11)
{
    p11_eph *e = p11->eph;
    if (e == NULL)
        return NULL;
    p11->eph = NULL;
    e->retired = true;
    return e->users == 0 ? e : NULL;
}

/*
 * The current key if it is younger than eph_reuse_ms, else a new one
 * (*fresh). Made under eph_mu: a burst of builds at an epoch boundary makes
 * one key, not one each. Call eph_release exactly once after STEK_OK.
 */
static stek_status eph_acquire(stek_p11 *p11, p11_eph **out, bool *fresh)
{
    p11_eph *old = NULL, *e = NULL;
    stek_status st = STEK_OK;
    pthread_mutex_lock(&p11->eph_mu);
    *fresh = p11->eph == NULL || eph_expired_locked(p11);
    if (!*fresh) {
        e = p11->eph;
        e->users++;
    } else {
        old = eph_retire_locked(p11);
        st = eph_new(p11, &e);
        if (st == STEK_OK) {
            e->users = 1;
            e->retired = atomic_load(&p11->eph_reuse_ms) == 0;
            if (!e->retired)
                p11->eph = e;
        }
    }
    pthread_mutex_unlock(&p11->eph_mu);
    eph_close(p11, old);
    if (st == STEK_OK)
        *out = e;
    return st;
}

/* `broken`: the HSM refused the key; it is not handed out again. */
static void eph_release(stek_p11 *p11, p11_eph *e, bool broken)
{
    pthread_mutex_lock(&p11->eph_mu);
    if (broken && p11->eph == e)
        (void)eph_retire_locked(p11); /* NULL: this build still holds it */
    bool last = --e->users == 0 && e->retired;
    pthread_mutex_unlock(&p11->eph_mu);
    if (last)
        eph_close(p11, e);
}

void p11_eph_forget(stek_p11 *p11)
{
    /* Under the write lock, so no build holds it; finalizing destroyed it. */
    pthread_mutex_lock(&p11->eph_mu);
    free(p11->eph);
    p11->eph = NULL;
    pthread_mutex_unlock(&p11->eph_mu);
}

void stek_p11_eph_sweep(stek_p11 *p11)
{
    if (p11 == NULL)
        return;
    pthread_mutex_lock(&p11->eph_mu);
    bool due = eph_expired_locked(p11);
    pthread_mutex_unlock(&p11->eph_mu);
    p11_sess s;
    /* A checkout holds the locks every C_* call needs. */
    if (!due || p11_sess_get(p11, &s) != STEK_OK)
        return;
    pthread_mutex_lock(&p11->eph_mu);
    p11_eph *old = eph_expired_locked(p11) ? eph_retire_locked(p11) : NULL;
    pthread_mutex_unlock(&p11->eph_mu);
    eph_close(p11, old);
    STEK_IGNORE(p11_sess_done(&s, STEK_OK));
}

void stek_p11_set_eph_reuse_ms(stek_p11 *p11, unsigned ms)
{
    if (p11 != NULL)
        atomic_store(&p11->eph_reuse_ms, ms);
}

/* ---- wrapping -------------------------------------------------------------- */

stek_status stek_p11_wrap_tickets(stek_p11 *p11, const char *group, uint32_t generation,
                                  const uint8_t *host_pub, size_t host_pub_len,
                                  const uint64_t *epochs, size_t n_epochs,
                                  uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                                  uint8_t (*blobs)[STEK_WRAPPED_KEY_BYTES])
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(hsm_pub);
    STEK_ENSURE(n_epochs == 0 || (epochs != NULL && blobs != NULL), STEK_ERR_INVALID_ARG);
    /* Check the point here, not in the HSM: modules differ in what they accept. */
    STEK_GUARD(stek_p256_point_check(host_pub, host_pub_len));
    STEK_GUARD(stek_group_name_check(group));

    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    stek_status st = STEK_OK;
    p11_eph *eph = NULL;
    CK_OBJECT_HANDLE z = CK_INVALID_HANDLE, kek = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE *handles = NULL;

    /*
     * A shared key the HSM refuses (its session closed under us, say) is
     * retired, and the set is built once more with a fresh key.
     */
    for (int attempt = 0;; attempt++) {
        bool fresh = false;
        STEK_GUARD_GOTO(eph_acquire(p11, &eph, &fresh));
        memcpy(hsm_pub, eph->point, STEK_P256_POINT_BYTES);
        st = derive_kek(&s, eph->priv, host_pub, hsm_pub, group, generation, &z, &kek);
        if (st == STEK_OK)
            break;
        eph_release(p11, eph, true);
        eph = NULL;
        if (z != CK_INVALID_HANDLE)
            STEK_IGNORE(p11_destroy(&s, z));
        z = CK_INVALID_HANDLE;
        if (fresh || attempt > 0 || st == STEK_ERR_HSM_UNAVAILABLE)
            goto done;
    }

    STEK_GUARD_GOTO(p11_tickets_resolve(&s, group, generation, epochs, n_epochs, &handles));
    for (size_t i = 0; i < n_epochs; i++) {
        CK_MECHANISM m = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
        CK_ULONG len = STEK_WRAPPED_KEY_BYTES;
        STEK_GUARD_GOTO(P11_CALL(p11, C_WrapKey, s.h, &m, kek, handles[i], blobs[i], &len));
        STEK_ENSURE_GOTO(len == STEK_WRAPPED_KEY_BYTES, STEK_ERR_HSM);
    }
done:
    p11_sess_note(&s, st);
    /* Destroy the per-host objects now rather than at session close:
     * pooled sessions live long. */
    CK_OBJECT_HANDLE per_host[] = {kek, z};
    for (size_t i = 0; i < sizeof(per_host) / sizeof(per_host[0]); i++)
        if (per_host[i] != CK_INVALID_HANDLE)
            STEK_IGNORE(p11_destroy(&s, per_host[i]));
    if (eph != NULL)
        eph_release(p11, eph, false);
    free(handles);
    return p11_sess_done(&s, st);
}
