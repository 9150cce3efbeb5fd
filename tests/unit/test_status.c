/* status.h: names, the thread-local detail, and the guard macros' control flow. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <string.h>

#include "status.h"

static void test_names_are_unique_and_named(void **state)
{
    (void)state;
    for (int i = 0; i < STEK_STATUS_COUNT; i++) {
        const char *a = stek_status_name((stek_status)i);
        assert_non_null(a);
        assert_true(strncmp(a, "STEK_", 5) == 0);
        assert_string_not_equal(a, "STEK_ERR_UNKNOWN");
        for (int j = i + 1; j < STEK_STATUS_COUNT; j++)
            assert_string_not_equal(a, stek_status_name((stek_status)j));
    }
    assert_string_equal(stek_status_name(STEK_OK), "STEK_OK");
    assert_string_equal(stek_status_name(STEK_ERR_PIN_INCORRECT), "STEK_ERR_PIN_INCORRECT");
    assert_string_equal(stek_status_name(STEK_ERR_BAD_POINT), "STEK_ERR_BAD_POINT");
}

static void test_name_out_of_range(void **state)
{
    (void)state;
    assert_string_equal(stek_status_name(STEK_STATUS_COUNT), "STEK_ERR_UNKNOWN");
    assert_string_equal(stek_status_name((stek_status)1000), "STEK_ERR_UNKNOWN");
    assert_string_equal(stek_status_name((stek_status)-1), "STEK_ERR_UNKNOWN");
}

static void test_detail_set_and_clear(void **state)
{
    (void)state;
    assert_int_equal(stek_error_set(STEK_ERR_HSM, "C_Login: %s", "CKR_PIN_INCORRECT"),
                     STEK_ERR_HSM);
    assert_string_equal(stek_error_detail(), "C_Login: CKR_PIN_INCORRECT");
    stek_error_clear();
    assert_string_equal(stek_error_detail(), "");
}

static void test_detail_truncates_long_text(void **state)
{
    (void)state;
    char big[1024];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    (void)stek_error_set(STEK_ERR_IO, "%s", big);
    size_t n = strlen(stek_error_detail());
    assert_true(n > 0 && n < sizeof(big) - 1);
    stek_error_clear();
}

static void *other_thread(void *arg)
{
    (void)arg;
    (void)stek_error_set(STEK_ERR_IO, "from the other thread");
    return NULL;
}

static void test_detail_is_thread_local(void **state)
{
    (void)state;
    pthread_t t;
    (void)stek_error_set(STEK_ERR_HSM, "mine");
    assert_int_equal(pthread_create(&t, NULL, other_thread, NULL), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_string_equal(stek_error_detail(), "mine");
}

/* Helpers that exercise each macro; reached counts how far control got. */
static int reached;

static stek_status returns(stek_status st)
{
    return st;
}

static stek_status use_guard(stek_status inner)
{
    reached = 0;
    STEK_GUARD(returns(inner));
    reached = 1;
    return STEK_OK;
}

static stek_status use_ensure(int cond)
{
    reached = 0;
    STEK_ENSURE(cond == 1, STEK_ERR_CONFIG);
    reached = 1;
    return STEK_OK;
}

static stek_status use_ensure_ref(const void *p)
{
    STEK_ENSURE_REF(p);
    return STEK_OK;
}

static stek_status use_bail(void)
{
    STEK_BAIL(STEK_ERR_NOT_FOUND, "object %s missing", "R(g,1,7)");
}

static int cleaned;

static stek_status use_goto_forms(int which)
{
    stek_status st = STEK_OK;
    reached = 0;
    cleaned = 0;
    STEK_GUARD_GOTO(returns(which == 1 ? STEK_ERR_HSM : STEK_OK));
    reached = 1;
    STEK_ENSURE_GOTO(which != 2, STEK_ERR_INTERNAL);
    reached = 2;
    if (which == 3)
        STEK_BAIL_GOTO(STEK_ERR_EXISTS, "label %d", 42);
    reached = 3;
done:
    cleaned = 1;
    return st;
}

static void test_guard(void **state)
{
    (void)state;
    assert_int_equal(use_guard(STEK_OK), STEK_OK);
    assert_int_equal(reached, 1);
    assert_int_equal(use_guard(STEK_ERR_VERIFY), STEK_ERR_VERIFY);
    assert_int_equal(reached, 0);
}

static void test_ensure_records_condition(void **state)
{
    (void)state;
    assert_int_equal(use_ensure(1), STEK_OK);
    assert_int_equal(reached, 1);
    assert_int_equal(use_ensure(0), STEK_ERR_CONFIG);
    assert_int_equal(reached, 0);
    assert_non_null(strstr(stek_error_detail(), "cond == 1"));
    assert_non_null(strstr(stek_error_detail(), "test_status.c"));

    int x = 0;
    assert_int_equal(use_ensure_ref(&x), STEK_OK);
    assert_int_equal(use_ensure_ref(NULL), STEK_ERR_INVALID_ARG);
}

static void test_bail_formats_detail(void **state)
{
    (void)state;
    assert_int_equal(use_bail(), STEK_ERR_NOT_FOUND);
    assert_string_equal(stek_error_detail(), "object R(g,1,7) missing");
}

static void test_goto_forms_always_clean_up(void **state)
{
    (void)state;
    assert_int_equal(use_goto_forms(0), STEK_OK);
    assert_int_equal(reached, 3);
    assert_int_equal(cleaned, 1);

    assert_int_equal(use_goto_forms(1), STEK_ERR_HSM);
    assert_int_equal(reached, 0);
    assert_int_equal(cleaned, 1);

    assert_int_equal(use_goto_forms(2), STEK_ERR_INTERNAL);
    assert_int_equal(reached, 1);
    assert_int_equal(cleaned, 1);
    assert_non_null(strstr(stek_error_detail(), "which != 2"));

    assert_int_equal(use_goto_forms(3), STEK_ERR_EXISTS);
    assert_int_equal(reached, 2);
    assert_int_equal(cleaned, 1);
    assert_string_equal(stek_error_detail(), "label 42");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_are_unique_and_named),
        cmocka_unit_test(test_name_out_of_range),
        cmocka_unit_test(test_detail_set_and_clear),
        cmocka_unit_test(test_detail_truncates_long_text),
        cmocka_unit_test(test_detail_is_thread_local),
        cmocka_unit_test(test_guard),
        cmocka_unit_test(test_ensure_records_condition),
        cmocka_unit_test(test_bail_formats_detail),
        cmocka_unit_test(test_goto_forms_always_clean_up),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
