/*
 * stekd's start-up errors: each is one clear log line and a distinct exit
 * code (2 configuration, 3 HSM, 4 TLS or address), and nothing is served.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "fx_stekd.h"

#ifndef STEKD_BIN
#error "STEKD_BIN must name the stekd binary"
#endif

static fx_stekd d;
static char original[16384];

static const fx_stekd_group groups[] = {
    {"edge", {"uri:spiffe://fleet/edge/*", NULL, NULL, NULL}},
};

static int setup(void **state)
{
    (void)state;
    if (fx_stekd_setup(&d, 60, 120, groups, 1, NULL) != 0 || fx_stekd_provision(&d) != 0)
        return -1;
    FILE *f = fopen(d.config_path, "r");
    if (f == NULL)
        return -1;
    size_t n = fread(original, 1, sizeof(original) - 1, f);
    original[n] = '\0';
    fclose(f);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    fx_stekd_destroy(&d);
    return 0;
}

/* Writes the original config with `from` replaced by `to` (NULL: as is). */
static void config_with(const char *from, const char *to)
{
    char out[20000];
    const char *at = from ? strstr(original, from) : NULL;
    if (from != NULL)
        assert_non_null(at);
    if (at == NULL)
        snprintf(out, sizeof(out), "%s", original);
    else
        snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - original), original, to,
                 at + strlen(from));
    assert_int_equal(fx_write_file(d.config_path, out, 0600), 0);
}

/* Runs stekd to completion; returns its exit code and its log. */
static int run_stekd(char *log, size_t cap, const char *extra_arg, const char *extra_val)
{
    char path[FX_PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/startup.log", d.dir);
    remove(path);
    char *argv[] = {STEKD_BIN,         "--config",        d.config_path,
                    (char *)extra_arg, (char *)extra_val, NULL};
    pid_t pid;
    int status = -1;
    assert_int_equal(fx_spawn(argv, path, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 15000, &status), 0);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(log, 1, cap - 1, f);
    log[n] = '\0';
    fclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void test_config_errors(void **state)
{
    (void)state;
    char log[8192];
    config_with("groups = (", "groups = ( oops");
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 2);
    assert_non_null(strstr(log, "stekd.conf:"));

    config_with("listen =", "pin = \"1234\";\nlisten =");
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 2);
    assert_non_null(strstr(log, "PINs are never read from the config file"));
    assert_null(strstr(log, "1234"));

    config_with(NULL, NULL);
    char *argv_bad = "--no-such-option";
    assert_int_equal(run_stekd(log, sizeof(log), argv_bad, NULL), 2);
}

static void test_hsm_errors(void **state)
{
    (void)state;
    char log[8192];
    char label[64];
    snprintf(label, sizeof(label), "token = \"%s\"", d.tok.label);
    config_with(label, "token = \"no-such-token\"");
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 3);
    assert_non_null(strstr(log, "no-such-token"));

    /* A wrong PIN is reported once, and the token does not lock. */
    char pin_file[FX_PATH_MAX + 32];
    snprintf(pin_file, sizeof(pin_file), "%s/wrong-pin", d.dir);
    assert_int_equal(fx_write_file(pin_file, "0000", 0600), 0);
    config_with(NULL, NULL);
    assert_int_equal(run_stekd(log, sizeof(log), "--pin-file", pin_file), 3);
    assert_non_null(strstr(log, "CKR_PIN_INCORRECT"));
    assert_null(strstr(log, d.tok.pin));

    char module[FX_PATH_MAX + 32];
    snprintf(module, sizeof(module), "module = \"%s\"", d.tok.module);
    config_with(module, "module = \"/nonexistent/libpkcs11.so\"");
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 3);
    assert_non_null(strstr(log, "/nonexistent/libpkcs11.so"));
}

static void test_tls_and_address_errors(void **state)
{
    (void)state;
    char log[8192];
    config_with(d.server.cert_path, "/nonexistent/stekd.pem");
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 4);
    assert_non_null(strstr(log, "/nonexistent/stekd.pem"));

    /* The port is taken by a running stekd: the second one refuses. */
    config_with(NULL, NULL);
    assert_int_equal(fx_stekd_start(&d), 0);
    const char *port = strrchr(d.target, ':');
    assert_non_null(port);
    char fixed[64];
    snprintf(fixed, sizeof(fixed), "listen = \"127.0.0.1%s\"", port);
    config_with("listen = \"127.0.0.1:0\"", fixed);
    assert_int_equal(run_stekd(log, sizeof(log), NULL, NULL), 4);
    assert_non_null(strstr(log, "cannot listen"));
    int code = -1;
    assert_int_equal(fx_stekd_stop(&d, 8000, &code), 0);
    assert_int_equal(code, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_hsm_errors),
        cmocka_unit_test(test_tls_and_address_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
