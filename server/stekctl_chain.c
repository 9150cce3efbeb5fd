/*
 * Seeding a replica's HSM with a group's chain key (DESIGN.md, "Scale-out"):
 *
 *   target: stekctl transport-create --id ID --out t.pem
 *   source: stekctl export-chain GROUP --transport t.pem --id ID --out g.export  (SO PIN)
 *   target: stekctl import-chain --in g.export
 *
 * The chain key never exists in plaintext outside an HSM: it travels
 * RSA-OAEP-wrapped to a single-use key whose private half never leaves the
 * target, and the source wraps only to a key the security officer trusted.
 * The file is a packed stek.v1.ChainExport.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <getopt.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "log.h"
#include "stek/v1/admin.pb-c.h"
#include "stekctl_cmd.h"

#define CHAIN_CONTEXT "stek-chain-v1"
/* A packed export is about 330 bytes; anything much larger is not one. */
#define EXPORT_MAX_BYTES 4096
#define PEM_MAX_BYTES 16384
#define EPOCH_LIMIT (((uint64_t)1 << 48) - 1)

/* ---- transport-create (target) ----------------------------------------- */

/* PEM SubjectPublicKeyInfo of a DER one. *pem is NUL-terminated (free()). */
static stek_status spki_to_pem(const uint8_t *der, size_t len, char **pem, size_t *pem_len)
{
    const unsigned char *p = der;
    stek_status st = STEK_OK;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)len);
    BIO *bio = BIO_new(BIO_s_mem());
    STEK_ENSURE_GOTO(pkey != NULL && bio != NULL, STEK_ERR_CRYPTO);
    STEK_ENSURE_GOTO(PEM_write_bio_PUBKEY(bio, pkey) == 1, STEK_ERR_CRYPTO);
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    STEK_ENSURE_GOTO(n > 0, STEK_ERR_CRYPTO);
    *pem = malloc((size_t)n + 1);
    STEK_ENSURE_GOTO(*pem != NULL, STEK_ERR_NOMEM);
    memcpy(*pem, data, (size_t)n);
    (*pem)[n] = '\0';
    *pem_len = (size_t)n;
done:
    BIO_free(bio);
    EVP_PKEY_free(pkey);
    return st;
}

stek_status stekctl_cmd_transport_create(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"id", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    const char *id = NULL, *out = NULL;
    int o;
    optind = 0;
    opterr = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'i')
            id = optarg;
        else if (o == 'o')
            out = optarg;
        else
            return stekctl_usage(c, "unknown option or missing value: %s", argv[optind - 1]);
    }
    if (optind != argc || id == NULL || out == NULL)
        return stekctl_usage(c, "expected --id ID --out FILE");
    STEK_GUARD(stekctl_open(c));

    uint8_t *spki = NULL;
    size_t spki_len = 0;
    char *pem = NULL;
    size_t pem_len = 0;
    stek_status st = stek_p11_transport_create(c->p11, id, &spki, &spki_len);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot create transport key %s", id);
    st = spki_to_pem(spki, spki_len, &pem, &pem_len);
    if (st != STEK_OK)
        st = stekctl_fail(c, st, "cannot encode the transport public key");
    if (st == STEK_OK) {
        st = stekctl_write_file(out, pem, pem_len, 0644);
        if (st != STEK_OK)
            st = stekctl_fail(c, st, "transport key %s was made but %s cannot be written", id, out);
    }
    if (st == STEK_OK)
        printf("created transport key %s; its public key is in %s\n", id, out);
    free(pem);
    free(spki);
    return st;
}

/* ---- export-chain (source) ---------------------------------------------- */

/* Reads a PEM public key file into a DER SubjectPublicKeyInfo (free()). */
static stek_status read_pubkey(const char *path, uint8_t **der, size_t *der_len)
{
    uint8_t *pem = NULL;
    size_t len = 0;
    STEK_GUARD(stekctl_read_file(path, PEM_MAX_BYTES, &pem, &len));
    stek_status st = STEK_OK;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    EVP_PKEY *pkey = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
    unsigned char *d = NULL;
    if (pkey == NULL)
        STEK_BAIL_GOTO(STEK_ERR_INVALID_ARG, "%s: not a PEM public key", path);
    int n = i2d_PUBKEY(pkey, &d);
    STEK_ENSURE_GOTO(n > 0, STEK_ERR_CRYPTO);
    *der = malloc((size_t)n);
    STEK_ENSURE_GOTO(*der != NULL, STEK_ERR_NOMEM);
    memcpy(*der, d, (size_t)n);
    *der_len = (size_t)n;
done:
    OPENSSL_free(d);
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    free(pem);
    return st;
}

stek_status stekctl_cmd_export_chain(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"transport", required_argument, NULL, 't'},
        {"id", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    const char *transport = NULL, *id = NULL, *out = NULL;
    int o;
    optind = 0;
    opterr = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 't')
            transport = optarg;
        else if (o == 'i')
            id = optarg;
        else if (o == 'o')
            out = optarg;
        else
            return stekctl_usage(c, "unknown option or missing value: %s", argv[optind - 1]);
    }
    if (argc - optind != 1 || transport == NULL || id == NULL || out == NULL)
        return stekctl_usage(c, "expected GROUP --transport FILE --id ID --out FILE");
    const stekd_group_cfg *g;
    STEK_GUARD(stekctl_group(c, argv[optind], &g));

    uint8_t *spki = NULL, *packed = NULL;
    size_t spki_len = 0;
    stek_status st = read_pubkey(transport, &spki, &spki_len);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot read the transport public key %s", transport);
    uint32_t gen = 0;
    int64_t start = 0;
    uint8_t blob[STEK_P11_CHAIN_BLOB_MAX_BYTES];
    size_t blob_len = 0;
    uint64_t epoch = 0;
    STEK_GUARD_GOTO(stekctl_open(c));
    STEK_GUARD_GOTO(stekctl_newest_generation(c, g->name, &gen, &start));
    if (gen == 0) {
        st = stek_error_set(STEK_ERR_NOT_FOUND, "no generation record");
        st = stekctl_fail(c, st, "group %s is not initialized in this token", g->name);
        goto done;
    }
    /* Trusted: only the SO may mark it, and only a trusted key may wrap a chain key. */
    st = stek_p11_transport_import(c->p11, id, spki, spki_len, true);
    if (st == STEK_ERR_EXISTS) {
        /* Never wrap to a key this run did not import: it may not be the target's. */
        st = stekctl_fail(c, st,
                          "a transport key %s is already imported here (left by an interrupted "
                          "export; keys --audit reports it): use another --id",
                          id);
        goto done;
    }
    if (st != STEK_OK) {
        st = stekctl_fail(c, st,
                          "cannot import transport key %s as trusted (this needs the SO PIN, "
                          "from --so-pin-file or $%s)",
                          id, c->cfg->so_pin_env);
        goto done;
    }
    st = stek_p11_chain_export(c->p11, g->name, gen, id, blob, &blob_len, &epoch);
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "cannot export the chain key of group %s generation %u", g->name,
                          (unsigned)gen);
        goto done;
    }

    Stek__V1__ChainExport msg = STEK__V1__CHAIN_EXPORT__INIT;
    msg.context = (char *)CHAIN_CONTEXT;
    msg.group = (char *)g->name;
    msg.generation = gen;
    msg.epoch = epoch;
    msg.generation_start = start;
    msg.transport_id = (char *)id;
    msg.wrapped.data = blob;
    msg.wrapped.len = blob_len;
    size_t len = stek__v1__chain_export__get_packed_size(&msg);
    packed = malloc(len);
    if (packed == NULL) {
        st = stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "export"), "out of memory");
        goto done;
    }
    stek__v1__chain_export__pack(&msg, packed);
    /* Nothing in it is secret, but only the target should have it. */
    st = stekctl_write_file(out, packed, len, 0600);
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "cannot write %s (the transport key is used up: make a new one)",
                          out);
        goto done;
    }
    stek_log(STEK_LOG_INFO, "stekctl", "exported group %s generation %u epoch %" PRIu64, g->name,
             (unsigned)gen, epoch);
    printf("exported %s generation %u chain key at epoch %" PRIu64 " to %s\n", g->name,
           (unsigned)gen, epoch, out);
done:
    free(packed);
    free(spki);
    return st;
}

/* ---- import-chain (target) ---------------------------------------------- */

/* Checks an unpacked export; proto3 has no presence, so empty means missing. */
static stek_status check_export(const Stek__V1__ChainExport *m)
{
    if (m->context == NULL || strcmp(m->context, CHAIN_CONTEXT) != 0)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "context is \"%.32s\", not \"%s\"",
                  m->context ? m->context : "", CHAIN_CONTEXT);
    if (m->group == NULL || stek_group_name_check(m->group) != STEK_OK)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "missing or bad group");
    if (m->generation == 0)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "missing generation");
    if (m->epoch >= EPOCH_LIMIT)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "epoch %" PRIu64 " out of range", m->epoch);
    if (m->generation_start <= 0)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "missing generation start");
    if (m->transport_id == NULL || stek_group_name_check(m->transport_id) != STEK_OK)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "missing or bad transport id");
    if (m->wrapped.len == 0 || m->wrapped.len > STEK_P11_CHAIN_BLOB_MAX_BYTES)
        STEK_BAIL(STEK_ERR_INVALID_ARG, "wrapped key of %zu bytes", m->wrapped.len);
    return STEK_OK;
}

stek_status stekctl_cmd_import_chain(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"in", required_argument, NULL, 'i'},
        {NULL, 0, NULL, 0},
    };
    const char *in = NULL;
    int o;
    optind = 0;
    opterr = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'i')
            in = optarg;
        else
            return stekctl_usage(c, "unknown option or missing value: %s", argv[optind - 1]);
    }
    if (optind != argc || in == NULL)
        return stekctl_usage(c, "expected --in FILE");

    uint8_t *buf = NULL;
    size_t len = 0;
    stek_status st = stekctl_read_file(in, EXPORT_MAX_BYTES, &buf, &len);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot read %s", in);
    Stek__V1__ChainExport *m = stek__v1__chain_export__unpack(NULL, len, buf);
    free(buf);
    if (m == NULL)
        return stekctl_fail(c, stek_error_set(STEK_ERR_INVALID_ARG, "protobuf unpack failed"),
                            "%s is not a chain export", in);
    stek_p11_generation *gens = NULL;
    size_t n_gens = 0;
    st = check_export(m);
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "%s is not a valid chain export", in);
        goto done;
    }
    const stekd_group_cfg *g;
    STEK_GUARD_GOTO(stekctl_group(c, m->group, &g));
    STEK_GUARD_GOTO(stekctl_open(c));

    /* Refuse before the import what would make the record disagree with the key. */
    st = stek_p11_generation_list(c->p11, g->name, &gens, &n_gens);
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "cannot read the generations of group %s", g->name);
        goto done;
    }
    for (size_t i = 0; i < n_gens; i++) {
        if (gens[i].generation > m->generation) {
            st = stek_error_set(STEK_ERR_EXISTS, "newest generation here is %u",
                                (unsigned)gens[n_gens - 1].generation);
            st = stekctl_fail(c, st, "group %s already has a newer generation than %u", g->name,
                              (unsigned)m->generation);
            goto done;
        }
        if (gens[i].generation == m->generation && gens[i].start != m->generation_start) {
            st = stek_error_set(STEK_ERR_EXISTS, "recorded start %lld, export says %lld",
                                (long long)gens[i].start, (long long)m->generation_start);
            st = stekctl_fail(c, st,
                              "group %s generation %u was started independently here: this "
                              "token holds another root (rekey the source, or start over)",
                              g->name, (unsigned)m->generation);
            goto done;
        }
    }
    st = stek_p11_chain_import(c->p11, g->name, m->generation, m->epoch, m->transport_id,
                               m->wrapped.data, m->wrapped.len);
    /* The layer tells a damaged or foreign blob (VERIFY) from a token that
     * went away (HSM_UNAVAILABLE). */
    if (st == STEK_ERR_VERIFY) {
        st = stekctl_fail(c, st,
                          "the chain key of group %s did not unwrap in this token: %s is "
                          "damaged or was made for another transport key (transport key %s "
                          "is used up)",
                          g->name, in, m->transport_id);
        goto done;
    }
    if (st != STEK_OK) {
        st = stekctl_fail(c, st,
                          "cannot import the chain key of group %s generation %u (transport key "
                          "%s is used up either way)",
                          g->name, (unsigned)m->generation, m->transport_id);
        goto done;
    }
    /* An earlier import of the same generation leaves an older chain key. */
    st = stek_p11_chain_cleanup(c->p11, g->name, m->generation);
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "cannot clean up older chain keys of group %s", g->name);
        goto done;
    }
    st = stek_p11_generation_record(c->p11, g->name, m->generation, m->generation_start);
    if (st == STEK_ERR_EXISTS) {
        /* Recorded already (checked above, or by a racing run): the start must match. */
        int64_t start = 0;
        uint32_t newest = 0;
        STEK_GUARD_GOTO(stekctl_newest_generation(c, g->name, &newest, &start));
        st = newest == m->generation && start == m->generation_start
                 ? STEK_OK
                 : stek_error_set(STEK_ERR_EXISTS, "generation %u recorded with start %lld",
                                  (unsigned)newest, (long long)start);
    }
    if (st != STEK_OK) {
        st = stekctl_fail(c, st, "cannot record generation %u of group %s", (unsigned)m->generation,
                          g->name);
        goto done;
    }
    /* The replica serves the source's generation now; older ones are dead weight. */
    unsigned destroyed = 0;
    STEK_GUARD_GOTO(stekctl_destroy_generations_below(c, g->name, m->generation, &destroyed));
    stek_log(STEK_LOG_INFO, "stekctl", "imported group %s generation %u epoch %" PRIu64, g->name,
             (unsigned)m->generation, m->epoch);
    printf("imported %s generation %u chain key at epoch %" PRIu64 "\n", g->name,
           (unsigned)m->generation, m->epoch);
    if (destroyed > 0)
        printf("destroyed %u key(s) of older generations\n", destroyed);
done:
    free(gens);
    stek__v1__chain_export__free_unpacked(m, NULL);
    return st;
}
