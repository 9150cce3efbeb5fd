/*
 * libstek's public API (include/stek/stek.h): options, the client and its
 * background thread, and the OpenSSL ticket callbacks.
 *
 * Threads:
 *   - one background thread per group fetches, accepts, publishes,
 *     republishes (expiry) and persists that group's keys; the keyring
 *     has one writer at a time, so they serialize every keyring write (and
 *     the writer-side peek) under `wmu`;
 *   - handshake threads run the ticket callbacks: they read the keyring
 *     (lock-free, keyring.h) and bump atomic counters, nothing else;
 *   - the application's thread runs new / wait_ready / attach / free.
 * Shared mutable state is either atomic (counters, flags) or under `mu`
 * (the ready flag's condition variable, the stop flag's wake-up).
 */
#include "stek/stek.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <strings.h>

#include "accept.h"
#include "atomic_file.h"
#include "cache.h"
#include "keyring.h"
#include "log.h"
#include "p11engine.h"
#include "stek_client_internal.h"
#include "transport.h"
#include "stek/v1/stek.pb-c.h"

#define COMPONENT "libstek"
#define NONCE_BYTES 32
/* A new ephemeral key (and nonce, and signed request) at least this often. */
#define EPH_MAX_AGE_NS (24LL * 3600 * 1000000000LL)
/* How long one stream read waits: bounds how late stop and expiry are seen. */
#define READ_SLICE_MS 250
/* Before the first heartbeat says otherwise. */
#define DEFAULT_HEARTBEAT_NS (30LL * 1000000000LL)
#define BACKOFF_MIN_MS 200
#define BACKOFF_MAX_MS 30000
#define SID_CTX_LABEL "stek-sid-v1"

_Static_assert(STEK_REJECTED_COUNT == (int)STEK_REJECT_COUNT, "public rejection reasons");
_Static_assert(STEK_REJECTED_NAME == (int)STEK_REJECT_NAME, "public rejection reasons");
_Static_assert(STEK_KEY_NAME_BYTES == STEK_RING_NAME_BYTES, "name size");
_Static_assert(STEK_GROUP_NAME_MAX_BYTES == STEK_GROUP_MAX_BYTES, "group size");
_Static_assert(STEK_MAX_GROUPS <= STEK_RING_MAX_GROUPS, "groups per snapshot");

/* ---- results ------------------------------------------------------------------- */

static stek_result result_of(stek_status st)
{
    switch (st) {
    case STEK_OK:
        return STEK_RESULT_OK;
    case STEK_ERR_INVALID_ARG:
        return STEK_RESULT_INVALID_ARGUMENT;
    case STEK_ERR_NOMEM:
        return STEK_RESULT_NO_MEMORY;
    case STEK_ERR_IO:
    case STEK_ERR_NOT_FOUND: /* a key missing from its token */
        return STEK_RESULT_IO;
    case STEK_ERR_CONFIG:
        return STEK_RESULT_CONFIG;
    case STEK_ERR_CRYPTO:
    case STEK_ERR_VERIFY:
    case STEK_ERR_BAD_POINT:
        return STEK_RESULT_CRYPTO;
    default:
        return STEK_RESULT_INTERNAL;
    }
}

const char *stek_result_name(stek_result r)
{
    static const char *const names[] = {
        [STEK_RESULT_OK] = "STEK_RESULT_OK",
        [STEK_RESULT_INVALID_ARGUMENT] = "STEK_RESULT_INVALID_ARGUMENT",
        [STEK_RESULT_NO_MEMORY] = "STEK_RESULT_NO_MEMORY",
        [STEK_RESULT_IO] = "STEK_RESULT_IO",
        [STEK_RESULT_CONFIG] = "STEK_RESULT_CONFIG",
        [STEK_RESULT_CRYPTO] = "STEK_RESULT_CRYPTO",
        [STEK_RESULT_TIMEOUT] = "STEK_RESULT_TIMEOUT",
        [STEK_RESULT_ALREADY] = "STEK_RESULT_ALREADY",
        [STEK_RESULT_INTERNAL] = "STEK_RESULT_INTERNAL",
    };
    if ((unsigned)r < sizeof(names) / sizeof(names[0]) && names[r] != NULL)
        return names[r];
    return "STEK_RESULT_UNKNOWN";
}

/* ---- options ------------------------------------------------------------------- */

struct stek_options {
    char *servers[STEK_MAX_SERVERS];
    size_t n_servers;
    char *service_keys[STEK_MAX_SERVICE_KEYS];
    size_t n_service_keys;
    char *ca, *cert, *key, *group, *server_name, *state_dir;
    char *extra_groups[STEK_MAX_GROUPS];
    size_t n_extra_groups;
    char *map_names[STEK_MAX_SERVER_NAMES], *map_groups[STEK_MAX_SERVER_NAMES];
    size_t n_map;
    bool early_data;
    bool keep_sid_ctx;
    char *cache_path, *sealing_key; /* both or neither */
};

stek_result stek_options_new(stek_options **out)
{
    if (out == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    *out = calloc(1, sizeof(**out));
    return *out != NULL ? STEK_RESULT_OK : STEK_RESULT_NO_MEMORY;
}

void stek_options_free(stek_options *o)
{
    if (o == NULL)
        return;
    for (size_t i = 0; i < o->n_servers; i++)
        free(o->servers[i]);
    for (size_t i = 0; i < o->n_service_keys; i++)
        free(o->service_keys[i]);
    free(o->ca);
    free(o->cert);
    free(o->key);
    free(o->group);
    for (size_t i = 0; i < o->n_extra_groups; i++)
        free(o->extra_groups[i]);
    for (size_t i = 0; i < o->n_map; i++) {
        free(o->map_names[i]);
        free(o->map_groups[i]);
    }
    free(o->server_name);
    free(o->state_dir);
    free(o->cache_path);
    free(o->sealing_key);
    free(o);
}

/* Replaces *slot with a copy of s (NULL clears when allow_null). */
static stek_result set_str(char **slot, const char *s, bool allow_null)
{
    if (s == NULL && !allow_null)
        return STEK_RESULT_INVALID_ARGUMENT;
    if (s != NULL && (s[0] == '\0' || strlen(s) > 4096))
        return STEK_RESULT_INVALID_ARGUMENT;
    char *copy = NULL;
    if (s != NULL && (copy = strdup(s)) == NULL)
        return STEK_RESULT_NO_MEMORY;
    free(*slot);
    *slot = copy;
    return STEK_RESULT_OK;
}

static stek_result add_str(char **arr, size_t *n, size_t max, const char *s)
{
    if (*n >= max)
        return STEK_RESULT_INVALID_ARGUMENT;
    char *slot = NULL;
    stek_result r = set_str(&slot, s, false);
    if (r == STEK_RESULT_OK)
        arr[(*n)++] = slot;
    return r;
}

stek_result stek_options_add_server(stek_options *o, const char *address)
{
    if (o == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    return add_str(o->servers, &o->n_servers, STEK_MAX_SERVERS, address);
}

stek_result stek_options_set_ca(stek_options *o, const char *ca_pem_path)
{
    return o == NULL ? STEK_RESULT_INVALID_ARGUMENT : set_str(&o->ca, ca_pem_path, false);
}

stek_result stek_options_set_cert(stek_options *o, const char *cert_pem_path,
                                  const char *key_pem_path)
{
    if (o == NULL || cert_pem_path == NULL || key_pem_path == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    stek_result r = set_str(&o->cert, cert_pem_path, false);
    return r != STEK_RESULT_OK ? r : set_str(&o->key, key_pem_path, false);
}

stek_result stek_options_set_service_key(stek_options *o, const char *pub_pem_path)
{
    if (o == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    return add_str(o->service_keys, &o->n_service_keys, STEK_MAX_SERVICE_KEYS, pub_pem_path);
}

stek_result stek_options_set_group(stek_options *o, const char *group)
{
    if (o == NULL || group == NULL || stek_group_name_check(group) != STEK_OK)
        return STEK_RESULT_INVALID_ARGUMENT;
    return set_str(&o->group, group, false);
}

stek_result stek_options_add_group(stek_options *o, const char *group)
{
    if (o == NULL || group == NULL || stek_group_name_check(group) != STEK_OK)
        return STEK_RESULT_INVALID_ARGUMENT;
    for (size_t i = 0; i < o->n_extra_groups; i++)
        if (strcmp(o->extra_groups[i], group) == 0)
            return STEK_RESULT_OK;
    return add_str(o->extra_groups, &o->n_extra_groups, STEK_MAX_GROUPS - 1, group);
}

stek_result stek_options_map_server_name(stek_options *o, const char *server_name,
                                         const char *group)
{
    if (o == NULL || server_name == NULL || group == NULL || server_name[0] == '\0' ||
        strlen(server_name) > STEK_SERVER_NAME_MAX_BYTES || stek_group_name_check(group) != STEK_OK)
        return STEK_RESULT_INVALID_ARGUMENT;
    for (size_t i = 0; i < o->n_map; i++)
        if (strcasecmp(o->map_names[i], server_name) == 0)
            return set_str(&o->map_groups[i], group, false); /* remapped */
    if (o->n_map >= STEK_MAX_SERVER_NAMES)
        return STEK_RESULT_INVALID_ARGUMENT;
    char *name = NULL, *grp = NULL;
    stek_result r = set_str(&name, server_name, false);
    if (r == STEK_RESULT_OK)
        r = set_str(&grp, group, false);
    if (r != STEK_RESULT_OK) {
        free(name);
        free(grp);
        return r;
    }
    o->map_names[o->n_map] = name;
    o->map_groups[o->n_map] = grp;
    o->n_map++;
    return STEK_RESULT_OK;
}

stek_result stek_options_set_server_name(stek_options *o, const char *name)
{
    return o == NULL ? STEK_RESULT_INVALID_ARGUMENT : set_str(&o->server_name, name, true);
}

stek_result stek_options_set_state_dir(stek_options *o, const char *dir)
{
    return o == NULL ? STEK_RESULT_INVALID_ARGUMENT : set_str(&o->state_dir, dir, true);
}

stek_result stek_options_set_cache(stek_options *o, const char *cache_path, const char *sealing_key)
{
    if (o == NULL || (cache_path == NULL) != (sealing_key == NULL))
        return STEK_RESULT_INVALID_ARGUMENT;
    char *path = NULL;
    stek_result r = set_str(&path, cache_path, true);
    if (r == STEK_RESULT_OK)
        r = set_str(&o->sealing_key, sealing_key, true);
    if (r != STEK_RESULT_OK) {
        free(path);
        return r;
    }
    free(o->cache_path);
    o->cache_path = path;
    return STEK_RESULT_OK;
}

stek_result stek_options_allow_early_data(stek_options *o, bool allow)
{
    if (o == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    o->early_data = allow;
    return STEK_RESULT_OK;
}

stek_result stek_options_keep_session_id_context(stek_options *o, bool keep)
{
    if (o == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    o->keep_sid_ctx = keep;
    return STEK_RESULT_OK;
}

/* ---- the client ------------------------------------------------------------------ */

#define MAX_ATTACHED 8

/*
 * One group: its background thread's own state (no other thread touches it
 * after new, but for the atomics).
 */
typedef struct stek_group_state {
    stek_client *c;
    size_t index; /* 0 is the default group */
    char name[STEK_GROUP_MAX_BYTES + 1];
    char *hwm_path; /* NULL: the high-water mark lives in memory only */
    uint64_t generation_hwm, current_epoch_hwm;
    stek_sched sched;
    bool sched_pinned;
    stek_host_eph *eph;
    uint8_t nonce[NONCE_BYTES];
    uint8_t *request; /* signed once per ephemeral key, resent as is */
    size_t request_len;
    int64_t eph_born; /* CLOCK_BOOTTIME ns */
    int64_t heartbeat_ns;
    pthread_t thread;
    bool thread_started;
    atomic_bool stream_up;
    atomic_uint_fast64_t lifetime_s; /* L of the newest accepted set; 0 = none */
    stek_sched cache_sched;          /* sched as the cache records it: under the client's cmu */
} stek_group_state;

/* Server name -> group, immutable after new: read by the callbacks. */
typedef struct stek_sni_map {
    char name[STEK_SERVER_NAME_MAX_BYTES + 1];
    size_t len;
    size_t group; /* index into groups */
} stek_sni_map;

struct stek_client {
    stek_keyring *ring;
    bool early_data, keep_sid_ctx;
    EVP_CIPHER *aes; /* fetched once: no implicit fetch per handshake */

    stek_group_state groups[STEK_MAX_GROUPS];
    size_t n_groups;
    stek_sni_map *map; /* n_map entries */
    size_t n_map;

    /* Shared by the group threads, read-only after new (a transport takes
     * concurrent streams: transport.h). */
    stek_transport *transports[STEK_MAX_SERVERS];
    char *targets[STEK_MAX_SERVERS];
    size_t n_transports;
    EVP_PKEY *service_pubs[STEK_MAX_SERVICE_KEYS];
    size_t n_service_pubs;
    EVP_PKEY *cert_key;
    /* The certificate's typed SANs: a set must name one of them. */
    char *identities[STEK_MAX_CERT_IDENTITIES];
    size_t n_identities;

    /* Attached contexts, each with one reference (detached at free). */
    SSL_CTX *attached[MAX_ATTACHED];
    size_t n_attached;

    /* The sealed cache (cache_path NULL: off). Only the public half of the
     * sealing key is kept: writing never touches a token. */
    char *cache_path;
    EVP_PKEY *sealing_pub;
    uint8_t host_id[STEK_CACHE_HOST_ID_BYTES];
    pthread_mutex_t cmu; /* one cache writer at a time; taken before wmu */

    pthread_mutex_t wmu; /* one keyring writer at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* ready or stop changed */
    atomic_bool stop;
    atomic_bool ready;

    /* Counters: relaxed atomics, read one by one. */
    atomic_uint_fast64_t tickets_issued, tickets_stale, tickets_resumed, tickets_renewed;
    atomic_uint_fast64_t miss_unknown, miss_expired, miss_other_generation, no_key_encrypts;
    atomic_uint_fast64_t miss_other_group, miss_bad_mac;
    atomic_uint_fast64_t sets_accepted, sets_rejected, sets_rejected_by[STEK_REJECT_COUNT];
    atomic_uint_fast64_t current_epoch, generation;
    atomic_int_fast64_t last_fetch_unix;
    atomic_uint_fast64_t cache_loaded, cache_rejected, cache_write_errors;

    /* Fleet reports to stekd (ReportStatus): the "fleet reports" section at
     * the end of this file. NULL: not reporting. */
    struct stek_reporter *rep;

    /* TEST ONLY: STEK_TEST_CLOCK_OFFSET_MS, read once in stek_client_new, so
     * that fault tests can run hosts whose wall clocks disagree in one
     * process. 0 in production. */
    int64_t test_clock_offset_ns;
};

static void bump(atomic_uint_fast64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

static bool stopping(stek_client *c)
{
    return atomic_load(&c->stop);
}

/*
 * TEST ONLY: the client's wall clock, shifted by STEK_TEST_CLOCK_OFFSET_MS
 * (like stekd's STEKD_TEST_CLOCK_OFFSET). Every wall-clock reading of the
 * client goes through here: the epoch checks of a set, the base of its
 * keys' deadlines, the cache's times. The ticket callback reads only
 * CLOCK_BOOTTIME deadlines, so the hot path is unchanged.
 */
static int64_t wall_ns(const stek_client *c)
{
    return stek_walltime_ns() + c->test_clock_offset_ns;
}

static void test_clock_offset_read(stek_client *c)
{
    const char *v = getenv("STEK_TEST_CLOCK_OFFSET_MS");
    long long ms = v != NULL ? strtoll(v, NULL, 10) : 0;
    if (ms == 0 || ms < -86400000LL || ms > 86400000LL)
        return;
    c->test_clock_offset_ns = (int64_t)ms * 1000000LL;
    stek_log(STEK_LOG_WARN, COMPONENT, "test clock offset of %lld ms is in effect", ms);
}

/* ---- high-water mark file -------------------------------------------------------- */

static stek_status hwm_read(const char *path, uint64_t *out)
{
    stek_status st = STEK_OK;
    char buf[32] = {0};
    *out = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        if (errno == ENOENT)
            return STEK_OK; /* never written: no mark yet */
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", path, strerror(errno));
    }
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    STEK_ENSURE_GOTO(n > 0, STEK_ERR_IO);
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(buf, &end, 10);
    STEK_ENSURE_GOTO(errno == 0 && end != buf && (*end == '\n' || *end == '\0'), STEK_ERR_IO);
    *out = v;
done:
    close(fd);
    return st;
}

/* Replaced atomically (atomic_file.h): a crash leaves the old mark or the new. */
static stek_status hwm_write(const char *path, uint64_t v)
{
    char buf[32];
    int len = snprintf(buf, sizeof(buf), "%llu\n", (unsigned long long)v);
    return stek_file_replace(path, buf, (size_t)len);
}

/* ---- creation -------------------------------------------------------------------- */

static stek_status read_pem_key(const char *path, bool private_key, EVP_PKEY **out)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", path, strerror(errno));
    *out = private_key ? PEM_read_PrivateKey(f, NULL, NULL, NULL)
                       : PEM_read_PUBKEY(f, NULL, NULL, NULL);
    fclose(f);
    if (*out == NULL)
        STEK_BAIL(STEK_ERR_CRYPTO, "%s: not a PEM %s key", path,
                  private_key ? "private" : "public");
    return STEK_OK;
}

/* A PEM private key file, or a pkcs11: URI of a key in a token. */
static stek_status load_private_key(const char *spec, EVP_PKEY **out)
{
    if (stek_p11engine_is_uri(spec))
        return stek_p11engine_load_private_key(spec, out);
    return read_pem_key(spec, true, out);
}

static void *run(void *arg);
static void stop_threads(stek_client *c);
/* Fleet reports (the section at the end of this file). */
static void report_start(stek_client *c);
static void report_stop(stek_client *c);
static void report_request(stek_group_state *g);
static void report_due(stek_group_state *g);
static void report_replica(stek_group_state *g, size_t replica);
static void cache_load(stek_client *c, EVP_PKEY *sealing_priv);

static long group_of(const stek_client *c, const char *name)
{
    for (size_t i = 0; i < c->n_groups; i++)
        if (strcmp(c->groups[i].name, name) == 0)
            return (long)i;
    return -1;
}

/*
 * The sealed cache: the host identity it is bound to, the public half of
 * the sealing key, and the file's keys installed if it passes. The private
 * half is used for that one load and freed.
 */
static stek_status cache_init(stek_client *c, const stek_options *o)
{
    stek_status st = STEK_OK;
    EVP_PKEY *priv = NULL;
    c->cache_path = strdup(o->cache_path);
    STEK_ENSURE(c->cache_path != NULL, STEK_ERR_NOMEM);
    STEK_GUARD(stek_cache_host_id(o->cert, c->host_id));
    STEK_GUARD(load_private_key(o->sealing_key, &priv));
    st = stek_cache_sealing_public(priv, &c->sealing_pub);
    if (st == STEK_ERR_INVALID_ARG) { /* a key of another kind: not usable */
        char why[256];
        snprintf(why, sizeof(why), "%s", stek_error_detail());
        STEK_BAIL_GOTO(STEK_ERR_CRYPTO, "%s", why);
    }
    if (st != STEK_OK)
        goto done;
    cache_load(c, priv);
done:
    EVP_PKEY_free(priv);
    return st;
}

static stek_status client_init(stek_client *c, const stek_options *o)
{
    STEK_ENSURE(o->n_servers > 0 && o->ca != NULL && o->cert != NULL && o->key != NULL &&
                    o->group != NULL && o->n_service_keys > 0,
                STEK_ERR_CONFIG);
    c->early_data = o->early_data;
    c->keep_sid_ctx = o->keep_sid_ctx;
    for (size_t i = 0; i <= o->n_extra_groups; i++) {
        const char *name = i == 0 ? o->group : o->extra_groups[i - 1];
        if (group_of(c, name) >= 0)
            continue; /* the default group added again */
        STEK_ENSURE(c->n_groups < STEK_MAX_GROUPS, STEK_ERR_CONFIG);
        stek_group_state *g = &c->groups[c->n_groups];
        g->c = c;
        g->index = c->n_groups++;
        snprintf(g->name, sizeof(g->name), "%s", name);
        g->heartbeat_ns = DEFAULT_HEARTBEAT_NS;
    }
    if (o->n_map > 0) {
        c->map = calloc(o->n_map, sizeof(*c->map));
        STEK_ENSURE(c->map != NULL, STEK_ERR_NOMEM);
    }
    for (size_t i = 0; i < o->n_map; i++) {
        long g = group_of(c, o->map_groups[i]);
        if (g < 0)
            STEK_BAIL(STEK_ERR_CONFIG, "server name %s maps to group %s, which is not added",
                      o->map_names[i], o->map_groups[i]);
        stek_sni_map *m = &c->map[c->n_map++];
        snprintf(m->name, sizeof(m->name), "%s", o->map_names[i]);
        m->len = strlen(m->name);
        m->group = (size_t)g;
    }
    for (size_t i = 0; i < o->n_service_keys; i++) {
        STEK_GUARD(read_pem_key(o->service_keys[i], false, &c->service_pubs[i]));
        c->n_service_pubs++;
    }
    STEK_GUARD(load_private_key(o->key, &c->cert_key));
    STEK_GUARD(stek_cert_identities(o->cert, c->identities, &c->n_identities));
    c->aes = EVP_CIPHER_fetch(NULL, "AES-256-CBC", NULL);
    STEK_ENSURE(c->aes != NULL, STEK_ERR_CRYPTO);
    for (size_t i = 0; o->state_dir != NULL && i < c->n_groups; i++) {
        stek_group_state *g = &c->groups[i];
        size_t len = strlen(o->state_dir) + strlen(g->name) + 32;
        g->hwm_path = malloc(len);
        STEK_ENSURE(g->hwm_path != NULL, STEK_ERR_NOMEM);
        snprintf(g->hwm_path, len, "%s/%s.generation", o->state_dir, g->name);
        STEK_GUARD(hwm_read(g->hwm_path, &g->generation_hwm));
    }
    for (size_t i = 0; i < o->n_servers; i++) {
        stek_transport_opts to = {
            .target = o->servers[i],
            .ca_pem_path = o->ca,
            .cert_pem_path = o->cert,
            .key_pem_path = o->key,
            .server_name_override = o->server_name,
            .max_reconnect_backoff_ms = 1000,
        };
        c->targets[i] = strdup(o->servers[i]);
        STEK_ENSURE(c->targets[i] != NULL, STEK_ERR_NOMEM);
        STEK_GUARD(stek_transport_open(&to, &c->transports[i]));
        c->n_transports++;
    }
    STEK_GUARD(stek_keyring_new(&c->ring));
    if (o->cache_path != NULL)
        STEK_GUARD(cache_init(c, o));
    return STEK_OK;
}

static void client_destroy(stek_client *c)
{
    for (size_t i = 0; i < c->n_attached; i++) {
        /* Detach: a context that outlives us gets no ticket callback. */
        SSL_CTX_set_tlsext_ticket_key_evp_cb(c->attached[i], NULL);
        SSL_CTX_set_session_ticket_cb(c->attached[i], NULL, NULL, NULL);
        SSL_CTX_free(c->attached[i]);
    }
    stek_keyring_free(c->ring); /* cleanses every installed key */
    for (size_t i = 0; i < STEK_MAX_SERVERS; i++) {
        stek_transport_close(c->transports[i]);
        free(c->targets[i]);
    }
    for (size_t i = 0; i < c->n_service_pubs; i++)
        EVP_PKEY_free(c->service_pubs[i]);
    EVP_PKEY_free(c->cert_key);
    for (size_t i = 0; i < c->n_identities; i++)
        free(c->identities[i]);
    EVP_PKEY_free(c->sealing_pub);
    free(c->cache_path);
    EVP_CIPHER_free(c->aes);
    for (size_t i = 0; i < c->n_groups; i++) {
        stek_group_state *g = &c->groups[i];
        stek_host_eph_free(g->eph);
        stek_cleanse(g->nonce, sizeof(g->nonce));
        free(g->request);
        free(g->hwm_path);
    }
    free(c->map);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->wmu);
    pthread_mutex_destroy(&c->cmu);
    free(c);
}

stek_result stek_client_new(const stek_options *o, stek_client **out)
{
    if (o == NULL || out == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    *out = NULL;
    stek_client *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return STEK_RESULT_NO_MEMORY;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->wmu, NULL);
    pthread_mutex_init(&c->cmu, NULL);
    test_clock_offset_read(c); /* TEST ONLY; before the cache is loaded */
    stek_status st = client_init(c, o);
    if (st != STEK_OK) {
        stek_log(STEK_LOG_ERROR, COMPONENT, "client: %s: %s", stek_status_name(st),
                 stek_error_detail());
        client_destroy(c);
        return result_of(st);
    }
    report_start(c); /* before the group threads, which feed it */
    for (size_t i = 0; i < c->n_groups; i++) {
        if (pthread_create(&c->groups[i].thread, NULL, run, &c->groups[i]) != 0) {
            stop_threads(c);
            client_destroy(c);
            return STEK_RESULT_NO_MEMORY;
        }
        c->groups[i].thread_started = true;
    }
    *out = c;
    return STEK_RESULT_OK;
}

/* Stops every group thread (each sees the flag within a read slice), then the reporter. */
static void stop_threads(stek_client *c)
{
    pthread_mutex_lock(&c->mu);
    atomic_store(&c->stop, true);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    for (size_t i = 0; i < c->n_groups; i++)
        if (c->groups[i].thread_started) {
            pthread_join(c->groups[i].thread, NULL);
            c->groups[i].thread_started = false;
        }
    /* Last: the group threads feed it; it uses the transports and the
     * keyring, which outlive this call. */
    report_stop(c);
}

void stek_client_free(stek_client *c)
{
    if (c == NULL)
        return;
    stop_threads(c);
    client_destroy(c);
}

static struct timespec mono_after(int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

stek_result stek_client_wait_ready(stek_client *c, int timeout_ms)
{
    if (c == NULL || timeout_ms < 0)
        return STEK_RESULT_INVALID_ARGUMENT;
    struct timespec until = mono_after(timeout_ms);
    pthread_mutex_lock(&c->mu);
    while (!atomic_load(&c->ready))
        if (pthread_cond_timedwait(&c->cv, &c->mu, &until) == ETIMEDOUT)
            break;
    bool ready = atomic_load(&c->ready);
    pthread_mutex_unlock(&c->mu);
    return ready ? STEK_RESULT_OK : STEK_RESULT_TIMEOUT;
}

stek_result stek_client_get_counters(const stek_client *cc, stek_counters *out)
{
    if (cc == NULL || out == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    stek_client *c = (stek_client *)cc; /* atomic loads take non-const pointers */
    memset(out, 0, sizeof(*out));
    out->tickets_issued = atomic_load(&c->tickets_issued);
    out->tickets_stale = atomic_load(&c->tickets_stale);
    out->tickets_resumed = atomic_load(&c->tickets_resumed);
    out->tickets_renewed = atomic_load(&c->tickets_renewed);
    out->miss_unknown = atomic_load(&c->miss_unknown);
    out->miss_expired = atomic_load(&c->miss_expired);
    out->miss_other_generation = atomic_load(&c->miss_other_generation);
    out->miss_other_group = atomic_load(&c->miss_other_group);
    out->miss_bad_mac = atomic_load(&c->miss_bad_mac);
    out->no_key_encrypts = atomic_load(&c->no_key_encrypts);
    out->sets_accepted = atomic_load(&c->sets_accepted);
    out->sets_rejected = atomic_load(&c->sets_rejected);
    for (size_t i = 0; i < STEK_REJECT_COUNT; i++)
        out->sets_rejected_by[i] = atomic_load(&c->sets_rejected_by[i]);
    out->current_epoch = atomic_load(&c->current_epoch);
    out->generation = atomic_load(&c->generation);
    out->last_fetch_unix = atomic_load(&c->last_fetch_unix);
    out->stream_up = c->n_groups > 0;
    for (size_t i = 0; i < c->n_groups; i++)
        out->stream_up = out->stream_up && atomic_load(&c->groups[i].stream_up);
    out->ready = atomic_load(&c->ready);
    out->cache_loaded = atomic_load(&c->cache_loaded);
    out->cache_rejected = atomic_load(&c->cache_rejected);
    out->cache_write_errors = atomic_load(&c->cache_write_errors);
    return STEK_RESULT_OK;
}

/* Internal (stek_client_internal.h), not STEK_API: hidden in the shared libstek. */
stek_keyring *stek_client_keyring(stek_client *c)
{
    return c != NULL ? c->ring : NULL;
}

/* ---- the ticket callbacks ---------------------------------------------------------- */

static int ex_index = -1;
static pthread_once_t ex_once = PTHREAD_ONCE_INIT;

static void ex_init(void)
{
    ex_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static bool mac_init(EVP_MAC_CTX *hctx, const uint8_t *hmac_key)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)hmac_key,
                                          STEK_RING_HMAC_BYTES),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    return EVP_MAC_CTX_set_params(hctx, params) == 1;
}

/*
 * The server name the client sent: SSL_get_servername, or while the
 * ClientHello is being processed (a TLS 1.2 ticket is decrypted before the
 * server_name extension is recorded) the extension itself. No allocation.
 */
static bool sni_of(SSL *s, const char **name, size_t *len)
{
    const char *n = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    if (n != NULL) {
        *name = n;
        *len = strlen(n);
        return true;
    }
    const unsigned char *p = NULL;
    size_t left = 0;
    if (SSL_client_hello_get0_ext(s, TLSEXT_TYPE_server_name, &p, &left) != 1 || left < 2)
        return false;
    size_t list = ((size_t)p[0] << 8) | p[1];
    p += 2;
    left -= 2;
    if (list > left)
        return false;
    left = list;
    while (left >= 3) {
        size_t l = ((size_t)p[1] << 8) | p[2];
        if (l > left - 3)
            return false;
        if (p[0] == TLSEXT_NAMETYPE_host_name) {
            *name = (const char *)p + 3;
            *len = l;
            return true;
        }
        p += 3 + l;
        left -= 3 + l;
    }
    return false;
}

/* The group of this connection: its server name's, or the default group. */
static const char *conn_group(const stek_client *c, SSL *s)
{
    const char *name = NULL;
    size_t len = 0;
    if (c->n_map > 0 && sni_of(s, &name, &len))
        for (size_t i = 0; i < c->n_map; i++)
            if (c->map[i].len == len && strncasecmp(c->map[i].name, name, len) == 0)
                return c->groups[c->map[i].group].name;
    return c->groups[0].name;
}

/*
 * Which client a handshake belongs to. The callbacks run on the listener's
 * initial SSL_CTX (OpenSSL 3.0 calls them through s->session_ctx), but
 * SSL_get_SSL_CTX returns the context an SNI callback switched to, and 3.0
 * has no getter for the initial one. The generate and decrypt callbacks do
 * get our argument, and OpenSSL calls them on the same thread as, and
 * right around, the ticket key callback:
 *   encrypt: gen_cb, then ticket_cb(enc=1)   (one tls_construct_new_session_ticket)
 *   decrypt: ticket_cb(enc=0), then dec_cb   (one tls_decrypt_ticket)
 * So gen_cb leaves the client in a thread-local note for ticket_cb, and
 * ticket_cb leaves what it found for dec_cb. A note names its SSL, so a
 * stale note from another connection on the thread is never used. No lock
 * and no allocation. Decryption runs while the ClientHello is parsed,
 * before the SNI callback can switch contexts, so there SSL_get_SSL_CTX is
 * still the initial context.
 */
typedef struct cb_note {
    const SSL *s;
    stek_client *c;
    bool found;   /* decrypt: ticket_cb gave OpenSSL one of our keys */
    bool current; /* ... and it is the group's current key */
} cb_note;

static _Thread_local cb_note enc_note, dec_note;

static stek_client *client_of(const SSL *s, const cb_note *n)
{
    if (n->s == s && n->c != NULL)
        return n->c;
    return ex_index >= 0 ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), ex_index) : NULL;
}

/*
 * OpenSSL's ticket key callback. Return values (OpenSSL 3.0): encrypt 1 =
 * ticket made, 0 = no ticket (the handshake completes without one; -1
 * would abort it); decrypt 1 = use, 2 = use and renew, 0 = not ours (full
 * handshake). The snapshot is read under the keyring's read section only,
 * and the key bytes are copied into OpenSSL's contexts before it ends.
 * Resumptions are counted in dec_cb, once OpenSSL has checked the MAC.
 */
static int ticket_cb(SSL *s, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                     EVP_MAC_CTX *hctx, int enc)
{
    stek_client *c = client_of(s, enc ? &enc_note : &dec_note);
    if (!enc)
        dec_note = (cb_note){.s = s, .c = c, .found = false};
    if (c == NULL)
        return 0;
    unsigned slot;
    const stek_ring *r = stek_keyring_read_begin(c->ring, &slot);
    const int64_t now = stek_boottime_ns();
    int ret = 0;
    const char *group = conn_group(c, s);
    if (enc) {
        bool stale = false;
        int g = stek_ring_group_index(r, group);
        long i = g >= 0 ? stek_ring_encrypt_key(r, (uint32_t)g, now, &stale) : -1;
        if (i < 0) {
            bump(&c->no_key_encrypts);
            goto done;
        }
        const uint8_t *e = stek_ring_entry(r, (size_t)i);
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(c->aes)) != 1 ||
            EVP_EncryptInit_ex(cctx, c->aes, NULL, e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES,
                               iv) != 1 ||
            !mac_init(hctx, e + STEK_RING_NAME_BYTES)) {
            bump(&c->no_key_encrypts);
            goto done;
        }
        memcpy(key_name, e, STEK_RING_NAME_BYTES);
        bump(&c->tickets_issued);
        if (stale)
            bump(&c->tickets_stale);
        ret = 1;
    } else {
        long i = -1;
        stek_ring_lookup l = stek_ring_decrypt_key(r, key_name, now, &i);
        switch (l) {
        case STEK_RING_FOUND_CURRENT:
        case STEK_RING_FOUND_OTHER: {
            if (strcmp(r->groups[r->keys[i].group].name, group) != 0) {
                /* Another group's ticket under this server name: it
                 * resumes only within its own group. */
                bump(&c->miss_other_group);
                goto done;
            }
            const uint8_t *e = stek_ring_entry(r, (size_t)i);
            if (EVP_DecryptInit_ex(cctx, c->aes, NULL,
                                   e + STEK_RING_NAME_BYTES + STEK_RING_HMAC_BYTES, iv) != 1 ||
                !mac_init(hctx, e + STEK_RING_NAME_BYTES))
                goto done; /* cannot decrypt: a full handshake */
            dec_note.found = true;
            dec_note.current = l == STEK_RING_FOUND_CURRENT;
            /* 2 (renew) for any other key, and always under TLS 1.3, as
             * OpenSSL's built-in keys do there: a client should not reuse
             * one ticket for many connections (RFC 8446 C.4). */
            ret = dec_note.current && SSL_version(s) != TLS1_3_VERSION ? 1 : 2;
            break;
        }
        case STEK_RING_MISS_EXPIRED:
            bump(&c->miss_expired);
            break;
        case STEK_RING_MISS_OTHER_GENERATION:
            bump(&c->miss_other_generation);
            break;
        case STEK_RING_MISS_UNKNOWN:
        default:
            bump(&c->miss_unknown);
            break;
        }
    }
done:
    stek_keyring_read_end(c->ring, slot);
    if (enc)
        enc_note = (cb_note){0};
    return ret;
}

/*
 * OpenSSL's verdict on a ticket, after the MAC check and the session's
 * decoding (SSL_CTX_set_session_ticket_cb): counts resumptions that really
 * happen, and tickets under one of our keys whose MAC failed (forged or
 * corrupted in transit). The returns keep OpenSSL's own behaviour for each
 * status (SSL_CTX_set_session_ticket_cb(3)): use what decrypted, renew
 * when the key cb asked, and a fresh ticket after a failed one.
 */
static SSL_TICKET_RETURN dec_cb(SSL *s, SSL_SESSION *ss, const unsigned char *keyname,
                                size_t keyname_len, SSL_TICKET_STATUS status, void *arg)
{
    (void)ss;
    (void)keyname;
    (void)keyname_len;
    stek_client *c = arg;
    const bool ours = dec_note.s == s && dec_note.found;
    const bool current = ours && dec_note.current;
    dec_note = (cb_note){0};
    switch (status) {
    case SSL_TICKET_SUCCESS:
    case SSL_TICKET_SUCCESS_RENEW:
        /* Counted by the key, not by the renewal: TLS 1.3 renews always. */
        if (c != NULL)
            bump(current ? &c->tickets_resumed : &c->tickets_renewed);
        return status == SSL_TICKET_SUCCESS ? SSL_TICKET_RETURN_USE : SSL_TICKET_RETURN_USE_RENEW;
    case SSL_TICKET_NO_DECRYPT:
        if (ours && c != NULL)
            bump(&c->miss_bad_mac);
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    case SSL_TICKET_EMPTY:
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    case SSL_TICKET_NONE:
        return SSL_TICKET_RETURN_IGNORE;
    default: /* SSL_TICKET_FATAL_ERR_*: OpenSSL's own failure */
        return SSL_TICKET_RETURN_ABORT;
    }
}

/*
 * Runs before each ticket is made (OpenSSL 3.0 calls the generate callback
 * before it serializes the session). The ticket key callback itself comes
 * too late to change the session's timeout (the session is already
 * encoded), so the cap is applied here: at most L, and at most the
 * remaining decrypt life of the key that will encrypt it (which is less
 * than L only while encrypting with a stale key during an outage:
 * decrypt_until - now).
 * The key might change between the two callbacks at a rotation; the cap is
 * then a second or so off, which is harmless: a ticket can never outlive
 * its key anyway, since the key is gone at its deadline.
 */
static int gen_cb(SSL *s, void *arg)
{
    stek_client *c = arg;
    enc_note = (cb_note){.s = s, .c = c};
    SSL_SESSION *sess = SSL_get0_session(s);
    if (c == NULL || sess == NULL)
        return 1;
    unsigned slot;
    const stek_ring *r = stek_keyring_read_begin(c->ring, &slot);
    const int64_t now = stek_boottime_ns();
    bool stale = false;
    int g = stek_ring_group_index(r, conn_group(c, s));
    long i = g >= 0 ? stek_ring_encrypt_key(r, (uint32_t)g, now, &stale) : -1;
    long left = 0;
    if (i >= 0) {
        /* min(L, remaining decrypt life): L alone for a CURRENT key. */
        const stek_ring_key *k = &r->keys[i];
        int64_t life = k->dec_until - now, l = k->dec_until - k->enc_until;
        left = (long)((life < l ? life : l) / 1000000000LL);
    }
    stek_keyring_read_end(c->ring, slot);
    if (i >= 0 && SSL_SESSION_get_timeout(sess) > left)
        SSL_SESSION_set_timeout(sess, left > 0 ? left : 1);
    return 1;
}

stek_result stek_client_attach(stek_client *c, SSL_CTX *ctx)
{
    if (c == NULL || ctx == NULL)
        return STEK_RESULT_INVALID_ARGUMENT;
    pthread_once(&ex_once, ex_init);
    if (ex_index < 0)
        return STEK_RESULT_INTERNAL;
    if (SSL_CTX_get_ex_data(ctx, ex_index) != NULL)
        return STEK_RESULT_ALREADY;
    if (c->n_attached == MAX_ATTACHED)
        return STEK_RESULT_INVALID_ARGUMENT;
    if (!c->keep_sid_ctx) {
        /* OpenSSL 3.0 has no getter for a context's session-id context,
         * so "the application set none" is the option's default:
         * stek_options_keep_session_id_context(o, true) keeps the
         * application's own (which must then match across the group). */
        uint8_t sid[SHA256_DIGEST_LENGTH];
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
                  EVP_DigestUpdate(md, SID_CTX_LABEL, strlen(SID_CTX_LABEL)) == 1 &&
                  EVP_DigestUpdate(md, c->groups[0].name, strlen(c->groups[0].name)) == 1 &&
                  EVP_DigestFinal_ex(md, sid, NULL) == 1;
        EVP_MD_CTX_free(md);
        _Static_assert(SHA256_DIGEST_LENGTH <= SSL_MAX_SID_CTX_LENGTH, "sid ctx size");
        if (!ok || SSL_CTX_set_session_id_context(ctx, sid, SHA256_DIGEST_LENGTH) != 1)
            return STEK_RESULT_CRYPTO;
    }
    if (!c->early_data && SSL_CTX_set_max_early_data(ctx, 0) != 1)
        return STEK_RESULT_INTERNAL;
    uint64_t l = 0; /* the longest L of our groups: gen_cb caps each ticket */
    for (size_t i = 0; i < c->n_groups; i++) {
        uint64_t gl = atomic_load(&c->groups[i].lifetime_s);
        l = gl > l ? gl : l;
    }
    if (l > 0 && (uint64_t)SSL_CTX_get_timeout(ctx) > l)
        SSL_CTX_set_timeout(ctx, (long)l);
    if (SSL_CTX_up_ref(ctx) != 1)
        return STEK_RESULT_INTERNAL;
    if (SSL_CTX_set_ex_data(ctx, ex_index, c) != 1) {
        SSL_CTX_free(ctx);
        return STEK_RESULT_NO_MEMORY;
    }
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb);
    SSL_CTX_set_session_ticket_cb(ctx, gen_cb, dec_cb, c);
    c->attached[c->n_attached++] = ctx;
    return STEK_RESULT_OK;
}

/* ---- the background thread ------------------------------------------------------------ */

static void set_ready(stek_client *c, bool ready)
{
    if (atomic_load(&c->ready) == ready)
        return;
    pthread_mutex_lock(&c->mu);
    atomic_store(&c->ready, ready);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Whether the published snapshot can encrypt for every group now. Under wmu. */
static void update_ready(stek_client *c)
{
    const stek_ring *r = stek_keyring_peek(c->ring);
    const int64_t now = stek_boottime_ns();
    bool ready = true;
    for (size_t i = 0; i < c->n_groups && ready; i++) {
        bool stale = false;
        int g = stek_ring_group_index(r, c->groups[i].name);
        ready = g >= 0 && stek_ring_encrypt_key(r, (uint32_t)g, now, &stale) >= 0;
    }
    set_ready(c, ready);
}

/* ---- the sealed cache ---------------------------------------------------------------- */

/*
 * Rewrites the cache file from the published snapshot. Under cmu from the
 * snapshot to the rename, so files are written in snapshot order. A
 * failure is logged and counted: serving goes on, and the next accepted
 * set tries again. With no key left, the file is removed.
 */
static void cache_save(stek_client *c)
{
    if (c->cache_path == NULL)
        return;
    stek_cache_contents *cc = NULL;
    pthread_mutex_lock(&c->cmu);
    pthread_mutex_lock(&c->wmu);
    stek_status st = stek_cache_from_ring(stek_keyring_peek(c->ring), stek_boottime_ns(),
                                          wall_ns(c), c->host_id, &cc);
    pthread_mutex_unlock(&c->wmu);
    if (st == STEK_OK && cc->n_keys == 0) {
        if (unlink(c->cache_path) != 0 && errno != ENOENT)
            st = stek_error_set(STEK_ERR_IO, "unlink %s: %s", c->cache_path, strerror(errno));
    } else if (st == STEK_OK) {
        for (size_t i = 0; i < cc->n_groups; i++) {
            long g = group_of(c, cc->groups[i].name);
            if (g >= 0)
                cc->groups[i].sched = c->groups[g].cache_sched;
        }
        st = stek_cache_write(c->cache_path, c->sealing_pub, cc);
    }
    pthread_mutex_unlock(&c->cmu);
    stek_cache_contents_free(cc);
    if (st != STEK_OK) {
        bump(&c->cache_write_errors);
        stek_log(STEK_LOG_ERROR, COMPONENT, "cache %s not written: %s: %s", c->cache_path,
                 stek_status_name(st), stek_error_detail());
    }
}

/* Republishes without the keys past their decrypt deadline, if any. */
static void drop_expired(stek_client *c)
{
    pthread_mutex_lock(&c->wmu);
    const stek_ring *r = stek_keyring_peek(c->ring);
    const int64_t now = stek_boottime_ns();
    bool any = false;
    for (size_t i = 0; r != NULL && i < r->n_keys && !any; i++)
        any = r->keys[i].dec_until <= now;
    bool published = false;
    if (any) {
        stek_ring *next = NULL;
        stek_status st = stek_ring_build(r, NULL, now, &next);
        if (st == STEK_OK) {
            stek_keyring_publish(c->ring, next);
            published = true;
        } else {
            stek_log(STEK_LOG_ERROR, COMPONENT, "republish: %s: %s", stek_status_name(st),
                     stek_error_detail());
        }
    }
    update_ready(c);
    pthread_mutex_unlock(&c->wmu);
    /* A key past its window leaves the cache file too, service or not. */
    if (published)
        cache_save(c);
}

/* Sleeps up to ms, waking for stop, and drops expired keys every second. */
static void idle(stek_client *c, int ms)
{
    while (ms > 0 && !stopping(c)) {
        int slice = ms < 1000 ? ms : 1000;
        struct timespec until = mono_after(slice);
        pthread_mutex_lock(&c->mu);
        while (!stopping(c))
            if (pthread_cond_timedwait(&c->cv, &c->mu, &until) == ETIMEDOUT)
                break;
        pthread_mutex_unlock(&c->mu);
        ms -= slice;
        drop_expired(c);
    }
}

/* A new ephemeral key and nonce, and the one signed request for them. */
static stek_status new_request(stek_group_state *c)
{
    stek_host_eph *eph = NULL;
    uint8_t *req = NULL;
    size_t len = 0;
    STEK_GUARD(stek_host_eph_generate(&eph));
    if (RAND_bytes(c->nonce, sizeof(c->nonce)) != 1) {
        stek_host_eph_free(eph);
        STEK_BAIL(STEK_ERR_CRYPTO, "RAND_bytes");
    }
    stek_status st =
        stek_request_build(c->name, eph, c->nonce, sizeof(c->nonce), c->c->cert_key, &req, &len);
    if (st != STEK_OK) {
        stek_host_eph_free(eph);
        return st;
    }
    stek_host_eph_free(c->eph);
    free(c->request);
    c->eph = eph;
    c->request = req;
    c->request_len = len;
    c->eph_born = stek_boottime_ns();
    report_request(c);
    return STEK_OK;
}

/* (T0, P, L) from an accepted set's CURRENT key: pinned for our lifetime. */
static void pin_schedule(stek_group_state *c, const stek_accepted_set *set)
{
    const stek_accepted_key *k = &set->keys[set->current];
    const int64_t ns = 1000000000LL;
    int64_t p = (k->encrypt_until - k->not_before) / ns;
    if (p <= 0)
        return;
    stek_sched s = {
        .origin = k->not_before / ns - (int64_t)k->epoch * p,
        .epoch_s = (uint64_t)p,
        .lifetime_s = (uint64_t)((k->decrypt_until - k->encrypt_until) / ns),
    };
    if (stek_sched_check(&s) == STEK_OK) {
        c->sched = s;
        c->sched_pinned = true;
    }
}

static stek_status install(stek_client *c, const stek_accepted_set *set)
{
    stek_status st = STEK_OK;
    stek_ring *next = NULL;
    stek_ring_key *keys = calloc(set->n_keys, sizeof(*keys));
    STEK_ENSURE(keys != NULL, STEK_ERR_NOMEM);
    const int64_t boot = stek_boottime_ns();
    STEK_GUARD_GOTO(stek_ring_deadlines(set, boot, wall_ns(c), keys));
    stek_ring_input in = {
        .group = set->group,
        .generation = set->generation,
        .current_epoch = set->current_epoch,
        .n_keys = set->n_keys,
        .keys = keys,
        .entries = stek_accepted_entry(set, 0),
    };
    pthread_mutex_lock(&c->wmu);
    st = stek_ring_build(stek_keyring_peek(c->ring), &in, boot, &next);
    if (st == STEK_OK) {
        stek_keyring_publish(c->ring, next);
        next = NULL;
    }
    pthread_mutex_unlock(&c->wmu);
done:
    free(keys);
    stek_ring_free(next);
    return st;
}

/* Raises the group's high-water marks to a generation and epoch installed. */
static void raise_hwm(stek_group_state *g, uint64_t generation, uint64_t current_epoch)
{
    if (generation > g->generation_hwm) {
        if (g->hwm_path != NULL) {
            stek_status st = hwm_write(g->hwm_path, generation);
            if (st != STEK_OK)
                stek_log(STEK_LOG_ERROR, COMPONENT, "high-water mark not saved: %s",
                         stek_error_detail());
        }
        g->generation_hwm = generation;
        g->current_epoch_hwm = 0;
    }
    if (current_epoch > g->current_epoch_hwm)
        g->current_epoch_hwm = current_epoch;
}

static void on_accepted(stek_group_state *g, const stek_accepted_set *set)
{
    stek_client *const c = g->c;
    if (!g->sched_pinned)
        pin_schedule(g, set);
    raise_hwm(g, set->generation, set->current_epoch);
    stek_status st = install(c, set);
    if (st != STEK_OK) {
        stek_log(STEK_LOG_ERROR, COMPONENT, "install: %s: %s", stek_status_name(st),
                 stek_error_detail());
        return;
    }
    const stek_accepted_key *k = &set->keys[set->current];
    uint64_t l = (uint64_t)((k->decrypt_until - k->encrypt_until) / 1000000000LL);
    atomic_store(&g->lifetime_s, l);
    if (g->index == 0) { /* the public epoch and generation are the default group's */
        atomic_store(&c->current_epoch, set->current_epoch);
        atomic_store(&c->generation, set->generation);
    }
    atomic_store(&c->last_fetch_unix, wall_ns(c) / 1000000000LL);
    bump(&c->sets_accepted);
    stek_log(STEK_LOG_DEBUG, COMPONENT, "group %s: generation %llu, epoch %llu, %zu keys",
             set->group, (unsigned long long)set->generation,
             (unsigned long long)set->current_epoch, set->n_keys);
    if (c->cache_path != NULL) {
        pthread_mutex_lock(&c->cmu);
        g->cache_sched = g->sched_pinned ? g->sched : (stek_sched){0};
        pthread_mutex_unlock(&c->cmu);
        /* Before ready: once ready, a restart resumes from the file. */
        cache_save(c);
    }
    /* Ready last: whoever waited for it sees the counters above. */
    pthread_mutex_lock(&c->wmu);
    update_ready(c);
    pthread_mutex_unlock(&c->wmu);
    report_due(g);
}

/*
 * Installs the live keys of a loaded cache, group by group, as an accepted
 * set would be (new has not started the threads yet). The schedule is not
 * pinned from the file: the first set fetched pins it, as after any start.
 */
static stek_status cache_install(stek_client *c, const stek_cache_contents *cc)
{
    stek_status st = STEK_OK;
    stek_ring_key *keys = calloc(cc->n_keys, sizeof(*keys));
    STEK_ENSURE(keys != NULL, STEK_ERR_NOMEM);
    for (size_t i = 0; i < cc->n_groups; i++) {
        const stek_cache_group *cg = &cc->groups[i];
        long gi = group_of(c, cg->name);
        if (gi < 0 || cg->count == 0)
            continue;
        stek_group_state *g = &c->groups[gi];
        const int64_t boot = stek_boottime_ns();
        STEK_GUARD_GOTO(stek_cache_deadlines(cc, i, boot, wall_ns(c), keys));
        stek_ring_input in = {
            .group = cg->name,
            .generation = cg->generation,
            .current_epoch = cg->current_epoch,
            .n_keys = cg->count,
            .keys = keys,
            .entries = stek_secret_cdata(cc->material) + cg->first * STEK_RING_ENTRY_BYTES,
        };
        stek_ring *next = NULL;
        pthread_mutex_lock(&c->wmu);
        st = stek_ring_build(stek_keyring_peek(c->ring), &in, boot, &next);
        if (st == STEK_OK)
            stek_keyring_publish(c->ring, next);
        pthread_mutex_unlock(&c->wmu);
        if (st != STEK_OK)
            goto done;
        raise_hwm(g, cg->generation, cg->current_epoch);
        g->cache_sched = cg->sched; /* kept in the next rewrite until a set pins one */
        const stek_cache_key *newest = &cc->keys[cg->first + cg->count - 1];
        uint64_t l =
            cg->sched.lifetime_s > 0
                ? cg->sched.lifetime_s
                : (uint64_t)((newest->decrypt_until - newest->encrypt_until) / 1000000000LL);
        atomic_store(&g->lifetime_s, l);
        if (g->index == 0) {
            atomic_store(&c->current_epoch, cg->current_epoch);
            atomic_store(&c->generation, cg->generation);
        }
    }
    atomic_store(&c->last_fetch_unix, cc->written_at / 1000000000LL);
    pthread_mutex_lock(&c->wmu);
    update_ready(c);
    pthread_mutex_unlock(&c->wmu);
done:
    stek_cleanse(keys, cc->n_keys * sizeof(*keys));
    free(keys);
    return st;
}

/* Loads the cache file at new. A file that fails is logged and counted, never fatal. */
static void cache_load(stek_client *c, EVP_PKEY *sealing_priv)
{
    const char *names[STEK_MAX_GROUPS];
    uint64_t hwm[STEK_MAX_GROUPS];
    for (size_t i = 0; i < c->n_groups; i++) {
        names[i] = c->groups[i].name;
        hwm[i] = c->groups[i].generation_hwm;
    }
    stek_cache_expect x = {
        .host_id = c->host_id,
        .wall_now = wall_ns(c),
        .n_groups = c->n_groups,
        .groups = names,
        .generation_hwm = hwm,
    };
    stek_cache_contents *cc = NULL;
    stek_cache_reject why = STEK_CACHE_OK;
    stek_status st = stek_cache_read(c->cache_path, sealing_priv, &x, &cc, &why);
    if (st == STEK_ERR_NOT_FOUND) {
        stek_log(STEK_LOG_INFO, COMPONENT, "cache %s: no file yet", c->cache_path);
        return;
    }
    if (st == STEK_OK)
        st = cache_install(c, cc);
    if (st != STEK_OK) {
        bump(&c->cache_rejected);
        stek_log(STEK_LOG_WARN, COMPONENT, "cache %s rejected: %s: %s", c->cache_path,
                 why != STEK_CACHE_OK ? stek_cache_reject_name(why) : stek_status_name(st),
                 stek_error_detail());
    } else {
        bump(&c->cache_loaded);
        stek_log(STEK_LOG_INFO, COMPONENT,
                 "cache %s loaded: %zu live keys of %zu groups, "
                 "written %lld s ago",
                 c->cache_path, cc->n_keys, cc->n_groups,
                 (long long)((x.wall_now - cc->written_at) / 1000000000LL));
    }
    stek_cache_contents_free(cc);
}

static void on_heartbeat(stek_group_state *c, const uint8_t *msg, size_t len)
{
    Stek__V1__KeySet *ks = stek__v1__key_set__unpack(NULL, len, msg);
    if (ks == NULL)
        return;
    /* Bounded: a heartbeat is unsigned, so it may slow our dead-stream
     * detection only so far. */
    if (ks->heartbeat != NULL && ks->heartbeat->interval >= 100000000ULL &&
        ks->heartbeat->interval <= 300000000000ULL)
        c->heartbeat_ns = (int64_t)ks->heartbeat->interval;
    stek__v1__key_set__free_unpacked(ks, NULL);
}

/* One message of the stream. Returns true when a set was accepted. */
static bool handle(stek_group_state *g, const uint8_t *msg, size_t len)
{
    stek_client *const c = g->c;
    stek_accept_ctx ac = {
        .service_pubs = c->service_pubs,
        .n_service_pubs = c->n_service_pubs,
        /* stekd names the first SAN its policy allows: any of ours. */
        .identities = (const char *const *)c->identities,
        .n_identities = c->n_identities,
        .eph = g->eph,
        .nonce = g->nonce,
        .nonce_len = sizeof(g->nonce),
        .group = g->name,
        .sched = g->sched_pinned ? &g->sched : NULL,
        .now = wall_ns(c) / 1000000000LL,
        .generation_hwm = g->generation_hwm,
        .current_epoch_hwm = g->current_epoch_hwm,
    };
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool hb = false;
    stek_status st = stek_accept(&ac, msg, len, &set, &why, &hb);
    if (st == STEK_OK && hb) {
        on_heartbeat(g, msg, len);
        return false;
    }
    if (st == STEK_OK) {
        on_accepted(g, set);
        stek_accepted_set_free(set);
        return true;
    }
    if (st == STEK_ERR_VERIFY && why > STEK_REJECT_NONE && why < STEK_REJECT_COUNT) {
        bump(&c->sets_rejected);
        bump(&c->sets_rejected_by[why]);
        stek_log(STEK_LOG_WARN, COMPONENT, "group %s: key set rejected: %s: %s", g->name,
                 stek_reject_name(why), stek_error_detail());
    } else {
        stek_log(STEK_LOG_ERROR, COMPONENT, "key set not checked: %s: %s", stek_status_name(st),
                 stek_error_detail());
    }
    return false;
}

/* One WatchKeySet stream on one replica, until it ends, goes silent, the
 * ephemeral key is due, or we stop. Returns whether it delivered a set. */
static bool watch(stek_group_state *g, stek_transport *t, const char *target, bool quiet)
{
    stek_client *const c = g->c;
    stek_watch *w = NULL;
    bool delivered = false;
    stek_status st = stek_transport_watch_start(t, g->request, g->request_len, &w);
    if (st != STEK_OK) {
        stek_log(STEK_LOG_ERROR, COMPONENT, "%s: watch: %s", target, stek_error_detail());
        return false;
    }
    int64_t last = stek_boottime_ns();
    while (!stopping(c)) {
        uint8_t *msg = NULL;
        size_t len = 0;
        int got = stek_transport_watch_read(w, READ_SLICE_MS, &msg, &len);
        const int64_t now = stek_boottime_ns();
        if (got == 1) {
            last = now;
            atomic_store(&g->stream_up, true);
            delivered |= handle(g, msg, len);
            free(msg);
        } else if (got == 0) {
            int code = STEK_TRANSPORT_NO_STATUS;
            char details[128] = "";
            STEK_IGNORE(stek_transport_watch_status(w, 1000, &code, details, sizeof(details)));
            /* Once per outage at WARN; the retries that follow at DEBUG. */
            stek_log(quiet && !delivered ? STEK_LOG_DEBUG : STEK_LOG_WARN, COMPONENT,
                     "%s: stream ended: gRPC %d (%s)", target, code, details);
            break;
        } else if (now - last > 3 * g->heartbeat_ns) {
            stek_log(STEK_LOG_WARN, COMPONENT, "%s: stream silent for %lld ms; reconnecting",
                     target, (long long)((now - last) / 1000000));
            break;
        }
        drop_expired(c);
        if (now - g->eph_born > EPH_MAX_AGE_NS)
            break; /* the caller makes a new key and request */
    }
    atomic_store(&g->stream_up, false);
    stek_transport_watch_cancel_free(w);
    return delivered;
}

/* One group's thread: watches its keys, failing over across replicas. */
static void *run(void *arg)
{
    stek_group_state *g = arg;
    stek_client *const c = g->c;
    size_t replica = 0;
    unsigned failures = 0;
    while (!stopping(c)) {
        if (g->request == NULL || stek_boottime_ns() - g->eph_born > EPH_MAX_AGE_NS) {
            stek_status st = new_request(g);
            if (st != STEK_OK) {
                stek_log(STEK_LOG_ERROR, COMPONENT, "request: %s: %s", stek_status_name(st),
                         stek_error_detail());
                idle(c, BACKOFF_MAX_MS);
                continue;
            }
        }
        report_replica(g, replica);
        bool delivered =
            watch(g, c->transports[replica], c->targets[replica], failures >= c->n_transports);
        if (stopping(c))
            break;
        failures = delivered ? 0 : failures + 1;
        replica = (replica + 1) % c->n_transports;
        /* Exponential backoff with jitter in [d/2, d], once a whole
         * round of replicas failed; the next replica at once otherwise. */
        int delay = 0;
        if (failures >= c->n_transports) {
            unsigned shift = failures - c->n_transports;
            long d = BACKOFF_MIN_MS << (shift < 8 ? shift : 8);
            if (d > BACKOFF_MAX_MS)
                d = BACKOFF_MAX_MS;
            uint32_t rnd = 0;
            if (RAND_bytes((unsigned char *)&rnd, sizeof(rnd)) != 1)
                rnd = 0;
            delay = (int)(d / 2 + rnd % (uint32_t)(d / 2 + 1));
        }
        idle(c, delay);
    }
    return NULL;
}

/* ---- fleet reports ------------------------------------------------------------------- */

/*
 * What this host holds, reported to stekd (ReportStatus) for `stekctl
 * fleet` and stekd's /metrics: per group, its generation, CURRENT epoch,
 * key names (never key material) and the client's ticket counters. One
 * thread per client sends them, after each set a group accepts and every
 * REPORT_INTERVAL_MS, to the replica that group is watching, over the same
 * transport. It reads the keyring like the ticket callback (a read
 * section) and the counters like stek_client_get_counters, so it never
 * holds up a group thread: a report that fails or hangs (until its
 * deadline) changes nothing about keys, and is logged at debug level only.
 * A replica that does not know ReportStatus (UNIMPLEMENTED: an older
 * stekd) is skipped for REPORT_SKIP_MS.
 *
 * The report is authenticated like the group's watch: it carries the very
 * request the group watches with, which stekd checks on GetKeySet's path
 * (mostly a hit of its validated-request cache: no signature check).
 */
#define REPORT_INTERVAL_MS 10000
/* A report in flight at stek_client_free is cancelled, not waited for. */
#define REPORT_TIMEOUT_MS 2000
#define REPORT_SKIP_MS (10 * 60 * 1000)
#define GRPC_UNIMPLEMENTED 12 /* grpc/status.h: transport.h statuses are plain ints */

typedef struct stek_report_group {
    uint8_t *request; /* a copy of the group's signed request; NULL until it has one */
    size_t request_len;
    size_t replica;  /* the transport the group watches on */
    bool due;        /* a set was accepted since the last report */
    int64_t last_ns; /* CLOCK_BOOTTIME of the last report (or of the first request) */
} stek_report_group;

struct stek_reporter {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC: due, stop */
    bool stop;
    atomic_bool cancel; /* stop, for a report in flight: free does not wait it out */
    stek_report_group groups[STEK_MAX_GROUPS]; /* under mu */
    int64_t skip_until[STEK_MAX_SERVERS];      /* reporter thread only */
};

/* Sends group gi's report over replica's transport. Reporter thread. */
static void report_send(stek_client *c, size_t gi, const uint8_t *req, size_t len, size_t replica)
{
    struct stek_reporter *rp = c->rep;
    const int64_t now = stek_boottime_ns();
    if (replica >= c->n_transports || rp->skip_until[replica] > now)
        return;
    uint8_t names[STEK_REPORT_MAX_NAMES][STEK_TICKET_NAME_BYTES];
    stek_report r = {
        .key_set_request = req,
        .key_set_request_len = len,
        .names = (const uint8_t(*)[STEK_TICKET_NAME_BYTES])names,
        .interval_s = REPORT_INTERVAL_MS / 1000,
    };
    unsigned slot;
    const stek_ring *ring = stek_keyring_read_begin(c->ring, &slot);
    int g = stek_ring_group_index(ring, c->groups[gi].name);
    if (g >= 0) {
        const stek_ring_group *rg = &ring->groups[g];
        r.generation = rg->generation;
        r.current_epoch = rg->current_epoch;
        /* The newest keys when there are more than a report takes. Names
         * only: the first 16 bytes of each entry. */
        size_t from = rg->count > STEK_REPORT_MAX_NAMES ? rg->count - STEK_REPORT_MAX_NAMES : 0;
        for (size_t i = from; i < rg->count; i++)
            memcpy(names[r.n_names++], stek_ring_entry(ring, rg->first + i),
                   STEK_TICKET_NAME_BYTES);
    }
    stek_keyring_read_end(c->ring, slot);
    stek_counters k;
    if (stek_client_get_counters(c, &k) != STEK_RESULT_OK)
        return;
    r.counters = (stek_report_counters){
        .tickets_issued = k.tickets_issued,
        .tickets_stale = k.tickets_stale,
        .tickets_resumed = k.tickets_resumed,
        .tickets_renewed = k.tickets_renewed,
        .miss_unknown = k.miss_unknown,
        .miss_expired = k.miss_expired,
        .miss_other_generation = k.miss_other_generation,
        .miss_other_group = k.miss_other_group,
        .miss_bad_mac = k.miss_bad_mac,
        .no_key_encrypts = k.no_key_encrypts,
    };
    uint8_t *msg = NULL;
    size_t msg_len = 0;
    stek_status st = stek_report_build(&r, &msg, &msg_len);
    int code = STEK_TRANSPORT_NO_STATUS;
    char details[128] = "";
    if (st == STEK_OK)
        st = stek_transport_report(c->transports[replica], msg, msg_len, REPORT_TIMEOUT_MS,
                                   &rp->cancel, &code, details, sizeof(details));
    free(msg);
    if (st == STEK_OK)
        return;
    stek_log(STEK_LOG_DEBUG, COMPONENT, "%s: report for group %s not delivered: %s (gRPC %d %s)",
             c->targets[replica], c->groups[gi].name, stek_error_detail(), code, details);
    if (code == GRPC_UNIMPLEMENTED)
        rp->skip_until[replica] = now + (int64_t)REPORT_SKIP_MS * 1000000;
}

static void *report_main(void *arg)
{
    stek_client *c = arg;
    struct stek_reporter *rp = c->rep;
    pthread_mutex_lock(&rp->mu);
    while (!rp->stop) {
        const int64_t now = stek_boottime_ns();
        const int64_t interval = (int64_t)REPORT_INTERVAL_MS * 1000000;
        int64_t next = now + interval;
        long pick = -1;
        for (size_t i = 0; i < c->n_groups && pick < 0; i++) {
            const stek_report_group *rg = &rp->groups[i];
            if (rg->request == NULL)
                continue;
            int64_t at = rg->due ? now : rg->last_ns + interval;
            if (at <= now)
                pick = (long)i;
            else if (at < next)
                next = at;
        }
        if (pick < 0) {
            struct timespec until = mono_after((int)((next - now) / 1000000) + 1);
            pthread_cond_timedwait(&rp->cv, &rp->mu, &until);
            continue;
        }
        stek_report_group *rg = &rp->groups[pick];
        uint8_t *req = malloc(rg->request_len);
        size_t len = rg->request_len, replica = rg->replica;
        if (req != NULL)
            memcpy(req, rg->request, len);
        rg->due = false;
        rg->last_ns = now;
        pthread_mutex_unlock(&rp->mu);
        if (req != NULL)
            report_send(c, (size_t)pick, req, len, replica);
        free(req);
        pthread_mutex_lock(&rp->mu);
    }
    pthread_mutex_unlock(&rp->mu);
    return NULL;
}

/* Starts the reporter; without one (no memory, no thread) the client just does not report. */
static void report_start(stek_client *c)
{
    struct stek_reporter *rp = calloc(1, sizeof(*rp));
    if (rp == NULL) {
        stek_log(STEK_LOG_WARN, COMPONENT, "fleet reports off: out of memory");
        return;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rp->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&rp->mu, NULL);
    c->rep = rp;
    if (pthread_create(&rp->thread, NULL, report_main, c) != 0) {
        stek_log(STEK_LOG_WARN, COMPONENT, "fleet reports off: no thread");
        c->rep = NULL;
        pthread_cond_destroy(&rp->cv);
        pthread_mutex_destroy(&rp->mu);
        free(rp);
    }
}

/* Stops the reporter (cancelling a report in flight) and frees it. */
static void report_stop(stek_client *c)
{
    struct stek_reporter *rp = c->rep;
    if (rp == NULL)
        return;
    atomic_store(&rp->cancel, true);
    pthread_mutex_lock(&rp->mu);
    rp->stop = true;
    pthread_cond_broadcast(&rp->cv);
    pthread_mutex_unlock(&rp->mu);
    pthread_join(rp->thread, NULL);
    c->rep = NULL;
    for (size_t i = 0; i < STEK_MAX_GROUPS; i++)
        free(rp->groups[i].request);
    pthread_cond_destroy(&rp->cv);
    pthread_mutex_destroy(&rp->mu);
    free(rp);
}

/* The group's new signed request (a new ephemeral key): reports carry it. Group thread. */
static void report_request(stek_group_state *g)
{
    struct stek_reporter *rp = g->c->rep;
    if (rp == NULL)
        return;
    uint8_t *copy = malloc(g->request_len);
    if (copy == NULL)
        return; /* reports go on with the previous request, or start later */
    memcpy(copy, g->request, g->request_len);
    pthread_mutex_lock(&rp->mu);
    stek_report_group *rg = &rp->groups[g->index];
    free(rg->request);
    rg->request = copy;
    rg->request_len = g->request_len;
    if (rg->last_ns == 0)
        rg->last_ns = stek_boottime_ns();
    pthread_mutex_unlock(&rp->mu);
}

/* The group accepted a set: report it now. Group thread. */
static void report_due(stek_group_state *g)
{
    struct stek_reporter *rp = g->c->rep;
    if (rp == NULL)
        return;
    pthread_mutex_lock(&rp->mu);
    rp->groups[g->index].due = true;
    pthread_cond_broadcast(&rp->cv);
    pthread_mutex_unlock(&rp->mu);
}

/* The replica the group is about to watch: its reports go there too. Group thread. */
static void report_replica(stek_group_state *g, size_t replica)
{
    struct stek_reporter *rp = g->c->rep;
    if (rp == NULL)
        return;
    pthread_mutex_lock(&rp->mu);
    rp->groups[g->index].replica = replica;
    pthread_mutex_unlock(&rp->mu);
}
