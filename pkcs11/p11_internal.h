/*
 * Private to pkcs11/: the handle's layout, the one C_* call chokepoint,
 * the session pool, and template helpers. Tests include it to reach the
 * template chokepoint directly; nothing outside pkcs11/ and tests may.
 */
#ifndef STEK_PKCS11_P11_INTERNAL_H
#define STEK_PKCS11_P11_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#include "secret.h"
#include "stek_p11.h"

/* The HSM ephemeral key shared by per-host wrapping (p11_wrap.c). */
typedef struct p11_eph p11_eph;

struct stek_p11 {
    void *dl;
    CK_FUNCTION_LIST_PTR fl;
    char *module_path;
    char *token_label;
    char *so_pin_env;
    char *so_pin_file;
    stek_secret *pin;

    /*
     * Readers are calls using the module; the writer (re)initializes it.
     * A call holds the read lock from session checkout to return, so the
     * module is never finalized under a running C_* call.
     */
    pthread_rwlock_t mod_lock;
    bool initialized;         /* C_Initialize succeeded (write lock) */
    bool connected;           /* token found and logged in (write lock) */
    bool ever_connected;      /* for counting reconnects (write lock) */
    CK_SLOT_ID slot;          /* valid while connected */
    struct timespec last_try; /* last reconnect attempt, CLOCK_MONOTONIC */
    atomic_bool lost;         /* a call saw the token or session vanish */
    atomic_bool pin_rejected; /* latched: the PIN is never offered again */

    /*
     * Token objects: a call that writes them (create, derive into, destroy)
     * holds this for writing, every other call for reading, from checkout
     * to return. SoftHSM's file store locks object files with fcntl locks,
     * which do not exclude threads of one process: a call reading an object
     * file while another thread rewrites it can keep a partial copy for
     * good. Measured: a new ticket key read as CKA_EXTRACTABLE=FALSE by
     * every later C_WrapKey (about 1 build in 60 under a 20 ms ratchet),
     * and concurrent writes failing with CKR_GENERAL_ERROR. Writes are a
     * few per epoch and prefer over readers, so builds pause for
     * milliseconds at a rotation. No call nests checkouts. Lock order:
     * tok_lock before mod_lock.
     */
    pthread_rwlock_t tok_lock;

    /* Session pool (pool_mu), only used under the read lock. */
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    CK_SESSION_HANDLE *idle;
    size_t n_idle;
    size_t n_open;
    size_t pool_max;

    atomic_ulong login_calls;
    atomic_ulong reconnects;

    /*
     * The HSM ephemeral key that per-host wrapping shares (p11_wrap.c), under
     * eph_mu and the module read lock. module_finalize drops it: finalizing
     * destroyed its objects.
     */
    pthread_mutex_t eph_mu;
    p11_eph *eph;               /* the current one, or NULL */
    atomic_uint eph_reuse_ms;   /* 0: a fresh key per set */
    atomic_ulong eph_generated; /* ephemeral keys made, for tests and metrics */

    /* Timing of every P11_CALL (stek_p11_set_call_observer); NULL: none. */
    _Atomic(stek_p11_call_observer) observer;
    void *observer_arg;
};

/* A checked-out session. Holds the module read lock until p11_sess_put. */
typedef struct p11_sess {
    stek_p11 *p11;
    CK_SESSION_HANDLE h;
    bool bad;    /* close instead of returning to the pool */
} p11_sess;

/*
 * Maps a CK_RV to a stek_status, records "<call>: <CKR name>" as the detail,
 * logs the call at debug level, and marks the handle lost on device-class
 * errors so the next checkout reconnects.
 */
STEK_MUST_USE stek_status p11_rv(stek_p11 *p11, const char *call, CK_RV rv);

/* The constant name of a CK_RV ("CKR_PIN_INCORRECT"), or "CKR_0x..." */
const char *p11_rv_name(CK_RV rv);

/*
 * Every C_* call goes through this: p11_rv(p11, "C_X", p11->fl->C_X(args)),
 * timed for the handle's call observer. The comma operator sequences the
 * start time before the call; p11_call_end runs after it returns.
 */
#define P11_CALL(p11, fn, ...)                                                                     \
    (p11_call_begin(p11), p11_call_end((p11), #fn, (p11)->fl->fn(__VA_ARGS__)))

/* Notes this thread's start time of the C_* call about to run, when p11
 * has an observer (P11_CALL only). */
void p11_call_begin(stek_p11 *p11);

/* Reports the call's duration to the observer, then returns p11_rv(p11, call, rv). */
STEK_MUST_USE stek_status p11_call_end(stek_p11 *p11, const char *call, CK_RV rv);

/*
 * Checks out a logged-in session, reconnecting first if the token was lost.
 * Returns STEK_OK (call p11_sess_put exactly once), STEK_ERR_HSM_UNAVAILABLE,
 * or STEK_ERR_PIN_INCORRECT when the PIN was rejected before.
 */
STEK_MUST_USE stek_status p11_sess_get(stek_p11 *p11, p11_sess *out);

/* p11_sess_get for calls that write token objects: holds tok_lock for writing. */
STEK_MUST_USE stek_status p11_sess_get_writer(stek_p11 *p11, p11_sess *out);

/*
 * Bounded retry for effects of another process writing the same token
 * (SoftHSM's file store can hide objects for a moment while it re-indexes):
 * sleeps 1, 2, 4 ... 32 ms and returns true while attempt < 8.
 */
bool p11_retry_backoff(int attempt);

/* Reconnects a lost handle under the write lock (p11_module.c). */
STEK_MUST_USE stek_status p11_ensure_connected(stek_p11 *p11);

/*
 * Ends a checkout: returns the session to the pool (or closes it) and drops
 * the read lock. It is also the one place that tells a vanished token from
 * a real failure: when st is STEK_ERR_HSM or STEK_ERR_NOT_FOUND it probes
 * the token (C_GetTokenInfo); if the token is gone it marks the handle lost
 * and returns STEK_ERR_HSM_UNAVAILABLE instead. SoftHSM, for one, keeps
 * answering from memory after its token directory is deleted, with empty
 * finds and CKR_GENERAL_ERROR, and sees a restored token only after a
 * re-initialization. Returns the final status.
 */
STEK_MUST_USE stek_status p11_sess_done(p11_sess *s, stek_status st);

/* Marks a session bad early when st says the token or session went away. */
void p11_sess_note(p11_sess *s, stek_status st);

/* Probes the token of a checked-out session; false when it is gone. */
bool p11_token_present(p11_sess *s);

/*
 * The template chokepoint for every secret key the layer makes (derive,
 * generate, unwrap): copies tmpl into out (room for n + 1 entries) and forces
 * CKA_SENSITIVE to TRUE, appending it when absent. SoftHSM accepts
 * CKA_SENSITIVE=FALSE in a derive template and then reveals CKA_VALUE, so no
 * template reaches the HSM without this. Returns the new count.
 */
CK_ULONG p11_force_sensitive(const CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_ATTRIBUTE *out);

/* C_DeriveKey through p11_force_sensitive. n must be < 32. */
STEK_MUST_USE stek_status p11_derive(p11_sess *s, CK_MECHANISM *mech, CK_OBJECT_HANDLE base,
                                     const CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *out);

/*
 * Finds every object matching tmpl. Returns STEK_OK with *objs (free()),
 * possibly empty (*count 0, *objs NULL).
 */
STEK_MUST_USE stek_status p11_find(p11_sess *s, const CK_ATTRIBUTE *tmpl, CK_ULONG n,
                                   CK_OBJECT_HANDLE **objs, size_t *count);

/* Reads one attribute into buf (len in, actual length out). */
STEK_MUST_USE stek_status p11_get_attr(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type,
                                       void *buf, CK_ULONG *len);

/* Reads a CK_BBOOL attribute; absent or not applicable reads as false. */
bool p11_get_bool(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type);

/* Destroys an object; a handle that is already gone counts as done. */
STEK_MUST_USE stek_status p11_destroy(p11_sess *s, CK_OBJECT_HANDLE obj);

/* Reads a PIN from an environment variable or a file into locked memory. */
STEK_MUST_USE stek_status p11_pin_read(const char *env, const char *file, stek_secret **out);

/* Object labels: "stek:chain:<g>:<n>", "stek:ticket:<g>:<n>", "stek:transport:<id>". */
#define P11_LABEL_SIGNING "stek:signing"
STEK_MUST_USE stek_status p11_label(char out[STEK_P11_LABEL_MAX], const char *kind,
                                    const char *group, uint32_t generation);

/* CKA_ID layout of chain and ticket keys: u64be(epoch) || 8 random bytes. */
#define P11_ID_BYTES 16
STEK_MUST_USE stek_status p11_make_id(uint64_t epoch, uint8_t id[P11_ID_BYTES]);
uint64_t p11_id_epoch(const uint8_t id[P11_ID_BYTES]);

/* Destroys the generation record of (g,n) (p11_meta.c). */
STEK_MUST_USE stek_status p11_generation_record_destroy(p11_sess *s, const char *group,
                                                        uint32_t generation);

/* Forgets the shared ephemeral key without a C_* call (module_finalize). */
void p11_eph_forget(stek_p11 *p11);

/* The DER OID of P-256 for CKA_EC_PARAMS. */
extern const CK_BYTE p11_p256_oid[10];

/* Reads CKA_EC_POINT of a public key as an uncompressed 65-byte point. */
STEK_MUST_USE stek_status p11_read_ec_point(p11_sess *s, CK_OBJECT_HANDLE pub,
                                            uint8_t out[STEK_P256_POINT_BYTES]);

#endif
