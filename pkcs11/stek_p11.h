/*
 * stek's PKCS#11 layer: the only code in the project that calls C_*.
 *
 * It loads a module by path, finds the token by label, logs in once with a
 * PIN from an environment variable or a file, keeps a session pool, and
 * offers the key operations of DESIGN.md: group roots, the deterministic
 * ratchet, per-host wrapping, signing, listing and chain export/import.
 *
 * Every function returns a stek_status; no CK_RV leaves this layer. The
 * detail (stek_error_detail) names the failing C_ call and its CKR_ name.
 * A token that disappears turns into STEK_ERR_HSM_UNAVAILABLE until it is
 * back; the handle reconnects on its own. A rejected PIN is latched: the
 * handle never calls C_Login with it again.
 *
 * All functions are safe to call from several threads on one handle.
 * Object values never leave the HSM in plaintext: there is no function that
 * reads CKA_VALUE.
 */
#ifndef STEK_PKCS11_STEK_P11_H
#define STEK_PKCS11_STEK_P11_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kek.h"
#include "status.h"

typedef struct stek_p11 stek_p11;

typedef struct stek_p11_config {
    const char *module_path; /* PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so */
    const char *token_label; /* found by label: SoftHSM reassigns slot ids */
    /* The user PIN comes from exactly one of these, never argv or config. */
    const char *pin_env;  /* name of an environment variable holding the PIN */
    const char *pin_file; /* path of a file holding the PIN (trailing newline ignored) */
    /* The SO PIN, needed only to mark a transport key trusted. Optional. */
    const char *so_pin_env;
    const char *so_pin_file;
    unsigned pool_size; /* sessions kept open; 0 means 8 */
    /*
     * false: stek_p11_open fails with STEK_ERR_TOKEN_NOT_FOUND when the token
     * is absent (a clear start-up error). true: open succeeds and calls return
     * STEK_ERR_HSM_UNAVAILABLE until the token appears.
     */
    bool allow_absent_token;
} stek_p11_config;

#define STEK_P11_SIGNATURE_MAX_BYTES 72 /* DER ECDSA P-256 */
#define STEK_P11_KCV_BYTES 32
#define STEK_P11_CHAIN_BLOB_MAX_BYTES 512 /* RSA-OAEP-2048 output is 256 */
#define STEK_P11_LABEL_MAX 96

/*
 * Loads the module, initializes it with OS locking, reads the PIN, finds the
 * token and logs in. Returns STEK_OK and *out (free with stek_p11_close);
 * STEK_ERR_MODULE_LOAD (path missing, not a PKCS#11 module),
 * STEK_ERR_PIN_MISSING, STEK_ERR_TOKEN_NOT_FOUND, STEK_ERR_PIN_INCORRECT
 * (C_Login was called exactly once), STEK_ERR_PIN_LOCKED, or STEK_ERR_HSM.
 */
STEK_MUST_USE stek_status stek_p11_open(const stek_p11_config *cfg, stek_p11 **out);

/* Closes every session, finalizes the module, cleanses the PIN. NULL is a no-op. */
void stek_p11_close(stek_p11 *p11);

/*
 * Checks that the token is reachable and logged in, reconnecting if needed.
 * Returns STEK_OK, STEK_ERR_HSM_UNAVAILABLE, or STEK_ERR_PIN_INCORRECT when
 * the PIN was rejected earlier.
 */
STEK_MUST_USE stek_status stek_p11_ping(stek_p11 *p11);

/* ------------------------------------------------------------------------
 * Group chain keys and the ratchet (KDF profile 1, DESIGN.md).
 *
 * Objects: chain key R(g,n,e) has label "stek:chain:<g>:<n>", ticket key
 * K(g,n,e) "stek:ticket:<g>:<n>"; both carry CKA_ID = u64be(e) || 8 random
 * bytes. The random tail gives racing processes one agreed survivor among
 * byte-identical duplicates: the lowest CKA_ID.
 */

#define STEK_KDF_PROFILE 1

/*
 * Creates the root chain key R(g,n,epoch) from C_GenerateKey. Returns
 * STEK_OK, STEK_ERR_EXISTS when (g,n) already has a chain key,
 * STEK_ERR_INVALID_ARG for a bad group name, or an HSM error.
 */
STEK_MUST_USE stek_status stek_p11_root_create(stek_p11 *p11, const char *group,
                                               uint32_t generation, uint64_t epoch);

/*
 * Reads the epoch of the newest chain key of (g,n) into *epoch.
 * Returns STEK_OK or STEK_ERR_NOT_FOUND when (g,n) has no chain key.
 */
STEK_MUST_USE stek_status stek_p11_chain_newest(stek_p11 *p11, const char *group,
                                                uint32_t generation, uint64_t *epoch);

/*
 * Steps the ratchet until the newest chain key is R(g,n,target): for each
 * epoch e from the newest up to target-1, derives K(g,n,e), then
 * R(g,n,e+1), then destroys every chain key of (g,n) older than e+1.
 * Idempotent: a target at or below the newest only runs the cleanup.
 * Safe when other processes step the same chain at the same time.
 * Returns STEK_OK, STEK_ERR_NOT_FOUND (no chain), or an HSM error.
 */
STEK_MUST_USE stek_status stek_p11_ratchet_advance(stek_p11 *p11, const char *group,
                                                   uint32_t generation, uint64_t target);

/*
 * The start-up cleanup: destroys chain keys of (g,n) older than the newest,
 * and duplicates of the newest chain key and of ticket keys, keeping the
 * lowest CKA_ID of each. Returns STEK_OK or an HSM error.
 */
STEK_MUST_USE stek_status stek_p11_chain_cleanup(stek_p11 *p11, const char *group,
                                                 uint32_t generation);

/* Sets *exists to whether K(g,n,epoch) is in the token. */
STEK_MUST_USE stek_status stek_p11_ticket_exists(stek_p11 *p11, const char *group,
                                                 uint32_t generation, uint64_t epoch, bool *exists);

/*
 * Destroys every ticket key of (g,n) with an epoch below `epoch` (keys past
 * their window). *destroyed, if not NULL, gets the count.
 */
STEK_MUST_USE stek_status stek_p11_ticket_destroy_before(stek_p11 *p11, const char *group,
                                                         uint32_t generation, uint64_t epoch,
                                                         unsigned *destroyed);

/* ------------------------------------------------------------------------
 * Generation records: the HSM is the only state a replica has, so each
 * generation's signed start time lives there too, as a private token data
 * object "stek:gen:<g>:<n>" (CKA_VALUE = u64be(start, Unix seconds)).
 */
typedef struct stek_p11_generation {
    uint32_t generation;
    int64_t start; /* Unix seconds */
} stek_p11_generation;

/* Records generation n of g as started at `start`. STEK_ERR_EXISTS if recorded. */
STEK_MUST_USE stek_status stek_p11_generation_record(stek_p11 *p11, const char *group,
                                                     uint32_t generation, int64_t start);

/*
 * Lists the recorded generations of g in ascending order. *out is freed with
 * free() (NULL when *count is 0).
 */
STEK_MUST_USE stek_status stek_p11_generation_list(stek_p11 *p11, const char *group,
                                                   stek_p11_generation **out, size_t *count);

/*
 * Destroys every chain and ticket key of generation n of group g, and its
 * generation record. *destroyed counts keys only.
 */
STEK_MUST_USE stek_status stek_p11_generation_destroy(stek_p11 *p11, const char *group,
                                                      uint32_t generation, unsigned *destroyed);

/*
 * A key check value: HMAC-SHA256 over "stek-kcv-v1" keyed with the whole
 * 80-byte K(g,n,e), computed inside the HSM. It identifies a key (replicas
 * compare it) without revealing it. Returns STEK_OK or STEK_ERR_NOT_FOUND.
 */
STEK_MUST_USE stek_status stek_p11_ticket_check_value(stek_p11 *p11, const char *group,
                                                      uint32_t generation, uint64_t epoch,
                                                      uint8_t kcv[STEK_P11_KCV_BYTES]);

/*
 * Ticket key names: HMAC-SHA256(K(g,n,e), "stek-name-v1")[0:16], computed in
 * the HSM. K is sensitive, so the service cannot read its first bytes; this
 * name is public by construction (it travels in every ticket), identical on
 * every replica, and reveals nothing of the hmac and aes parts. Hosts
 * recompute it from the unwrapped key and use name | K[16:48] | K[48:80].
 * Writes names[i] for each epochs[i]. STEK_ERR_NOT_FOUND when a key is absent.
 */
STEK_MUST_USE stek_status stek_p11_ticket_names(stek_p11 *p11, const char *group,
                                                uint32_t generation, const uint64_t *epochs,
                                                size_t n_epochs,
                                                uint8_t (*names)[STEK_TICKET_NAME_BYTES]);

/* ------------------------------------------------------------------------
 * Per-host wrapping (kek.h): an HSM ephemeral P-256 key, ECDH with the
 * host's ephemeral point, the context-bound KEK, then AES-KWP per key.
 * Z and the KEK are session objects destroyed before return; the ephemeral
 * key is one too, destroyed before return or, when shared, once it is past
 * its reuse window and its last set is built.
 */

/*
 * Lets the sets wrapped within `ms` of each other share one HSM ephemeral
 * key (default 0: a fresh key per set). KEKs stay per host. Takes effect
 * for the next key made; a NULL p11 is ignored.
 */
void stek_p11_set_eph_reuse_ms(stek_p11 *p11, unsigned ms);

/*
 * Destroys the shared ephemeral key if it is past its window, now or, when
 * a build still holds it, as that build ends. Without this the key would
 * wait for the next build; call it every second or so. Does nothing while
 * the HSM is unavailable (its key went with it). A NULL p11 is ignored.
 */
void stek_p11_eph_sweep(stek_p11 *p11);

/*
 * Wraps K(g,n,epochs[i]) for i < n_epochs to host_pub. Writes the HSM's
 * ephemeral point to hsm_pub and each blob to blobs[i]. Returns STEK_OK;
 * STEK_ERR_BAD_POINT when host_pub is not an uncompressed P-256 point on
 * the curve; STEK_ERR_NOT_FOUND when a ticket key is missing; an HSM error.
 */
STEK_MUST_USE stek_status stek_p11_wrap_tickets(stek_p11 *p11, const char *group,
                                                uint32_t generation, const uint8_t *host_pub,
                                                size_t host_pub_len, const uint64_t *epochs,
                                                size_t n_epochs,
                                                uint8_t hsm_pub[STEK_P256_POINT_BYTES],
                                                uint8_t (*blobs)[STEK_WRAPPED_KEY_BYTES]);

/* ------------------------------------------------------------------------
 * The service signing key: ECDSA P-256, label "stek:signing", sensitive and
 * never extractable.
 */

/* Creates the signing key pair. STEK_ERR_EXISTS when one is already there. */
STEK_MUST_USE stek_status stek_p11_signing_key_create(stek_p11 *p11);

/*
 * Signs SHA-256(msg) in the HSM. Writes a DER ECDSA signature to sig and its
 * length to *sig_len (at most STEK_P11_SIGNATURE_MAX_BYTES).
 * Returns STEK_OK, STEK_ERR_NOT_FOUND (no signing key), or an error.
 */
STEK_MUST_USE stek_status stek_p11_sign(stek_p11 *p11, const uint8_t *msg, size_t msg_len,
                                        uint8_t sig[STEK_P11_SIGNATURE_MAX_BYTES], size_t *sig_len);

/*
 * Exports the signing public key as a PEM SubjectPublicKeyInfo, for hosts to
 * pin. *pem is NUL-terminated; the caller frees it with free().
 */
STEK_MUST_USE stek_status stek_p11_signing_pubkey_pem(stek_p11 *p11, char **pem);

/* ------------------------------------------------------------------------
 * Listing and housekeeping. Never values.
 */

typedef enum stek_p11_kind {
    STEK_P11_KIND_CHAIN,
    STEK_P11_KIND_TICKET,
    STEK_P11_KIND_SIGNING,
    STEK_P11_KIND_TRANSPORT,
    STEK_P11_KIND_GENERATION, /* a generation record (data object) */
    STEK_P11_KIND_OTHER,      /* not made by stek: `keys --audit` flags these */
} stek_p11_kind;

typedef struct stek_p11_object_info {
    stek_p11_kind kind;
    char label[STEK_P11_LABEL_MAX];
    char group[STEK_GROUP_MAX_BYTES + 1];
    uint32_t generation;
    uint64_t epoch;
    bool is_private_key; /* CKO_PRIVATE_KEY (signing, transport) */
    bool is_public_key;
    bool token;
    bool sensitive;
    bool always_sensitive;
    bool extractable;
    bool never_extractable;
    bool wrap_with_trusted;
    bool trusted;
    bool derive;
} stek_p11_object_info;

/*
 * Lists every object the user session sees. Returns STEK_OK with *objs (free
 * with free()) and *count.
 */
STEK_MUST_USE stek_status stek_p11_list(stek_p11 *p11, stek_p11_object_info **objs, size_t *count);

/* Returns the constant name of a kind ("chain", "ticket", ...). */
const char *stek_p11_kind_name(stek_p11_kind kind);

/* ------------------------------------------------------------------------
 * Seeding a replica's HSM with the current chain key (DESIGN.md,
 * "Scale-out"). The chain key never exists in plaintext outside an HSM.
 *
 *   target: stek_p11_transport_create   -> SPKI (public half), private half stays
 *   source: stek_p11_transport_import(trusted = true)   (needs the SO PIN)
 *   source: stek_p11_chain_export       -> blob; the imported key is destroyed
 *   target: stek_p11_chain_import       -> chain key; transport key destroyed
 */

/*
 * Target side: makes a single-use RSA-2048 transport key pair whose private
 * half is a token object labelled "stek:transport:<id>" (unwrap only).
 * Returns the public key as DER SubjectPublicKeyInfo in *spki (free()).
 * STEK_ERR_EXISTS when a transport key with that id is already there.
 */
STEK_MUST_USE stek_status stek_p11_transport_create(stek_p11 *p11, const char *id, uint8_t **spki,
                                                    size_t *spki_len);

/*
 * Source side: imports a transport public key (DER SPKI, RSA) as a token
 * object labelled "stek:transport:<id>" with CKA_WRAP. With trusted = true
 * it logs in as SO to set CKA_TRUSTED (the only way a chain key may be
 * wrapped), which needs the SO PIN source in the config: STEK_ERR_PIN_MISSING
 * without it, STEK_ERR_PIN_INCORRECT when rejected.
 */
STEK_MUST_USE stek_status stek_p11_transport_import(stek_p11 *p11, const char *id,
                                                    const uint8_t *spki, size_t spki_len,
                                                    bool trusted);

/*
 * Source side: wraps the newest chain key of (g,n) with the imported
 * transport key "stek:transport:<id>" (RSA-OAEP, SHA-1, as SoftHSM allows),
 * then destroys that transport key whatever the outcome. Writes the blob and
 * the chain key's epoch. STEK_ERR_NOT_WRAPPABLE when the transport key is
 * not trusted.
 */
STEK_MUST_USE stek_status stek_p11_chain_export(stek_p11 *p11, const char *group,
                                                uint32_t generation, const char *id,
                                                uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES],
                                                size_t *blob_len, uint64_t *epoch);

/*
 * Target side: unwraps the blob inside the HSM with transport key id into
 * chain key R(g,n,epoch), with the same attributes as a locally made one,
 * then destroys the transport private key. STEK_ERR_EXISTS when (g,n)
 * already has a chain key at or past that epoch.
 */
STEK_MUST_USE stek_status stek_p11_chain_import(stek_p11 *p11, const char *group,
                                                uint32_t generation, uint64_t epoch, const char *id,
                                                const uint8_t *blob, size_t blob_len);

/* ------------------------------------------------------------------------
 * Test-visible counters: how many times each sensitive call was made.
 */
typedef struct stek_p11_stats {
    unsigned long login_calls; /* C_Login as user */
    unsigned long reconnects;  /* module re-initializations after a loss */
} stek_p11_stats;

void stek_p11_get_stats(stek_p11 *p11, stek_p11_stats *out);

/*
 * An observer of the layer's C_* calls, for latency metrics: the function's
 * name ("C_WrapKey", a string constant), how long it took in nanoseconds
 * (CLOCK_MONOTONIC), and whether it returned CKR_OK. It runs on the calling
 * thread right after each call, so it must be quick, must not block, and
 * must not call into the layer. Nothing else of the call reaches it.
 */
typedef void (*stek_p11_call_observer)(void *arg, const char *call, uint64_t ns, bool ok);

/*
 * Installs fn (NULL removes it). Set it before the handle is shared between
 * threads: arg is not synchronized. Calls made by stek_p11_open itself are
 * not observed.
 */
void stek_p11_set_call_observer(stek_p11 *p11, stek_p11_call_observer fn, void *arg);

#endif
