/*
 * stekd's own TLS key held in the token, named by a pkcs11: URI and reached
 * through OpenSSL's pkcs11 engine (libengine-pkcs11-openssl); the PIN comes
 * from a file named in the URI, never from the config file itself.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "fx_grpc.h"
#include "fx_stekd.h"
#include "hostwrap.h"

static fx_stekd d;

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

static int run(char *const argv[])
{
    char log[FX_PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s/tool.log", d.dir);
    pid_t pid;
    int status = -1;
    if (fx_spawn(argv, log, &pid) != 0 || fx_wait_exit(pid, 20000, &status) != 0)
        return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* DER files for pkcs11-tool, made with the OpenSSL API. */
static int write_der(const char *pem_path, const char *der_path, bool key)
{
    FILE *in = fopen(pem_path, "r"), *out = fopen(der_path, "wb");
    int ok = 0;
    if (in && out) {
        if (key) {
            EVP_PKEY *k = PEM_read_PrivateKey(in, NULL, NULL, NULL);
            ok = k && i2d_PKCS8PrivateKey_fp(out, k, NULL, NULL, 0, NULL, NULL);
            EVP_PKEY_free(k);
        } else {
            X509 *c = PEM_read_X509(in, NULL, NULL, NULL);
            ok = c && i2d_X509_fp(out, c);
            X509_free(c);
        }
    }
    if (in)
        fclose(in);
    if (out && fclose(out) != 0)
        ok = 0;
    return ok ? 0 : -1;
}

/* Replaces the first occurrence of `from` in the config file with `to`. */
static int config_replace(const char *from, const char *to)
{
    FILE *f = fopen(d.config_path, "r");
    if (f == NULL)
        return -1;
    char buf[16384];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *at = strstr(buf, from);
    if (at == NULL)
        return -1;
    char out[20000];
    snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - buf), buf, to, at + strlen(from));
    return fx_write_file(d.config_path, out, 0600);
}

static void test_tls_key_in_token(void **state)
{
    (void)state;
    assert_int_equal(fx_stekd_setup(&d, 60, 120, groups, 1, NULL), 0);
    char key_der[FX_PATH_MAX + 16], cert_der[FX_PATH_MAX + 16];
    snprintf(key_der, sizeof(key_der), "%s/tls-key.der", d.dir);
    snprintf(cert_der, sizeof(cert_der), "%s/tls-cert.der", d.dir);
    assert_int_equal(write_der(d.server.key_path, key_der, true), 0);
    assert_int_equal(write_der(d.server.cert_path, cert_der, false), 0);

    /* Put the key and its certificate into the token, then delete the PEM
     * key file so nothing but the token can serve the handshake. */
    char *wk[] = {"pkcs11-tool",   "--module",  d.tok.module,     "--login", "--pin",  d.tok.pin,
                  "--token-label", d.tok.label, "--write-object", key_der,   "--type", "privkey",
                  "--label",       "stekd-tls", "--id",           "5a01",    NULL};
    assert_int_equal(run(wk), 0);
    char *wc[] = {"pkcs11-tool",   "--module",  d.tok.module,     "--login", "--pin",  d.tok.pin,
                  "--token-label", d.tok.label, "--write-object", cert_der,  "--type", "cert",
                  "--label",       "stekd-tls", "--id",           "5a01",    NULL};
    assert_int_equal(run(wc), 0);
    char uri[2 * FX_PATH_MAX];
    snprintf(uri, sizeof(uri), "pkcs11:token=%s;object=stekd-tls;type=private?pin-source=file:%s",
             d.tok.label, d.tok.pin_file);
    assert_int_equal(config_replace(d.server.key_path, uri), 0);
    assert_int_equal(remove(d.server.key_path), 0);
    assert_int_equal(remove(key_der), 0);

    assert_int_equal(fx_stekd_start(&d), 0);

    const char *uris[] = {"spiffe://fleet/edge/a", NULL};
    fx_cert_opts o = {.name = "edge-a", .uri_sans = uris};
    fx_cert host;
    assert_int_equal(fx_stekd_host_cert(&d, &o, &host), 0);
    stek_host_eph *eph = NULL;
    uint8_t pub[STEK_P256_POINT_BYTES], nonce[16];
    assert_int_equal(stek_host_eph_generate(&eph), STEK_OK);
    assert_int_equal(stek_host_eph_public(eph, pub), STEK_OK);
    assert_int_equal(RAND_bytes(nonce, sizeof(nonce)), 1);
    fx_grpc *ch = NULL;
    assert_int_equal(
        fx_grpc_open(&ch, d.target, d.ca.cert_path, host.cert_path, host.key_path, "localhost"), 0);
    uint8_t *req = NULL;
    size_t len = 0;
    assert_int_equal(
        fx_stek_request("edge", pub, sizeof(pub), nonce, sizeof(nonce), host.key_path, &req, &len),
        0);
    fx_grpc_result r = {0};
    assert_int_equal(fx_grpc_unary(ch, "/stek.v1.KeyService/GetKeySet", req, len, 10000, &r), 0);
    if (r.status != GRPC_STATUS_OK)
        fprintf(stderr, "status %d: %s (stekd log: %s)\n", (int)r.status, r.details, d.log_path);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    assert_non_null(r.body);
    fx_grpc_result_free(&r);
    free(req);
    fx_grpc_close(ch);
    stek_host_eph_free(eph);

    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    assert_int_equal(code, 0);
}

/* Runs even when an assertion failed: stekd never outlives the test. */
static int teardown(void **state)
{
    (void)state;
    fx_stekd_destroy(&d);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls_key_in_token),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
