/*
 * The PKCS#11 layer's loading, login and recovery, against a real SoftHSM
 * token in a temp dir. The shim module is used only where SoftHSM cannot
 * produce the fault (counting C_Login calls, CKR_DEVICE_REMOVED).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fx.h"
#include "stek_p11.h"

static fx_token tok;

static stek_p11_config config_for(const fx_token *t)
{
    stek_p11_config c = {
        .module_path = t->module,
        .token_label = t->label,
        .pin_env = t->pin_env,
        .so_pin_env = t->so_pin_env,
    };
    return c;
}

static int setup(void **state)
{
    (void)state;
    return fx_token_create(&tok, "stek-module");
}

static int teardown(void **state)
{
    (void)state;
    return fx_token_destroy(&tok);
}

static void test_open_with_env_pin(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(stek_p11_ping(p11), STEK_OK);
    stek_p11_stats st;
    stek_p11_get_stats(p11, &st);
    assert_int_equal(st.login_calls, 1);
    stek_p11_close(p11);
}

static void test_open_with_pin_file(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    c.pin_env = NULL;
    c.pin_file = tok.pin_file;
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(stek_p11_ping(p11), STEK_OK);
    stek_p11_close(p11);
}

static void test_pin_missing(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;

    c.pin_env = "STEK_TEST_NO_SUCH_VARIABLE";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_PIN_MISSING);
    assert_non_null(strstr(stek_error_detail(), "STEK_TEST_NO_SUCH_VARIABLE"));
    assert_null(p11);

    c.pin_env = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_PIN_MISSING);

    c.pin_file = "/nonexistent/stek/pin";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_PIN_MISSING);
    assert_non_null(strstr(stek_error_detail(), "/nonexistent/stek/pin"));
}

static void test_missing_module(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;

    c.module_path = "/nonexistent/libpkcs11-module.so";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_MODULE_LOAD);
    assert_non_null(strstr(stek_error_detail(), "/nonexistent/libpkcs11-module.so"));
    assert_null(p11);

    /* A file that exists but is no shared object. */
    c.module_path = tok.conf_path;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_MODULE_LOAD);

    /* A shared object that is no PKCS#11 module. */
    c.module_path = "libz.so.1";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_MODULE_LOAD);
    assert_non_null(strstr(stek_error_detail(), "C_GetFunctionList"));

    c.module_path = "";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_CONFIG);
}

static void test_missing_token_label(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;
    c.token_label = "no-such-token";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_TOKEN_NOT_FOUND);
    assert_non_null(strstr(stek_error_detail(), "no-such-token"));
    assert_null(p11);

    c.token_label = "a-label-that-is-longer-than-32-bytes";
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_CONFIG);
}

/* A wrong PIN is offered exactly once: the shim counts C_Login calls. */
static void test_wrong_pin_single_attempt(void **state)
{
    (void)state;
    fx_shim shim;
    assert_int_equal(fx_shim_setup(&shim, &tok), 0);
    setenv("STEK_TEST_WRONG_PIN", "000000", 1);

    stek_p11_config c = config_for(&tok);
    c.module_path = shim.module;
    c.pin_env = "STEK_TEST_WRONG_PIN";
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_ERR_PIN_INCORRECT);
    assert_non_null(strstr(stek_error_detail(), "CKR_PIN_INCORRECT"));
    assert_null(p11);
    assert_int_equal(fx_shim_count(&shim, "C_Login"), 1);

    /* The right PIN still works: the token was not locked by retries. */
    c.pin_env = tok.pin_env;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(fx_shim_count(&shim, "C_Login"), 2);
    stek_p11_close(p11);
}

static bool ping_ok(void *arg)
{
    return stek_p11_ping(arg) == STEK_OK;
}

static bool ping_not_unavailable(void *arg)
{
    return stek_p11_ping(arg) != STEK_ERR_HSM_UNAVAILABLE;
}

/*
 * A PIN rejected on a reconnect (the token came back re-initialized) is
 * latched: every later call fails with STEK_ERR_PIN_INCORRECT and no further
 * C_Login reaches the token.
 */
static void test_pin_rejected_on_reconnect_is_latched(void **state)
{
    (void)state;
    fx_shim shim;
    assert_int_equal(fx_shim_setup(&shim, &tok), 0);
    stek_p11_config c = config_for(&tok);
    c.module_path = shim.module;
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    int logins = fx_shim_count(&shim, "C_Login");

    /* The token "goes away" and comes back with a PIN that no longer works. */
    assert_int_equal(fx_shim_set_faults(&shim, "C_GetTokenInfo=CKR_DEVICE_REMOVED\n"
                                               "C_Login=CKR_PIN_INCORRECT\n"),
                     0);
    assert_int_equal(stek_p11_ping(p11), STEK_ERR_HSM_UNAVAILABLE);
    assert_int_equal(fx_shim_set_faults(&shim, "C_Login=CKR_PIN_INCORRECT\n"), 0);
    /* Reconnects are spaced; wait for the attempt that reaches C_Login. */
    assert_int_equal(fx_wait_until(ping_not_unavailable, p11, 5000), 0);
    assert_int_equal(stek_p11_ping(p11), STEK_ERR_PIN_INCORRECT);
    for (int i = 0; i < 5; i++) {
        uint64_t e;
        assert_int_equal(stek_p11_ping(p11), STEK_ERR_PIN_INCORRECT);
        assert_int_equal(stek_p11_chain_newest(p11, "edge", 1, &e), STEK_ERR_PIN_INCORRECT);
    }
    assert_int_equal(fx_shim_count(&shim, "C_Login"), logins + 1);
    stek_p11_close(p11);
    assert_int_equal(fx_shim_set_faults(&shim, ""), 0);
}

/* CKR_DEVICE_REMOVED from a key operation: unavailable, then recovered. */
static void test_device_removed_fault_recovers(void **state)
{
    (void)state;
    fx_shim shim;
    assert_int_equal(fx_shim_setup(&shim, &tok), 0);
    stek_p11_config c = config_for(&tok);
    c.module_path = shim.module;
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(stek_p11_root_create(p11, "dev-removed", 1, 10), STEK_OK);

    assert_int_equal(fx_shim_set_faults(&shim, "C_DeriveKey=CKR_DEVICE_REMOVED\n"), 0);
    assert_int_equal(stek_p11_ratchet_advance(p11, "dev-removed", 1, 12), STEK_ERR_HSM_UNAVAILABLE);
    assert_non_null(strstr(stek_error_detail(), "CKR_DEVICE_REMOVED"));

    assert_int_equal(fx_shim_set_faults(&shim, ""), 0);
    assert_int_equal(fx_wait_until(ping_ok, p11, 5000), 0);

    /* A session the module no longer knows: reopened, not reused. */
    assert_int_equal(fx_shim_set_faults(&shim, "C_FindObjectsInit=CKR_SESSION_HANDLE_INVALID\n"),
                     0);
    uint64_t e = 0;
    assert_int_equal(stek_p11_chain_newest(p11, "dev-removed", 1, &e), STEK_ERR_HSM_UNAVAILABLE);
    assert_non_null(strstr(stek_error_detail(), "CKR_SESSION_HANDLE_INVALID"));

    assert_int_equal(fx_shim_set_faults(&shim, "*=CKR_TOKEN_NOT_PRESENT\n"), 0);
    assert_int_equal(stek_p11_chain_newest(p11, "dev-removed", 1, &e), STEK_ERR_HSM_UNAVAILABLE);

    assert_int_equal(fx_shim_set_faults(&shim, ""), 0);
    assert_int_equal(fx_wait_until(ping_ok, p11, 5000), 0);
    assert_int_equal(stek_p11_ratchet_advance(p11, "dev-removed", 1, 12), STEK_OK);
    assert_int_equal(stek_p11_chain_newest(p11, "dev-removed", 1, &e), STEK_OK);
    assert_int_equal(e, 12);
    stek_p11_stats st;
    stek_p11_get_stats(p11, &st);
    assert_true(st.reconnects >= 1);
    stek_p11_close(p11);
}

/* The token directory deleted under a live process, then restored. */
static void test_token_dir_deleted_mid_run(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(stek_p11_root_create(p11, "deleted", 1, 5), STEK_OK);

    /* Keep a copy so the "same token" can come back. */
    char backup[FX_PATH_MAX + 16];
    snprintf(backup, sizeof(backup), "%s.bak", tok.tokens_dir);
    char *cp[] = {"cp", "-a", tok.tokens_dir, backup, NULL};
    pid_t pid;
    int status;
    assert_int_equal(fx_spawn(cp, NULL, &pid), 0);
    assert_int_equal(fx_wait_exit(pid, 10000, &status), 0);
    assert_int_equal(status, 0);
    assert_int_equal(fx_token_delete_dir(&tok), 0);

    uint64_t e = 0;
    assert_int_equal(stek_p11_chain_newest(p11, "deleted", 1, &e), STEK_ERR_HSM_UNAVAILABLE);
    assert_int_equal(stek_p11_ping(p11), STEK_ERR_HSM_UNAVAILABLE);
    assert_int_equal(stek_p11_ratchet_advance(p11, "deleted", 1, 6), STEK_ERR_HSM_UNAVAILABLE);

    assert_int_equal(rename(backup, tok.tokens_dir), 0);
    assert_int_equal(fx_wait_until(ping_ok, p11, 5000), 0);
    assert_int_equal(stek_p11_chain_newest(p11, "deleted", 1, &e), STEK_OK);
    assert_int_equal(e, 5);
    stek_p11_close(p11);
}

/* A process that started while the token was missing recovers by itself. */
static void test_started_without_token(void **state)
{
    (void)state;
    assert_int_equal(fx_token_hide(&tok), 0);
    stek_p11_config c = config_for(&tok);
    stek_p11 *p11 = NULL;

    /* The default is a clear start-up error. */
    assert_int_not_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_null(p11);

    c.allow_absent_token = true;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    assert_int_equal(stek_p11_ping(p11), STEK_ERR_HSM_UNAVAILABLE);
    uint64_t e;
    assert_int_equal(stek_p11_chain_newest(p11, "edge", 1, &e), STEK_ERR_HSM_UNAVAILABLE);

    assert_int_equal(fx_token_restore(&tok), 0);
    assert_int_equal(fx_wait_until(ping_ok, p11, 5000), 0);
    assert_int_equal(stek_p11_root_create(p11, "late", 1, 1), STEK_OK);
    stek_p11_close(p11);
}

struct worker {
    stek_p11 *p11;
    int id;
    int failures;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    char group[16];
    snprintf(group, sizeof(group), "thread-%d", w->id);
    if (stek_p11_root_create(w->p11, group, 1, 0) != STEK_OK)
        w->failures++;
    for (uint64_t e = 1; e <= 6; e++) {
        uint8_t kcv[STEK_P11_KCV_BYTES];
        if (stek_p11_ratchet_advance(w->p11, group, 1, e) != STEK_OK ||
            stek_p11_ticket_check_value(w->p11, group, 1, e - 1, kcv) != STEK_OK)
            w->failures++;
    }
    return NULL;
}

/* More threads than pooled sessions: callers wait for a session, none fail. */
static void test_pool_under_threads(void **state)
{
    (void)state;
    stek_p11_config c = config_for(&tok);
    c.pool_size = 2;
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&c, &p11), STEK_OK);
    enum { N = 6 };
    pthread_t th[N];
    struct worker w[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){p11, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].failures, 0);
    }
    stek_p11_close(p11);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(NULL, &p11), STEK_ERR_INVALID_ARG);
    stek_p11_config c = config_for(&tok);
    assert_int_equal(stek_p11_open(&c, NULL), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_p11_ping(NULL), STEK_ERR_INVALID_ARG);
    stek_p11_close(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_with_env_pin),
        cmocka_unit_test(test_open_with_pin_file),
        cmocka_unit_test(test_pin_missing),
        cmocka_unit_test(test_missing_module),
        cmocka_unit_test(test_missing_token_label),
        cmocka_unit_test(test_wrong_pin_single_attempt),
        cmocka_unit_test(test_pin_rejected_on_reconnect_is_latched),
        cmocka_unit_test(test_device_removed_fault_recovers),
        cmocka_unit_test(test_token_dir_deleted_mid_run),
        cmocka_unit_test(test_started_without_token),
        cmocka_unit_test(test_pool_under_threads),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
