/*
 * The gRPC core server. Threads poll one completion queue; every event's tag
 * points at a small struct whose first member says what completed.
 *
 * Unary calls (GetKeySet, ReportStatus, Health/Check) arrive with their payload
 * (GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER) and are answered with one
 * batch. A watch stream is a `watcher`: the first set goes out at once; a
 * ticker thread sends a new set when the group's view changes (after a
 * per-stream jitter) and a heartbeat when the stream has been quiet for the
 * heartbeat interval. gRPC allows one send in flight per call, so a watcher
 * sends only when its previous send completed.
 */
#include "rpc.h"
#include "p11engine.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "audit.h"
#include "fleet.h"
#include "grpc/health/v1/health.pb-c.h"
#include "log.h"
#include "metrics.h"
#include "secret.h"
#include "tsan.h"
#include "stek/v1/stek.pb-c.h"

#define MAX_SANS 16
/* Watchers per tick from which the ticker gets helpers. */
#define TICK_PARALLEL_MIN 32
#define TICK_HELPERS_MAX 8
/* How long after a view change's last due time the helpers stay on: sets
 * that could not be sent at once (a send in flight) go out on later ticks. */
#define SETS_OWED_GRACE_MS 2000
#define TICK_MS 50
/*
 * Staging (see watcher_stage): a stream's set for the next epoch is built
 * as soon as the stream holds the current one, but at most
 * STAGE_LEAD_MAX_MS before the boundary: the cap keeps a staged set younger
 * than STEKD_KEYSET_MAX_AGE_S when it goes out. Each tick spends at most
 * STAGE_BUDGET_MS staging, so heartbeats and owed sets of later watchers
 * wait no longer than that.
 */
#define STAGE_LEAD_MAX_MS 25000
#define STAGE_BUDGET_MS 250
/*
 * Plaintext buffered per TLS connection before it is sealed into a record:
 * this minus 100 bytes, allocated for the connection's life. gRPC's default
 * is 16 KiB; sets and heartbeats are a few KiB at most, so half of that is
 * 8 KiB less per connected host (10 MiB less peak RSS for 2,000 watchers in
 * bench_load).
 *
 * Not less than 8,272: gRPC 1.51's SSL frame protector (protect_flush) leaves
 * its output size unset when a write ends exactly at the end of this buffer
 * with the record already drained, and secure_endpoint then sends the rest of
 * its 8 KiB staging buffer as if it were TLS data: the peer sees a corrupt
 * record (and whatever those bytes held). A record can only be drained by then
 * if it fits that 8,192-byte staging buffer; at 8,272 or more it never does
 * (buffer 8,172 + at least 21 bytes of record overhead). Measured on gRPC's
 * own protector: at 1,024 and 4,096, every write of a multiple of 924 or
 * 3,996 bytes corrupted the stream (bench_load lost 255 of 2,000 watch
 * streams at 1,024); at 8,448 no write size up to 26,000 did.
 */
#define TSI_MAX_FRAME_BYTES 8448

/*
 * Socket reads, when gRPC's tcp_read_chunks experiment is off (stekd.c turns
 * it off on gRPC core 29): start at 1 KiB, then 256 bytes to 4 KiB as gRPC
 * sees fit. A request is at most a few hundred bytes of protobuf in one or
 * two TLS records; gRPC's defaults (8 KiB, up to 4 MiB) suit bulk streams.
 * These arguments change nothing while the experiment is on.
 */
#define TCP_READ_CHUNK_BYTES 1024
#define TCP_MIN_READ_CHUNK_BYTES 256
#define TCP_MAX_READ_CHUNK_BYTES 4096

static grpc_arg int_arg(const char *key, int value)
{
    grpc_arg a = {.type = GRPC_ARG_INTEGER, .key = (char *)key, .value.integer = value};
    return a;
}

typedef enum kind {
    K_NEW_GET,
    K_NEW_WATCH,
    K_NEW_HEALTH,
    K_NEW_REPORT,
    K_NEW_OTHER, /* any unregistered method: answered UNIMPLEMENTED */
    K_NEW_ECHO,  /* benchmark echo (STEKD_BENCH_ECHO=1 only) */
    K_UNARY_DONE,
    K_WATCH_SEND,
    K_WATCH_CLOSED,
    K_WATCH_STATUS,
    K_SHUTDOWN,
} kind;

struct stekd_rpc;

/* A requested call not yet arrived. */
typedef struct incoming {
    kind k; /* K_NEW_* */
    struct stekd_rpc *rpc;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    grpc_call_details details; /* K_NEW_OTHER only */
} incoming;

/* A unary answer in flight. */
typedef struct unary {
    kind k; /* K_UNARY_DONE */
    grpc_call *call;
    grpc_byte_buffer *resp;
    grpc_slice details;
    int cancelled;
} unary;

typedef struct watcher watcher;
typedef struct wtag {
    kind k;
    watcher *w;
} wtag;

struct watcher {
    struct stekd_rpc *rpc;
    pthread_mutex_t mu;
    int refs;
    grpc_call *call;
    stekd_request req;
    wtag send_tag, close_tag, status_tag;
    grpc_byte_buffer *send_bb;
    grpc_slice status_details;
    int cancelled;
    bool sending, closed, finishing;
    grpc_status_code finish_code; /* what watcher_finish_locked sent */
    char peer[96];                /* the host's address, for audit lines */
    uint64_t sent_version;
    /* The next epoch's set, built ahead from staged_view (a reference);
     * staged_ks NULL with staged_view set: that build failed, not retried. */
    stekd_view *staged_view;
    stekd_keyset *staged_ks;
    int64_t due_ms;  /* send the new view at or after this (jitter) */
    int64_t last_ms; /* last message sent */
    watcher *next;   /* in rpc->watchers (rpc->wmu) */
};

struct stekd_rpc {
    const stekd_handler *h;
    grpc_server *server;
    grpc_completion_queue *cq;
    void *m_get, *m_watch, *m_health, *m_report;
    void *m_echo; /* benchmark echo: NULL unless STEKD_BENCH_ECHO=1 */
    int port;
    pthread_t *threads;
    unsigned n_threads;
    pthread_t ticker;
    bool ticker_started;
    kind shutdown_tag;

    pthread_mutex_t wmu;
    pthread_cond_t wcv;
    watcher *watchers;
    bool stopping, shutdown_done;
    unsigned long n_watchers;
    /* Atomics, not under wmu: they are bumped while a watcher's mu is
     * held, and wmu is taken before a watcher's mu (snapshot_watchers). */
    atomic_ulong sets_sent, heartbeats_sent, sets_staged, staged_sent;
    /* Until when (mono ms) a view change leaves watchers owing sets: the
     * ticker gets helpers only then. */
    atomic_int_fast64_t sets_owed_until_ms;
};

/* Every batch starts here: the tag is published to whichever cq thread
 * gets its event (cq_main acquires it; see tsan.h). */
static grpc_call_error start_batch(grpc_call *call, const grpc_op *ops, size_t n, void *tag)
{
    STEK_TSAN_RELEASE(tag);
    return grpc_call_start_batch(call, ops, n, tag, NULL);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- helpers ------------------------------------------------------------ */

static grpc_byte_buffer *bb_from(const uint8_t *data, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Copies a byte buffer out; *out is freed with free(). */
static bool bb_read(grpc_byte_buffer *bb, uint8_t **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    if (bb == NULL)
        return false;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return false;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *len = GRPC_SLICE_LENGTH(s);
    *out = malloc(*len ? *len : 1);
    if (*out != NULL)
        memcpy(*out, GRPC_SLICE_START_PTR(s), *len);
    grpc_slice_unref(s);
    return *out != NULL;
}

/* The verified peer: certificate and typed SANs from the auth context. */
typedef struct peer_buf {
    stekd_peer p;
    char *pem;
    char *uris[MAX_SANS], *dns[MAX_SANS];
} peer_buf;

static char *prop_dup(const grpc_auth_property *prop)
{
    char *s = malloc(prop->value_length + 1);
    if (s != NULL) {
        memcpy(s, prop->value, prop->value_length);
        s[prop->value_length] = '\0';
    }
    return s;
}

static void peer_read(grpc_call *call, peer_buf *pb)
{
    memset(pb, 0, sizeof(*pb));
    grpc_auth_context *ctx = grpc_call_auth_context(call);
    if (ctx == NULL)
        return;
    grpc_auth_property_iterator it =
        grpc_auth_context_find_properties_by_name(ctx, GRPC_X509_PEM_CERT_PROPERTY_NAME);
    const grpc_auth_property *prop = grpc_auth_property_iterator_next(&it);
    if (prop != NULL && (pb->pem = prop_dup(prop)) != NULL) {
        /* Parsed by the handler only when the request is not already known
         * to be valid: PEM decoding dominates a warm call otherwise. */
        pb->p.cert_pem = pb->pem;
        pb->p.cert_pem_len = prop->value_length;
    }
    it = grpc_auth_context_find_properties_by_name(ctx, GRPC_PEER_URI_PROPERTY_NAME);
    while ((prop = grpc_auth_property_iterator_next(&it)) != NULL && pb->p.n_uris < MAX_SANS)
        if ((pb->uris[pb->p.n_uris] = prop_dup(prop)) != NULL)
            pb->p.n_uris++;
    it = grpc_auth_context_find_properties_by_name(ctx, GRPC_PEER_DNS_PROPERTY_NAME);
    while ((prop = grpc_auth_property_iterator_next(&it)) != NULL && pb->p.n_dns < MAX_SANS)
        if ((pb->dns[pb->p.n_dns] = prop_dup(prop)) != NULL)
            pb->p.n_dns++;
    pb->p.uris = (const char *const *)pb->uris;
    pb->p.dns = (const char *const *)pb->dns;
    grpc_auth_context_release(ctx);
}

static void peer_free(peer_buf *pb)
{
    free(pb->pem);
    for (size_t i = 0; i < pb->p.n_uris; i++)
        free(pb->uris[i]);
    for (size_t i = 0; i < pb->p.n_dns; i++)
        free(pb->dns[i]);
}

/* ---- requesting calls --------------------------------------------------- */

static void request_next(stekd_rpc *r, kind k)
{
    incoming *in = calloc(1, sizeof(*in));
    if (in == NULL) {
        stek_log(STEK_LOG_ERROR, "stekd", "out of memory: not accepting more calls");
        return;
    }
    in->k = k;
    in->rpc = r;
    grpc_metadata_array_init(&in->md);
    grpc_call_details_init(&in->details);
    grpc_call_error e;
    STEK_TSAN_RELEASE(in);
    if (k == K_NEW_OTHER) {
        e = grpc_server_request_call(r->server, &in->call, &in->details, &in->md, r->cq, r->cq, in);
    } else {
        void *method = k == K_NEW_GET      ? r->m_get
                       : k == K_NEW_WATCH  ? r->m_watch
                       : k == K_NEW_REPORT ? r->m_report
                       : k == K_NEW_ECHO   ? r->m_echo
                                           : r->m_health;
        e = grpc_server_request_registered_call(r->server, method, &in->call, &in->deadline,
                                                &in->md, &in->payload, r->cq, r->cq, in);
    }
    if (e != GRPC_CALL_OK) {
        grpc_call_details_destroy(&in->details);
        grpc_metadata_array_destroy(&in->md);
        free(in);
    }
}

static void incoming_free(incoming *in)
{
    grpc_call_details_destroy(&in->details);
    grpc_metadata_array_destroy(&in->md);
    if (in->payload)
        grpc_byte_buffer_destroy(in->payload);
    free(in);
}

/* Answers a unary call (or refuses a stream) with status and optional body. */
static void answer(grpc_call *call, grpc_status_code code, const char *details, const uint8_t *body,
                   size_t len)
{
    unary *u = calloc(1, sizeof(*u));
    if (u == NULL) {
        grpc_call_cancel(call, NULL);
        grpc_call_unref(call);
        return;
    }
    u->k = K_UNARY_DONE;
    u->call = call;
    u->details = grpc_slice_from_copied_string(details ? details : "");
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (code == GRPC_STATUS_OK && body != NULL) {
        u->resp = bb_from(body, len);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = u->resp;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &u->details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &u->cancelled;
    if (start_batch(call, ops, n, u) != GRPC_CALL_OK) {
        grpc_call_cancel(call, NULL);
        grpc_call_unref(call);
        if (u->resp)
            grpc_byte_buffer_destroy(u->resp);
        grpc_slice_unref(u->details);
        free(u);
    }
}

static void unary_done(unary *u)
{
    if (u->resp)
        grpc_byte_buffer_destroy(u->resp);
    grpc_slice_unref(u->details);
    grpc_call_unref(u->call);
    free(u);
}

static void log_refusal(const char *method, const peer_buf *pb, grpc_status_code code,
                        const char *details)
{
    const char *who = pb->p.n_uris ? pb->uris[0] : pb->p.n_dns ? pb->dns[0] : "(no typed SAN)";
    stek_log(STEK_LOG_INFO, "stekd", "%s from %s: status %d: %s", method, who, (int)code, details);
}

/* The call's peer address ("ipv4:10.0.0.7:51234"), for audit lines. */
static void peer_address(grpc_call *call, char *out, size_t len)
{
    char *p = grpc_call_get_peer(call);
    snprintf(out, len, "%s", p != NULL ? p : "");
    gpr_free(p);
}

_Static_assert(STEKD_CERT_SHA256_BYTES == STEKD_AUDIT_FP_BYTES, "audit fingerprint size");

/* One audit line for a set about to go out (h->audit NULL: no-op). */
static void audit_set(const stekd_rpc *r, const char *event, const stekd_request *req,
                      const stekd_reply *rep, const char *peer)
{
    stekd_audit_set a = {event,
                         req->identity,
                         peer,
                         req->cert_sha256,
                         req->group,
                         rep->generation,
                         rep->epoch_first,
                         rep->epoch_last,
                         rep->epoch_current};
    stekd_audit_keyset(r->h->audit, &a);
}

/* ---- GetKeySet and Health ----------------------------------------------- */

static void on_get(stekd_rpc *r, incoming *in)
{
    peer_buf pb;
    peer_read(in->call, &pb);
    uint8_t *bytes = NULL;
    size_t len = 0;
    stekd_request req;
    char details[256] = "";
    grpc_status_code code;
    if (!bb_read(in->payload, &bytes, &len))
        code = GRPC_STATUS_INVALID_ARGUMENT, snprintf(details, sizeof(details), "no request");
    else
        code = stekd_handle_validate(r->h, &pb.p, bytes, len, &req, details, sizeof(details));
    if (code != GRPC_STATUS_OK) {
        log_refusal("GetKeySet", &pb, code, details);
        answer(in->call, code, details, NULL, 0);
    } else {
        stekd_reply rep;
        stekd_handle_keyset(r->h, &req, &rep, NULL);
        code = rep.code;
        if (rep.code == GRPC_STATUS_OK) {
            if (r->h->audit != NULL) {
                char peer[96];
                peer_address(in->call, peer, sizeof(peer));
                audit_set(r, "get", &req, &rep, peer);
            }
            answer(in->call, GRPC_STATUS_OK, "", rep.ks->msg, rep.ks->len);
        } else {
            answer(in->call, rep.code, rep.details, NULL, 0);
        }
        stekd_keyset_unref(rep.ks);
    }
    stekd_metrics_fetch_done(r->h->metrics, code);
    free(bytes);
    peer_free(&pb);
    in->call = NULL;
}

/* ---- ReportStatus ------------------------------------------------------- */

static void on_report(stekd_rpc *r, incoming *in)
{
    peer_buf pb;
    peer_read(in->call, &pb);
    uint8_t *bytes = NULL;
    size_t len = 0;
    char details[256] = "";
    char peer[STEKD_FLEET_PEER_MAX];
    peer_address(in->call, peer, sizeof(peer));
    grpc_status_code code;
    if (!bb_read(in->payload, &bytes, &len))
        code = GRPC_STATUS_INVALID_ARGUMENT, snprintf(details, sizeof(details), "no request");
    else
        code = stekd_handle_report(r->h, &pb.p, peer, bytes, len, details, sizeof(details));
    if (code != GRPC_STATUS_OK) {
        log_refusal("ReportStatus", &pb, code, details);
        answer(in->call, code, details, NULL, 0);
    } else {
        /* An empty ReportStatusResponse: zero bytes. */
        answer(in->call, GRPC_STATUS_OK, "", (const uint8_t *)"", 0);
    }
    stekd_metrics_report_done(r->h->metrics, code);
    free(bytes);
    peer_free(&pb);
    in->call = NULL;
}

static void on_health(stekd_rpc *r, incoming *in)
{
    uint8_t *bytes = NULL;
    size_t len = 0;
    Grpc__Health__V1__HealthCheckRequest *m = NULL;
    if (bb_read(in->payload, &bytes, &len))
        m = grpc__health__v1__health_check_request__unpack(NULL, len, bytes);
    if (m == NULL) {
        answer(in->call, GRPC_STATUS_INVALID_ARGUMENT, "malformed health check request", NULL, 0);
    } else if (m->service[0] != '\0' && strcmp(m->service, "stek.v1.KeyService") != 0) {
        answer(in->call, GRPC_STATUS_NOT_FOUND, "unknown service", NULL, 0);
    } else {
        Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        resp.status = stekd_state_serving(r->h->state, stekd_now(), NULL, 0)
                          ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                          : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        uint8_t out[16];
        size_t n = grpc__health__v1__health_check_response__pack(&resp, out);
        answer(in->call, GRPC_STATUS_OK, "", out, n);
    }
    if (m != NULL)
        grpc__health__v1__health_check_request__free_unpacked(m, NULL);
    free(bytes);
    in->call = NULL;
}

/* ---- benchmark echo (STEKD_BENCH_ECHO=1 only) --------------------------- */

/*
 * "/stek.bench.Echo/Echo" is the baseline of bench/bench_stekd's warm
 * benchmark: the same binary, threads, completion queue, TLS and answer()
 * as GetKeySet, with none of its work. The request's first 4 bytes are the
 * wanted response size (big-endian); the answer is the request padded with
 * zeros or truncated to that size, so it matches a key set byte for byte in
 * length. It is registered only when the environment asks at start, so a
 * production stekd never serves it.
 */
#define BENCH_ECHO_MAX_BYTES (1u << 20)

static void on_echo(incoming *in)
{
    uint8_t *bytes = NULL;
    size_t len = 0;
    uint8_t *out = NULL;
    size_t want = 0;
    if (bb_read(in->payload, &bytes, &len) && len >= 4) {
        want = (size_t)bytes[0] << 24 | (size_t)bytes[1] << 16 | (size_t)bytes[2] << 8 | bytes[3];
        out = want <= BENCH_ECHO_MAX_BYTES ? calloc(1, want ? want : 1) : NULL;
    }
    if (out == NULL) {
        answer(in->call, GRPC_STATUS_INVALID_ARGUMENT, "echo: bad size", NULL, 0);
    } else {
        memcpy(out, bytes, len < want ? len : want);
        answer(in->call, GRPC_STATUS_OK, "", out, want);
    }
    free(out);
    free(bytes);
    in->call = NULL;
}

/* ---- WatchKeySet -------------------------------------------------------- */

static void watcher_unref(watcher *w)
{
    pthread_mutex_lock(&w->mu);
    bool last = --w->refs == 0;
    pthread_mutex_unlock(&w->mu);
    if (!last)
        return;
    if (w->send_bb)
        grpc_byte_buffer_destroy(w->send_bb);
    stekd_keyset_unref(w->staged_ks);
    stekd_view_unref(w->staged_view);
    grpc_slice_unref(w->status_details);
    grpc_call_unref(w->call);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

/* Starts one send; called with w->mu held and no send in flight. */
static bool watcher_send_locked(watcher *w, const uint8_t *msg, size_t len, bool initial)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    if (initial)
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (w->send_bb)
        grpc_byte_buffer_destroy(w->send_bb);
    w->send_bb = bb_from(msg, len);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = w->send_bb;
    w->refs++;
    if (start_batch(w->call, ops, n, &w->send_tag) != GRPC_CALL_OK) {
        w->refs--;
        return false;
    }
    w->sending = true;
    w->last_ms = mono_ms();
    return true;
}

/* Ends the stream with a status; called with w->mu held. */
static void watcher_finish_locked(watcher *w, grpc_status_code code, const char *details)
{
    if (w->finishing || w->closed)
        return;
    w->finishing = true;
    w->finish_code = code;
    grpc_slice_unref(w->status_details);
    w->status_details = grpc_slice_from_copied_string(details);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op.data.send_status_from_server.status = code;
    op.data.send_status_from_server.status_details = &w->status_details;
    w->refs++;
    if (start_batch(w->call, &op, 1, &w->status_tag) != GRPC_CALL_OK)
        w->refs--;
}

static void on_watch(stekd_rpc *r, incoming *in)
{
    peer_buf pb;
    peer_read(in->call, &pb);
    uint8_t *bytes = NULL;
    size_t len = 0;
    char details[256] = "";
    stekd_request req;
    grpc_status_code code;
    stekd_reply rep = {0};
    uint64_t version = 0;
    if (!bb_read(in->payload, &bytes, &len))
        code = GRPC_STATUS_INVALID_ARGUMENT, snprintf(details, sizeof(details), "no request");
    else
        code = stekd_handle_validate(r->h, &pb.p, bytes, len, &req, details, sizeof(details));
    if (code == GRPC_STATUS_OK) {
        stekd_handle_keyset(r->h, &req, &rep, &version);
        code = rep.code;
        snprintf(details, sizeof(details), "%s", rep.details);
    }
    pthread_mutex_lock(&r->wmu);
    bool full = r->n_watchers >= r->h->cfg->max_watchers, stopping = r->stopping;
    pthread_mutex_unlock(&r->wmu);
    if (code == GRPC_STATUS_OK && (full || stopping)) {
        code = GRPC_STATUS_UNAVAILABLE;
        snprintf(details, sizeof(details), "%s", stopping ? "shutting down" : "too many watchers");
    }
    if (code != GRPC_STATUS_OK) {
        log_refusal("WatchKeySet", &pb, code, details);
        answer(in->call, code, details, NULL, 0);
        stekd_metrics_watch_done(r->h->metrics, code);
        goto done;
    }

    watcher *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        answer(in->call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        goto done;
    }
    pthread_mutex_init(&w->mu, NULL);
    w->rpc = r;
    w->call = in->call;
    w->req = req;
    w->refs = 1; /* the list's */
    w->send_tag = (wtag){K_WATCH_SEND, w};
    w->close_tag = (wtag){K_WATCH_CLOSED, w};
    w->status_tag = (wtag){K_WATCH_STATUS, w};
    w->status_details = grpc_empty_slice();
    w->sent_version = version;
    if (r->h->audit != NULL) {
        peer_address(w->call, w->peer, sizeof(w->peer));
        audit_set(r, "watch_open", &req, &rep, w->peer);
    }

    pthread_mutex_lock(&w->mu);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &w->cancelled;
    w->refs++;
    if (start_batch(w->call, &op, 1, &w->close_tag) != GRPC_CALL_OK)
        w->refs--;
    watcher_send_locked(w, rep.ks->msg, rep.ks->len, true);
    pthread_mutex_unlock(&w->mu);

    pthread_mutex_lock(&r->wmu);
    w->next = r->watchers;
    r->watchers = w;
    r->n_watchers++;
    pthread_mutex_unlock(&r->wmu);
    atomic_fetch_add(&r->sets_sent, 1);
    stek_log(STEK_LOG_INFO, "stekd", "watch from %s on %s opened", req.identity, req.group);
done:
    stekd_keyset_unref(rep.ks);
    free(bytes);
    peer_free(&pb);
    in->call = NULL;
}

/*
 * Takes the watcher's staged set out (w->mu held): returned when it holds
 * exactly what v serves and is young enough to send, else dropped. Either
 * way the stream stages afresh for the next boundary.
 */
static stekd_keyset *take_staged_locked(watcher *w, const stekd_view *v)
{
    stekd_keyset *ks = w->staged_ks;
    bool fits = ks != NULL && v->available && stekd_view_same(w->staged_view, v) &&
                stekd_now() - ks->built_at < STEKD_KEYSET_MAX_AGE_S;
    w->staged_ks = NULL;
    stekd_view_unref(w->staged_view);
    w->staged_view = NULL;
    if (fits)
        return ks;
    stekd_keyset_unref(ks);
    return NULL;
}

/*
 * Builds the watcher's set for the next epoch ahead of the boundary, so the
 * rotation itself sends without HSM work: with one thread building every
 * watcher's set after the boundary, 2,000 watchers took 1.5 s on SoftHSM
 * (bench_load). The set is the one the boundary would build (same keys,
 * wrapped to the same host key and nonce), signed a little earlier; hosts
 * take the later of issued_at and their clock as the base of its deadlines.
 * Only for a stream that holds v's set, once per staged view.
 */
static void watcher_stage(stekd_rpc *r, watcher *w, const stekd_view *v, int64_t stage_until_ms)
{
    if (!v->available || v->staged == NULL || mono_ms() >= stage_until_ms)
        return;
    stek_key_times t;
    stek_sched_key_times(&v->cfg->sched, v->epoch, &t);
    int64_t lead = STAGE_LEAD_MAX_MS;
    if (v->cfg->sched.epoch_s * 1000 < (uint64_t)lead)
        lead = (int64_t)v->cfg->sched.epoch_s * 1000;
    if (stekd_now_ms() < t.encrypt_until * 1000 - lead)
        return;
    pthread_mutex_lock(&w->mu);
    bool want = !w->closed && !w->finishing && w->sent_version == v->version &&
                (w->staged_view == NULL || !stekd_view_same(w->staged_view, v->staged));
    pthread_mutex_unlock(&w->mu);
    if (!want)
        return;
    stekd_keyset *ks = NULL;
    if (stekd_handle_stage(r->h, &w->req, v->staged, &ks) == STEK_OK)
        atomic_fetch_add(&r->sets_staged, 1);
    pthread_mutex_lock(&w->mu);
    stekd_keyset_unref(w->staged_ks);
    stekd_view_unref(w->staged_view);
    w->staged_ks = ks; /* NULL: failed; the boundary builds as before */
    w->staged_view = v->staged;
    atomic_fetch_add(&v->staged->refs, 1);
    pthread_mutex_unlock(&w->mu);
}

/* Sends what a watcher is owed (a newer set, or a heartbeat), then stages. */
static void watcher_tick(stekd_rpc *r, watcher *w, int64_t now_ms, int64_t stage_until_ms)
{
    const stekd_handler *h = r->h;
    stekd_view *v = stekd_state_view(h->state, w->req.group);
    if (v == NULL) /* validated requests name configured groups */
        return;
    stekd_keyset *ready = NULL;
    pthread_mutex_lock(&w->mu);
    bool busy = w->sending || w->closed || w->finishing;
    bool owe_set = v->version != w->sent_version && now_ms >= w->due_ms;
    bool owe_beat = now_ms - w->last_ms >= (int64_t)h->cfg->heartbeat_s * 1000;
    if (owe_set && !busy)
        ready = take_staged_locked(w, v);
    pthread_mutex_unlock(&w->mu);

    if (busy) {
        /* A send in flight: nothing to send now, but staging needs none. */
    } else if (owe_set) {
        stekd_reply rep;
        uint64_t built = 0;
        if (ready != NULL) {
            stekd_reply_ok(v, ready, &rep);
            built = v->version;
        } else {
            /* The HSM work happens outside the watcher's lock. */
            stekd_handle_keyset(h, &w->req, &rep, &built);
        }
        bool sent = false;
        pthread_mutex_lock(&w->mu);
        if (rep.code != GRPC_STATUS_OK) {
            /* End the stream: the host fails over to another replica and
             * keeps serving with the keys it holds meanwhile. */
            watcher_finish_locked(w, rep.code, rep.details);
        } else if (!w->sending && !w->closed && !w->finishing &&
                   watcher_send_locked(w, rep.ks->msg, rep.ks->len, false)) {
            w->sent_version = built;
            atomic_fetch_add(&r->sets_sent, 1);
            if (ready != NULL)
                atomic_fetch_add(&r->staged_sent, 1);
            sent = true;
        }
        pthread_mutex_unlock(&w->mu);
        /* Outside the lock; req and peer are fixed since the stream opened. */
        if (sent)
            audit_set(r, "watch_update", &w->req, &rep, w->peer);
        stekd_keyset_unref(rep.ks);
        stekd_view_unref(v);
        return; /* stage on a later tick, once this send is known */
    } else if (owe_beat) {
        Stek__V1__Heartbeat hb = STEK__V1__HEARTBEAT__INIT;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        hb.sent_at = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        hb.interval = h->cfg->heartbeat_s * 1000000000ULL;
        Stek__V1__KeySet ks = STEK__V1__KEY_SET__INIT;
        ks.heartbeat = &hb;
        uint8_t buf[64];
        size_t n = stek__v1__key_set__pack(&ks, buf);
        pthread_mutex_lock(&w->mu);
        if (!w->sending && !w->closed && !w->finishing && watcher_send_locked(w, buf, n, false))
            atomic_fetch_add(&r->heartbeats_sent, 1);
        pthread_mutex_unlock(&w->mu);
    }
    watcher_stage(r, w, v, stage_until_ms);
    stekd_view_unref(v);
}

/* Drops closed watchers from the list; returns the live ones, referenced. */
static watcher **snapshot_watchers(stekd_rpc *r, size_t *n)
{
    pthread_mutex_lock(&r->wmu);
    watcher **prev = &r->watchers, *dead = NULL;
    while (*prev != NULL) {
        watcher *w = *prev;
        pthread_mutex_lock(&w->mu);
        bool closed = w->closed;
        pthread_mutex_unlock(&w->mu);
        if (closed) {
            *prev = w->next;
            w->next = dead;
            dead = w;
            r->n_watchers--;
        } else {
            prev = &w->next;
        }
    }
    watcher **out = calloc(r->n_watchers ? r->n_watchers : 1, sizeof(*out));
    size_t k = 0;
    for (watcher *w = r->watchers; out != NULL && w != NULL; w = w->next) {
        pthread_mutex_lock(&w->mu);
        w->refs++;
        pthread_mutex_unlock(&w->mu);
        out[k++] = w;
    }
    pthread_mutex_unlock(&r->wmu);
    while (dead != NULL) {
        watcher *w = dead;
        dead = w->next;
        watcher_unref(w); /* the list's reference */
    }
    *n = k;
    return out;
}

/*
 * One tick's watchers, shared by the ticker and its helpers: each takes the
 * next index until none is left. A rotation makes every watcher of a group
 * owe a set at once, and each set is HSM work (a key pair, ECDH, wraps, a
 * signature); built in turn on the ticker alone, 2,000 watchers took 1.5 s
 * (bench_load). watcher_tick locks only its own watcher.
 */
typedef struct tick_batch {
    stekd_rpc *r;
    watcher **ws;
    size_t n;
    int64_t now, stage_until;
    atomic_size_t next;
} tick_batch;

static void *tick_worker(void *arg)
{
    tick_batch *b = arg;
    for (size_t i; (i = atomic_fetch_add(&b->next, 1)) < b->n;)
        watcher_tick(b->r, b->ws[i], b->now, b->stage_until);
    return NULL;
}

static void tick_all(stekd_rpc *r, watcher **ws, size_t n, int64_t now)
{
    tick_batch b = {.r = r, .ws = ws, .n = n, .now = now, .stage_until = now + STAGE_BUDGET_MS};
    atomic_init(&b.next, 0);
    /* Helpers only for a crowd: one per completion-queue thread, at most
     * TICK_HELPERS_MAX, created for this tick and joined before the next.
     * Staging gets none: it has until the boundary. */
    pthread_t helpers[TICK_HELPERS_MAX];
    bool owed = now <= atomic_load(&r->sets_owed_until_ms);
    size_t want = owed && n >= TICK_PARALLEL_MIN ? r->n_threads : 0, nh = 0;
    if (want > TICK_HELPERS_MAX)
        want = TICK_HELPERS_MAX;
    while (nh < want && pthread_create(&helpers[nh], NULL, tick_worker, &b) == 0)
        nh++;
    tick_worker(&b);
    for (size_t i = 0; i < nh; i++)
        pthread_join(helpers[i], NULL);
}

static void *ticker_main(void *arg)
{
    stekd_rpc *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->wmu);
        if (!r->stopping) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += TICK_MS * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&r->wcv, &r->wmu, &ts);
        }
        bool stop = r->stopping;
        pthread_mutex_unlock(&r->wmu);
        if (stop)
            return NULL;
        size_t n = 0;
        watcher **ws = snapshot_watchers(r, &n);
        int64_t now = mono_ms();
        if (ws != NULL)
            tick_all(r, ws, n, now);
        for (size_t i = 0; ws != NULL && i < n; i++)
            watcher_unref(ws[i]);
        free(ws);
    }
}

/* A group's view changed: every watcher of it owes a set, after a jitter
 * that spreads the HSM work of a rotation. */
static void on_state_change(void *arg, const char *group)
{
    stekd_rpc *r = arg;
    int64_t now = mono_ms();
    uint64_t jitter = r->h->cfg->jitter_ms;
    pthread_mutex_lock(&r->wmu);
    for (watcher *w = r->watchers; w != NULL; w = w->next) {
        if (strcmp(w->req.group, group) != 0)
            continue;
        uint32_t rnd = 0;
        if (jitter > 0 && RAND_bytes((unsigned char *)&rnd, sizeof(rnd)) != 1)
            rnd = 0;
        pthread_mutex_lock(&w->mu);
        w->due_ms = now + (jitter ? (int64_t)(rnd % jitter) : 0);
        pthread_mutex_unlock(&w->mu);
    }
    /* Sets are owed until the last jittered due time has passed. */
    atomic_store(&r->sets_owed_until_ms, now + (int64_t)jitter + SETS_OWED_GRACE_MS);
    pthread_cond_broadcast(&r->wcv);
    pthread_mutex_unlock(&r->wmu);
}

/* ---- the completion queue ----------------------------------------------- */

static void dispatch(stekd_rpc *r, void *tag, bool ok)
{
    kind k = *(kind *)tag;
    switch (k) {
    case K_NEW_GET:
    case K_NEW_WATCH:
    case K_NEW_HEALTH:
    case K_NEW_REPORT:
    case K_NEW_OTHER:
    case K_NEW_ECHO: {
        incoming *in = tag;
        if (!ok) { /* shutting down: the request was cancelled */
            incoming_free(in);
            return;
        }
        request_next(r, k);
        if (k == K_NEW_GET) {
            on_get(r, in);
        } else if (k == K_NEW_WATCH) {
            on_watch(r, in);
        } else if (k == K_NEW_HEALTH) {
            on_health(r, in);
        } else if (k == K_NEW_REPORT) {
            on_report(r, in);
        } else if (k == K_NEW_ECHO) {
            on_echo(in);
        } else {
            /* Without an answer the caller would wait for its deadline. */
            answer(in->call, GRPC_STATUS_UNIMPLEMENTED, "unknown method", NULL, 0);
            in->call = NULL;
        }
        incoming_free(in);
        return;
    }
    case K_UNARY_DONE:
        unary_done(tag);
        return;
    case K_WATCH_SEND: {
        watcher *w = ((wtag *)tag)->w;
        pthread_mutex_lock(&w->mu);
        w->sending = false;
        if (!ok)
            w->closed = true;
        pthread_mutex_unlock(&w->mu);
        watcher_unref(w);
        return;
    }
    case K_WATCH_CLOSED:
    case K_WATCH_STATUS: {
        watcher *w = ((wtag *)tag)->w;
        pthread_mutex_lock(&w->mu);
        w->closed = true;
        /* A stream stekd did not end was ended by the host (or its deadline). */
        grpc_status_code final = w->finishing ? w->finish_code : GRPC_STATUS_CANCELLED;
        pthread_mutex_unlock(&w->mu);
        if (k == K_WATCH_CLOSED) {
            stekd_metrics_watch_done(r->h->metrics, final);
            stek_log(STEK_LOG_INFO, "stekd", "watch from %s on %s closed", w->req.identity,
                     w->req.group);
        }
        watcher_unref(w);
        return;
    }
    case K_SHUTDOWN:
        pthread_mutex_lock(&r->wmu);
        r->shutdown_done = true;
        pthread_cond_broadcast(&r->wcv);
        pthread_mutex_unlock(&r->wmu);
        return;
    }
}

static void *cq_main(void *arg)
{
    stekd_rpc *r = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            return NULL;
        if (ev.type == GRPC_OP_COMPLETE) {
            STEK_TSAN_ACQUIRE(ev.tag);
            dispatch(r, ev.tag, ev.success != 0);
        }
    }
}

/* ---- start and stop ----------------------------------------------------- */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = NULL;
    size_t len = 0;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n >= 0 && n < (1 << 20) && fseek(f, 0, SEEK_SET) == 0) {
            buf = calloc(1, (size_t)n + 1);
            if (buf != NULL)
                len = fread(buf, 1, (size_t)n, f);
            if (buf != NULL && len != (size_t)n) {
                free(buf);
                buf = NULL;
            }
        }
    }
    fclose(f);
    return buf;
}

/*
 * The server's own TLS key: a PEM file, or a pkcs11: URI that gRPC hands to
 * OpenSSL's pkcs11 engine (libengine-pkcs11-openssl) as "engine:pkcs11:<uri>".
 */
static char *server_key(const char *key)
{
    if (strncmp(key, "pkcs11:", 7) != 0)
        return read_file(key);
    size_t n = strlen(key) + 16;
    char *s = malloc(n);
    if (s != NULL)
        snprintf(s, n, "engine:pkcs11:%s", key);
    return s;
}

static stek_status make_creds(const stekd_config *cfg, grpc_server_credentials **out)
{
    char *ca = read_file(cfg->tls_client_ca), *cert = read_file(cfg->tls_cert);
    char *key = server_key(cfg->tls_key);
    stek_status st = STEK_OK;
    if (ca == NULL)
        st = stek_error_set(STEK_ERR_CONFIG, "cannot read client CA %s", cfg->tls_client_ca);
    else if (cert == NULL)
        st = stek_error_set(STEK_ERR_CONFIG, "cannot read certificate %s", cfg->tls_cert);
    else if (key == NULL)
        st = stek_error_set(STEK_ERR_CONFIG, "cannot read private key %s", cfg->tls_key);
    if (st == STEK_OK) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        *out = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
        if (*out == NULL)
            st = stek_error_set(STEK_ERR_CONFIG, "gRPC rejected the TLS settings");
    }
    free(ca);
    free(cert);
    if (key != NULL) {
        stek_cleanse(key, strlen(key)); /* a PEM private key */
        free(key);
    }
    return st;
}

stek_status stekd_rpc_start(const stekd_handler *h, unsigned threads, stekd_rpc **out)
{
    STEK_ENSURE(h != NULL && out != NULL && threads > 0, STEK_ERR_INVALID_ARG);
    grpc_init();
    stekd_rpc *r = calloc(1, sizeof(*r));
    STEK_ENSURE(r != NULL, STEK_ERR_NOMEM);
    r->h = h;
    r->shutdown_tag = K_SHUTDOWN;
    pthread_mutex_init(&r->wmu, NULL);
    pthread_cond_init(&r->wcv, NULL);

    grpc_server_credentials *creds = NULL;
    stek_status st = make_creds(h->cfg, &creds);
    if (st != STEK_OK) {
        pthread_mutex_destroy(&r->wmu);
        pthread_cond_destroy(&r->wcv);
        free(r);
        grpc_shutdown();
        return st;
    }
    grpc_arg args[] = {
        int_arg(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, (int)h->cfg->max_request_bytes),
        /* gRPC sets SO_REUSEPORT by default: a second stekd on the same port
         * would start and silently share connections. One owner per port. */
        int_arg(GRPC_ARG_ALLOW_REUSEPORT, 0),
        int_arg(GRPC_ARG_TSI_MAX_FRAME_SIZE, TSI_MAX_FRAME_BYTES),
        int_arg(GRPC_ARG_TCP_READ_CHUNK_SIZE, TCP_READ_CHUNK_BYTES),
        int_arg(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, TCP_MIN_READ_CHUNK_BYTES),
        int_arg(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, TCP_MAX_READ_CHUNK_BYTES),
    };
    grpc_channel_args cargs = {sizeof(args) / sizeof(args[0]), args};
    r->server = grpc_server_create(&cargs, NULL);
    r->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(r->server, r->cq, NULL);
    r->m_get = grpc_server_register_method(r->server, "/stek.v1.KeyService/GetKeySet", NULL,
                                           GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    r->m_watch = grpc_server_register_method(r->server, "/stek.v1.KeyService/WatchKeySet", NULL,
                                             GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    r->m_health = grpc_server_register_method(r->server, "/grpc.health.v1.Health/Check", NULL,
                                              GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    r->m_report = grpc_server_register_method(r->server, "/stek.v1.KeyService/ReportStatus", NULL,
                                              GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    /* Benchmark echo: read once, here; see on_echo. */
    const char *echo_env = getenv("STEKD_BENCH_ECHO");
    if (echo_env != NULL && strcmp(echo_env, "1") == 0) {
        r->m_echo = grpc_server_register_method(r->server, "/stek.bench.Echo/Echo", NULL,
                                                GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        stek_log(STEK_LOG_WARN, "stekd", "benchmark echo method enabled");
    }
    r->port = grpc_server_add_http2_port(r->server, h->cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (strncmp(h->cfg->tls_key, "pkcs11:", 7) == 0)
        stek_p11engine_withdraw_defaults();
    if (r->port == 0) {
        st = stek_error_set(STEK_ERR_IO, "cannot listen on %s", h->cfg->listen);
        /* gRPC asserts that a server is shut down before it is destroyed. */
        grpc_server_shutdown_and_notify(r->server, r->cq, &r->shutdown_tag);
        grpc_completion_queue_shutdown(r->cq);
        while (grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_server_destroy(r->server);
        grpc_completion_queue_destroy(r->cq);
        pthread_mutex_destroy(&r->wmu);
        pthread_cond_destroy(&r->wcv);
        free(r);
        grpc_shutdown();
        return st;
    }
    grpc_server_start(r->server);
    /* Several outstanding requests per method, so bursts need no round trip. */
    for (unsigned i = 0; i < threads * 2; i++) {
        request_next(r, K_NEW_GET);
        request_next(r, K_NEW_WATCH);
        request_next(r, K_NEW_REPORT);
        if (r->m_echo != NULL)
            request_next(r, K_NEW_ECHO);
    }
    request_next(r, K_NEW_HEALTH);
    request_next(r, K_NEW_OTHER);
    r->threads = calloc(threads, sizeof(*r->threads));
    for (unsigned i = 0; r->threads != NULL && i < threads; i++)
        if (pthread_create(&r->threads[i], NULL, cq_main, r) == 0)
            r->n_threads++;
    r->ticker_started = pthread_create(&r->ticker, NULL, ticker_main, r) == 0;
    stekd_state_set_listener(h->state, on_state_change, r);
    *out = r;
    return STEK_OK;
}

int stekd_rpc_port(const stekd_rpc *r)
{
    return r->port;
}

void stekd_rpc_get_stats(stekd_rpc *r, stekd_rpc_stats *out)
{
    pthread_mutex_lock(&r->wmu);
    out->watchers = r->n_watchers;
    pthread_mutex_unlock(&r->wmu);
    out->sets_sent = atomic_load(&r->sets_sent);
    out->heartbeats_sent = atomic_load(&r->heartbeats_sent);
    out->sets_staged = atomic_load(&r->sets_staged);
    out->staged_sent = atomic_load(&r->staged_sent);
}

void stekd_rpc_stop(stekd_rpc *r, int grace_ms)
{
    if (r == NULL)
        return;
    stekd_state_set_listener(r->h->state, NULL, NULL);
    pthread_mutex_lock(&r->wmu);
    r->stopping = true;
    pthread_cond_broadcast(&r->wcv);
    pthread_mutex_unlock(&r->wmu);
    if (r->ticker_started)
        pthread_join(r->ticker, NULL);

    /* Watch streams end cleanly, so hosts reconnect elsewhere at once. */
    size_t n = 0;
    watcher **ws = snapshot_watchers(r, &n);
    for (size_t i = 0; ws != NULL && i < n; i++) {
        pthread_mutex_lock(&ws[i]->mu);
        watcher_finish_locked(ws[i], GRPC_STATUS_UNAVAILABLE, "server shutting down");
        pthread_mutex_unlock(&ws[i]->mu);
        watcher_unref(ws[i]);
    }
    free(ws);

    grpc_server_shutdown_and_notify(r->server, r->cq, &r->shutdown_tag);
    pthread_mutex_lock(&r->wmu);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += grace_ms / 1000;
    ts.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    while (!r->shutdown_done)
        if (pthread_cond_timedwait(&r->wcv, &r->wmu, &ts) != 0)
            break;
    bool done = r->shutdown_done;
    pthread_mutex_unlock(&r->wmu);
    if (!done)
        grpc_server_cancel_all_calls(r->server);
    pthread_mutex_lock(&r->wmu);
    while (!r->shutdown_done)
        pthread_cond_wait(&r->wcv, &r->wmu);
    pthread_mutex_unlock(&r->wmu);

    grpc_server_destroy(r->server);
    grpc_completion_queue_shutdown(r->cq);
    for (unsigned i = 0; i < r->n_threads; i++)
        pthread_join(r->threads[i], NULL);
    free(r->threads);
    grpc_completion_queue_destroy(r->cq);

    /* Whatever is left in the list is closed now. */
    while (r->watchers != NULL) {
        watcher *w = r->watchers;
        r->watchers = w->next;
        watcher_unref(w);
    }
    pthread_mutex_destroy(&r->wmu);
    pthread_cond_destroy(&r->wcv);
    free(r);
    grpc_shutdown();
}
