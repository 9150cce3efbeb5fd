/* Helpers shared by the fuzz harnesses (fuzz.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "fuzz.h"

void fuzz_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzz: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

bool fuzz_verbose(void)
{
    static int v = -1;
    if (v < 0)
        v = getenv("STEK_FUZZ_VERBOSE") != NULL;
    return v == 1;
}

EVP_PKEY *fuzz_pem_key(const char *pem)
{
    BIO *b = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = b != NULL ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    if (k == NULL && b != NULL && BIO_reset(b) == 1)
        k = PEM_read_bio_PUBKEY(b, NULL, NULL, NULL);
    BIO_free(b);
    if (k == NULL)
        fuzz_fail("a fixed PEM key does not parse");
    return k;
}

EVP_PKEY *fuzz_derived_key(const char *label, bool ed25519)
{
    static const char prefix[] = "stek-fuzz-key:";
    unsigned char d[32];
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(md, prefix, sizeof(prefix) - 1) != 1 ||
        EVP_DigestUpdate(md, label, strlen(label)) != 1 || EVP_DigestFinal_ex(md, d, NULL) != 1)
        fuzz_fail("derive %s", label);
    EVP_MD_CTX_free(md);
    if (ed25519) {
        EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, d, sizeof(d));
        if (k == NULL)
            fuzz_fail("Ed25519 key %s", label);
        return k;
    }
    /* The public point is d*G, computed here: an imported EC private key
     * without its public half cannot be exported or used to verify. */
    EC_GROUP *g = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1);
    BIGNUM *priv = BN_bin2bn(d, sizeof(d), NULL);
    EC_POINT *pub = g != NULL ? EC_POINT_new(g) : NULL;
    unsigned char pt[65];
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    EVP_PKEY *k = NULL;
    if (g == NULL || priv == NULL || pub == NULL || bld == NULL || ctx == NULL ||
        EC_POINT_mul(g, pub, priv, NULL, NULL, NULL) != 1 ||
        EC_POINT_point2oct(g, pub, POINT_CONVERSION_UNCOMPRESSED, pt, sizeof(pt), NULL) !=
            sizeof(pt) ||
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, priv) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof(pt)) != 1 ||
        (params = OSSL_PARAM_BLD_to_param(bld)) == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &k, EVP_PKEY_KEYPAIR, params) != 1)
        fuzz_fail("EC key %s", label);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    EVP_PKEY_CTX_free(ctx);
    EC_POINT_free(pub);
    BN_clear_free(priv);
    EC_GROUP_free(g);
    OPENSSL_cleanse(d, sizeof(d));
    return k;
}

char *fuzz_private_pem(EVP_PKEY *k)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *data = NULL;
    long n = 0;
    if (b == NULL || PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL) != 1 ||
        (n = BIO_get_mem_data(b, &data)) <= 0)
        fuzz_fail("private key PEM");
    char *out = strndup(data, (size_t)n);
    BIO_free(b);
    if (out == NULL)
        fuzz_fail("private key PEM");
    return out;
}

const char *fuzz_host_cert_pem(void)
{
    static char *pem;
    if (pem != NULL)
        return pem;
    EVP_PKEY *key = fuzz_derived_key("host", false);
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    X509V3_CTX v3;
    if (x == NULL || name == NULL || X509_set_version(x, X509_VERSION_3) != 1 ||
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1) != 1 ||
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                   (const unsigned char *)"stek-fuzz-host", -1, -1, 0) != 1 ||
        X509_set_subject_name(x, name) != 1 || X509_set_issuer_name(x, name) != 1 ||
        X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL ||
        X509_gmtime_adj(X509_getm_notAfter(x), 86400L * 365) == NULL ||
        X509_set_pubkey(x, key) != 1)
        fuzz_fail("host certificate");
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    static const char *const ext[][2] = {
        {"basicConstraints", "critical,CA:FALSE"},
        {"keyUsage", "critical,digitalSignature"},
        {"extendedKeyUsage", "clientAuth"},
        {"subjectAltName", "URI:spiffe://fleet/edge/fuzz,DNS:fuzz.edge.example"},
    };
    for (size_t i = 0; i < sizeof(ext) / sizeof(ext[0]); i++) {
        X509_EXTENSION *e = X509V3_EXT_conf(NULL, &v3, ext[i][0], ext[i][1]);
        if (e == NULL || X509_add_ext(x, e, -1) != 1)
            fuzz_fail("host certificate: %s", ext[i][0]);
        X509_EXTENSION_free(e);
    }
    BIO *b = BIO_new(BIO_s_mem());
    char *data = NULL;
    long n = 0;
    if (X509_sign(x, key, EVP_sha256()) <= 0 || b == NULL || PEM_write_bio_X509(b, x) != 1 ||
        (n = BIO_get_mem_data(b, &data)) <= 0 || (pem = strndup(data, (size_t)n)) == NULL)
        fuzz_fail("host certificate");
    BIO_free(b);
    X509_NAME_free(name);
    X509_free(x);
    EVP_PKEY_free(key);
    return pem;
}

static char tmpdir[512];

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static void tmpdir_remove(void)
{
    if (tmpdir[0] != '\0')
        nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *fuzz_tmpdir(void)
{
    if (tmpdir[0] != '\0')
        return tmpdir;
    const char *base = getenv("STEK_TEST_TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/stek-fuzz-XXXXXX",
             base != NULL && base[0] != '\0' ? base : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        fuzz_fail("mkdtemp %s: %s", tmpdir, strerror(errno));
    atexit(tmpdir_remove);
    return tmpdir;
}

void fuzz_write_file(const char *name, const uint8_t *data, size_t len, char *out)
{
    int w = snprintf(out, 512, "%s/%s", fuzz_tmpdir(), name);
    if (w < 0 || w >= 512)
        fuzz_fail("path too long: %s", name);
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        fuzz_fail("open %s: %s", out, strerror(errno));
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fuzz_fail("write %s: %s", out, strerror(errno));
        off += (size_t)n;
    }
    if (close(fd) != 0)
        fuzz_fail("close %s: %s", out, strerror(errno));
}
