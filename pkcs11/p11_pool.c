/*
 * The session pool. Sessions are opened on demand up to pool_max and reused;
 * a session that saw the token vanish is closed, not reused. Every checkout
 * holds the module read lock, so a reconnect (write lock) waits for calls in
 * flight and never finalizes the module under them, and tok_lock, for reading
 * or, for token-object writes, for writing (p11_internal.h).
 */
#include <stdio.h>
#include <time.h>

#include "log.h"
#include "p11_internal.h"

/* A checkout under the tok_lock the caller holds. */
static stek_status checkout(stek_p11 *p11, p11_sess *out)
{
    out->p11 = p11;
    out->bad = false;
    /* Two rounds: a lost handle gets one reconnect attempt per checkout. */
    for (int round = 0; round < 2; round++) {
        pthread_rwlock_rdlock(&p11->mod_lock);
        if (atomic_load(&p11->pin_rejected)) {
            pthread_rwlock_unlock(&p11->mod_lock);
            STEK_BAIL(STEK_ERR_PIN_INCORRECT, "the token rejected the PIN earlier; not retrying");
        }
        if (p11->connected && !atomic_load(&p11->lost))
            break;
        pthread_rwlock_unlock(&p11->mod_lock);
        if (round == 1)
            STEK_BAIL(STEK_ERR_HSM_UNAVAILABLE, "token '%s' unavailable", p11->token_label);
        STEK_GUARD(p11_ensure_connected(p11));
    }

    pthread_mutex_lock(&p11->pool_mu);
    while (p11->n_idle == 0 && p11->n_open >= p11->pool_max)
        pthread_cond_wait(&p11->pool_cv, &p11->pool_mu);
    if (p11->n_idle > 0) {
        out->h = p11->idle[--p11->n_idle];
        pthread_mutex_unlock(&p11->pool_mu);
        return STEK_OK;
    }
    p11->n_open++;
    pthread_mutex_unlock(&p11->pool_mu);

    /* Sessions share the token's login state, so a new one needs no C_Login. */
    stek_status st = P11_CALL(p11, C_OpenSession, p11->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                              NULL, NULL, &out->h);
    if (st != STEK_OK) {
        pthread_mutex_lock(&p11->pool_mu);
        p11->n_open--;
        pthread_cond_signal(&p11->pool_cv);
        pthread_mutex_unlock(&p11->pool_mu);
        pthread_rwlock_unlock(&p11->mod_lock);
        return st;
    }
    return STEK_OK;
}

stek_status p11_sess_get(stek_p11 *p11, p11_sess *out)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(out);
    pthread_rwlock_rdlock(&p11->tok_lock);
    stek_status st = checkout(p11, out);
    if (st != STEK_OK)
        pthread_rwlock_unlock(&p11->tok_lock);
    return st;
}

stek_status p11_sess_get_writer(stek_p11 *p11, p11_sess *out)
{
    STEK_ENSURE_REF(p11);
    STEK_ENSURE_REF(out);
    pthread_rwlock_wrlock(&p11->tok_lock);
    stek_status st = checkout(p11, out);
    if (st != STEK_OK)
        pthread_rwlock_unlock(&p11->tok_lock);
    return st;
}

bool p11_retry_backoff(int attempt)
{
    if (attempt >= 8)
        return false;
    int ms = attempt < 5 ? 1 << attempt : 32;
    struct timespec ts = {0, (long)ms * 1000000L};
    nanosleep(&ts, NULL);
    return true;
}

void p11_sess_note(p11_sess *s, stek_status st)
{
    if (st == STEK_ERR_HSM_UNAVAILABLE)
        s->bad = true;
}

bool p11_token_present(p11_sess *s)
{
    CK_TOKEN_INFO info;
    stek_p11 *p11 = s->p11;
    /* Keep the caller's detail: the probe's own failure is not the story. */
    CK_RV rv = p11->fl->C_GetTokenInfo(p11->slot, &info);
    if (rv == CKR_OK)
        return true;
    stek_log(STEK_LOG_WARN, "pkcs11", "token '%s' probe: C_GetTokenInfo: %s", p11->token_label,
             p11_rv_name(rv));
    atomic_store(&p11->lost, true);
    return false;
}

stek_status p11_sess_done(p11_sess *s, stek_status st)
{
    stek_p11 *p11 = s->p11;
    if ((st == STEK_ERR_HSM || st == STEK_ERR_NOT_FOUND) && !p11_token_present(s)) {
        char why[128]; /* the detail buffer is about to be rewritten */
        snprintf(why, sizeof(why), "%s", stek_error_detail());
        st = stek_error_set(STEK_ERR_HSM_UNAVAILABLE, "token '%s' is no longer present (%s)",
                            p11->token_label, why);
    }
    p11_sess_note(s, st);

    bool close_it = s->bad || atomic_load(&p11->lost);
    if (close_it)
        STEK_IGNORE(P11_CALL(p11, C_CloseSession, s->h));
    pthread_mutex_lock(&p11->pool_mu);
    if (close_it)
        p11->n_open--;
    else
        p11->idle[p11->n_idle++] = s->h;
    pthread_cond_signal(&p11->pool_cv);
    pthread_mutex_unlock(&p11->pool_mu);
    pthread_rwlock_unlock(&p11->mod_lock);
    pthread_rwlock_unlock(&p11->tok_lock);
    return st;
}
