/*
 * Corpus replay without libFuzzer: feeds every file of the target's
 * committed corpus (FUZZ_CORPUS_DIR) to its LLVMFuzzerTestOneInput, under
 * whatever sanitizers the build has. A crash, a sanitizer report or a
 * broken harness invariant fails the test; so does an empty corpus.
 *
 *   fuzz_replay_<target>                   replay the committed corpus
 *   fuzz_replay_<target> FILE|DIR...       replay these instead
 *   fuzz_replay_<target> --write-seeds DIR write the harness's seeds to DIR
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "fuzz.h"

static char *const *paths;
static int n_paths;
static const char *seed_dir;

static void replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        fail_msg("%s: %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 4096;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    assert_int_equal(ferror(f), 0);
    fclose(f);
    /* An exact-size copy, so ASan sees a read one past the input. */
    uint8_t *in = malloc(len ? len : 1);
    assert_non_null(in);
    memcpy(in, buf, len);
    free(buf);
    assert_int_equal(LLVMFuzzerTestOneInput(in, len), 0);
    free(in);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Replays path (a file, or every regular file of a directory, in name order). */
static size_t replay_path(const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        fail_msg("%s: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) {
        replay_file(path);
        return 1;
    }
    DIR *d = opendir(path);
    assert_non_null(d);
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        names = realloc(names, (n + 1) * sizeof(*names));
        assert_non_null(names);
        names[n] = malloc(strlen(path) + strlen(e->d_name) + 2);
        assert_non_null(names[n]);
        sprintf(names[n], "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof(*names), cmp_names);
    size_t done = 0;
    for (size_t i = 0; i < n; i++) {
        if (stat(names[i], &sb) == 0 && S_ISREG(sb.st_mode)) {
            replay_file(names[i]);
            done++;
        }
        free(names[i]);
    }
    free(names);
    return done;
}

static void test_replay_corpus(void **state)
{
    (void)state;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t n = 0;
    if (n_paths == 0)
        n = replay_path(FUZZ_CORPUS_DIR);
    for (int i = 0; i < n_paths; i++)
        n += replay_path(paths[i]);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    print_message("replayed %zu inputs in %.2f s\n", n,
                  (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    /* A corpus that vanished would pass silently otherwise. */
    assert_true(n > 0);
}

static void emit_seed(const char *name, const uint8_t *data, size_t len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", seed_dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    printf("%s (%zu bytes)\n", path, len);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write-seeds") == 0) {
        seed_dir = argv[2];
        fuzz_seeds(emit_seed);
        return 0;
    }
    paths = argv + 1;
    n_paths = argc - 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replay_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
