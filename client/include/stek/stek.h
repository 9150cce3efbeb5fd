/*
 * libstek: TLS session-ticket keys from a stek key service, installed in
 * OpenSSL's ticket callback, so that every TLS server of a group issues and
 * resumes the same tickets.
 *
 *     stek_options *o = NULL;
 *     stek_options_new(&o);
 *     stek_options_add_server(o, "stekd-1.example:7443");
 *     stek_options_add_server(o, "stekd-2.example:7443");
 *     stek_options_set_ca(o, "/etc/stek/ca.pem");
 *     stek_options_set_cert(o, "/etc/stek/host.pem", "/etc/stek/host-key.pem");
 *     stek_options_set_service_key(o, "/etc/stek/service.pub.pem");
 *     stek_options_set_group(o, "edge");
 *     stek_options_set_state_dir(o, "/var/lib/myserver/stek");
 *     stek_client *c = NULL;
 *     if (stek_client_new(o, &c) != STEK_RESULT_OK) ...
 *     stek_options_free(o);
 *     stek_client_wait_ready(c, 5000);          // optional: tickets flow once ready
 *     stek_client_attach(c, listener_ssl_ctx);  // the listener's initial SSL_CTX
 *     ... serve ...
 *     SSL_CTX_free(listener_ssl_ctx);           // detach: no handshake may run any more
 *     stek_client_free(c);
 *
 * Conventions: every function returns a stek_result (or nothing); outputs
 * are written only on STEK_RESULT_OK. Objects are opaque. Strings passed in
 * are copied: the caller keeps ownership of its arguments. Nothing here
 * prints; failures are logged on stderr by the library's logger (level from
 * STEK_LOG_LEVEL).
 *
 * Link with -lstek (which needs OpenSSL 3 and gRPC core at run time).
 */
#ifndef STEK_STEK_H
#define STEK_STEK_H

#include <stdbool.h>
#include <stdint.h>

#include <openssl/ssl.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define STEK_API __attribute__((visibility("default")))
#else
#define STEK_API
#endif

/* Size of a ticket key name: the first 16 bytes of every ticket. */
#define STEK_KEY_NAME_BYTES 16
/* HMAC-SHA-256 key and AES-256-CBC key of one ticket key. */
#define STEK_HMAC_KEY_BYTES 32
#define STEK_AES_KEY_BYTES 32
/* Longest group name, without its NUL. */
#define STEK_GROUP_NAME_MAX_BYTES 64
/* Most service replicas and pinned service keys one client takes. */
#define STEK_MAX_SERVERS 16
#define STEK_MAX_SERVICE_KEYS 8
/* Most groups one client serves (the default group included). */
#define STEK_MAX_GROUPS 16
/* Most server names one client maps to groups, and the longest name. */
#define STEK_MAX_SERVER_NAMES 64
#define STEK_SERVER_NAME_MAX_BYTES 253

typedef enum stek_result {
    STEK_RESULT_OK = 0,
    STEK_RESULT_INVALID_ARGUMENT, /* NULL, empty, too long, or out of contract */
    STEK_RESULT_NO_MEMORY,        /* allocation or mlock (RLIMIT_MEMLOCK) failed */
    STEK_RESULT_IO,               /* a file could not be read or written */
    STEK_RESULT_CONFIG,           /* options incomplete or inconsistent */
    STEK_RESULT_CRYPTO,           /* a key file is not a usable key; OpenSSL failed */
    STEK_RESULT_TIMEOUT,          /* not ready within the time given */
    STEK_RESULT_ALREADY,          /* the SSL_CTX already has a client attached */
    STEK_RESULT_INTERNAL,         /* a bug */
} stek_result;

/* Why a key set was rejected: indices of stek_counters.sets_rejected_by. */
typedef enum stek_rejection {
    STEK_REJECTED_MALFORMED = 1,
    STEK_REJECTED_SIGNATURE,        /* no pinned service key verifies it */
    STEK_REJECTED_CONTEXT,          /* wrong context or KDF profile */
    STEK_REJECTED_IDENTITY,         /* made for another host */
    STEK_REJECTED_EPH_KEY,          /* wrapped to another ephemeral key */
    STEK_REJECTED_NONCE,            /* answers another request */
    STEK_REJECTED_GROUP,            /* another group's keys */
    STEK_REJECTED_EPOCH,            /* current epoch more than +-1 from ours */
    STEK_REJECTED_ROLLBACK,         /* older generation or epoch than already seen */
    STEK_REJECTED_GENERATION_START, /* new generation starting in the future */
    STEK_REJECTED_UNWRAP,           /* keys do not unwrap under our ephemeral key */
    STEK_REJECTED_NAME,             /* a key name does not match its key */
    STEK_REJECTED_COUNT
} stek_rejection;

/*
 * A consistent-enough snapshot of a client's counters (each field is read
 * atomically; fields are not read together). Counts are since
 * stek_client_new.
 */
typedef struct stek_counters {
    uint64_t tickets_issued;        /* tickets encrypted (by any key) */
    uint64_t tickets_stale;         /* of which with a key past its encrypt window (outage) */
    uint64_t tickets_resumed;       /* sessions resumed from a ticket of the current key */
    uint64_t tickets_renewed;       /* resumed from another live key's ticket (then renewed) */
    uint64_t miss_unknown;          /* ticket name never installed here */
    uint64_t miss_expired;          /* ticket key past its decrypt deadline */
    uint64_t miss_other_generation; /* ticket key of a generation since replaced */
    uint64_t no_key_encrypts;       /* handshakes that got no ticket: no usable key */
    uint64_t sets_accepted;
    uint64_t sets_rejected; /* total of sets_rejected_by */
    uint64_t sets_rejected_by[STEK_REJECTED_COUNT];
    uint64_t current_epoch;  /* CURRENT epoch of the default group's newest set; 0 = none */
    uint64_t generation;     /* its generation; 0 = none */
    int64_t last_fetch_unix; /* wall-clock seconds of the last accepted set; 0 = never */
    bool stream_up;          /* every group's WatchKeySet stream is delivering messages */
    bool ready;              /* every group has a key installed that can encrypt */
    /* Appended (several groups): a ticket of another of our groups, offered
     * under a server name of this group. Not resumed. */
    uint64_t miss_other_group;
    /* Appended: a ticket under one of our live keys whose MAC failed
     * (forged or corrupted). Not resumed. */
    uint64_t miss_bad_mac;
    /* Appended (sealed cache, stek_options_set_cache): whether the cache file
     * was loaded at stek_client_new (0 or 1), rejected there (0 or 1; the
     * reason is logged), and how many rewrites failed (logged; serving
     * goes on). */
    uint64_t cache_loaded;
    uint64_t cache_rejected;
    uint64_t cache_write_errors;
} stek_counters;

typedef struct stek_options stek_options;
typedef struct stek_client stek_client;

/* The constant name of a result ("STEK_RESULT_TIMEOUT"); never NULL. Thread-safe. */
STEK_API const char *stek_result_name(stek_result r);

/* ---- options ------------------------------------------------------------------- */
/* Options objects are not thread-safe; a client copies what it needs, so an
 * options object may be freed (or reused) as soon as stek_client_new returns. */

/* Creates empty options. Returns OK and *out (stek_options_free), or NO_MEMORY. */
STEK_API stek_result stek_options_new(stek_options **out);

/* Frees the options. NULL is a no-op. */
STEK_API void stek_options_free(stek_options *o);

/*
 * Adds one service replica, "host:port" (gRPC target syntax). Call once per
 * replica; the client fails over across them in order. At least one is
 * required. INVALID_ARGUMENT for an empty address or more than
 * STEK_MAX_SERVERS.
 */
STEK_API stek_result stek_options_add_server(stek_options *o, const char *address);

/* The CA (PEM file) that issued the service's TLS certificate. Required. */
STEK_API stek_result stek_options_set_ca(stek_options *o, const char *ca_pem_path);

/*
 * The host's client certificate (PEM chain) and its private key, used for
 * mutual TLS and to sign key-set requests. Required. The key is EC
 * P-256/P-384 or RSA 2048..8192, and key_pem_path is either a PEM file or
 * a pkcs11: URI (RFC 7512) naming the key in a token, e.g.
 * "pkcs11:token=host;object=tls;type=private?pin-source=file:/etc/stek/pin".
 * A token key is reached through OpenSSL's pkcs11 engine (package
 * libengine-pkcs11-openssl), which finds the module through p11-kit; the
 * PIN comes from the URI only (pin-source or pin-value). Its operations run
 * in the token; stek_client_new fails with IO when the key cannot be found
 * or the token refuses the PIN.
 */
STEK_API stek_result stek_options_set_cert(stek_options *o, const char *cert_pem_path,
                                           const char *key_pem_path);

/*
 * Pins a service signing public key (PEM SubjectPublicKeyInfo, as `stekctl
 * init` prints it). Call once per key: replicas with separate HSMs have
 * separate keys, and a set must verify under one of them. At least one is
 * required. INVALID_ARGUMENT beyond STEK_MAX_SERVICE_KEYS.
 */
STEK_API stek_result stek_options_set_service_key(stek_options *o, const char *pub_pem_path);

/*
 * The default group: the one whose keys this client fetches, and which
 * serves connections whose server name is not mapped to another group (or
 * that send none). Required; [a-z0-9._-], 1..64 bytes.
 */
STEK_API stek_result stek_options_set_group(stek_options *o, const char *group);

/*
 * Adds a further group, for several groups on one listener (virtual hosts):
 * the client fetches and watches its keys too (one background thread and
 * one WatchKeySet stream per group), and connections whose server name is
 * mapped to it (stek_options_map_server_name) use its keys. Adding a group
 * twice, or the default group, is a no-op. The host certificate must be
 * allowed by every group's policy in stekd. Returns OK; INVALID_ARGUMENT
 * for a bad name or more than STEK_MAX_GROUPS - 1 further groups;
 * NO_MEMORY.
 */
STEK_API stek_result stek_options_add_group(stek_options *o, const char *group);

/*
 * Maps a TLS server name (SNI), exactly but case-insensitively (no
 * wildcards), to a group: the default group or one added with
 * stek_options_add_group (checked by stek_client_new, which returns CONFIG
 * for a name mapped to a group that is neither). Connections with that
 * server name get tickets under that group's keys, and resume only tickets
 * of that group: a ticket of another of the client's groups is a full
 * handshake (counted as miss_other_group). Unmapped names and connections
 * without SNI belong to the default group. Mapping a name again replaces
 * its group. Returns OK; INVALID_ARGUMENT for an empty name, one longer
 * than STEK_SERVER_NAME_MAX_BYTES, a bad group name or more than
 * STEK_MAX_SERVER_NAMES names; NO_MEMORY.
 */
STEK_API stek_result stek_options_map_server_name(stek_options *o, const char *server_name,
                                                  const char *group);

/* Optional: the name checked against the service's certificate instead of
 * the host part of each address. NULL clears it. */
STEK_API stek_result stek_options_set_server_name(stek_options *o, const char *name);

/*
 * Optional: a directory (existing, writable by the process) for the
 * anti-rollback high-water mark: the highest key generation accepted, one
 * small file per group, written atomically with mode 0600. It holds no key.
 * NULL (the default) keeps the mark in memory only, so a restarted process
 * could be fed an older generation.
 */
STEK_API stek_result stek_options_set_state_dir(stek_options *o, const char *dir);

/*
 * Optional, off by default: the sealed cache. After every key set it
 * accepts, the client writes its installed keys, sealed, to cache_path
 * (atomically: a temporary file in the same directory, mode 0600, synced,
 * renamed over, directory synced). A client created while every service
 * replica is down then loads them from there and is ready at once, so
 * tickets issued before a restart still resume; sets fetched later
 * supersede them. Without this option nothing about keys is written
 * anywhere.
 *
 * sealing_key is a PEM private key file or a pkcs11: URI of a private key
 * in a token (as for stek_options_set_cert): EC P-256, or RSA of at least
 * 2048 bits. Writing uses only its public half (ephemeral ECDH + HKDF-SHA256,
 * or a random data key wrapped with RSA-OAEP-SHA256; AES-256-GCM), so the
 * token is used only to unseal, once, in stek_client_new. A sealing key
 * file on the same disk as the cache lets whoever reads the disk unseal
 * it: prefer a key in a token, or a key file on tmpfs.
 *
 * At stek_client_new a missing file is normal. A file that is corrupt or
 * truncated, sealed under another key or tampered with, made for another
 * host certificate, below a group's high-water mark (stek_options_set_state_dir)
 * or whose keys are all past their decrypt deadline is rejected: logged
 * with its reason, counted (cache_rejected), and not used; the client
 * starts anyway. Keys past their deadline are never installed.
 *
 * Both NULL disables the cache. Returns OK; INVALID_ARGUMENT when only one
 * is NULL, or for an empty or over-long string; NO_MEMORY. The key is read
 * by stek_client_new (IO when it cannot be read, CRYPTO when it is not a
 * usable key).
 */
STEK_API stek_result stek_options_set_cache(stek_options *o, const char *cache_path,
                                            const char *sealing_key);

/*
 * Allows TLS 1.3 early data (0-RTT) on attached contexts. Default false:
 * stek_client_attach sets max_early_data to 0, because a ClientHello with
 * early data is replayable on every server sharing the keys (RFC 8446 §8).
 */
STEK_API stek_result stek_options_allow_early_data(stek_options *o, bool allow);

/*
 * Whether stek_client_attach keeps the application's own session-id
 * context. Default false: attach sets SHA-256("stek-sid-v1" || default
 * group),
 * because OpenSSL 3.0 offers no way to read a context's session-id context
 * back, so libstek cannot tell whether the application set one. With true,
 * the application sets it itself, identically on every server of the group
 * (otherwise tickets from another server do not resume).
 */
STEK_API stek_result stek_options_keep_session_id_context(stek_options *o, bool keep);

/* ---- client -------------------------------------------------------------------- */

/*
 * Creates a client from o: reads and checks the key files, the CA and the
 * state directory's high-water marks, and starts its background threads
 * (one per group), which fetch and watch the groups' keys, and one that
 * reports to stekd what the client holds (per group: generation, current
 * epoch, key names and the ticket counters below; never key material), for
 * `stekctl fleet` and stekd's metrics: after each set accepted and every
 * 10 s, over the same connections; a failed report changes nothing. Returns
 * at once (no network wait); see stek_client_wait_ready.
 * With the sealed cache set (stek_options_set_cache), it also loads the
 * cache file, if any, and installs its keys that are still live (no
 * network either): the client may then be ready on return.
 * Returns OK and *out (stek_client_free); CONFIG when a required option is
 * missing or a server name is mapped to a group not added; IO when a file cannot be read, or the
 * high-water mark file is corrupt; CRYPTO when a key is unusable; NO_MEMORY.
 * A rejected cache file is not an error (see stek_options_set_cache).
 *
 * TEST ONLY, not part of the API: the environment variable
 * STEK_TEST_CLOCK_OFFSET_MS (milliseconds, may be negative, at most a day),
 * read once here, shifts this client's wall clock (its epoch checks, key
 * deadlines and cache times; a warning is logged), so that tests can run
 * hosts with skewed clocks in one process. Never set it in production.
 */
STEK_API stek_result stek_client_new(const stek_options *o, stek_client **out);

/*
 * Waits up to timeout_ms (>= 0) until a key that can encrypt is installed,
 * for every group of the client. Returns OK, or TIMEOUT. Handshakes on an attached context work
 * either way: without a key they are full handshakes without a ticket. Thread-safe.
 */
STEK_API stek_result stek_client_wait_ready(stek_client *c, int timeout_ms);

/*
 * Attaches the client to ctx, which must be the listener's initial SSL_CTX:
 * the one passed to SSL_new. OpenSSL calls the ticket callbacks of that
 * context even after an SNI callback switched the connection to another
 * one (SSL_set_SSL_CTX), so contexts switched to need nothing from
 * libstek; the group still follows the server name. It:
 *   - installs the ticket key callback (SSL_CTX_set_tlsext_ticket_key_evp_cb)
 *     and the ticket generate and decrypt callbacks
 *     (SSL_CTX_set_session_ticket_cb, which the application must then not
 *     set itself);
 *   - caps SSL_CTX_set_timeout at the keys' decrypt lifetime L (when known:
 *     call stek_client_wait_ready first; in any case each ticket's session
 *     timeout is capped at the remaining life of its key);
 *   - sets max_early_data to 0 unless stek_options_allow_early_data;
 *   - sets the session-id context to SHA-256("stek-sid-v1" || default group)
 *     unless stek_options_keep_session_id_context: every server of a group
 *     must use the same one, or resumed sessions are refused. With several
 *     groups it is still the default group's (it belongs to the SSL_CTX,
 *     not to a group): groups are kept apart by their own keys, and by the
 *     callback accepting only the tickets of the connection's group.
 * On each handshake the callback picks the connection's group from its
 * server name (SSL_get_servername, through the map; the default group
 * otherwise), encrypts with that group's current key, and decrypts only
 * tickets of that group.
 * The client takes a reference on ctx and detaches from it (removing both
 * callbacks) in stek_client_free, so either may be freed first, but no
 * handshake may run on ctx while stek_client_free runs. A context takes one
 * client; a client takes up to 8 contexts.
 * Returns OK; ALREADY when ctx has a client; INVALID_ARGUMENT; CRYPTO;
 * INTERNAL.
 * Call it before ctx serves handshakes (it changes ctx, which OpenSSL does
 * not make thread-safe).
 */
STEK_API stek_result stek_client_attach(stek_client *c, SSL_CTX *ctx);

/* Fills *out with the counters. Thread-safe; never blocks. */
STEK_API stek_result stek_client_get_counters(const stek_client *c, stek_counters *out);

/*
 * Stops the background threads (within about a second; a report in flight
 * is cancelled), detaches from every attached context (which then issue no
 * tickets and resume none of ours), drops its references to them, cleanses
 * every key and frees the client.
 * No handshake may run on an attached context during the call. Not
 * thread-safe with any other call on c. NULL is a no-op.
 */
STEK_API void stek_client_free(stek_client *c);

#ifdef __cplusplus
}
#endif

#endif
