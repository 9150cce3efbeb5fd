/*
 * stekd's request decoding and validation (server/handler.c), from the raw
 * bytes of a GetKeySet/WatchKeySet or ReportStatus request to the answer,
 * for a fixed peer: the host certificate of fuzz_host_cert_pem() (EKU clientAuth,
 * URI and DNS SANs) as gRPC would hand it over. Every check of handler.h
 * runs before any HSM call, so no token is involved: the harness stops
 * where stekd_handle_keyset would ask the HSM for a set.
 *
 * The first byte picks the mode, the rest is the request:
 *   0  stekd_handle_validate on the bytes;
 *   1  the same with the validated-request cache, twice: the second answer
 *      must equal the first (a cache hit returns what the checks returned);
 *   2  the bytes parsed as a GetKeySetRequest and signed again with the
 *      host key before validation, so mutations of group, eph_pub and nonce
 *      get past the signature check and reach the accepting path;
 *   3  stekd_handle_report (its embedded key_set_request goes through the
 *      same validation; no fleet table, so nothing is kept).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "config.h"
#include "fuzz.h"
#include "handler.h"
#include "kek.h"
#include "reqsig.h"
#include "stek/v1/stek.pb-c.h"

#define MODES 4

static stekd_config *cfg;
static stekd_vcache *vcache;
static EVP_PKEY *host_key;
static const char *const uris[] = {"spiffe://fleet/edge/fuzz"};
static const char *const dns[] = {"fuzz.edge.example"};
static stekd_peer peer;

static const char conf_text[] =
    "listen = \"127.0.0.1:7443\";\n"
    "tls = { cert = \"/c.pem\"; key = \"/k.pem\"; client_ca = \"/ca.pem\"; };\n"
    "hsm = { module = \"/m.so\"; token = \"t\"; };\n"
    "groups = (\n"
    "  { name = \"edge\"; epoch = \"1m\"; decrypt_lifetime = \"3m\";\n"
    "    allow = [ \"uri:spiffe://fleet/edge/*\" ]; },\n"
    "  { name = \"by-dns\"; epoch = \"1h\"; allow = [ \"dns:*.edge.example\" ]; },\n"
    "  { name = \"others\"; epoch = \"1h\"; allow = [ \"uri:spiffe://fleet/others/*\" ]; }\n"
    ");\n";

static void init(void)
{
    if (cfg != NULL)
        return;
    char path[512];
    fuzz_write_file("stekd.conf", (const uint8_t *)conf_text, sizeof(conf_text) - 1, path);
    if (stekd_config_load(path, &cfg) != STEK_OK)
        fuzz_fail("config: %s", stek_error_detail());
    if (stekd_vcache_new(64, &vcache) != STEK_OK)
        fuzz_fail("vcache: %s", stek_error_detail());
    host_key = fuzz_derived_key("host", false);
    peer = (stekd_peer){
        .cert_pem = fuzz_host_cert_pem(),
        .cert_pem_len = strlen(fuzz_host_cert_pem()),
        .uris = uris,
        .n_uris = 1,
        .dns = dns,
        .n_dns = 1,
    };
}

/* What an accepted request must hold, whatever the bytes were. */
static void check_accepted(const stekd_request *req)
{
    if (stekd_config_group(cfg, req->group) == NULL)
        fuzz_fail("accepted a request for an unconfigured group");
    if (strncmp(req->identity, "uri:", 4) != 0 && strncmp(req->identity, "dns:", 4) != 0)
        fuzz_fail("accepted identity is not typed");
    if (req->nonce_len < STEK_NONCE_MIN_BYTES || req->nonce_len > STEK_NONCE_MAX_BYTES)
        fuzz_fail("accepted a nonce of %zu bytes", req->nonce_len);
    if (stek_p256_point_check(req->eph_pub, sizeof(req->eph_pub)) != STEK_OK)
        fuzz_fail("accepted an eph_pub that is not a P-256 point");
}

static grpc_status_code validate(const stekd_handler *h, const uint8_t *b, size_t n,
                                 stekd_request *req)
{
    char details[256];
    grpc_status_code code = stekd_handle_validate(h, &peer, b, n, req, details, sizeof(details));
    if (fuzz_verbose())
        fprintf(stderr, "validate: %d %s\n", (int)code, code == GRPC_STATUS_OK ? "" : details);
    if (code == GRPC_STATUS_OK)
        check_accepted(req);
    else if (details[0] == '\0')
        fuzz_fail("refusal %d without a reason", (int)code);
    return code;
}

/* Mode 2: the request as parsed, signed again by the host key. */
static void resign_and_validate(const stekd_handler *h, const uint8_t *b, size_t n)
{
    Stek__V1__GetKeySetRequest *m = stek__v1__get_key_set_request__unpack(NULL, n, b);
    if (m == NULL)
        return;
    uint8_t *sig = NULL, *out = NULL;
    size_t sig_len = 0;
    if (stek_reqsig_sign(host_key, m->group, m->eph_pub.data, m->eph_pub.len, m->nonce.data,
                         m->nonce.len, &sig, &sig_len) == STEK_OK) {
        ProtobufCBinaryData received = m->signature;
        m->signature = (ProtobufCBinaryData){sig_len, sig};
        size_t len = stek__v1__get_key_set_request__get_packed_size(m);
        out = malloc(len);
        if (out == NULL)
            fuzz_fail("out of memory");
        stek__v1__get_key_set_request__pack(m, out);
        stekd_request req;
        grpc_status_code code = validate(h, out, len, &req);
        /* Signed by the right key: only the other checks may refuse. */
        if (code == GRPC_STATUS_UNAUTHENTICATED)
            fuzz_fail("a request signed by the host key failed its signature check");
        m->signature = received; /* protobuf-c frees its own, not ours */
    }
    stek__v1__get_key_set_request__free_unpacked(m, NULL);
    free(sig);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init();
    if (size < 1)
        return 0;
    const uint8_t mode = data[0] % MODES;
    const uint8_t *b = data + 1;
    const size_t n = size - 1;
    stekd_handler h = {.cfg = cfg};
    stekd_request req, again;
    char details[256];
    switch (mode) {
    case 0:
        validate(&h, b, n, &req);
        break;
    case 1: {
        h.vcache = vcache;
        grpc_status_code c1 = validate(&h, b, n, &req);
        grpc_status_code c2 = validate(&h, b, n, &again);
        if (c1 != c2 || (c1 == GRPC_STATUS_OK && memcmp(&req, &again, sizeof(req)) != 0))
            fuzz_fail("the validated-request cache changed the answer (%d, then %d)", (int)c1,
                      (int)c2);
        break;
    }
    case 2:
        resign_and_validate(&h, b, n);
        break;
    default:
        details[0] = '\0';
        grpc_status_code code =
            stekd_handle_report(&h, &peer, "ipv4:127.0.0.1:1", b, n, details, sizeof(details));
        if (fuzz_verbose())
            fprintf(stderr, "report: %d %s\n", (int)code, details);
        break;
    }
    return 0;
}

/* ---- seeds ------------------------------------------------------------------------------ */

/* A GetKeySetRequest for group, signed by the host key (or with a broken signature). */
static size_t make_request(const char *group, size_t nonce_len, bool break_sig, uint8_t *out,
                           size_t cap)
{
    uint8_t eph[STEK_P256_POINT_BYTES], nonce[STEK_NONCE_MAX_BYTES];
    EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    size_t len = 0;
    if (k == NULL ||
        EVP_PKEY_get_octet_string_param(k, "encoded-pub-key", eph, sizeof(eph), &len) != 1)
        fuzz_fail("eph key");
    EVP_PKEY_free(k);
    for (size_t i = 0; i < nonce_len; i++)
        nonce[i] = (uint8_t)(0xa0 + i);
    uint8_t *sig = NULL;
    size_t sig_len = 0;
    if (stek_reqsig_sign(host_key, group, eph, sizeof(eph), nonce, nonce_len, &sig, &sig_len) !=
        STEK_OK)
        fuzz_fail("sign: %s", stek_error_detail());
    if (break_sig)
        sig[sig_len / 2] ^= 0x01;
    Stek__V1__GetKeySetRequest m = STEK__V1__GET_KEY_SET_REQUEST__INIT;
    m.group = (char *)group;
    m.eph_pub = (ProtobufCBinaryData){sizeof(eph), eph};
    m.nonce = (ProtobufCBinaryData){nonce_len, nonce};
    m.signature = (ProtobufCBinaryData){sig_len, sig};
    len = stek__v1__get_key_set_request__get_packed_size(&m);
    if (len > cap)
        fuzz_fail("seed too large");
    stek__v1__get_key_set_request__pack(&m, out);
    free(sig);
    return len;
}

static void emit_mode(fuzz_emit_fn emit, const char *name, uint8_t mode, const uint8_t *b, size_t n)
{
    uint8_t buf[2048];
    buf[0] = mode;
    memcpy(buf + 1, b, n);
    emit(name, buf, n + 1);
}

void fuzz_seeds(fuzz_emit_fn emit)
{
    init();
    uint8_t req[1024], rep[1500];
    size_t n = make_request("edge", 16, false, req, sizeof(req));
    emit_mode(emit, "validate-edge-ok", 0, req, n);
    emit_mode(emit, "vcache-edge-ok", 1, req, n);
    emit_mode(emit, "resign-edge", 2, req, n);

    n = make_request("by-dns", 64, false, req, sizeof(req));
    emit_mode(emit, "validate-dns-ok", 0, req, n);
    n = make_request("others", 32, false, req, sizeof(req));
    emit_mode(emit, "validate-other-group", 0, req, n);
    n = make_request("edge", 24, true, req, sizeof(req));
    emit_mode(emit, "validate-bad-signature", 0, req, n);
    emit_mode(emit, "resign-bad-signature", 2, req, n);

    /* A report around a valid request, with two key names and counters. */
    n = make_request("edge", 16, false, req, sizeof(req));
    uint8_t names[2][16];
    memset(names, 0x5a, sizeof(names));
    ProtobufCBinaryData nb[2] = {{16, names[0]}, {16, names[1]}};
    Stek__V1__HostCounters hc = STEK__V1__HOST_COUNTERS__INIT;
    hc.tickets_issued = 10;
    hc.tickets_resumed = 7;
    hc.miss_unknown = 1;
    Stek__V1__ReportStatusRequest r = STEK__V1__REPORT_STATUS_REQUEST__INIT;
    r.key_set_request = (ProtobufCBinaryData){n, req};
    r.generation = 1;
    r.current_epoch = 28333333;
    r.n_key_names = 2;
    r.key_names = nb;
    r.counters = &hc;
    r.report_interval_s = 60;
    size_t rn = stek__v1__report_status_request__get_packed_size(&r);
    stek__v1__report_status_request__pack(&r, rep);
    emit_mode(emit, "report-ok", 3, rep, rn);
    emit_mode(emit, "empty", 0, (const uint8_t *)"", 0);
}
