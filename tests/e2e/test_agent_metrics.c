/*
 * stek-agent's metrics file (node_exporter's textfile format) with the
 * `files` output, no server needed: a real stekd, `stek-agent --once` for a
 * target that can be written and for one whose directory cannot. The file
 * passes `promtool check metrics`, says which target holds its keys and
 * which failed, counts match the key files on disk, and it holds no key
 * byte.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "e2e.h"

static fx_stekd d;
static fx_cert host;
static const fx_stekd_group groups[] = {
    {E2E_GROUP, {"uri:spiffe://fleet/edge/*", NULL}},
};

static int setup(void **state)
{
    (void)state;
    if (e2e_require_binary("/usr/bin/promtool", "prometheus") != 0)
        return -1;
    if (fx_stekd_setup(&d, E2E_EPOCH_S, E2E_LIFETIME_S, groups, 1, NULL) != 0 ||
        fx_stekd_start(&d) != 0)
        return -1;
    const char *uris[] = {"spiffe://fleet/edge/m", NULL};
    fx_cert_opts o = {.name = "host-m", .uri_sans = uris};
    return fx_stekd_host_cert(&d, &o, &host);
}

static int teardown(void **state)
{
    (void)state;
    fx_stekd_destroy(&d);
    return 0;
}

/* Runs promtool check metrics on path; returns its exit code. */
static int promtool(const char *path)
{
    char cmd[FX_PATH_MAX * 4 + 64];
    snprintf(cmd, sizeof(cmd), "promtool check metrics < '%s' > '%s.promtool' 2>&1", path, path);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* Whether any 80-byte key file in dir has its key, or a 32-byte half, in text. */
static bool holds_key_of(const char *dir, const char *text, size_t len, int *files)
{
    DIR *dh = opendir(dir);
    assert_non_null(dh);
    bool found = false;
    *files = 0;
    for (struct dirent *e; (e = readdir(dh)) != NULL;) {
        if (strncmp(e->d_name, "stek-", 5) != 0 || strstr(e->d_name, ".key") == NULL)
            continue;
        char p[FX_PATH_MAX * 2];
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        FILE *f = fopen(p, "rb");
        assert_non_null(f);
        unsigned char k[80];
        assert_int_equal(fread(k, 1, sizeof(k), f), sizeof(k));
        fclose(f);
        (*files)++;
        char hex[65];
        for (size_t h = 16; h < 80; h += 32) {
            for (size_t i = 0; i < 32; i++)
                snprintf(hex + 2 * i, 3, "%02x", k[h + i]);
            found = found || memmem(text, len, k + h, 32) != NULL || strstr(text, hex) != NULL;
        }
    }
    closedir(dh);
    return found;
}

static void test_metrics_file(void **state)
{
    (void)state;
    char keys[FX_PATH_MAX + 16], bad[FX_PATH_MAX + 16], prom[FX_PATH_MAX + 16];
    char conf[FX_PATH_MAX + 16], log[FX_PATH_MAX + 16];
    snprintf(keys, sizeof(keys), "%s/keys-m", d.dir);
    snprintf(bad, sizeof(bad), "%s/not-a-dir", d.dir);
    snprintf(prom, sizeof(prom), "%s/stek-agent.prom", d.dir);
    snprintf(conf, sizeof(conf), "%s/agent-m.conf", d.dir);
    snprintf(log, sizeof(log), "%s/agent-m.log", d.dir);
    assert_int_equal(mkdir(keys, 0700), 0);
    /* A plain file where a directory should be: unwritable even for root. */
    assert_int_equal(fx_write_file(bad, "x", 0600), 0);

    char root[FX_PATH_MAX + 64], targets[4 * FX_PATH_MAX];
    snprintf(root, sizeof(root), "metrics_file = \"%s\";", prom);
    snprintf(targets, sizeof(targets),
             "  { name = \"good\"; group = \"" E2E_GROUP "\"; type = \"files\"; dir = \"%s\"; }",
             keys);
    assert_int_equal(e2e_write_agent_config(conf, &d, &host, root, targets), 0);
    char *once[] = {"--config", conf, "--once", NULL};
    assert_int_equal(e2e_run_agent(once, log, 30000), 0);

    struct stat sb;
    assert_int_equal(stat(prom, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0644);
    assert_int_equal(promtool(prom), 0);
    char *text = e2e_read_file(prom);
    assert_non_null(text);
    int files = 0;
    assert_false(holds_key_of(keys, text, strlen(text), &files));
    assert_true(files >= 2);
    char want[256];
    assert_non_null(strstr(
        text, "stek_agent_target_applied{target=\"good\",group=\"edge\",kind=\"files\"} 1\n"));
    snprintf(want, sizeof(want),
             "stek_agent_target_keys{target=\"good\",group=\"edge\",kind=\"files\"} %d\n", files);
    assert_non_null(strstr(text, want));
    assert_non_null(strstr(text, "stek_agent_target_generation{target=\"good\",group=\"edge\","
                                 "kind=\"files\"} 1\n"));
    assert_non_null(strstr(text, "stek_agent_target_applies_total{target=\"good\",group=\"edge\","
                                 "kind=\"files\",result=\"ok\"} 1\n"));
    assert_non_null(strstr(text, "stek_agent_sets_accepted_total "));
    assert_null(strstr(text, "stek_agent_sets_accepted_total 0\n"));
    free(text);

    /* A second target that cannot be written: --once fails, and says so. */
    snprintf(targets, sizeof(targets),
             "  { name = \"good\"; group = \"" E2E_GROUP "\"; type = \"files\"; dir = \"%s\"; },\n"
             "  { name = \"broken\"; group = \"" E2E_GROUP "\"; type = \"files\"; dir = \"%s\"; }",
             keys, bad);
    assert_int_equal(e2e_write_agent_config(conf, &d, &host, root, targets), 0);
    assert_int_equal(e2e_run_agent(once, log, 30000), 1);
    assert_int_equal(promtool(prom), 0);
    text = e2e_read_file(prom);
    assert_non_null(text);
    assert_non_null(strstr(
        text, "stek_agent_target_applied{target=\"good\",group=\"edge\",kind=\"files\"} 1\n"));
    assert_non_null(strstr(
        text, "stek_agent_target_applied{target=\"broken\",group=\"edge\",kind=\"files\"} 0\n"));
    assert_non_null(strstr(text, "stek_agent_target_applies_total{target=\"broken\",group=\"edge\","
                                 "kind=\"files\",result=\"failed\"} 1\n"));
    assert_non_null(strstr(text, "stek_agent_target_consecutive_failures{target=\"broken\","
                                 "group=\"edge\",kind=\"files\"} 1\n"));
    assert_false(holds_key_of(keys, text, strlen(text), &files));
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
