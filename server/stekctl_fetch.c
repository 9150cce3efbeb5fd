/*
 * stekctl fetch: a debugging client. It asks a stekd for a group's key set
 * with a given host certificate, exactly as a host would (a fresh ephemeral
 * key, a signed request), runs the host's acceptance checks against the
 * pinned service key, and prints the set's metadata and the verdict. Key
 * material is unwrapped into locked memory by the checks and never printed:
 * names, epochs, states and times only.
 *
 * Every gRPC client call is in client/transport.c; this file only drives it.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/pem.h>
#include <openssl/rand.h>

#include "accept.h"
#include "stekctl_cmd.h"
#include "transport.h"

static const char *state_name(stek_key_state s)
{
    switch (s) {
    case STEK_KEY_NEXT:
        return "next";
    case STEK_KEY_CURRENT:
        return "current";
    case STEK_KEY_DECRYPT_ONLY:
        return "decrypt-only";
    default:
        return "expired";
    }
}

static EVP_PKEY *read_key(const char *path, bool private_key)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    EVP_PKEY *k = private_key ? PEM_read_PrivateKey(f, NULL, NULL, NULL)
                              : PEM_read_PUBKEY(f, NULL, NULL, NULL);
    fclose(f);
    return k;
}

static void print_set(const stek_accepted_set *s)
{
    char when[32];
    printf("group        %s\n", s->group);
    printf("identity     %s\n", s->identity);
    printf("generation   %llu\n", (unsigned long long)s->generation);
    stekctl_rfc3339(s->issued_at / 1000000000, when);
    printf("issued at    %s\n", when);
    printf("epoch        %llu (current)\n", (unsigned long long)s->current_epoch);
    printf("signature    valid (pinned service key)\n");
    printf("%-8s %-13s %-32s %-20s %-20s %s\n", "epoch", "state", "name", "not_before",
           "encrypt_until", "decrypt_until");
    for (size_t i = 0; i < s->n_keys; i++) {
        const stek_accepted_key *k = &s->keys[i];
        const uint8_t *name = stek_accepted_entry(s, i); /* the name: bytes 0..15 only */
        char hex[2 * STEK_TICKET_NAME_BYTES + 1];
        for (size_t j = 0; j < STEK_TICKET_NAME_BYTES; j++)
            snprintf(hex + 2 * j, 3, "%02x", name[j]);
        char nb[32], eu[32], du[32];
        stekctl_rfc3339(k->not_before / 1000000000, nb);
        stekctl_rfc3339(k->encrypt_until / 1000000000, eu);
        stekctl_rfc3339(k->decrypt_until / 1000000000, du);
        printf("%-8llu %-13s %-32s %-20s %-20s %s\n", (unsigned long long)k->epoch,
               state_name(k->state), hex, nb, eu, du);
    }
}

stek_status stekctl_cmd_fetch(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"target", required_argument, NULL, 't'},  {"ca", required_argument, NULL, 'a'},
        {"cert", required_argument, NULL, 'c'},    {"key", required_argument, NULL, 'k'},
        {"pubkey", required_argument, NULL, 'p'},  {"server-name", required_argument, NULL, 's'},
        {"timeout", required_argument, NULL, 'w'}, {NULL, 0, NULL, 0},
    };
    const char *target = NULL, *ca = NULL, *cert = NULL, *key = NULL, *pubkey = NULL;
    const char *server_name = NULL;
    int timeout_ms = 10000;
    optind = 0;
    opterr = 0;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 't':
            target = optarg;
            break;
        case 'a':
            ca = optarg;
            break;
        case 'c':
            cert = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case 'p':
            pubkey = optarg;
            break;
        case 's':
            server_name = optarg;
            break;
        case 'w':
            timeout_ms = atoi(optarg);
            break;
        default:
            return stekctl_usage(c, "unknown option or missing value: %s", argv[optind - 1]);
        }
    }
    if (argc - optind != 1)
        return stekctl_usage(c, "expected one GROUP");
    if (!target || !ca || !cert || !key || !pubkey || timeout_ms <= 0)
        return stekctl_usage(c, "fetch needs --target, --ca, --cert, --key and --pubkey");
    const char *group = argv[optind];
    const stekd_group_cfg *g = NULL;
    STEK_GUARD(stekctl_group(c, group, &g));

    stek_status st = STEK_OK;
    EVP_PKEY *host_key = read_key(key, true), *service = read_key(pubkey, false);
    stek_host_eph *eph = NULL;
    stek_transport *t = NULL;
    uint8_t nonce[16], *req = NULL, *resp = NULL;
    size_t req_len = 0, resp_len = 0;
    stek_accepted_set *set = NULL;
    if (host_key == NULL || service == NULL) {
        st = stekctl_fail(c, STEK_ERR_IO, "cannot read %s", host_key ? pubkey : key);
        goto done;
    }
    if (RAND_bytes(nonce, sizeof(nonce)) != 1) {
        st = stekctl_fail(c, STEK_ERR_CRYPTO, "no random bytes");
        goto done;
    }
    stek_transport_opts to = {.target = target,
                              .ca_pem_path = ca,
                              .cert_pem_path = cert,
                              .key_pem_path = key,
                              .server_name_override = server_name};
    if ((st = stek_host_eph_generate(&eph)) != STEK_OK ||
        (st = stek_request_build(group, eph, nonce, sizeof(nonce), host_key, &req, &req_len)) !=
            STEK_OK ||
        (st = stek_transport_open(&to, &t)) != STEK_OK) {
        st = stekctl_fail(c, st, "cannot prepare the request");
        goto done;
    }
    int grpc_status = -1;
    char details[256] = "";
    st = stek_transport_get(t, req, req_len, timeout_ms, &resp, &resp_len, &grpc_status, details,
                            sizeof(details));
    if (st != STEK_OK) {
        printf("status       %d (%s)\n", grpc_status, details[0] ? details : "no details");
        st = stekctl_fail(c, st, "GetKeySet from %s failed with gRPC status %d", target,
                          grpc_status);
        goto done;
    }
    EVP_PKEY *pins[] = {service};
    stek_accept_ctx ac = {
        .service_pubs = pins,
        .n_service_pubs = 1,
        .identity = NULL, /* whichever typed SAN the policy matched */
        .eph = eph,
        .nonce = nonce,
        .nonce_len = sizeof(nonce),
        .group = group,
        .sched = &g->sched,
        .now = c->now,
    };
    stek_reject why = STEK_REJECT_NONE;
    bool heartbeat = false;
    st = stek_accept(&ac, resp, resp_len, &set, &why, &heartbeat);
    if (st == STEK_OK && set != NULL) {
        printf("status       0 (OK)\n");
        print_set(set);
    } else if (st == STEK_OK) {
        st = stekctl_fail(c, STEK_ERR_VERIFY, "the answer was a heartbeat, not a key set");
    } else {
        printf("status       0 (OK), but the set is REJECTED: %s\n", stek_reject_name(why));
        st = stekctl_fail(c, st, "key set rejected (%s)", stek_reject_name(why));
    }
done:
    stek_accepted_set_free(set);
    free(resp);
    free(req);
    stek_transport_close(t);
    stek_host_eph_free(eph);
    EVP_PKEY_free(host_key);
    EVP_PKEY_free(service);
    return st;
}
