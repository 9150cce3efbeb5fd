/* secret.h: locked, dump-excluded buffers; truncate and free cleanse; comparisons. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "secret.h"

/*
 * ASan's mlock interceptor returns 0 without locking anything, so under it
 * the lock itself cannot be observed; everything else still is.
 */
#if defined(__SANITIZE_ADDRESS__)
#define MLOCK_OBSERVABLE 0
#else
#define MLOCK_OBSERVABLE 1
#endif

/*
 * Whether the VmFlags line of the /proc/self/smaps entry that maps addr has
 * flag (" lo", " dd"), so the test sees what the kernel enforces rather than
 * what the code meant. -1 when the mapping is not found.
 */
static int vm_flag_set(const void *addr, const char *flag)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (f == NULL)
        return -1;
    char line[512];
    int in_range = 0, found = -1;
    uintptr_t a = (uintptr_t)addr;
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in_range = a >= lo && a < hi;
            continue;
        }
        if (in_range && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line + 8, flag) != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

static void test_new_is_zeroed_locked_and_not_dumped(void **state)
{
    (void)state;
    stek_secret *s = NULL;
    assert_int_equal(stek_secret_new(80, &s), STEK_OK);
    assert_non_null(s);
    assert_int_equal(stek_secret_len(s), 80);
    assert_true(stek_ct_is_zero(stek_secret_cdata(s), 80));
    assert_ptr_equal(stek_secret_data(s), stek_secret_cdata(s));

    if (MLOCK_OBSERVABLE)
        assert_int_equal(vm_flag_set(stek_secret_cdata(s), " lo"), 1); /* mlocked */
    assert_int_equal(vm_flag_set(stek_secret_cdata(s), " dd"), 1);     /* MADV_DONTDUMP */

    memset(stek_secret_data(s), 0xa5, 80);
    stek_secret_free(s);
}

static void test_large_secret_spans_pages(void **state)
{
    (void)state;
    stek_secret *s = NULL;
    size_t len = 3 * (size_t)sysconf(_SC_PAGESIZE) + 1;
    assert_int_equal(stek_secret_new(len, &s), STEK_OK);
    uint8_t *d = stek_secret_data(s);
    memset(d, 0x11, len);
    assert_int_equal(d[len - 1], 0x11);
    stek_secret_free(s);
}

static void test_new_bad_args(void **state)
{
    (void)state;
    stek_secret *s = NULL;
    assert_int_equal(stek_secret_new(0, &s), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_secret_new(16, NULL), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_secret_new(SIZE_MAX, &s), STEK_ERR_INVALID_ARG);
    assert_null(s);
}

/*
 * Child side of the mlock-failure test: drop CAP_IPC_LOCK (root ignores
 * RLIMIT_MEMLOCK with it), set the limit to zero, and report what
 * stek_secret_new did through the exit code.
 */
static int alloc_without_memlock(void)
{
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) != 0)
        return 10;
    data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
    data[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
    if (syscall(SYS_capset, &hdr, data) != 0)
        return 11;
    struct rlimit zero = {.rlim_cur = 0, .rlim_max = 0};
    if (setrlimit(RLIMIT_MEMLOCK, &zero) != 0)
        return 12;
    stek_secret *s = (stek_secret *)&hdr;
    stek_status st = stek_secret_new(32, &s);
    if (st == STEK_OK)
        return 13;
    if (st != STEK_ERR_NOMEM || s != NULL || strstr(stek_error_detail(), "mlock") == NULL)
        return 14;
    return 0;
}

static void test_new_fails_cleanly_without_memlock(void **state)
{
    (void)state;
    if (!MLOCK_OBSERVABLE)
        skip();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(alloc_without_memlock());
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    assert_true(WIFEXITED(ws));
    assert_int_equal(WEXITSTATUS(ws), 0);
}

static void test_truncate_cleanses_tail(void **state)
{
    (void)state;
    stek_secret *s = NULL;
    assert_int_equal(stek_secret_new(64, &s), STEK_OK);
    uint8_t *d = stek_secret_data(s);
    memset(d, 0xee, 64);
    assert_int_equal(stek_secret_truncate(s, 16), STEK_OK);
    assert_int_equal(stek_secret_len(s), 16);
    for (size_t i = 0; i < 16; i++)
        assert_int_equal(d[i], 0xee);
    /* The tail is still our mapping, so reading it is defined. */
    assert_true(stek_ct_is_zero(d + 16, 48));

    assert_int_equal(stek_secret_truncate(s, 16), STEK_OK); /* same length: no-op */
    assert_int_equal(stek_secret_truncate(s, 0), STEK_OK);
    assert_true(stek_ct_is_zero(d, 64));
    stek_secret_free(s);
}

static void test_truncate_bad_args(void **state)
{
    (void)state;
    stek_secret *s = NULL;
    assert_int_equal(stek_secret_new(32, &s), STEK_OK);
    assert_int_equal(stek_secret_truncate(s, 33), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_secret_len(s), 32);
    assert_int_equal(stek_secret_truncate(s, 8), STEK_OK);
    /* Growing back is refused: the logical length is the capacity now. */
    assert_int_equal(stek_secret_truncate(s, 32), STEK_ERR_INVALID_ARG);
    assert_int_equal(stek_secret_truncate(NULL, 0), STEK_ERR_INVALID_ARG);
    stek_secret_free(s);
}

static void test_free_and_cleanse_accept_null(void **state)
{
    (void)state;
    stek_secret_free(NULL);
    stek_cleanse(NULL, 32);
    uint8_t b[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    stek_cleanse(b, 0);
    assert_int_equal(b[0], 1);
    stek_cleanse(b, sizeof(b));
    assert_true(stek_ct_is_zero(b, sizeof(b)));
}

static void test_ct_equal(void **state)
{
    (void)state;
    uint8_t a[32], b[32];
    memset(a, 0x5c, sizeof(a));
    memcpy(b, a, sizeof(b));
    assert_true(stek_ct_equal(a, b, sizeof(a)));
    b[0] ^= 1;
    assert_false(stek_ct_equal(a, b, sizeof(a)));
    b[0] ^= 1;
    b[31] ^= 0x80;
    assert_false(stek_ct_equal(a, b, sizeof(a)));
    assert_true(stek_ct_equal(a, b, 31)); /* only the compared prefix counts */
    assert_true(stek_ct_equal(a, b, 0));
}

static void test_ct_is_zero(void **state)
{
    (void)state;
    uint8_t z[80] = {0};
    assert_true(stek_ct_is_zero(z, sizeof(z)));
    z[79] = 1;
    assert_false(stek_ct_is_zero(z, sizeof(z)));
    z[79] = 0;
    z[0] = 0x80;
    assert_false(stek_ct_is_zero(z, sizeof(z)));
    assert_true(stek_ct_is_zero(z, 0));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_is_zeroed_locked_and_not_dumped),
        cmocka_unit_test(test_large_secret_spans_pages),
        cmocka_unit_test(test_new_bad_args),
        cmocka_unit_test(test_new_fails_cleanly_without_memlock),
        cmocka_unit_test(test_truncate_cleanses_tail),
        cmocka_unit_test(test_truncate_bad_args),
        cmocka_unit_test(test_free_and_cleanse_accept_null),
        cmocka_unit_test(test_ct_equal),
        cmocka_unit_test(test_ct_is_zero),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
