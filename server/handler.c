/*
 * Request validation and key-set answers. Every refusal gets the precise
 * status of handler.h and a short, secret-free reason; the server keeps
 * serving everyone else.
 */
#include "handler.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdlib.h>

#include "fleet.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "stek/v1/stek.pb-c.h"

static grpc_status_code refuse(grpc_status_code code, char *details, size_t len, const char *fmt,
                               ...) __attribute__((format(printf, 4, 5)));

static grpc_status_code refuse(grpc_status_code code, char *details, size_t len, const char *fmt,
                               ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(details, len, fmt, ap);
    va_end(ap);
    return code;
}

/* EKU must be present and include clientAuth: a server certificate or an
 * unconstrained one is not a host identity. */
static bool has_client_auth(X509 *cert)
{
    uint32_t flags = X509_get_extension_flags(cert);
    return (flags & EXFLAG_XKUSAGE) != 0 && (X509_get_extended_key_usage(cert) & XKU_SSL_CLIENT);
}

/* Finds the first typed SAN that the group's policy allows. */
static bool allowed_identity(const stekd_group_cfg *g, const stekd_peer *peer, char *out,
                             size_t out_len)
{
    if (g == NULL)
        return false;
    for (size_t i = 0; i < peer->n_uris; i++) {
        if (stekd_policy_allows(g->allow, g->n_allow, STEKD_ID_URI, peer->uris[i])) {
            snprintf(out, out_len, "uri:%s", peer->uris[i]);
            return true;
        }
    }
    for (size_t i = 0; i < peer->n_dns; i++) {
        if (stekd_policy_allows(g->allow, g->n_allow, STEKD_ID_DNS, peer->dns[i])) {
            snprintf(out, out_len, "dns:%s", peer->dns[i]);
            return true;
        }
    }
    return false;
}

static grpc_status_code validate(const stekd_handler *h, const stekd_peer *peer, X509 *cert,
                                 const uint8_t *bytes, size_t len, stekd_request *req,
                                 char *details, size_t details_len)
{
    /* GetKeySetRequest and WatchKeySetRequest share fields and numbers. */
    Stek__V1__GetKeySetRequest *m = stek__v1__get_key_set_request__unpack(NULL, len, bytes);
    if (m == NULL)
        return refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len,
                      "malformed request: not a stek.v1 key-set request");
    grpc_status_code code = GRPC_STATUS_OK;
    memset(req, 0, sizeof(*req));
    if (m->group == NULL || m->group[0] == '\0') {
        code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len, "empty group");
        goto done;
    }
    if (strlen(m->group) > STEK_GROUP_MAX_BYTES) {
        code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len, "group name too long");
        goto done;
    }
    if (m->nonce.len < STEK_NONCE_MIN_BYTES || m->nonce.len > STEK_NONCE_MAX_BYTES) {
        code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len,
                      "nonce must be %d to %d bytes", STEK_NONCE_MIN_BYTES, STEK_NONCE_MAX_BYTES);
        goto done;
    }
    if (cert == NULL || !has_client_auth(cert)) {
        code = refuse(GRPC_STATUS_PERMISSION_DENIED, details, details_len,
                      "client certificate lacks extended key usage clientAuth");
        goto done;
    }
    /* Same answer whether or not the group exists: no group enumeration. */
    const stekd_group_cfg *g = stekd_config_group(h->cfg, m->group);
    if (!allowed_identity(g, peer, req->identity, sizeof(req->identity))) {
        code = refuse(GRPC_STATUS_PERMISSION_DENIED, details, details_len,
                      "no identity of this certificate may fetch group '%.64s'", m->group);
        goto done;
    }
    if (stek_p256_point_check(m->eph_pub.data, m->eph_pub.len) != STEK_OK) {
        code = refuse(GRPC_STATUS_FAILED_PRECONDITION, details, details_len,
                      "eph_pub is not a valid P-256 point: %s", stek_error_detail());
        goto done;
    }
    if (stek_reqsig_verify(X509_get0_pubkey(cert), m->group, m->eph_pub.data, m->eph_pub.len,
                           m->nonce.data, m->nonce.len, m->signature.data,
                           m->signature.len) != STEK_OK) {
        stekd_metrics_count(h->metrics, STEKD_M_SIGNATURES_REJECTED);
        code = refuse(GRPC_STATUS_UNAUTHENTICATED, details, details_len,
                      "request signature does not verify against the client certificate");
        goto done;
    }
    /* The fingerprint audit lines name the host by; kept with the request,
     * so validated-request cache hits carry it too. */
    unsigned int fp_len = 0;
    if (X509_digest(cert, EVP_sha256(), req->cert_sha256, &fp_len) != 1 ||
        fp_len != STEKD_CERT_SHA256_BYTES) {
        code = refuse(GRPC_STATUS_INTERNAL, details, details_len,
                      "cannot fingerprint the client certificate");
        goto done;
    }
    snprintf(req->group, sizeof(req->group), "%s", m->group);
    memcpy(req->eph_pub, m->eph_pub.data, STEK_P256_POINT_BYTES);
    memcpy(req->nonce, m->nonce.data, m->nonce.len);
    req->nonce_len = m->nonce.len;
done:
    stek__v1__get_key_set_request__free_unpacked(m, NULL);
    return code;
}

/* ---- the validated-request cache ---------------------------------------- */

typedef struct ventry {
    uint8_t key[32];
    int64_t at; /* stekd_now() when stored; 0 = empty */
    stekd_request req;
} ventry;

struct stekd_vcache {
    pthread_mutex_t mu;
    size_t n;
    ventry *slots;
};

stek_status stekd_vcache_new(size_t entries, stekd_vcache **out)
{
    STEK_ENSURE(out != NULL && entries > 0 && entries < (1u << 22), STEK_ERR_INVALID_ARG);
    stekd_vcache *v = calloc(1, sizeof(*v));
    STEK_ENSURE(v != NULL, STEK_ERR_NOMEM);
    v->slots = calloc(entries, sizeof(*v->slots));
    if (v->slots == NULL) {
        free(v);
        STEK_BAIL(STEK_ERR_NOMEM, "validated-request cache of %zu", entries);
    }
    v->n = entries;
    pthread_mutex_init(&v->mu, NULL);
    *out = v;
    return STEK_OK;
}

void stekd_vcache_free(stekd_vcache *v)
{
    if (v == NULL)
        return;
    pthread_mutex_destroy(&v->mu);
    free(v->slots);
    free(v);
}

static bool vkey(const stekd_peer *peer, const uint8_t *bytes, size_t len, uint8_t out[32])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    size_t pem_len = peer->cert_pem_len;
    bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
              EVP_DigestUpdate(md, &pem_len, sizeof(pem_len)) == 1 &&
              EVP_DigestUpdate(md, peer->cert_pem, pem_len) == 1 &&
              EVP_DigestUpdate(md, bytes, len) == 1 && EVP_DigestFinal_ex(md, out, NULL) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

static bool vcache_get(stekd_vcache *v, const uint8_t key[32], int64_t now, stekd_request *req)
{
    size_t i;
    memcpy(&i, key, sizeof(i));
    ventry *e = &v->slots[i % v->n];
    pthread_mutex_lock(&v->mu);
    bool hit = e->at != 0 && now >= e->at && now - e->at < STEKD_KEYSET_MAX_AGE_S &&
               memcmp(e->key, key, 32) == 0;
    if (hit)
        *req = e->req;
    pthread_mutex_unlock(&v->mu);
    return hit;
}

static void vcache_put(stekd_vcache *v, const uint8_t key[32], int64_t now,
                       const stekd_request *req)
{
    size_t i;
    memcpy(&i, key, sizeof(i));
    ventry *e = &v->slots[i % v->n];
    pthread_mutex_lock(&v->mu);
    memcpy(e->key, key, 32);
    e->at = now;
    e->req = *req;
    pthread_mutex_unlock(&v->mu);
}

grpc_status_code stekd_handle_validate(const stekd_handler *h, const stekd_peer *peer,
                                       const uint8_t *bytes, size_t len, stekd_request *req,
                                       char *details, size_t details_len)
{
    uint8_t key[32];
    int64_t now = stekd_now();
    bool keyed = h->vcache != NULL && peer->cert_pem != NULL && vkey(peer, bytes, len, key);
    if (keyed && vcache_get(h->vcache, key, now, req))
        return GRPC_STATUS_OK;

    X509 *cert = NULL;
    if (peer->cert_pem != NULL && peer->cert_pem_len > 0 && peer->cert_pem_len < (1u << 20)) {
        BIO *bio = BIO_new_mem_buf(peer->cert_pem, (int)peer->cert_pem_len);
        if (bio != NULL)
            cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        BIO_free(bio);
    }
    grpc_status_code code = validate(h, peer, cert, bytes, len, req, details, details_len);
    X509_free(cert);
    if (code == GRPC_STATUS_OK && keyed)
        vcache_put(h->vcache, key, now, req);
    return code;
}

void stekd_reply_ok(const stekd_view *v, stekd_keyset *ks, stekd_reply *out)
{
    memset(out, 0, sizeof(*out));
    out->code = GRPC_STATUS_OK;
    out->ks = ks;
    out->generation = v->generation;
    out->epoch_first = v->keys[0].epoch;
    out->epoch_last = v->keys[v->n_keys - 1].epoch;
    out->epoch_current = v->epoch;
}

void stekd_handle_keyset(const stekd_handler *h, const stekd_request *req, stekd_reply *out,
                         uint64_t *version)
{
    memset(out, 0, sizeof(*out));
    stekd_view *v = stekd_state_view(h->state, req->group);
    if (v == NULL) { /* validated requests name configured groups */
        out->code = refuse(GRPC_STATUS_PERMISSION_DENIED, out->details, sizeof(out->details),
                           "group not configured");
        return;
    }
    if (!v->available) {
        out->code =
            refuse(GRPC_STATUS_UNAVAILABLE, out->details, sizeof(out->details), "%s", v->why);
        stekd_view_unref(v);
        return;
    }
    stekd_keyset_req r = {req->identity, req->eph_pub, req->nonce, req->nonce_len};
    stek_status st = stekd_cache_get(h->cache, h->p11, v, &r, stekd_now(), &out->ks);
    /*
     * A rotation destroys the keys that left the window right after it
     * publishes the view without them, so a build that took the previous
     * view just before can find its oldest key gone. That is not an error
     * of the host's: build once more from the view published since
     * (bench_load saw this about once per rotation, as INTERNAL to the host).
     */
    if (st == STEK_ERR_NOT_FOUND) {
        stekd_view *nv = stekd_state_view(h->state, req->group);
        if (nv != NULL && nv->available && nv->version != v->version) {
            stekd_view_unref(v);
            v = nv;
            nv = NULL;
            st = stekd_cache_get(h->cache, h->p11, v, &r, stekd_now(), &out->ks);
        }
        stekd_view_unref(nv);
    }
    if (st == STEK_OK) {
        /* The cache key includes the view version: the set holds exactly v's keys. */
        stekd_reply_ok(v, out->ks, out);
        if (version)
            *version = v->version;
    } else {
        stek_log(STEK_LOG_WARN, "stekd", "key set for %s (%s): %s: %s", req->identity, req->group,
                 stek_status_name(st), stek_error_detail());
        out->code = refuse(
            st == STEK_ERR_HSM_UNAVAILABLE ? GRPC_STATUS_UNAVAILABLE : GRPC_STATUS_INTERNAL,
            out->details, sizeof(out->details), "key set unavailable: %s", stek_status_name(st));
    }
    stekd_view_unref(v);
}

stek_status stekd_handle_stage(const stekd_handler *h, const stekd_request *req,
                               const stekd_view *staged, stekd_keyset **out)
{
    STEK_ENSURE(h && req && staged && out, STEK_ERR_INVALID_ARG);
    stekd_keyset_req r = {req->identity, req->eph_pub, req->nonce, req->nonce_len};
    stek_status st = stekd_keyset_build(h->p11, staged, &r, stekd_now(), out);
    if (st != STEK_OK)
        stek_log(STEK_LOG_DEBUG, "stekd", "staged key set for %s (%s): %s: %s", req->identity,
                 req->group, stek_status_name(st), stek_error_detail());
    return st;
}

/* ---- fleet reports ------------------------------------------------------- */

grpc_status_code stekd_handle_report(const stekd_handler *h, const stekd_peer *peer,
                                     const char *peer_addr, const uint8_t *bytes, size_t len,
                                     char *details, size_t details_len)
{
    Stek__V1__ReportStatusRequest *m = stek__v1__report_status_request__unpack(NULL, len, bytes);
    if (m == NULL)
        return refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len,
                      "malformed request: not a stek.v1 status report");
    /* Who is reporting, for which group: GetKeySet's own checks, in its
     * order, on the request the host watches with. */
    stekd_request req;
    grpc_status_code code = stekd_handle_validate(
        h, peer, m->key_set_request.data, m->key_set_request.len, &req, details, details_len);
    if (code != GRPC_STATUS_OK)
        goto done;
    if (m->n_key_names > STEKD_FLEET_MAX_NAMES) {
        code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len, "more than %d key names",
                      STEKD_FLEET_MAX_NAMES);
        goto done;
    }
    uint8_t names[STEKD_FLEET_MAX_NAMES][STEK_TICKET_NAME_BYTES];
    for (size_t i = 0; i < m->n_key_names; i++) {
        if (m->key_names[i].len != STEK_TICKET_NAME_BYTES) {
            code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len,
                          "key name %zu is %zu bytes, not %d", i, m->key_names[i].len,
                          STEK_TICKET_NAME_BYTES);
            goto done;
        }
        memcpy(names[i], m->key_names[i].data, STEK_TICKET_NAME_BYTES);
    }
    if (m->report_interval_s < 1 || m->report_interval_s > STEKD_FLEET_MAX_INTERVAL_S) {
        code = refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len,
                      "report interval must be 1 to %d s", STEKD_FLEET_MAX_INTERVAL_S);
        goto done;
    }
    if (m->generation > UINT32_MAX) {
        code =
            refuse(GRPC_STATUS_INVALID_ARGUMENT, details, details_len, "generation beyond 32 bits");
        goto done;
    }
    stekd_fleet_report r = {
        .group = req.group,
        .identity = req.identity,
        .peer = peer_addr,
        .generation = m->generation,
        .current_epoch = m->current_epoch,
        .names = (const uint8_t(*)[STEK_TICKET_NAME_BYTES])names,
        .n_names = m->n_key_names,
        .interval_s = m->report_interval_s,
    };
    const Stek__V1__HostCounters *k = m->counters;
    if (k != NULL)
        r.counters = (stekd_fleet_counters){
            .tickets_issued = k->tickets_issued,
            .tickets_stale = k->tickets_stale,
            .tickets_resumed = k->tickets_resumed,
            .tickets_renewed = k->tickets_renewed,
            .miss_unknown = k->miss_unknown,
            .miss_expired = k->miss_expired,
            .miss_other_generation = k->miss_other_generation,
            .miss_other_group = k->miss_other_group,
            .miss_bad_mac = k->miss_bad_mac,
            .no_key_encrypts = k->no_key_encrypts,
        };
    /* A report that cannot be kept is stekd's loss, not the host's error. */
    if (h->fleet != NULL && stekd_fleet_put(h->fleet, &r, stekd_now()) != STEK_OK)
        stek_log(STEK_LOG_WARN, "stekd", "report of %s (%s) not kept: %s", req.identity, req.group,
                 stek_error_detail());
done:
    stek__v1__report_status_request__free_unpacked(m, NULL);
    return code;
}

bool stekd_handle_fleet_group(const stekd_handler *h, const char *group, int64_t now,
                              stekd_fleet_group *out)
{
    const stekd_group_cfg *g = stekd_config_group(h->cfg, group);
    if (g == NULL)
        return false;
    memset(out, 0, sizeof(*out));
    out->name = g->name;
    out->sched = g->sched;
    /* A healthy host gets the new set within the jitter, then reports. */
    out->grace_s = (h->cfg->jitter_ms + 999) / 1000 + STEKD_FLEET_GRACE_S;
    stekd_view *v = stekd_state_view(h->state, group);
    if (v != NULL && v->available) {
        out->epoch = v->epoch;
        out->generation = v->generation;
        out->gen_start = v->gen_start;
        bool cur = false, next = false;
        for (size_t i = 0; i < v->n_keys; i++) {
            if (v->keys[i].epoch == v->epoch) {
                memcpy(out->current_name, v->keys[i].name, STEK_TICKET_NAME_BYTES);
                cur = true;
            } else if (v->keys[i].epoch == v->epoch + 1) {
                memcpy(out->next_name, v->keys[i].name, STEK_TICKET_NAME_BYTES);
                next = true;
            }
        }
        out->have_names = cur && next;
    } else if (stek_sched_epoch_at(&g->sched, now, &out->epoch) != STEK_OK) {
        out->epoch = 0; /* a clock before the group's origin */
    }
    stekd_view_unref(v);
    return true;
}
