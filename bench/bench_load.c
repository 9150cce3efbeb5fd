/*
 * bench_load: one real stekd under fleet-sized load (issue 7, "Load").
 *
 *   fetch   10,000 distinct host certificates (RSA-2048 and EC P-256, from
 *           the fixture's CA) each call GetKeySet once, each over its own
 *           new mTLS connection, a bounded number in flight.
 *   watch   2,000 of those hosts then hold a WatchKeySet stream each (on the
 *           connection of their fetch) while the group rotates every few
 *           seconds; for each rotation, the time from the new CURRENT
 *           epoch's not_before until each watcher holds a set whose
 *           CURRENT epoch is that one (or a later one): its receipt plus
 *           its own verification time (watch_verify_next).
 *
 * Every set received, fetched or pushed, goes through libstek's own host
 * acceptance (client/accept.c: signature, identity, eph key, nonce, key
 * list, rollback, unwrap of every key, names). A set it rejects is an
 * error, as is any call or stream that ends with a non-OK status.
 *
 * Speed is printed, never asserted; the targets are printed with "met" or
 * "MISSED". The exit status is non-zero only when a setup step failed or
 * there were errors.
 *
 * gRPC: one completion queue per client thread (2 by default), each thread
 * driving its own calls; every host has its own channel (a local subchannel
 * pool, so its own TLS connection), as every real host has.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "accept.h"
#include "fx_http.h"
#include "bench_util.h"
#include "fx_stekd.h"
#include "hostwrap.h"
#include "reqsig.h"
#include "stek/v1/stek.pb-c.h"

#define GROUP "load"
/* Epochs of a few seconds, so rotations happen during the run; a decrypt
 * lifetime of two epochs keeps every set at 4 keys (2 past, current, next). */
#define EPOCH_S 4u
#define LIFETIME_S 8u
#define KEYS_PER_TYPE 16 /* host keys, shared among certificates (see the output) */
#define MAX_THREADS 8
#define MAX_EPOCHS 256 /* watch phase: epochs a watcher can record */
#define CALL_TIMEOUT_MS 60000
#define GET "/stek.v1.KeyService/GetKeySet"
#define WATCH "/stek.v1.KeyService/WatchKeySet"
#define TARGET_P99_MS 1000.0
#define TARGET_RSS_MIB 256.0

static void pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- /proc figures -------------------------------------------------------- */

/* A "VmHWM:"-style field of /proc/PID/status, in KiB; -1 if unknown. */
static long proc_status_kib(pid_t pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    long v = -1;
    size_t fl = strlen(field);
    while (fgets(line, sizeof(line), f) != NULL)
        if (strncmp(line, field, fl) == 0) {
            v = strtol(line + fl, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static int proc_fds(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* ---- hosts: certificates, ephemeral keys, signed requests ------------------ */

typedef struct host {
    unsigned idx;
    bool rsa;
    char *cert_pem;      /* this host's certificate */
    const char *key_pem; /* the shared key it was issued for */
    char identity[64];   /* "uri:spiffe://fleet/load/hN" */
    stek_host_eph *eph;
    uint8_t nonce[16];
    uint8_t *req; /* a signed GetKeySetRequest; also the WatchKeySetRequest */
    size_t req_len;
    grpc_channel_credentials *creds;
    grpc_channel *ch; /* open from its fetch until the end, for watchers */
} host;

typedef struct fleet {
    const fx_stekd *d;
    EVP_PKEY *keys[2 * KEYS_PER_TYPE]; /* even: RSA-2048, odd: EC P-256 */
    char *key_pems[2 * KEYS_PER_TYPE];
    host *hosts;
    size_t n;
    atomic_size_t next;
    atomic_int failed;
} fleet;

static char *pem_of(int (*write)(BIO *, const void *), const void *obj)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *out = NULL, *p = NULL;
    long n;
    if (b != NULL && write(b, obj) == 1 && (n = BIO_get_mem_data(b, &p)) > 0 &&
        (out = malloc((size_t)n + 1)) != NULL) {
        memcpy(out, p, (size_t)n);
        out[n] = '\0';
    }
    BIO_free(b);
    return out;
}

static int write_key(BIO *b, const void *k)
{
    return PEM_write_bio_PrivateKey(b, (EVP_PKEY *)k, NULL, NULL, 0, NULL, NULL);
}

static int write_cert(BIO *b, const void *x)
{
    return PEM_write_bio_X509(b, (X509 *)x);
}

static bool add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *ex = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    bool ok = ex != NULL && X509_add_ext(x, ex, -1) == 1;
    X509_EXTENSION_free(ex);
    return ok;
}

/* A host certificate as fx_cert_issue makes it (clientAuth, one URI SAN),
 * in memory: 10,000 files through the fixture would be mostly I/O. */
static char *issue_cert(const fx_ca *ca, EVP_PKEY *key, bool rsa, const char *cn, const char *uri)
{
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    BIGNUM *serial = BN_new();
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *g = GENERAL_NAME_new();
    ASN1_IA5STRING *s = ASN1_IA5STRING_new();
    char *pem = NULL;
    bool ok =
        x && name && serial && gens && g && s && X509_set_version(x, X509_VERSION_3) &&
        BN_rand(serial, 64, BN_RAND_TOP_ONE, BN_RAND_BOTTOM_ANY) &&
        BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) != NULL &&
        X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"stek-test", -1,
                                   -1, 0) &&
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1,
                                   0) &&
        X509_set_subject_name(x, name) &&
        X509_set_issuer_name(x, X509_get_subject_name(ca->cert)) &&
        X509_gmtime_adj(X509_getm_notBefore(x), -3600L) != NULL &&
        X509_gmtime_adj(X509_getm_notAfter(x), 24L * 3600) != NULL && X509_set_pubkey(x, key) &&
        add_ext(x, ca->cert, NID_basic_constraints, "critical,CA:FALSE") &&
        add_ext(x, ca->cert, NID_key_usage,
                rsa ? "critical,digitalSignature,keyEncipherment" : "critical,digitalSignature") &&
        add_ext(x, ca->cert, NID_subject_key_identifier, "hash") &&
        add_ext(x, ca->cert, NID_authority_key_identifier, "keyid:always") &&
        add_ext(x, ca->cert, NID_ext_key_usage, "clientAuth") && ASN1_STRING_set(s, uri, -1) == 1;
    if (ok) {
        GENERAL_NAME_set0_value(g, GEN_URI, s);
        s = NULL;
        ok = sk_GENERAL_NAME_push(gens, g) > 0;
        if (ok)
            g = NULL;
    }
    ok = ok && X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) == 1 &&
         X509_sign(x, ca->key, EVP_sha256()) > 0;
    if (ok)
        pem = pem_of(write_cert, x);
    ASN1_IA5STRING_free(s);
    GENERAL_NAME_free(g);
    GENERAL_NAMES_free(gens);
    BN_free(serial);
    X509_NAME_free(name);
    X509_free(x);
    return pem;
}

/* Certificate, ephemeral key, nonce and signed request of host h. */
static int make_host(fleet *f, host *h)
{
    unsigned k = h->idx % (2 * KEYS_PER_TYPE);
    char cn[32], uri[48];
    snprintf(cn, sizeof(cn), "load-h%u", h->idx);
    snprintf(uri, sizeof(uri), "spiffe://fleet/load/h%u", h->idx);
    snprintf(h->identity, sizeof(h->identity), "uri:%s", uri);
    h->rsa = k % 2 == 0;
    h->key_pem = f->key_pems[k];
    h->cert_pem = issue_cert(&f->d->ca, f->keys[k], h->rsa, cn, uri);
    uint8_t pub[STEK_P256_POINT_BYTES], *sig = NULL;
    size_t sig_len = 0;
    if (h->cert_pem == NULL || stek_host_eph_generate(&h->eph) != STEK_OK ||
        stek_host_eph_public(h->eph, pub) != STEK_OK ||
        RAND_bytes(h->nonce, sizeof(h->nonce)) != 1 ||
        stek_reqsig_sign(f->keys[k], GROUP, pub, sizeof(pub), h->nonce, sizeof(h->nonce), &sig,
                         &sig_len) != STEK_OK)
        return -1;
    Stek__V1__GetKeySetRequest r = STEK__V1__GET_KEY_SET_REQUEST__INIT;
    r.group = (char *)GROUP;
    r.eph_pub = (ProtobufCBinaryData){sizeof(pub), pub};
    r.nonce = (ProtobufCBinaryData){sizeof(h->nonce), h->nonce};
    r.signature = (ProtobufCBinaryData){sig_len, sig};
    h->req_len = stek__v1__get_key_set_request__get_packed_size(&r);
    h->req = malloc(h->req_len);
    int rc = h->req != NULL ? 0 : -1;
    if (rc == 0)
        stek__v1__get_key_set_request__pack(&r, h->req);
    free(sig);
    return rc;
}

static void *make_hosts_main(void *arg)
{
    fleet *f = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&f->next, 1);
        if (i >= f->n || atomic_load(&f->failed) || bench_stop_requested)
            return NULL;
        if (make_host(f, &f->hosts[i]) != 0) {
            fprintf(stderr, "bench: host %zu: certificate or request failed\n", i);
            atomic_store(&f->failed, 1);
        }
    }
}

static int make_fleet(fleet *f)
{
    for (unsigned k = 0; k < 2 * KEYS_PER_TYPE; k++) {
        f->keys[k] = k % 2 == 0 ? EVP_RSA_gen(2048) : EVP_EC_gen("P-256");
        f->key_pems[k] = f->keys[k] ? pem_of(write_key, f->keys[k]) : NULL;
        if (f->key_pems[k] == NULL)
            return -1;
    }
    for (size_t i = 0; i < f->n; i++)
        f->hosts[i].idx = (unsigned)i;
    atomic_init(&f->next, 0);
    atomic_init(&f->failed, 0);
    pthread_t th;
    if (pthread_create(&th, NULL, make_hosts_main, f) != 0)
        return -1;
    make_hosts_main(f);
    pthread_join(th, NULL);
    return atomic_load(&f->failed) || bench_stop_requested ? -1 : 0;
}

static void free_fleet(fleet *f)
{
    for (size_t i = 0; f->hosts != NULL && i < f->n; i++) {
        host *h = &f->hosts[i];
        if (h->ch != NULL)
            grpc_channel_destroy(h->ch);
        if (h->creds != NULL)
            grpc_channel_credentials_release(h->creds);
        free(h->cert_pem);
        free(h->req);
        stek_host_eph_free(h->eph);
    }
    free(f->hosts);
    for (unsigned k = 0; k < 2 * KEYS_PER_TYPE; k++) {
        if (f->key_pems[k] != NULL) {
            OPENSSL_cleanse(f->key_pems[k], strlen(f->key_pems[k]));
            free(f->key_pems[k]);
        }
        EVP_PKEY_free(f->keys[k]);
    }
}

/* ---- shared client state --------------------------------------------------- */

typedef struct shared {
    const char *target;
    const char *ca_pem;
    EVP_PKEY *service_pub;
    host *hosts;
    size_t n_hosts, n_watch;
    unsigned threads;
    /* Errors, from every thread. */
    atomic_long status_count[GRPC_STATUS_UNAUTHENTICATED + 2]; /* last: local failures */
    atomic_long rejected[STEK_REJECT_COUNT];
    pthread_mutex_t mu;
    char first_error[320];
} shared;

static void record_error(shared *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void record_error(shared *s, const char *fmt, ...)
{
    pthread_mutex_lock(&s->mu);
    if (s->first_error[0] == '\0') {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->first_error, sizeof(s->first_error), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&s->mu);
}

static void count_status(shared *s, grpc_status_code st)
{
    size_t i =
        (size_t)st <= GRPC_STATUS_UNAUTHENTICATED ? (size_t)st : GRPC_STATUS_UNAUTHENTICATED + 1;
    atomic_fetch_add(&s->status_count[i], 1);
}

static grpc_byte_buffer *bytes_to_bb(const uint8_t *p, size_t n)
{
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)p, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

/* The message as one malloc'd block, or NULL. */
static uint8_t *bb_to_bytes(grpc_byte_buffer *bb, size_t *len)
{
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, bb))
        return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    size_t n = GRPC_SLICE_LENGTH(all);
    uint8_t *p = malloc(n ? n : 1);
    if (p != NULL && n > 0)
        memcpy(p, GRPC_SLICE_START_PTR(all), n);
    grpc_slice_unref(all);
    *len = n;
    return p;
}

/*
 * libstek's acceptance of one received KeySet for h. Returns 1 for an
 * accepted set (*current gets its CURRENT epoch), 0 for a heartbeat, -1 for
 * a rejection (counted). epoch_hwm: the CURRENT epoch of the last set this
 * host accepted (0: none), so a set going back in time is a rejection.
 */
static int accept_set(shared *s, const host *h, grpc_byte_buffer *bb, uint64_t epoch_hwm,
                      uint64_t *current)
{
    size_t len = 0;
    uint8_t *msg = bb_to_bytes(bb, &len);
    if (msg == NULL) {
        atomic_fetch_add(&s->rejected[STEK_REJECT_MALFORMED], 1);
        record_error(s, "%s: unreadable message", h->identity);
        return -1;
    }
    stek_accept_ctx c = {.service_pubs = &s->service_pub,
                         .n_service_pubs = 1,
                         .identity = h->identity,
                         .eph = h->eph,
                         .nonce = h->nonce,
                         .nonce_len = sizeof(h->nonce),
                         .group = GROUP,
                         .now = (int64_t)time(NULL),
                         .generation_hwm = epoch_hwm ? 1 : 0,
                         .current_epoch_hwm = epoch_hwm};
    stek_accepted_set *set = NULL;
    stek_reject why = STEK_REJECT_NONE;
    bool beat = false;
    stek_status st = stek_accept(&c, msg, len, &set, &why, &beat);
    free(msg);
    if (st != STEK_OK) {
        atomic_fetch_add(&s->rejected[why], 1);
        record_error(s, "%s: set rejected: %s (%s)", h->identity, stek_reject_name(why),
                     stek_error_detail());
        return -1;
    }
    if (beat)
        return 0;
    *current = set->current_epoch;
    stek_accepted_set_free(set);
    return 1;
}

static grpc_channel *open_channel(shared *s, host *h)
{
    grpc_ssl_pem_key_cert_pair pair = {.private_key = h->key_pem, .cert_chain = h->cert_pem};
    h->creds = grpc_ssl_credentials_create_ex(s->ca_pem, &pair, NULL, NULL);
    if (h->creds == NULL)
        return NULL;
    grpc_arg args[2];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL; /* its own connection */
    args[0].value.integer = 1;
    args[1].type = GRPC_ARG_STRING;
    args[1].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[1].value.string = (char *)"localhost";
    grpc_channel_args cargs = {2, args};
    return grpc_channel_create(s->target, h->creds, &cargs);
}

static void close_channel(host *h)
{
    if (h->ch != NULL)
        grpc_channel_destroy(h->ch);
    if (h->creds != NULL)
        grpc_channel_credentials_release(h->creds);
    h->ch = NULL;
    h->creds = NULL;
}

static grpc_call *new_call(grpc_channel *ch, grpc_completion_queue *cq, const char *method,
                           gpr_timespec deadline)
{
    grpc_slice m = grpc_slice_from_static_string(method);
    return grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL, deadline, NULL);
}

static gpr_timespec in_ms(int ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- fetch: every host calls GetKeySet once, on a new connection ----------- */

typedef struct fcall {
    host *h;
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array imd, tmd;
    grpc_status_code status;
    grpc_slice details;
    int64_t t0;
    bool busy;
} fcall;

typedef struct fetch_thread {
    shared *s;
    atomic_size_t *next;
    unsigned inflight;
    int64_t *lat_ns; /* one per completed OK call, this thread's */
    size_t n_lat;
    long ok, failed;
} fetch_thread;

static bool fetch_start(fetch_thread *t, grpc_completion_queue *cq, fcall *c, host *h)
{
    memset(c, 0, sizeof(*c));
    c->h = h;
    c->t0 = bench_mono_ns();
    h->ch = open_channel(t->s, h);
    if (h->ch != NULL)
        c->call = new_call(h->ch, cq, GET, in_ms(CALL_TIMEOUT_MS));
    if (c->call == NULL) {
        close_channel(h);
        return false;
    }
    c->send = bytes_to_bb(h->req, h->req_len);
    grpc_metadata_array_init(&c->imd);
    grpc_metadata_array_init(&c->tmd);
    c->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->imd;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &c->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &c->tmd;
    ops[5].data.recv_status_on_client.status = &c->status;
    ops[5].data.recv_status_on_client.status_details = &c->details;
    if (grpc_call_start_batch(c->call, ops, 6, c, NULL) != GRPC_CALL_OK) {
        grpc_call_unref(c->call);
        grpc_byte_buffer_destroy(c->send);
        grpc_metadata_array_destroy(&c->imd);
        grpc_metadata_array_destroy(&c->tmd);
        close_channel(h);
        return false;
    }
    c->busy = true;
    return true;
}

static void fetch_done(fetch_thread *t, fcall *c)
{
    shared *s = t->s;
    int64_t lat = bench_mono_ns() - c->t0;
    count_status(s, c->status);
    uint64_t cur = 0;
    if (c->status != GRPC_STATUS_OK) {
        char det[160];
        size_t n = GRPC_SLICE_LENGTH(c->details);
        n = n < sizeof(det) - 1 ? n : sizeof(det) - 1;
        memcpy(det, GRPC_SLICE_START_PTR(c->details), n);
        det[n] = '\0';
        record_error(s, "GetKeySet %s: status %d: %s", c->h->identity, (int)c->status, det);
        t->failed++;
    } else if (c->recv == NULL || accept_set(s, c->h, c->recv, 0, &cur) != 1) {
        if (c->recv == NULL) {
            atomic_fetch_add(&s->rejected[STEK_REJECT_MALFORMED], 1);
            record_error(s, "GetKeySet %s: OK without a message", c->h->identity);
        }
        t->failed++;
    } else {
        t->lat_ns[t->n_lat++] = lat;
        t->ok++;
    }
    if (c->recv != NULL)
        grpc_byte_buffer_destroy(c->recv);
    grpc_byte_buffer_destroy(c->send);
    grpc_slice_unref(c->details);
    grpc_metadata_array_destroy(&c->imd);
    grpc_metadata_array_destroy(&c->tmd);
    grpc_call_unref(c->call);
    /* Watchers keep their connection for the watch phase. */
    if (c->h->idx >= s->n_watch)
        close_channel(c->h);
    c->busy = false;
}

static void *fetch_main(void *arg)
{
    fetch_thread *t = arg;
    shared *s = t->s;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    fcall *calls = calloc(t->inflight, sizeof(*calls));
    t->lat_ns = calloc(s->n_hosts, sizeof(*t->lat_ns));
    unsigned busy = 0;
    bool more = calls != NULL && t->lat_ns != NULL;
    if (!more) {
        count_status(s, GRPC_STATUS_UNAUTHENTICATED + 1);
        t->failed++;
    }
    for (;;) {
        for (unsigned i = 0; more && i < t->inflight; i++) {
            if (calls[i].busy)
                continue;
            size_t k = atomic_fetch_add(t->next, 1);
            if (k >= s->n_hosts || bench_stop_requested) {
                more = false;
                break;
            }
            if (fetch_start(t, cq, &calls[i], &s->hosts[k])) {
                busy++;
            } else {
                count_status(s, GRPC_STATUS_UNAUTHENTICATED + 1);
                record_error(s, "GetKeySet %s: could not start the call", s->hosts[k].identity);
                t->failed++;
            }
        }
        if (busy == 0)
            break;
        /* Every call has a deadline, so every batch completes. */
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        fetch_done(t, ev.tag);
        busy--;
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    free(calls);
    return NULL;
}

/* ---- watch: streams held across rotations ------------------------------------ */

enum { W_START, W_MSG, W_STATUS };

typedef struct watcher watcher;
typedef struct wtag {
    int op;
    watcher *w;
} wtag;

struct watcher {
    wtag t_start, t_msg, t_status;
    host *h;
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array imd, tmd;
    grpc_status_code status;
    grpc_slice details;
    int pending;                  /* batches started, not yet completed */
    atomic_bool ended;            /* the status arrived before our cancel */
    atomic_uint_fast64_t current; /* CURRENT epoch of the last accepted set; 0: none */
    int64_t got_ns[MAX_EPOCHS];   /* realtime of the first set with CURRENT >= base + i */
    long sets, beats;
};

/* A received message waiting for its verification (see watch_main). */
typedef struct received {
    watcher *w;
    grpc_byte_buffer *bb;
    int64_t at_ns; /* realtime of the dequeue */
} received;

typedef struct watch_thread {
    shared *s;
    watcher *ws; /* this thread's */
    size_t n;
    received *q; /* FIFO ring of messages not verified yet */
    size_t q_cap, q_head, q_len;
    uint64_t base_epoch;
    atomic_bool *stop;
    atomic_long *established;
    atomic_long *ended; /* streams that ended before our cancel, all threads */
    long ended_early;
} watch_thread;

static bool watch_read(grpc_call *call, watcher *w)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &w->recv;
    if (grpc_call_start_batch(call, &op, 1, &w->t_msg, NULL) != GRPC_CALL_OK)
        return false;
    w->pending++;
    return true;
}

static bool watch_start(watch_thread *t, grpc_completion_queue *cq, watcher *w)
{
    w->t_start = (wtag){W_START, w};
    w->t_msg = (wtag){W_MSG, w};
    w->t_status = (wtag){W_STATUS, w};
    w->call = new_call(w->h->ch, cq, WATCH, gpr_inf_future(GPR_CLOCK_MONOTONIC));
    if (w->call == NULL)
        return false;
    w->send = bytes_to_bb(w->h->req, w->h->req_len);
    grpc_metadata_array_init(&w->imd);
    grpc_metadata_array_init(&w->tmd);
    w->details = grpc_empty_slice();
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = w->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &w->imd;
    if (grpc_call_start_batch(w->call, ops, 4, &w->t_start, NULL) != GRPC_CALL_OK)
        return false;
    w->pending++;
    grpc_op st;
    memset(&st, 0, sizeof(st));
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &w->tmd;
    st.data.recv_status_on_client.status = &w->status;
    st.data.recv_status_on_client.status_details = &w->details;
    if (grpc_call_start_batch(w->call, &st, 1, &w->t_status, NULL) != GRPC_CALL_OK)
        return false;
    w->pending++;
    (void)t;
    return watch_read(w->call, w);
}

/*
 * Verifies the oldest received message. The host holds a set once it has
 * verified it: at its receipt plus its own verification time. Each host
 * verifies on its own CPU; here 2 threads verify for 2,000 hosts, so the
 * wait behind other hosts' verifications is not counted.
 */
static void watch_verify_next(watch_thread *t)
{
    received m = t->q[t->q_head];
    t->q_head = (t->q_head + 1) % t->q_cap;
    t->q_len--;
    watcher *w = m.w;
    int64_t v0 = bench_mono_ns();
    uint64_t prev = atomic_load(&w->current), cur = 0;
    int r = accept_set(t->s, w->h, m.bb, prev, &cur);
    grpc_byte_buffer_destroy(m.bb);
    int64_t now = m.at_ns + (bench_mono_ns() - v0);
    if (r == 0) {
        w->beats++;
        return;
    }
    if (r < 0)
        return;
    w->sets++;
    if (prev == 0)
        atomic_fetch_add(t->established, 1);
    for (uint64_t e = prev > t->base_epoch ? prev + 1 : t->base_epoch; e <= cur; e++)
        if (e - t->base_epoch < MAX_EPOCHS && w->got_ns[e - t->base_epoch] == 0)
            w->got_ns[e - t->base_epoch] = now;
    atomic_store(&w->current, cur);
}

/* Queues a received message for verification, oldest first; verifies the
 * oldest at once when the ring is full. */
static void watch_received(watch_thread *t, watcher *w)
{
    if (t->q_len == t->q_cap)
        watch_verify_next(t);
    t->q[(t->q_head + t->q_len) % t->q_cap] = (received){w, w->recv, bench_real_ns()};
    t->q_len++;
    w->recv = NULL;
}

static void *watch_main(void *arg)
{
    watch_thread *t = arg;
    shared *s = t->s;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    long pending = 0;
    /* Room for a rotation's set and a few heartbeats per stream. */
    t->q_cap = t->n * 4 + 16;
    t->q = calloc(t->q_cap, sizeof(*t->q));
    if (t->q == NULL) {
        record_error(s, "watch thread: out of memory");
        grpc_completion_queue_destroy(cq);
        return NULL;
    }
    for (size_t i = 0; i < t->n; i++) {
        watcher *w = &t->ws[i];
        bool ok = watch_start(t, cq, w);
        pending += w->pending;
        if (!ok) {
            /* Its started batches still complete; count it as ended now. */
            atomic_store(&w->ended, true);
            atomic_fetch_add(t->ended, 1);
            count_status(s, GRPC_STATUS_UNAUTHENTICATED + 1);
            record_error(s, "WatchKeySet %s: could not start the call", w->h->identity);
        }
    }
    bool cancelled = false;
    while (pending > 0) {
        if (!cancelled && atomic_load(t->stop)) {
            /* The end of the run: our cancel, not an error. */
            for (size_t i = 0; i < t->n; i++)
                if (t->ws[i].call != NULL)
                    grpc_call_cancel(t->ws[i].call, NULL);
            cancelled = true;
        }
        /* Receipts first: verify only when no event is waiting. */
        grpc_event ev = grpc_completion_queue_next(
            cq, t->q_len > 0 ? gpr_time_0(GPR_CLOCK_MONOTONIC) : in_ms(100), NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            if (t->q_len > 0)
                watch_verify_next(t);
            continue;
        }
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        wtag *tg = ev.tag;
        watcher *w = tg->w;
        w->pending--;
        pending--;
        if (tg->op == W_MSG) {
            if (w->recv != NULL) {
                watch_received(t, w);
                if (!cancelled && watch_read(w->call, w))
                    pending++;
            }
        } else if (tg->op == W_STATUS) {
            if (!cancelled) {
                atomic_store(&w->ended, true);
                atomic_fetch_add(t->ended, 1);
                count_status(s, w->status);
                t->ended_early++;
                record_error(s, "WatchKeySet %s: stream ended with status %d", w->h->identity,
                             (int)w->status);
            }
        }
    }
    while (t->q_len > 0)
        watch_verify_next(t);
    free(t->q);
    for (size_t i = 0; i < t->n; i++) {
        watcher *w = &t->ws[i];
        if (w->call == NULL)
            continue;
        if (w->recv != NULL)
            grpc_byte_buffer_destroy(w->recv);
        grpc_byte_buffer_destroy(w->send);
        grpc_slice_unref(w->details);
        grpc_metadata_array_destroy(&w->imd);
        grpc_metadata_array_destroy(&w->tmd);
        grpc_call_unref(w->call);
        w->call = NULL;
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    return NULL;
}

/* ---- main -------------------------------------------------------------------- */

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    char *buf = calloc(1, 65536);
    if (buf != NULL && fread(buf, 1, 65535, f) == 0) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

/* stekd's warnings and errors (its log goes with the fixture's directory). */
static void print_log_problems(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char line[512];
    int n = 0, shown = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        if (strstr(line, "Z warn ") != NULL || strstr(line, "Z error ") != NULL) {
            if (shown < 5) {
                fprintf(stderr, "stekd: %s", line);
                shown++;
            }
            n++;
        }
    fclose(f);
    fprintf(stderr, "bench: stekd logged %d warning(s) or error(s)\n", n);
}

/* How many watchers hold a set whose CURRENT epoch is e or later, or have
 * ended (an error, counted apart: they will never hold it). */
static size_t holding_or_ended(watcher *ws, size_t n, uint64_t e)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += atomic_load(&ws[i].current) >= e || atomic_load(&ws[i].ended);
    return k;
}

static double pct_ms(const int64_t *v, size_t n, int p)
{
    if (n == 0)
        return -1;
    size_t i = (n * (size_t)p + 99) / 100;
    return (double)v[i ? i - 1 : 0] / 1e6;
}

int main(void)
{
    const size_t n_hosts = (size_t)bench_env_int("STEK_LOAD_HOSTS", 10000, 1, 100000);
    const size_t n_watch = (size_t)bench_env_int("STEK_LOAD_WATCHERS", 2000, 1, 20000);
    const unsigned threads = (unsigned)bench_env_int("STEK_LOAD_THREADS", 2, 1, MAX_THREADS);
    const unsigned inflight = (unsigned)bench_env_int("STEK_LOAD_INFLIGHT", 16, 1, 256);
    const unsigned rotations = (unsigned)bench_env_int("STEK_LOAD_ROTATIONS", 4, 1, 30);
    setvbuf(stdout, NULL, _IOLBF, 0);
    bench_catch_signals();
    if (n_watch > n_hosts) {
        fprintf(stderr, "bench: more watchers than hosts\n");
        return 2;
    }

    /* Every watcher is a TLS connection: an fd here and one in stekd, which
     * inherits this limit from us (fx_spawn). Raise the soft limit to the
     * hard one; stekd itself does not (see docs/benchmarks.md). */
    struct rlimit rl;
    rlim_t need = (rlim_t)(n_watch + (size_t)threads * inflight + 256);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need) {
        fprintf(stderr, "bench: RLIMIT_NOFILE %llu, need %llu (raise the hard limit)\n",
                (unsigned long long)rl.rlim_cur, (unsigned long long)need);
        return 1;
    }

    static const fx_stekd_group groups[] = {{GROUP, {"uri:spiffe://fleet/load/*", NULL}}};
    static fx_stekd d;
    static fleet f;
    static shared s;
    watcher *ws = NULL;
    char *ca_pem = NULL;
    EVP_PKEY *service_pub = NULL;
    int rc = 1, stekd_exit = -1;
    bool grpc_up = false;
    pthread_mutex_init(&s.mu, NULL);

    printf("bench: %zu hosts, %zu watchers, %u client thread(s), epoch %u s, decrypt lifetime "
           "%u s, open files %llu\n",
           n_hosts, n_watch, threads, EPOCH_S, LIFETIME_S, (unsigned long long)rl.rlim_cur);
    /* The metrics listener: how many rotation sets were built ahead. */
    if (fx_stekd_setup(&d, EPOCH_S, LIFETIME_S, groups, 1,
                       "metrics = { listen = \"127.0.0.1:0\"; };\n") != 0 ||
        fx_stekd_start(&d) != 0)
        goto done;
    FILE *pf = fopen(d.signing_pem_path, "r");
    service_pub = pf ? PEM_read_PUBKEY(pf, NULL, NULL, NULL) : NULL;
    if (pf != NULL)
        fclose(pf);
    ca_pem = read_text(d.ca.cert_path);
    if (service_pub == NULL || ca_pem == NULL) {
        fprintf(stderr, "bench: cannot read the service key or the CA\n");
        goto done;
    }

    int64_t t0 = bench_mono_ns();
    f.d = &d;
    f.n = n_hosts;
    f.hosts = calloc(n_hosts, sizeof(*f.hosts));
    if (f.hosts == NULL || make_fleet(&f) != 0)
        goto done;
    double gen_s = (double)(bench_mono_ns() - t0) / 1e9;
    printf("bench: %zu certificates (%zu RSA-2048, %zu EC P-256) issued in-process by the fleet "
           "CA in %.1f s; keys shared: %d RSA and %d EC keys, each behind %zu certificates\n",
           n_hosts, (n_hosts + 1) / 2, n_hosts / 2, gen_s, KEYS_PER_TYPE, KEYS_PER_TYPE,
           (n_hosts + 2 * KEYS_PER_TYPE - 1) / (2 * KEYS_PER_TYPE));

    grpc_init();
    grpc_up = true;
    s.target = d.target;
    s.ca_pem = ca_pem;
    s.service_pub = service_pub;
    s.hosts = f.hosts;
    s.n_hosts = n_hosts;
    s.n_watch = n_watch;
    s.threads = threads;

    /* Phase 1: fetch. */
    printf("bench: fetch: every host calls GetKeySet on a new connection, %u in flight\n",
           threads * inflight);
    static fetch_thread ft[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    atomic_size_t next;
    atomic_init(&next, 0);
    double cpu0 = bench_proc_cpu_s(d.pid);
    t0 = bench_mono_ns();
    for (unsigned i = 0; i < threads; i++) {
        ft[i] = (fetch_thread){.s = &s, .next = &next, .inflight = inflight};
        if (pthread_create(&th[i], NULL, fetch_main, &ft[i]) != 0) {
            fprintf(stderr, "bench: pthread_create failed\n");
            exit(1);
        }
    }
    for (unsigned i = 0; i < threads; i++)
        pthread_join(th[i], NULL);
    double fetch_s = (double)(bench_mono_ns() - t0) / 1e9;
    double fetch_cpu = bench_proc_cpu_s(d.pid) - cpu0;
    size_t n_lat = 0;
    long fetch_ok = 0, fetch_failed = 0;
    for (unsigned i = 0; i < threads; i++) {
        n_lat += ft[i].n_lat;
        fetch_ok += ft[i].ok;
        fetch_failed += ft[i].failed;
    }
    int64_t *lat = calloc(n_lat ? n_lat : 1, sizeof(*lat));
    size_t k = 0;
    for (unsigned i = 0; i < threads; i++) {
        for (size_t j = 0; lat != NULL && j < ft[i].n_lat; j++)
            lat[k++] = ft[i].lat_ns[j];
        free(ft[i].lat_ns);
    }
    qsort(lat, k, sizeof(*lat), cmp_i64);
    double f_p50 = pct_ms(lat, k, 50), f_p99 = pct_ms(lat, k, 99),
           f_max = k ? (double)lat[k - 1] / 1e6 : -1;
    free(lat);
    long rss_after_fetch = proc_status_kib(d.pid, "VmRSS:");

    /* Phase 2: watch, on the first n_watch hosts' open connections. */
    uint64_t base_epoch = (uint64_t)time(NULL) / EPOCH_S;
    ws = calloc(n_watch, sizeof(*ws));
    if (ws == NULL || bench_stop_requested)
        goto done;
    for (size_t i = 0; i < n_watch; i++) {
        ws[i].h = &f.hosts[i];
        atomic_init(&ws[i].current, 0);
        atomic_init(&ws[i].ended, false);
        if (ws[i].h->ch == NULL) {
            fprintf(stderr, "bench: watcher %zu has no connection (its fetch failed)\n", i);
            goto done;
        }
    }
    static watch_thread wt[MAX_THREADS];
    atomic_bool stop;
    atomic_long established, ended;
    atomic_init(&stop, false);
    atomic_init(&established, 0);
    atomic_init(&ended, 0);
    size_t per = (n_watch + threads - 1) / threads;
    unsigned wthreads = 0;
    printf("bench: watch: opening %zu WatchKeySet streams\n", n_watch);
    t0 = bench_mono_ns();
    for (unsigned i = 0; i < threads && (size_t)i * per < n_watch; i++) {
        size_t from = (size_t)i * per, n = n_watch - from < per ? n_watch - from : per;
        wt[i] = (watch_thread){.s = &s,
                               .ws = ws + from,
                               .n = n,
                               .base_epoch = base_epoch,
                               .stop = &stop,
                               .established = &established,
                               .ended = &ended};
        if (pthread_create(&th[i], NULL, watch_main, &wt[i]) != 0) {
            fprintf(stderr, "bench: pthread_create failed\n");
            exit(1);
        }
        wthreads++;
    }
    /* Every watcher holds a first set (or the wait gives up). */
    int64_t until = bench_mono_ns() + 120 * 1000000000LL;
    while ((size_t)(atomic_load(&established) + atomic_load(&ended)) < n_watch &&
           bench_mono_ns() < until && !bench_stop_requested)
        pause_ms(20);
    double open_s = (double)(bench_mono_ns() - t0) / 1e9;
    size_t est = (size_t)atomic_load(&established);
    printf("bench: %zu/%zu streams hold a set after %.1f s (%ld ended); stekd holds %d fds\n", est,
           n_watch, open_s, atomic_load(&ended), proc_fds(d.pid));
    /* The rotations measured: the first boundary after every stream holds
     * a set, and the next ones. */
    int64_t est_real = bench_real_ns();
    uint64_t e0 = (uint64_t)(est_real / 1000000000LL) / EPOCH_S + 1, e_last = e0 + rotations - 1;
    double cpu_w0 = bench_proc_cpu_s(d.pid);
    int64_t w0 = bench_mono_ns();
    int max_fds = 0;
    if (est > 0) {
        /* Until every watcher holds the last measured epoch, or 60 s past
         * its boundary. */
        int64_t last_real = (int64_t)(e_last * EPOCH_S) * 1000000000LL + 60 * 1000000000LL;
        while (holding_or_ended(ws, n_watch, e_last) < n_watch && bench_real_ns() < last_real &&
               !bench_stop_requested) {
            int fds = proc_fds(d.pid);
            max_fds = fds > max_fds ? fds : max_fds;
            pause_ms(50);
        }
    }
    double watch_cpu = bench_proc_cpu_s(d.pid) - cpu_w0,
           watch_s = (double)(bench_mono_ns() - w0) / 1e9;
    long hwm_kib = proc_status_kib(d.pid, "VmHWM:"), rss_kib = proc_status_kib(d.pid, "VmRSS:");
    long threads_stekd = proc_status_kib(d.pid, "Threads:");
    atomic_store(&stop, true);
    for (unsigned i = 0; i < wthreads; i++)
        pthread_join(th[i], NULL);
    long self_hwm = proc_status_kib(getpid(), "VmHWM:");
    double staged = NAN, staged_sent = NAN, sets_sent = NAN;
    fx_http_reply mr;
    if (fx_http(fx_metrics_port(d.log_path), "GET", "/metrics", &mr) == 0) {
        staged = fx_metric(mr.body, "stekd_watch_sets_staged_total");
        staged_sent = fx_metric(mr.body, "stekd_watch_staged_sent_total");
        sets_sent = fx_metric(mr.body, "stekd_watch_sets_sent_total");
        fx_http_free(&mr);
    }

    /* Per rotation: held - not_before(e), over all watchers. */
    int64_t *prop = calloc(n_watch, sizeof(*prop)),
            *all = calloc(n_watch * rotations, sizeof(*all));
    if (prop == NULL || all == NULL) {
        free(prop);
        free(all);
        goto done;
    }
    size_t n_all = 0, missing = 0;
    long sets = 0, beats = 0, ended_early = 0;
    for (size_t i = 0; i < n_watch; i++) {
        sets += ws[i].sets;
        beats += ws[i].beats;
    }
    for (unsigned i = 0; i < wthreads; i++)
        ended_early += wt[i].ended_early;
    printf("\nload benchmark (stekd, SoftHSM, %ld vCPU shared with other work; %zu hosts, %zu "
           "watchers, 4 keys per set)\n",
           sysconf(_SC_NPROCESSORS_ONLN), n_hosts, n_watch);
    printf("fetch: %ld OK of %zu GetKeySet in %.1f s = %.0f calls/s; latency (new TLS "
           "connection + call) p50 %.1f ms, p99 %.1f ms, max %.1f ms; stekd CPU %.0f us/call\n",
           fetch_ok, n_hosts, fetch_s, (double)fetch_ok / fetch_s, f_p50, f_p99, f_max,
           fetch_ok ? fetch_cpu * 1e6 / (double)fetch_ok : -1);
    printf("watch: %zu streams opened (first set each) in %.1f s\n", est, open_s);
    printf(
        "rotation         not_before (UTC s)  holding     min ms    p50 ms    p99 ms    max ms\n");
    size_t n_ended = 0;
    for (size_t i = 0; i < n_watch; i++)
        n_ended += atomic_load(&ws[i].ended);
    for (uint64_t e = e0; est > 0 && e <= e_last; e++) {
        size_t n = 0;
        int64_t nb = (int64_t)(e * EPOCH_S) * 1000000000LL;
        for (size_t i = 0; i < n_watch; i++) {
            int64_t g = e - base_epoch < MAX_EPOCHS ? ws[i].got_ns[e - base_epoch] : 0;
            if (g == 0) {
                missing += !atomic_load(&ws[i].ended);
                continue;
            }
            prop[n++] = g - nb;
            all[n_all++] = g - nb;
        }
        qsort(prop, n, sizeof(*prop), cmp_i64);
        printf("epoch %-10llu %-19lld %5zu/%zu %9.1f %9.1f %9.1f %9.1f\n", (unsigned long long)e,
               (long long)(nb / 1000000000LL), n, n_watch, n ? (double)prop[0] / 1e6 : -1,
               pct_ms(prop, n, 50), pct_ms(prop, n, 99), n ? (double)prop[n - 1] / 1e6 : -1);
    }
    qsort(all, n_all, sizeof(*all), cmp_i64);
    double p99 = pct_ms(all, n_all, 99);
    printf("all %u rotations: p50 %.1f ms, p99 %.1f ms, max %.1f ms over %zu receipts (%zu never "
           "arrived; %zu streams ended early, not counted)\n",
           rotations, pct_ms(all, n_all, 50), p99, n_all ? (double)all[n_all - 1] / 1e6 : -1, n_all,
           missing, n_ended);
    printf("watch phase: %.1f s, %ld sets and %ld heartbeats received, stekd CPU %.1f s (%.0f%% "
           "of one core)\n",
           watch_s, sets, beats, watch_cpu, watch_s > 0 ? watch_cpu * 100 / watch_s : 0);
    printf("stekd over the run: %.0f sets sent on watch streams, %.0f of them built ahead of "
           "their rotation; %.0f built ahead in all\n",
           sets_sent, staged_sent, staged);
    printf("stekd: peak RSS (VmHWM) %.1f MiB, RSS %.1f MiB after the fetch phase and %.1f MiB at "
           "the end, %ld threads, up to %d fds; benchmark process peak RSS %.1f MiB\n",
           (double)hwm_kib / 1024, (double)rss_after_fetch / 1024, (double)rss_kib / 1024,
           threads_stekd, max_fds, (double)self_hwm / 1024);
    long errors = 0;
    printf("errors by gRPC status:");
    for (size_t i = 0; i <= GRPC_STATUS_UNAUTHENTICATED + 1; i++) {
        long c = atomic_load(&s.status_count[i]);
        if (i != GRPC_STATUS_OK && c > 0) {
            printf(" %s%zu=%ld", i > GRPC_STATUS_UNAUTHENTICATED ? "local/" : "", i, c);
            errors += c;
        }
    }
    printf("%s (fetches failed: %ld; streams ended before our cancel: %ld)\nrejected sets:",
           errors ? "" : " none", fetch_failed, ended_early);
    long rejected = 0;
    for (int i = 1; i < STEK_REJECT_COUNT; i++) {
        long c = atomic_load(&s.rejected[i]);
        if (c > 0)
            printf(" %s=%ld", stek_reject_name((stek_reject)i), c);
        rejected += c;
    }
    printf("%s\n", rejected ? "" : " none");
    errors += rejected;
    if (s.first_error[0] != '\0')
        printf("first error: %s\n", s.first_error);
    bool complete = est == n_watch && missing == 0;
    double hwm_mib = (double)hwm_kib / 1024;
    printf("targets: zero errors: %s (%ld); propagation p99 <= %.0f ms to all %zu watchers: %s "
           "(%.1f ms%s); stekd peak RSS < %.0f MiB: %s (%.1f MiB)\n",
           errors == 0 ? "met" : "MISSED", errors, TARGET_P99_MS, n_watch,
           complete && p99 <= TARGET_P99_MS ? "met" : "MISSED", p99, complete ? "" : ", incomplete",
           TARGET_RSS_MIB, hwm_kib > 0 && hwm_mib < TARGET_RSS_MIB ? "met" : "MISSED", hwm_mib);
    free(prop);
    free(all);
    rc = errors == 0 && complete ? 0 : 1;

done:
    if (d.pid > 0 && (fx_stekd_stop(&d, 15000, &stekd_exit) != 0 || stekd_exit != 0)) {
        fprintf(stderr, "bench: stekd exited with %d; its log: %s\n", stekd_exit, d.log_path);
        rc = 1;
    }
    free(ws);
    free_fleet(&f);
    if (grpc_up)
        grpc_shutdown();
    free(ca_pem);
    EVP_PKEY_free(service_pub);
    if (rc != 0)
        print_log_problems(d.log_path);
    fx_stekd_destroy(&d);
    pthread_mutex_destroy(&s.mu);
    return rc;
}
