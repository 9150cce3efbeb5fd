/*
 * The gRPC core client of libstek. See transport.h for the contract.
 *
 * Shape of every call (the pattern of tests/fixture/fx_grpc.c): one pluck
 * completion queue per call, batches tagged with small integers, every
 * grpc_completion_queue_pluck bounded by a deadline. A call is freed only
 * once every batch it started has been plucked; when a wait runs out, the
 * call is cancelled first (a cancelled call completes its batches promptly)
 * and the batches are collected under a second bounded wait. If even that
 * runs out, the call and its queue are leaked on purpose, with a logged
 * error: freeing them would be a use-after-free inside gRPC.
 *
 * Library lifetime: grpc_init is reference counted; every transport holds
 * one reference from open to close. The application may use gRPC itself.
 */
#include "transport.h"
#include "p11engine.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "kek.h"
#include "log.h"
#include "reqsig.h"
#include "secret.h"
#include "stek/v1/stek.pb-c.h"

/* After a cancel, how long to wait for gRPC to hand back a batch. */
#define DRAIN_MS 10000
/* Slack on top of a unary call's own deadline before we stop trusting it. */
#define SLACK_MS 5000
/* How often a cancellable call (ReportStatus) looks at its cancel flag. */
#define CANCEL_POLL_MS 50
#define PEM_MAX_BYTES (1024 * 1024)
#define DEFAULT_MAX_BACKOFF_MS 5000
#define COMPONENT "libstek"

enum { TAG_UNARY = 1, TAG_SEND, TAG_RECV, TAG_STATUS };

static void *tag(int t)
{
    return (void *)(intptr_t)t;
}

static gpr_timespec deadline_in(int ms)
{
    if (ms < 0)
        ms = 0;
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Copies a slice into a NUL-terminated buffer, truncating. */
static void slice_to_buf(grpc_slice s, char *out, size_t out_len)
{
    if (out == NULL || out_len == 0)
        return;
    size_t n = GRPC_SLICE_LENGTH(s);
    if (n >= out_len)
        n = out_len - 1;
    memcpy(out, GRPC_SLICE_START_PTR(s), n);
    out[n] = '\0';
}

/* Reads a byte buffer into one malloc'd block (1 byte for an empty message). */
static stek_status bb_to_bytes(grpc_byte_buffer *bb, uint8_t **out, size_t *out_len)
{
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, bb)) /* nonzero on success */
        STEK_BAIL(STEK_ERR_INTERNAL, "grpc_byte_buffer_reader_init failed");
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    size_t n = GRPC_SLICE_LENGTH(all);
    uint8_t *p = malloc(n > 0 ? n : 1);
    if (p == NULL) {
        grpc_slice_unref(all);
        STEK_BAIL(STEK_ERR_NOMEM, "message of %zu bytes", n);
    }
    if (n > 0)
        memcpy(p, GRPC_SLICE_START_PTR(all), n);
    grpc_slice_unref(all);
    *out = p;
    *out_len = n;
    return STEK_OK;
}

static grpc_byte_buffer *bytes_to_bb(const uint8_t *p, size_t n)
{
    grpc_slice s = n > 0 ? grpc_slice_from_copied_buffer((const char *)p, n) : grpc_empty_slice();
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1); /* takes its own ref */
    grpc_slice_unref(s);
    return bb;
}

/*
 * Plucks tag t, waiting until `until`. True with *success on completion,
 * false on timeout. GRPC_QUEUE_SHUTDOWN cannot happen while a tag is
 * pending; it is treated as a timeout, so the caller cancels (and leaks).
 */
static bool pluck(grpc_completion_queue *cq, int t, gpr_timespec until, int *success)
{
    grpc_event ev = grpc_completion_queue_pluck(cq, tag(t), until, NULL);
    if (ev.type != GRPC_OP_COMPLETE)
        return false;
    if (success != NULL)
        *success = ev.success;
    return true;
}

/* Shuts down and destroys a queue whose every tag has been plucked. */
static void cq_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    /* A pluck queue reports SHUTDOWN once nothing is pending any more. */
    grpc_event ev = grpc_completion_queue_pluck(cq, NULL, deadline_in(DRAIN_MS), NULL);
    if (ev.type != GRPC_QUEUE_SHUTDOWN) {
        stek_log(STEK_LOG_ERROR, COMPONENT, "completion queue did not drain; leaking it");
        return;
    }
    grpc_completion_queue_destroy(cq);
}

/*
 * Reads a whole PEM file (1..PEM_MAX_BYTES) NUL-terminated: into *plain
 * (malloc'd) or, for a private key, into *sec (locked, cleansed on free).
 */
static stek_status read_pem(const char *path, char **plain, stek_secret **sec)
{
    stek_status st = STEK_OK;
    struct stat sb;
    uint8_t *buf = NULL;
    size_t got = 0;

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "open %s: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "stat %s: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode) || sb.st_size <= 0 || sb.st_size > PEM_MAX_BYTES)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: not a regular file of 1 byte to 1 MiB", path);
    const size_t size = (size_t)sb.st_size;
    if (sec != NULL) {
        STEK_GUARD_GOTO(stek_secret_new(size + 1, sec));
        buf = stek_secret_data(*sec);
    } else {
        buf = calloc(1, size + 1);
        STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
        *plain = (char *)buf;
    }
    /* At most the size seen by fstat: a file growing underneath is cut. */
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "read %s: %s", path, strerror(errno));
        if (n == 0)
            break;
        got += (size_t)n;
    }
    STEK_ENSURE_GOTO(got > 0, STEK_ERR_IO);
    buf[got] = '\0';

done:
    close(fd);
    if (st != STEK_OK) {
        if (sec != NULL) {
            stek_secret_free(*sec);
            *sec = NULL;
        } else if (plain != NULL) {
            free(*plain);
            *plain = NULL;
        }
    }
    return st;
}

/* ---- channels ------------------------------------------------------------ */

struct stek_transport {
    grpc_channel *channel;
    grpc_channel_credentials *creds;
};

stek_status stek_transport_open(const stek_transport_opts *o, stek_transport **out)
{
    stek_status st = STEK_OK;
    char *ca = NULL, *cert = NULL, *engine_key = NULL;
    stek_secret *key = NULL;
    stek_transport *t = NULL;
    bool inited = false;

    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE_REF(o);
    STEK_ENSURE(o->target != NULL && o->target[0] != '\0' && o->ca_pem_path != NULL &&
                    o->cert_pem_path != NULL && o->key_pem_path != NULL &&
                    o->max_reconnect_backoff_ms >= 0,
                STEK_ERR_INVALID_ARG);

    STEK_GUARD_GOTO(read_pem(o->ca_pem_path, &ca, NULL));
    STEK_GUARD_GOTO(read_pem(o->cert_pem_path, &cert, NULL));
    /* A key in a token goes to gRPC as an engine key string, which gRPC
     * loads itself (p11engine.h says why through a loader engine). */
    if (stek_p11engine_is_uri(o->key_pem_path))
        STEK_GUARD_GOTO(stek_p11engine_grpc_key(o->key_pem_path, &engine_key));
    else
        STEK_GUARD_GOTO(read_pem(o->key_pem_path, NULL, &key));
    t = calloc(1, sizeof(*t));
    STEK_ENSURE_GOTO(t != NULL, STEK_ERR_NOMEM);

    grpc_init();
    inited = true;
    grpc_ssl_pem_key_cert_pair pair = {
        .private_key = engine_key != NULL ? engine_key : (const char *)stek_secret_cdata(key),
        .cert_chain = cert};
    /* Copies the PEM strings: ours are released right after. */
    t->creds = grpc_ssl_credentials_create_ex(ca, &pair, NULL, NULL);
    if (t->creds == NULL)
        STEK_BAIL_GOTO(STEK_ERR_CRYPTO, "grpc_ssl_credentials_create_ex refused the PEM files");

    int backoff =
        o->max_reconnect_backoff_ms > 0 ? o->max_reconnect_backoff_ms : DEFAULT_MAX_BACKOFF_MS;
    grpc_arg args[5];
    size_t n = 0;
    /* Our own connection, not one shared with other channels of the process
     * (another transport, or the application's own gRPC use). */
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
    args[n++].value.integer = 1;
    /* Not GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: in 1.51 that is the minimum
     * connect timeout (default 20 s), and a small one fails TLS handshakes
     * on a loaded machine. */
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
    args[n++].value.integer = backoff < 1000 ? backoff : 1000;
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
    args[n++].value.integer = backoff;
    /* No answer worth accepting is larger (accept.h bounds the key count). */
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[n++].value.integer = STEK_TRANSPORT_MAX_MESSAGE_BYTES;
    if (o->server_name_override != NULL) {
        args[n].type = GRPC_ARG_STRING;
        args[n].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[n++].value.string = (char *)o->server_name_override;
    }
    grpc_channel_args cargs = {.num_args = n, .args = args};
    /* Copies the args; a bad target gives a "lame" channel whose calls fail
     * with a status, so NULL would be a gRPC bug. */
    t->channel = grpc_channel_create(o->target, t->creds, &cargs);
    if (t->channel == NULL)
        STEK_BAIL_GOTO(STEK_ERR_INTERNAL, "grpc_channel_create(%s) failed", o->target);
    *out = t;
    t = NULL;
    inited = false;

done:
    if (t != NULL) {
        if (t->creds != NULL)
            grpc_channel_credentials_release(t->creds);
        free(t);
    }
    if (inited)
        grpc_shutdown();
    free(ca);
    free(cert);
    stek_secret_free(key);
    if (engine_key != NULL) {
        stek_cleanse(engine_key, strlen(engine_key)); /* the URI may hold a pin-value */
        free(engine_key);
    }
    return st;
}

void stek_transport_close(stek_transport *t)
{
    if (t == NULL)
        return;
    grpc_channel_destroy(t->channel);
    grpc_channel_credentials_release(t->creds);
    free(t);
    grpc_shutdown();
}

static grpc_call *new_call(stek_transport *t, grpc_completion_queue *cq, const char *method,
                           gpr_timespec deadline)
{
    /* method is one of the literals of transport.h: a static slice. */
    grpc_slice m = grpc_slice_from_static_string(method);
    return grpc_channel_create_call(t->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
                                    deadline, NULL);
}

/* ---- unary calls: GetKeySet, ReportStatus ---------------------------------- */

/*
 * One unary call of `method` (named `what` in errors). With resp NULL the
 * answer's body is not wanted (ReportStatus): OK is enough.
 */
static stek_status unary(stek_transport *t, const char *method, const char *what,
                         const uint8_t *req, size_t len, int timeout_ms, const atomic_bool *cancel,
                         uint8_t **resp, size_t *resp_len, int *grpc_status, char *details,
                         size_t dlen)
{
    if (grpc_status != NULL)
        *grpc_status = STEK_TRANSPORT_NO_STATUS;
    if (details != NULL && dlen > 0)
        details[0] = '\0';
    STEK_ENSURE((resp == NULL) == (resp_len == NULL), STEK_ERR_INVALID_ARG);
    if (resp != NULL) {
        *resp = NULL;
        *resp_len = 0;
    }
    STEK_ENSURE(t != NULL && (req != NULL || len == 0) && timeout_ms > 0, STEK_ERR_INVALID_ARG);

    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    STEK_ENSURE(cq != NULL, STEK_ERR_NOMEM);
    grpc_call *call = new_call(t, cq, method, deadline_in(timeout_ms));
    if (call == NULL) {
        cq_destroy(cq);
        STEK_BAIL(STEK_ERR_INTERNAL, "grpc_channel_create_call failed");
    }

    stek_status st = STEK_OK;
    grpc_byte_buffer *send = bytes_to_bb(req, len);
    grpc_byte_buffer *recv = NULL;
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice status_details = grpc_empty_slice();
    const char *error_string = NULL;

    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &status_details;
    ops[5].data.recv_status_on_client.error_string = &error_string;

    grpc_call_error ce = grpc_call_start_batch(call, ops, 6, tag(TAG_UNARY), NULL);
    if (ce != GRPC_CALL_OK)
        STEK_BAIL_GOTO(STEK_ERR_INTERNAL, "grpc_call_start_batch: error %d", (int)ce);
    const gpr_timespec until = deadline_in(timeout_ms + SLACK_MS);
    bool completed = false;
    for (;;) {
        /* With a cancel flag, wait in slices and look at it in between. */
        gpr_timespec slice =
            cancel != NULL ? gpr_time_min(deadline_in(CANCEL_POLL_MS), until) : until;
        completed = pluck(cq, TAG_UNARY, slice, NULL);
        if (completed || (cancel != NULL && atomic_load(cancel)) ||
            gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), until) >= 0)
            break;
    }
    if (!completed) {
        /* Given up by the caller, or past the call's own deadline, which
         * should have ended it: end it now. It completes CANCELLED. */
        grpc_call_cancel(call, NULL);
        if (!pluck(cq, TAG_UNARY, deadline_in(DRAIN_MS), NULL)) {
            stek_log(STEK_LOG_ERROR, COMPONENT,
                     "%s: batch never completed after cancel; leaking the call", what);
            return stek_error_set(STEK_ERR_IO, "%s: no completion past the deadline", what);
        }
        if (cancel == NULL || !atomic_load(cancel))
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: no completion %d ms past the deadline", what,
                           SLACK_MS);
    }
    /* The batch's success flag says nothing for a client: the status does. */
    if (grpc_status != NULL)
        *grpc_status = (int)status;
    slice_to_buf(status_details, details, dlen);
    if (status != GRPC_STATUS_OK)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: gRPC status %d", what, (int)status);
    if (resp != NULL && recv == NULL)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: status OK without an answer", what);
    if (resp != NULL)
        STEK_GUARD_GOTO(bb_to_bytes(recv, resp, resp_len));

done:
    if (error_string != NULL)
        gpr_free((void *)error_string);
    grpc_slice_unref(status_details);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    grpc_byte_buffer_destroy(send);
    if (recv != NULL)
        grpc_byte_buffer_destroy(recv);
    grpc_call_unref(call);
    cq_destroy(cq);
    return st;
}

stek_status stek_transport_get(stek_transport *t, const uint8_t *req, size_t len, int timeout_ms,
                               uint8_t **resp, size_t *resp_len, int *grpc_status, char *details,
                               size_t dlen)
{
    if (resp == NULL || resp_len == NULL) {
        if (grpc_status != NULL)
            *grpc_status = STEK_TRANSPORT_NO_STATUS;
        STEK_BAIL(STEK_ERR_INVALID_ARG, "GetKeySet: no place for the answer");
    }
    return unary(t, STEK_METHOD_GET, "GetKeySet", req, len, timeout_ms, NULL, resp, resp_len,
                 grpc_status, details, dlen);
}

stek_status stek_transport_report(stek_transport *t, const uint8_t *req, size_t len, int timeout_ms,
                                  const atomic_bool *cancel, int *grpc_status, char *details,
                                  size_t dlen)
{
    return unary(t, STEK_METHOD_REPORT, "ReportStatus", req, len, timeout_ms, cancel, NULL, NULL,
                 grpc_status, details, dlen);
}

/* ---- WatchKeySet streams -------------------------------------------------- */

struct stek_watch {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_byte_buffer *send;
    grpc_byte_buffer *recv;
    grpc_metadata_array initial_md;
    grpc_metadata_array trailing_md;
    grpc_status_code status;
    grpc_slice details;
    bool send_pending;   /* TAG_SEND not plucked yet */
    bool recv_pending;   /* TAG_RECV started, not plucked yet */
    bool status_pending; /* TAG_STATUS not plucked yet */
    bool got_initial_md; /* RECV_INITIAL_METADATA went with the first read */
    bool ended;          /* a read saw the end of the stream */
};

stek_status stek_transport_watch_start(stek_transport *t, const uint8_t *req, size_t len,
                                       stek_watch **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(t != NULL && (req != NULL || len == 0), STEK_ERR_INVALID_ARG);
    stek_watch *w = calloc(1, sizeof(*w));
    STEK_ENSURE(w != NULL, STEK_ERR_NOMEM);
    w->status = GRPC_STATUS_UNKNOWN;
    w->details = grpc_empty_slice();
    grpc_metadata_array_init(&w->initial_md);
    grpc_metadata_array_init(&w->trailing_md);
    w->cq = grpc_completion_queue_create_for_pluck(NULL);
    if (w->cq == NULL) {
        free(w);
        STEK_BAIL(STEK_ERR_NOMEM, "grpc_completion_queue_create_for_pluck failed");
    }
    /* No deadline: heartbeats and the caller's read timeouts judge liveness. */
    w->call = new_call(t, w->cq, STEK_METHOD_WATCH, gpr_inf_future(GPR_CLOCK_MONOTONIC));
    if (w->call == NULL) {
        cq_destroy(w->cq);
        free(w);
        STEK_BAIL(STEK_ERR_INTERNAL, "grpc_channel_create_call failed");
    }
    w->send = bytes_to_bb(req, len);

    /* Batch 1: the request, then half-close. Completes once written. */
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = w->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    grpc_call_error ce = grpc_call_start_batch(w->call, ops, 3, tag(TAG_SEND), NULL);
    if (ce != GRPC_CALL_OK) {
        stek_transport_watch_cancel_free(w);
        STEK_BAIL(STEK_ERR_INTERNAL, "grpc_call_start_batch(send): error %d", (int)ce);
    }
    w->send_pending = true;

    /* Batch 2: the final status, outstanding for the whole call, so it is
     * collected whenever the server ends the stream. */
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &w->trailing_md;
    ops[0].data.recv_status_on_client.status = &w->status;
    ops[0].data.recv_status_on_client.status_details = &w->details;
    ce = grpc_call_start_batch(w->call, ops, 1, tag(TAG_STATUS), NULL);
    if (ce != GRPC_CALL_OK) {
        stek_transport_watch_cancel_free(w);
        STEK_BAIL(STEK_ERR_INTERNAL, "grpc_call_start_batch(status): error %d", (int)ce);
    }
    w->status_pending = true;
    /* The send batch is collected by cancel_free: starting never waits on
     * the network, only reads and the status do. */
    *out = w;
    return STEK_OK;
}

int stek_transport_watch_read(stek_watch *w, int timeout_ms, uint8_t **msg, size_t *len)
{
    if (msg != NULL)
        *msg = NULL;
    if (len != NULL)
        *len = 0;
    if (w == NULL || msg == NULL || len == NULL) {
        STEK_IGNORE(stek_error_set(STEK_ERR_INVALID_ARG, "watch_read: bad arguments"));
        return -1;
    }
    if (w->ended)
        return 0;
    if (!w->recv_pending) {
        grpc_op ops[2];
        size_t n = 0;
        memset(ops, 0, sizeof(ops));
        if (!w->got_initial_md) {
            /* Initial metadata arrives with the first message (or with the
             * status, for a trailers-only answer); asking for it here keeps
             * start from waiting on the server. */
            ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[n++].data.recv_initial_metadata.recv_initial_metadata = &w->initial_md;
        }
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n++].data.recv_message.recv_message = &w->recv;
        grpc_call_error ce = grpc_call_start_batch(w->call, ops, n, tag(TAG_RECV), NULL);
        if (ce != GRPC_CALL_OK) {
            STEK_IGNORE(stek_error_set(STEK_ERR_INTERNAL, "watch_read: grpc_call_start_batch: %d",
                                       (int)ce));
            return -1;
        }
        w->got_initial_md = true;
        w->recv_pending = true;
    }
    if (!pluck(w->cq, TAG_RECV, deadline_in(timeout_ms), NULL)) {
        STEK_IGNORE(stek_error_set(STEK_ERR_IO, "watch_read: no message within %d ms", timeout_ms));
        return -1;
    }
    w->recv_pending = false;
    if (w->recv == NULL) {
        /* End of stream, or the call failed: the status says which. */
        w->ended = true;
        return 0;
    }
    stek_status st = bb_to_bytes(w->recv, msg, len);
    grpc_byte_buffer_destroy(w->recv);
    w->recv = NULL;
    return st == STEK_OK ? 1 : -1;
}

stek_status stek_transport_watch_status(stek_watch *w, int timeout_ms, int *grpc_status,
                                        char *details, size_t dlen)
{
    if (grpc_status != NULL)
        *grpc_status = STEK_TRANSPORT_NO_STATUS;
    if (details != NULL && dlen > 0)
        details[0] = '\0';
    STEK_ENSURE_REF(w);
    if (w->status_pending) {
        if (!pluck(w->cq, TAG_STATUS, deadline_in(timeout_ms), NULL))
            STEK_BAIL(STEK_ERR_IO, "watch: no final status within %d ms", timeout_ms);
        w->status_pending = false;
    }
    if (grpc_status != NULL)
        *grpc_status = (int)w->status;
    slice_to_buf(w->details, details, dlen);
    return STEK_OK;
}

void stek_transport_watch_cancel_free(stek_watch *w)
{
    if (w == NULL)
        return;
    /* Cancelling a finished call is harmless; cancelling an open one makes
     * every pending batch complete. */
    if (w->status_pending || w->recv_pending || w->send_pending)
        grpc_call_cancel(w->call, NULL);
    gpr_timespec until = deadline_in(DRAIN_MS);
    if (w->send_pending && pluck(w->cq, TAG_SEND, until, NULL))
        w->send_pending = false;
    if (w->recv_pending && pluck(w->cq, TAG_RECV, until, NULL))
        w->recv_pending = false;
    if (w->status_pending && pluck(w->cq, TAG_STATUS, until, NULL))
        w->status_pending = false;
    if (w->send_pending || w->recv_pending || w->status_pending) {
        stek_log(STEK_LOG_ERROR, COMPONENT,
                 "watch: batches still pending after cancel; leaking the call");
        return;
    }
    if (w->recv != NULL)
        grpc_byte_buffer_destroy(w->recv);
    if (w->send != NULL)
        grpc_byte_buffer_destroy(w->send);
    grpc_slice_unref(w->details);
    grpc_metadata_array_destroy(&w->initial_md);
    grpc_metadata_array_destroy(&w->trailing_md);
    grpc_call_unref(w->call);
    cq_destroy(w->cq);
    free(w);
}

/* ---- requests ------------------------------------------------------------- */

stek_status stek_request_build(const char *group, const stek_host_eph *eph, const uint8_t *nonce,
                               size_t nonce_len, EVP_PKEY *cert_key, uint8_t **out, size_t *out_len)
{
    stek_status st = STEK_OK;
    uint8_t pub[STEK_P256_POINT_BYTES];
    uint8_t *sig = NULL, *buf = NULL;
    size_t sig_len = 0;

    STEK_ENSURE(out != NULL && out_len != NULL, STEK_ERR_INVALID_ARG);
    *out = NULL;
    *out_len = 0;
    STEK_ENSURE(eph != NULL && cert_key != NULL && nonce != NULL, STEK_ERR_INVALID_ARG);
    STEK_GUARD(stek_group_name_check(group));
    if (nonce_len < STEK_NONCE_MIN_BYTES || nonce_len > STEK_NONCE_MAX_BYTES)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "nonce of %zu bytes, want %d..%d", nonce_len,
                  STEK_NONCE_MIN_BYTES, STEK_NONCE_MAX_BYTES);
    STEK_GUARD(stek_host_eph_public(eph, pub));
    STEK_GUARD(
        stek_reqsig_sign(cert_key, group, pub, sizeof(pub), nonce, nonce_len, &sig, &sig_len));

    Stek__V1__GetKeySetRequest req = STEK__V1__GET_KEY_SET_REQUEST__INIT;
    req.group = (char *)group;
    req.eph_pub.data = pub;
    req.eph_pub.len = sizeof(pub);
    req.nonce.data = (uint8_t *)nonce;
    req.nonce.len = nonce_len;
    req.signature.data = sig;
    req.signature.len = sig_len;
    size_t n = stek__v1__get_key_set_request__get_packed_size(&req);
    buf = malloc(n);
    STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
    STEK_ENSURE_GOTO(stek__v1__get_key_set_request__pack(&req, buf) == n, STEK_ERR_INTERNAL);
    *out = buf;
    *out_len = n;
    buf = NULL;

done:
    free(buf);
    free(sig);
    return st;
}

stek_status stek_report_build(const stek_report *r, uint8_t **out, size_t *out_len)
{
    STEK_ENSURE(out != NULL && out_len != NULL, STEK_ERR_INVALID_ARG);
    *out = NULL;
    *out_len = 0;
    STEK_ENSURE(r != NULL && r->key_set_request != NULL && r->key_set_request_len > 0 &&
                    r->n_names <= STEK_REPORT_MAX_NAMES && (r->names != NULL || r->n_names == 0),
                STEK_ERR_INVALID_ARG);
    ProtobufCBinaryData names[STEK_REPORT_MAX_NAMES];
    for (size_t i = 0; i < r->n_names; i++) {
        names[i].data = (uint8_t *)r->names[i];
        names[i].len = STEK_TICKET_NAME_BYTES;
    }
    const stek_report_counters *k = &r->counters;
    Stek__V1__HostCounters hc = STEK__V1__HOST_COUNTERS__INIT;
    hc.tickets_issued = k->tickets_issued;
    hc.tickets_stale = k->tickets_stale;
    hc.tickets_resumed = k->tickets_resumed;
    hc.tickets_renewed = k->tickets_renewed;
    hc.miss_unknown = k->miss_unknown;
    hc.miss_expired = k->miss_expired;
    hc.miss_other_generation = k->miss_other_generation;
    hc.miss_other_group = k->miss_other_group;
    hc.miss_bad_mac = k->miss_bad_mac;
    hc.no_key_encrypts = k->no_key_encrypts;
    Stek__V1__ReportStatusRequest m = STEK__V1__REPORT_STATUS_REQUEST__INIT;
    m.key_set_request.data = (uint8_t *)r->key_set_request;
    m.key_set_request.len = r->key_set_request_len;
    m.generation = r->generation;
    m.current_epoch = r->current_epoch;
    m.n_key_names = r->n_names;
    m.key_names = r->n_names > 0 ? names : NULL;
    m.counters = &hc;
    m.report_interval_s = r->interval_s;
    size_t n = stek__v1__report_status_request__get_packed_size(&m);
    uint8_t *buf = malloc(n);
    STEK_ENSURE(buf != NULL, STEK_ERR_NOMEM);
    if (stek__v1__report_status_request__pack(&m, buf) != n) {
        free(buf);
        STEK_BAIL(STEK_ERR_INTERNAL, "ReportStatusRequest: packed size changed");
    }
    *out = buf;
    *out_len = n;
    return STEK_OK;
}
