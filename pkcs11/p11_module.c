/*
 * Module loading, token discovery, login and reconnection.
 *
 * A token can vanish (removed, HSM restarted, SoftHSM directory gone). Any
 * call that sees that marks the handle lost; the next session checkout takes
 * the write lock and re-initializes the module from scratch, because SoftHSM
 * only discovers tokens in C_Initialize. Attempts are spaced so a missing
 * token does not turn every request into a module reload.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "p11_internal.h"

#define RECONNECT_SPACING_MS 200
#define DEFAULT_POOL 8

static long ms_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000L + (now.tv_nsec - t->tv_nsec) / 1000000L;
}

static stek_status load_module(stek_p11 *p11)
{
    /* RTLD_LOCAL: the module's symbols must not satisfy anyone else's. */
    p11->dl = dlopen(p11->module_path, RTLD_NOW | RTLD_LOCAL);
    if (p11->dl == NULL)
        STEK_BAIL(STEK_ERR_MODULE_LOAD, "cannot load PKCS#11 module %s: %s", p11->module_path,
                  dlerror());
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(p11->dl, "C_GetFunctionList");
    if (get == NULL)
        STEK_BAIL(STEK_ERR_MODULE_LOAD, "%s is not a PKCS#11 module (no C_GetFunctionList)",
                  p11->module_path);
    CK_RV rv = get(&p11->fl);
    if (rv != CKR_OK || p11->fl == NULL)
        STEK_BAIL(STEK_ERR_MODULE_LOAD, "C_GetFunctionList: %s", p11_rv_name(rv));
    return STEK_OK;
}

static stek_status module_init(stek_p11 *p11)
{
    CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof(args));
    /* We call from several threads and hold no mutex across calls. */
    args.flags = CKF_OS_LOCKING_OK;
    CK_RV rv = p11->fl->C_Initialize(&args);
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)
        rv = CKR_OK;
    STEK_GUARD(p11_rv(p11, "C_Initialize", rv));
    p11->initialized = true;
    return STEK_OK;
}

static void module_finalize(stek_p11 *p11)
{
    if (!p11->initialized)
        return;
    STEK_IGNORE(p11_rv(p11, "C_Finalize", p11->fl->C_Finalize(NULL)));
    p11->initialized = false;
    p11->connected = false;
    p11_eph_forget(p11);
    /* Finalize closed every session; the pool's handles are now stale. */
    pthread_mutex_lock(&p11->pool_mu);
    p11->n_idle = 0;
    p11->n_open = 0;
    pthread_cond_broadcast(&p11->pool_cv);
    pthread_mutex_unlock(&p11->pool_mu);
}

/* Token labels are 32 bytes, blank padded, not NUL terminated. */
static bool label_matches(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = strlen(want);
    if (n > 32 || memcmp(label, want, n) != 0)
        return false;
    for (size_t i = n; i < 32; i++)
        if (label[i] != ' ' && label[i] != '\0')
            return false;
    return true;
}

/*
 * Finds the slot whose token has our label. STEK_ERR_TOKEN_NOT_FOUND when no
 * token has it; STEK_ERR_HSM_UNAVAILABLE when it was not found and some
 * token could not be read (SoftHSM fails C_GetTokenInfo while another process
 * writes the token directory, and keeps failing until re-initialized).
 */
static stek_status find_slot(stek_p11 *p11, CK_SLOT_ID *slot)
{
    CK_ULONG n = 0;
    STEK_GUARD(P11_CALL(p11, C_GetSlotList, CK_TRUE, NULL, &n));
    if (n == 0)
        STEK_BAIL(STEK_ERR_TOKEN_NOT_FOUND, "no token labelled '%s' (no token present)",
                  p11->token_label);
    CK_SLOT_ID *slots = calloc(n, sizeof(*slots));
    STEK_ENSURE(slots != NULL, STEK_ERR_NOMEM);
    stek_status st = P11_CALL(p11, C_GetSlotList, CK_TRUE, slots, &n);
    if (st == STEK_OK) {
        bool unreadable = false;
        st = STEK_ERR_TOKEN_NOT_FOUND;
        for (CK_ULONG i = 0; i < n; i++) {
            CK_TOKEN_INFO info;
            if (P11_CALL(p11, C_GetTokenInfo, slots[i], &info) != STEK_OK) {
                unreadable = true;
                continue;
            }
            if (label_matches(info.label, p11->token_label)) {
                *slot = slots[i];
                st = STEK_OK;
                break;
            }
        }
        if (st != STEK_OK)
            st = stek_error_set(unreadable ? STEK_ERR_HSM_UNAVAILABLE : STEK_ERR_TOKEN_NOT_FOUND,
                                "no token labelled '%s'%s", p11->token_label,
                                unreadable ? " (a token could not be read)" : "");
    }
    free(slots);
    return st;
}

static stek_status login(stek_p11 *p11, CK_SESSION_HANDLE h)
{
    if (atomic_load(&p11->pin_rejected))
        STEK_BAIL(STEK_ERR_PIN_INCORRECT, "the token rejected the PIN earlier; not retrying");
    atomic_fetch_add(&p11->login_calls, 1);
    CK_RV rv = p11->fl->C_Login(h, CKU_USER, stek_secret_data(p11->pin),
                                (CK_ULONG)stek_secret_len(p11->pin));
    if (rv == CKR_USER_ALREADY_LOGGED_IN)
        return STEK_OK;
    stek_status st = p11_rv(p11, "C_Login", rv);
    if (st == STEK_ERR_PIN_INCORRECT || st == STEK_ERR_PIN_LOCKED) {
        /* Never offer a rejected PIN again: retries would lock the token. */
        atomic_store(&p11->pin_rejected, true);
        stek_log(STEK_LOG_ERROR, "pkcs11", "token '%s' rejected the PIN (%s); not retrying",
                 p11->token_label, p11_rv_name(rv));
    }
    return st;
}

/* One connection attempt: initialize, find the token, open, log in. */
static stek_status connect_once(stek_p11 *p11)
{
    module_finalize(p11);
    atomic_store(&p11->lost, false);
    STEK_GUARD(module_init(p11));
    STEK_GUARD(find_slot(p11, &p11->slot));
    CK_SESSION_HANDLE h;
    STEK_GUARD(P11_CALL(p11, C_OpenSession, p11->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL,
                        NULL, &h));
    stek_status st = login(p11, h);
    if (st != STEK_OK) {
        STEK_IGNORE(P11_CALL(p11, C_CloseSession, h));
        return st;
    }
    pthread_mutex_lock(&p11->pool_mu);
    p11->idle[p11->n_idle++] = h;
    p11->n_open = 1;
    pthread_mutex_unlock(&p11->pool_mu);
    return STEK_OK;
}

/*
 * Brings the handle to "connected": module initialized, token found, one
 * logged-in session in the pool. Called with the write lock held.
 * `strict` turns an absent token into STEK_ERR_TOKEN_NOT_FOUND instead of
 * STEK_ERR_HSM_UNAVAILABLE.
 */
static stek_status reconnect_locked(stek_p11 *p11, bool strict)
{
    if (p11->connected && !atomic_load(&p11->lost))
        return STEK_OK;
    if (atomic_load(&p11->pin_rejected))
        STEK_BAIL(STEK_ERR_PIN_INCORRECT, "the token rejected the PIN earlier; not retrying");
    if (!strict && p11->last_try.tv_sec != 0 && ms_since(&p11->last_try) < RECONNECT_SPACING_MS)
        STEK_BAIL(STEK_ERR_HSM_UNAVAILABLE, "token '%s' unavailable; retrying shortly",
                  p11->token_label);
    clock_gettime(CLOCK_MONOTONIC, &p11->last_try);

    /*
     * A few quick rounds: SoftHSM fails C_GetTokenInfo and even C_Login with
     * CKR_GENERAL_ERROR while another process writes the token, and only a
     * re-initialization clears that. A rejected PIN is never retried.
     */
    stek_status st = STEK_OK;
    for (int attempt = 0;; attempt++) {
        st = connect_once(p11);
        bool transient = st == STEK_ERR_HSM || st == STEK_ERR_HSM_UNAVAILABLE ||
                         (st == STEK_ERR_TOKEN_NOT_FOUND && attempt == 0);
        if (st == STEK_OK || !transient || attempt >= 3 || !p11_retry_backoff(attempt))
            break;
    }
    if (st != STEK_OK) {
        module_finalize(p11);
        if (!strict && st != STEK_ERR_PIN_INCORRECT && st != STEK_ERR_PIN_LOCKED) {
            /* SoftHSM fails C_Initialize while its token directory is missing. */
            char why[128];
            snprintf(why, sizeof(why), "%s", stek_error_detail());
            st = stek_error_set(STEK_ERR_HSM_UNAVAILABLE, "token '%s' unavailable (%s)",
                                p11->token_label, why);
        }
        return st;
    }
    p11->connected = true;
    if (p11->ever_connected) {
        atomic_fetch_add(&p11->reconnects, 1);
        stek_log(STEK_LOG_INFO, "pkcs11", "token '%s' is back; reconnected", p11->token_label);
    }
    p11->ever_connected = true;
    return STEK_OK;
}

stek_status p11_ensure_connected(stek_p11 *p11)
{
    pthread_rwlock_wrlock(&p11->mod_lock);
    stek_status st = reconnect_locked(p11, false);
    pthread_rwlock_unlock(&p11->mod_lock);
    return st;
}

static char *dup_opt(const char *s, bool *ok)
{
    if (s == NULL)
        return NULL;
    char *d = strdup(s);
    if (d == NULL)
        *ok = false;
    return d;
}

stek_status stek_p11_open(const stek_p11_config *cfg, stek_p11 **out)
{
    STEK_ENSURE_REF(cfg);
    STEK_ENSURE_REF(out);
    *out = NULL;
    if (cfg->module_path == NULL || *cfg->module_path == '\0')
        STEK_BAIL(STEK_ERR_CONFIG, "no PKCS#11 module path configured");
    if (cfg->token_label == NULL || *cfg->token_label == '\0' || strlen(cfg->token_label) > 32)
        STEK_BAIL(STEK_ERR_CONFIG, "token label must be 1 to 32 bytes");

    stek_status st = STEK_OK;
    stek_p11 *p11 = calloc(1, sizeof(*p11));
    STEK_ENSURE(p11 != NULL, STEK_ERR_NOMEM);
    pthread_rwlock_init(&p11->mod_lock, NULL);
    pthread_mutex_init(&p11->pool_mu, NULL);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* A rotation's writes must not wait behind a steady stream of builds. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p11->tok_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&p11->eph_mu, NULL);
    pthread_cond_init(&p11->pool_cv, NULL);
    p11->pool_max = cfg->pool_size ? cfg->pool_size : DEFAULT_POOL;
    p11->idle = calloc(p11->pool_max, sizeof(*p11->idle));
    bool ok = p11->idle != NULL;
    p11->module_path = dup_opt(cfg->module_path, &ok);
    p11->token_label = dup_opt(cfg->token_label, &ok);
    p11->so_pin_env = dup_opt(cfg->so_pin_env, &ok);
    p11->so_pin_file = dup_opt(cfg->so_pin_file, &ok);
    STEK_ENSURE_GOTO(ok, STEK_ERR_NOMEM);

    /* Read the PIN before touching the module: a missing PIN is a config error. */
    STEK_GUARD_GOTO(p11_pin_read(cfg->pin_env, cfg->pin_file, &p11->pin));
    STEK_GUARD_GOTO(load_module(p11));

    pthread_rwlock_wrlock(&p11->mod_lock);
    st = reconnect_locked(p11, !cfg->allow_absent_token);
    pthread_rwlock_unlock(&p11->mod_lock);
    if (st == STEK_ERR_HSM_UNAVAILABLE && cfg->allow_absent_token) {
        stek_log(STEK_LOG_WARN, "pkcs11", "token '%s' not present yet; will keep trying",
                 cfg->token_label);
        st = STEK_OK;
    }
    STEK_GUARD_GOTO(st);
    stek_log(STEK_LOG_INFO, "pkcs11", "module %s, token '%s' ready", cfg->module_path,
             cfg->token_label);
    *out = p11;
    p11 = NULL;
done:
    stek_p11_close(p11);
    return st;
}

void stek_p11_close(stek_p11 *p11)
{
    if (p11 == NULL)
        return;
    if (p11->fl != NULL) {
        pthread_rwlock_wrlock(&p11->mod_lock);
        module_finalize(p11);
        pthread_rwlock_unlock(&p11->mod_lock);
    }
    /*
     * No dlclose: some modules (SoftHSM among them) register atexit
     * handlers or leave threads whose code must stay mapped.
     */
    stek_secret_free(p11->pin);
    free(p11->idle);
    free(p11->module_path);
    free(p11->token_label);
    free(p11->so_pin_env);
    free(p11->so_pin_file);
    pthread_rwlock_destroy(&p11->mod_lock);
    pthread_mutex_destroy(&p11->pool_mu);
    pthread_rwlock_destroy(&p11->tok_lock);
    pthread_mutex_destroy(&p11->eph_mu);
    pthread_cond_destroy(&p11->pool_cv);
    free(p11);
}

stek_status stek_p11_ping(stek_p11 *p11)
{
    STEK_ENSURE_REF(p11);
    p11_sess s;
    STEK_GUARD(p11_sess_get(p11, &s));
    CK_SESSION_INFO info;
    stek_status st = P11_CALL(p11, C_GetSessionInfo, s.h, &info);
    if (st == STEK_OK && info.state != CKS_RW_USER_FUNCTIONS &&
        info.state != CKS_RO_USER_FUNCTIONS) {
        /* Logged out behind our back (token re-inserted): reconnect next time. */
        atomic_store(&p11->lost, true);
        st = stek_error_set(STEK_ERR_HSM_UNAVAILABLE, "session is no longer logged in");
    }
    if (st == STEK_OK && !p11_token_present(&s))
        st =
            stek_error_set(STEK_ERR_HSM_UNAVAILABLE, "token '%s' is not present", p11->token_label);
    return p11_sess_done(&s, st);
}

void stek_p11_get_stats(stek_p11 *p11, stek_p11_stats *out)
{
    out->login_calls = atomic_load(&p11->login_calls);
    out->reconnects = atomic_load(&p11->reconnects);
}
