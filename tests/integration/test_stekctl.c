/*
 * stekctl end to end: the real binary against throwaway SoftHSM tokens.
 *
 * Every run pins the clock with --now, so epochs are known: the group
 * "edge" has 10 s epochs and a 30 s decrypt lifetime (three past keys),
 * "api" 1 h epochs, so that a jump of a whole day stays a few dozen steps.
 * Token A is the source HSM, token B a replica seeded with export-chain /
 * import-chain. Each token is used by one process at a time (SoftHSM's
 * multi-process caveat): the test process opens A itself only to plant
 * objects, and closes it before the binary runs again.
 *
 * Every run checks that no PIN of either token appears in its output.
 * The tests run in order and share the tokens.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json-c/json.h>

#include "fx.h"
#include "p11_internal.h"
#include "stek/v1/admin.pb-c.h"
#include "stek_p11.h"

#ifndef STEKCTL_PATH
#error "STEKCTL_PATH must name the stekctl binary"
#endif

extern char **environ;

#define T0 INT64_C(1767225605) /* 2026-01-01T00:00:05Z: 5 s into an edge epoch */
#define EDGE_P 10
#define API_P 3600
#define E0 ((uint64_t)(T0 / EDGE_P))
#define RUN_TIMEOUT_MS 120000

static fx_token tok_a, tok_b;
static char conf_a[FX_PATH_MAX], conf_b[FX_PATH_MAX];
static char pem_a[4096]; /* the signing public key from init */

/* Names of edge's ticket keys of generation 1, recorded by test_advance_keys. */
static char gen1_names[2][40];

/* ---- running the binary ---------------------------------------------- */
/* out = "<t's dir>/<name>" */
static void path_in(char out[FX_PATH_MAX], const fx_token *t, const char *name)
{
    int n = snprintf(out, FX_PATH_MAX, "%s/%s", t->dir, name);
    assert_true(n > 0 && n < FX_PATH_MAX);
}

typedef struct run {
    int code; /* exit status, or 128 + signal */
    char *out;
    char *err;
} run;

static void run_free(run *r)
{
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof(*r));
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len - 1 == 0) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

static void assert_no_pin(const char *text)
{
    const fx_token *toks[] = {&tok_a, &tok_b};
    for (size_t i = 0; i < 2; i++) {
        if (toks[i]->pin[0] != '\0')
            assert_null(strstr(text, toks[i]->pin));
        if (toks[i]->so_pin[0] != '\0')
            assert_null(strstr(text, toks[i]->so_pin));
    }
}

/*
 * Runs stekctl with the NULL-terminated arguments and the current
 * environment (activate a token first). stdout and stderr are kept apart.
 */
static void ctl(run *r, ...)
{
    char *argv[32];
    size_t n = 0;
    argv[n++] = (char *)STEKCTL_PATH;
    va_list ap;
    va_start(ap, r);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL) {
        assert_true(n < 31);
        argv[n++] = (char *)a;
    }
    va_end(ap);
    argv[n] = NULL;

    char out_path[FX_PATH_MAX], err_path[FX_PATH_MAX];
    path_in(out_path, &tok_a, "ctl.out");
    path_in(err_path, &tok_a, "ctl.err");
    posix_spawn_file_actions_t fa;
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    assert_int_equal(posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    assert_int_equal(
        posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600), 0);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    assert_int_equal(rc, 0);
    int status = 0;
    assert_int_equal(fx_wait_exit(pid, RUN_TIMEOUT_MS, &status), 0);
    r->code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r->out = slurp(out_path);
    r->err = slurp(err_path);
    fprintf(stderr, "[stekctl");
    for (size_t i = 1; i < n; i++)
        fprintf(stderr, " %s", argv[i]);
    fprintf(stderr, "] exit %d\n%s", r->code, r->err);
    assert_no_pin(r->out);
    assert_no_pin(r->err);
}

/* Runs and checks the exit status; prints stdout on a mismatch. */
#define CTL_EXPECT(r, want, ...)                                                                   \
    do {                                                                                           \
        ctl((r), __VA_ARGS__, NULL);                                                               \
        if ((r)->code != (want))                                                                   \
            print_error("unexpected exit %d (want %d); stdout:\n%s\n", (r)->code, (want),          \
                        (r)->out);                                                                 \
        assert_int_equal((r)->code, (want));                                                       \
    } while (0)

static void use(const fx_token *t)
{
    assert_int_equal(fx_token_activate(t), 0);
}

static const char *at(int64_t t)
{
    static char buf[4][32];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof(buf[k]), "%" PRId64, t);
    return buf[k];
}

/* ---- JSON helpers ------------------------------------------------------ */

typedef struct key_entry {
    char kind[16];
    char state[16];
    uint32_t generation;
    uint64_t epoch;
    char name[40];
} key_entry;

static const char *jstr(json_object *o, const char *field)
{
    json_object *v;
    if (!json_object_object_get_ex(o, field, &v))
        return NULL;
    assert_true(json_object_is_type(v, json_type_string));
    return json_object_get_string(v);
}

/* Every string anywhere in v is at most a name's 32 hex digits: no values. */
static void assert_short_strings(json_object *v)
{
    if (json_object_is_type(v, json_type_string)) {
        assert_true(json_object_get_string_len(v) <= 32);
    } else if (json_object_is_type(v, json_type_array)) {
        for (size_t i = 0; i < json_object_array_length(v); i++)
            assert_short_strings(json_object_array_get_idx(v, i));
    } else if (json_object_is_type(v, json_type_object)) {
        json_object_object_foreach(v, k, child)
        {
            (void)k;
            assert_short_strings(child);
        }
    }
}

/* Parses `keys --json` output and returns the entries of group (count in *n). */
static key_entry *parse_keys(const char *text, const char *group, size_t *n)
{
    json_object *root = json_tokener_parse(text);
    assert_non_null(root);
    assert_true(json_object_is_type(root, json_type_array));
    assert_short_strings(root);
    size_t len = json_object_array_length(root);
    key_entry *out = calloc(len + 1, sizeof(*out));
    assert_non_null(out);
    *n = 0;
    for (size_t i = 0; i < len; i++) {
        json_object *o = json_object_array_get_idx(root, i), *v;
        if (strcmp(jstr(o, "group"), group) != 0)
            continue;
        key_entry *e = &out[(*n)++];
        snprintf(e->kind, sizeof(e->kind), "%s", jstr(o, "kind"));
        snprintf(e->state, sizeof(e->state), "%s", jstr(o, "state"));
        assert_true(json_object_object_get_ex(o, "generation", &v));
        e->generation = (uint32_t)json_object_get_int64(v);
        assert_true(json_object_object_get_ex(o, "epoch", &v));
        e->epoch = json_object_get_uint64(v);
        const char *name = jstr(o, "name");
        if (strcmp(e->kind, "ticket") == 0) {
            assert_non_null(name);
            assert_int_equal(strlen(name), 32);
            assert_int_equal(strspn(name, "0123456789abcdef"), 32);
            snprintf(e->name, sizeof(e->name), "%s", name);
            assert_non_null(jstr(o, "not_before"));
            assert_non_null(jstr(o, "encrypt_until"));
            assert_non_null(jstr(o, "decrypt_until"));
        } else {
            assert_string_equal(e->kind, "chain");
            assert_string_equal(e->state, "chain");
            assert_null(name);
        }
    }
    json_object_put(root);
    return out;
}

static const key_entry *find_entry(const key_entry *k, size_t n, const char *kind, uint64_t epoch)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(k[i].kind, kind) == 0 && k[i].epoch == epoch)
            return &k[i];
    return NULL;
}

static size_t count_kind(const key_entry *k, size_t n, const char *kind)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += strcmp(k[i].kind, kind) == 0;
    return c;
}

/* Runs `keys --json` at time t on the active token; returns group's entries. */
static key_entry *keys_json(const char *conf, int64_t t, const char *group, size_t *n)
{
    run r = {0};
    CTL_EXPECT(&r, 0, "--config", conf, "--now", at(t), "keys", "--json");
    key_entry *k = parse_keys(r.out, group, n);
    run_free(&r);
    return k;
}

/* Parses `keys --json --audit` output; returns how many findings have `check`. */
static size_t count_findings(const char *text, const char *check, const char *label_part)
{
    json_object *root = json_tokener_parse(text), *f;
    assert_non_null(root);
    assert_true(json_object_object_get_ex(root, "findings", &f));
    size_t c = 0;
    for (size_t i = 0; i < json_object_array_length(f); i++) {
        json_object *o = json_object_array_get_idx(f, i);
        assert_non_null(jstr(o, "message"));
        if (strcmp(jstr(o, "check"), check) == 0 &&
            (label_part == NULL || strstr(jstr(o, "label"), label_part) != NULL))
            c++;
    }
    json_object_put(root);
    return c;
}

/* ---- setup ------------------------------------------------------------- */

static int write_conf(const fx_token *t, char *path)
{
    if (snprintf(path, FX_PATH_MAX, "%s/%s", t->dir, "stekctl.conf") >= FX_PATH_MAX)
        return -1;
    char text[4096];
    snprintf(text, sizeof(text),
             "# stekctl test configuration\n"
             "listen = \"127.0.0.1:0\";\n"
             "tls = { cert = \"server.pem\"; key = \"server-key.pem\"; client_ca = \"ca.pem\"; };\n"
             "hsm = { module = \"%s\"; token = \"%s\"; pin_env = \"%s\"; so_pin_env = \"%s\"; };\n"
             "groups = (\n"
             "  { name = \"edge\"; epoch = \"10s\"; decrypt_lifetime = \"30s\"; origin = 0;\n"
             "    allow = [ \"uri:spiffe://fleet/edge/*\" ]; },\n"
             "  { name = \"api\"; epoch = \"1h\"; decrypt_lifetime = \"2h\"; origin = 0;\n"
             "    allow = [ \"uri:spiffe://fleet/api/*\" ]; }\n"
             ");\n",
             t->module, t->label, t->pin_env, t->so_pin_env);
    return fx_write_file(path, text, 0644);
}

static int group_setup(void **state)
{
    (void)state;
    /* B first: a token made after this process initialized SoftHSM is unseen,
     * and A is the one this process opens. */
    if (fx_token_create(&tok_b, "stekctl-b") != 0 || fx_token_create(&tok_a, "stekctl-a") != 0)
        return -1;
    if (write_conf(&tok_a, conf_a) != 0 || write_conf(&tok_b, conf_b) != 0)
        return -1;
    return fx_token_activate(&tok_a);
}

static int group_teardown(void **state)
{
    (void)state;
    int rc = fx_token_destroy(&tok_a);
    return fx_token_destroy(&tok_b) == 0 && rc == 0 ? 0 : -1;
}

/* ---- tests ------------------------------------------------------------- */

static void test_init(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    char pub_path[FX_PATH_MAX];
    path_in(pub_path, &tok_a, "signing.pem");
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "init", "--pubkey-out", pub_path);
    assert_non_null(strstr(r.out, "-----BEGIN PUBLIC KEY-----"));
    assert_non_null(strstr(r.out, "-----END PUBLIC KEY-----"));
    assert_true(strlen(r.out) < sizeof(pem_a));
    snprintf(pem_a, sizeof(pem_a), "%s", r.out);
    char *file = slurp(pub_path);
    assert_string_equal(file, pem_a);
    free(file);
    struct stat sb;
    assert_int_equal(stat(pub_path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0644);
    run_free(&r);

    /* Idempotent: same key, no new generation. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0 + 3), "init");
    assert_string_equal(r.out, pem_a);
    run_free(&r);

    size_t n;
    key_entry *k = keys_json(conf_a, T0, "edge", &n);
    assert_int_equal(n, 1);
    assert_string_equal(k[0].kind, "chain");
    assert_int_equal(k[0].generation, 1);
    assert_int_equal(k[0].epoch, E0);
    free(k);
    k = keys_json(conf_a, T0, "api", &n);
    assert_int_equal(n, 1);
    assert_int_equal(k[0].epoch, (uint64_t)(T0 / API_P));
    free(k);
}

static void test_usage_errors(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    CTL_EXPECT(&r, 2, "--config", conf_a, "group", "add", "nosuch");
    assert_non_null(strstr(r.err, "stekctl: group add: "));
    assert_non_null(strstr(r.err, "nosuch"));
    assert_non_null(strstr(r.err, "STEK_ERR_CONFIG"));
    run_free(&r);

    CTL_EXPECT(&r, 1, "--config", conf_a, "--now", at(T0), "group", "add", "edge");
    assert_non_null(strstr(r.err, "already has a generation"));
    run_free(&r);

    CTL_EXPECT(&r, 2, "--config", conf_a, "frobnicate");
    assert_non_null(strstr(r.err, "unknown command"));
    run_free(&r);
    CTL_EXPECT(&r, 2, "keys");
    assert_non_null(strstr(r.err, "--config"));
    run_free(&r);
    CTL_EXPECT(&r, 2, "--config", conf_a, "keys", "--bogus");
    run_free(&r);
    CTL_EXPECT(&r, 2, "--config", conf_a, "--now", "yesterday", "keys");
    run_free(&r);
    CTL_EXPECT(&r, 2, "--config", conf_a, "rekey");
    run_free(&r);
}

static void test_advance_keys(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    char want[128];
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "advance", "edge");
    snprintf(want, sizeof(want), "advanced edge generation 1 from epoch %" PRIu64 " to %" PRIu64,
             E0, E0 + 3);
    assert_non_null(strstr(r.out, want));
    run_free(&r);

    size_t n;
    key_entry *k = keys_json(conf_a, T0, "edge", &n);
    assert_int_equal(n, 4);
    const key_entry *cur = find_entry(k, n, "ticket", E0);
    const key_entry *next = find_entry(k, n, "ticket", E0 + 1);
    const key_entry *staged = find_entry(k, n, "ticket", E0 + 2);
    assert_non_null(cur);
    assert_non_null(next);
    assert_non_null(staged);
    assert_non_null(find_entry(k, n, "chain", E0 + 3));
    assert_string_equal(cur->state, "current");
    assert_string_equal(next->state, "next");
    assert_string_equal(staged->state, "staged");
    assert_string_not_equal(cur->name, next->name);
    snprintf(gen1_names[0], sizeof(gen1_names[0]), "%s", cur->name);
    snprintf(gen1_names[1], sizeof(gen1_names[1]), "%s", next->name);
    free(k);

    /* The times are the epoch's: K(E0) encrypts during [E0*P, (E0+1)*P). */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "keys", "--json");
    assert_non_null(strstr(r.out, "2026-01-01T00:00:00Z"));
    assert_non_null(strstr(r.out, "2026-01-01T00:00:10Z"));
    assert_non_null(strstr(r.out, "2026-01-01T00:00:40Z")); /* + 30 s lifetime */
    run_free(&r);

    /* The table shows the same names. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "keys");
    assert_non_null(strstr(r.out, "GROUP"));
    assert_non_null(strstr(r.out, gen1_names[0]));
    assert_non_null(strstr(r.out, gen1_names[1]));
    assert_non_null(strstr(r.out, "current"));
    assert_non_null(strstr(r.out, "next"));
    assert_non_null(strstr(r.out, "chain"));
    run_free(&r);

    /* Again at the same time: nothing to do. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "advance", "edge");
    assert_non_null(strstr(r.out, "already at epoch"));
    run_free(&r);
}

static void test_audit_window(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(T0), "keys", "--audit");
    assert_non_null(strstr(r.out, "audit: no findings"));
    run_free(&r);

    /* A minute on, nobody destroyed K(E0), K(E0+1) and K(E0+2): all are past the window. */
    CTL_EXPECT(&r, 1, "--config", conf_a, "--now", at(T0 + 60), "keys", "--audit");
    assert_non_null(strstr(r.out, "finding: expired"));
    assert_non_null(strstr(r.err, "stekctl: keys: the audit found"));
    run_free(&r);
    CTL_EXPECT(&r, 1, "--config", conf_a, "--now", at(T0 + 60), "keys", "--json", "--audit");
    assert_int_equal(count_findings(r.out, "expired", "stek:ticket:edge:1"), 3);
    run_free(&r);
}

static void test_advance_jump(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    char want[128];
    /* 30 epochs on: far beyond max_jump (2), which binds stekd, not the operator. */
    int64_t t1 = T0 + 30 * EDGE_P;
    uint64_t e1 = E0 + 30;
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "advance", "edge");
    snprintf(want, sizeof(want), "advanced edge generation 1 from epoch %" PRIu64 " to %" PRIu64,
             E0 + 3, e1 + 3);
    assert_non_null(strstr(r.out, want));
    assert_non_null(strstr(r.out, "past their window"));
    run_free(&r);

    size_t n;
    key_entry *k = keys_json(conf_a, t1, "edge", &n);
    assert_non_null(find_entry(k, n, "chain", e1 + 3));
    assert_int_equal(count_kind(k, n, "chain"), 1);
    /* The window exactly (three past keys, current and next) and the staged
     * K(e1+2); none older. */
    assert_int_equal(count_kind(k, n, "ticket"), 6);
    for (uint64_t e = e1 - 3; e <= e1 + 2; e++)
        assert_non_null(find_entry(k, n, "ticket", e));
    assert_string_equal(find_entry(k, n, "ticket", e1)->state, "current");
    assert_string_equal(find_entry(k, n, "ticket", e1 - 1)->state, "decrypt-only");
    free(k);

    /* A whole day later for the hourly group. */
    int64_t day = T0 + 86400;
    uint64_t ea = (uint64_t)(day / API_P);
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(day), "advance", "api");
    snprintf(want, sizeof(want), "advanced api generation 1 from epoch %" PRIu64 " to %" PRIu64,
             (uint64_t)(T0 / API_P), ea + 3);
    assert_non_null(strstr(r.out, want));
    run_free(&r);
    k = keys_json(conf_a, day, "api", &n);
    assert_non_null(find_entry(k, n, "chain", ea + 3));
    assert_non_null(find_entry(k, n, "ticket", ea));
    assert_non_null(find_entry(k, n, "ticket", ea + 1));
    free(k);

    /* The advances left nothing behind. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "keys", "--audit");
    run_free(&r);
}

/* Plants objects the schedule did not make, through the layer in this process. */
static void plant(void)
{
    stek_p11_config cfg = {
        .module_path = tok_a.module,
        .token_label = tok_a.label,
        .pin_env = tok_a.pin_env,
    };
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&cfg, &p11), STEK_OK);

    p11_sess s;
    assert_int_equal(p11_sess_get_writer(p11, &s), STEK_OK);
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ULONG len = 32;
    CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h;
    /* A foreign key, readable: what a PIN holder might leave behind. */
    const char rogue[] = "rogue";
    CK_ATTRIBUTE t1[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},     {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &no, sizeof(no)},   {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_VALUE_LEN, &len, sizeof(len)}, {CKA_LABEL, (void *)rogue, sizeof(rogue) - 1},
        {CKA_DERIVE, &yes, sizeof(yes)},
    };
    assert_int_equal(P11_CALL(p11, C_GenerateKey, s.h, &m, t1, 7, &h), STEK_OK);
    /* A second, readable, freely wrappable chain key for edge generation 1. */
    const char chain[] = "stek:chain:edge:1";
    uint8_t id[P11_ID_BYTES];
    for (int i = 0; i < 8; i++)
        id[i] = (uint8_t)((E0 + 32) >> (56 - 8 * i));
    memset(id + 8, 0xff, 8); /* above any real CKA_ID tail: never the survivor */
    CK_ATTRIBUTE t2[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},     {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &no, sizeof(no)},   {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_VALUE_LEN, &len, sizeof(len)}, {CKA_LABEL, (void *)chain, sizeof(chain) - 1},
        {CKA_ID, id, sizeof(id)},           {CKA_DERIVE, &yes, sizeof(yes)},
    };
    assert_int_equal(P11_CALL(p11, C_GenerateKey, s.h, &m, t2, 8, &h), STEK_OK);
    /* A readable ticket key for an epoch in the window that cannot HMAC; its
     * CKA_ID tail makes it the survivor the layer picks to name the epoch. */
    const char ticket[] = "stek:ticket:edge:1";
    CK_ULONG tlen = 80;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    for (int i = 0; i < 8; i++)
        id[i] = (uint8_t)((E0 + 31) >> (56 - 8 * i));
    memset(id + 8, 0x00, 8);
    CK_ATTRIBUTE t3[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &no, sizeof(no)},
        {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_VALUE_LEN, &tlen, sizeof(tlen)},
        {CKA_LABEL, (void *)ticket, sizeof(ticket) - 1},
        {CKA_ID, id, sizeof(id)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
    };
    CK_MECHANISM gm = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    assert_int_equal(P11_CALL(p11, C_GenerateKey, s.h, &gm, t3, 9, &h), STEK_OK);
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    /* A group the config does not name. */
    assert_int_equal(stek_p11_root_create(p11, "ghost", 1, 5), STEK_OK);
    stek_p11_close(p11);
}

/* Removes what plant() made. */
static void unplant(void)
{
    stek_p11_config cfg = {
        .module_path = tok_a.module,
        .token_label = tok_a.label,
        .pin_env = tok_a.pin_env,
    };
    stek_p11 *p11 = NULL;
    assert_int_equal(stek_p11_open(&cfg, &p11), STEK_OK);
    p11_sess s;
    assert_int_equal(p11_sess_get_writer(p11, &s), STEK_OK);
    const char *labels[] = {"rogue", "stek:chain:edge:1", "stek:ticket:edge:1"};
    for (size_t i = 0; i < 3; i++) {
        CK_ATTRIBUTE q[] = {
            {CKA_LABEL, (void *)labels[i], strlen(labels[i])},
            {CKA_SENSITIVE, &(CK_BBOOL){CK_FALSE}, sizeof(CK_BBOOL)},
        };
        CK_OBJECT_HANDLE *h = NULL;
        size_t n = 0;
        assert_int_equal(p11_find(&s, q, 2, &h, &n), STEK_OK);
        assert_int_equal(n, 1);
        assert_int_equal(p11_destroy(&s, h[0]), STEK_OK);
        free(h);
    }
    assert_int_equal(p11_sess_done(&s, STEK_OK), STEK_OK);
    unsigned k = 0;
    assert_int_equal(stek_p11_generation_destroy(p11, "ghost", 1, &k), STEK_OK);
    assert_int_equal(k, 1);
    stek_p11_close(p11);
}

static void test_audit_plants(void **state)
{
    (void)state;
    use(&tok_a);
    int64_t t1 = T0 + 30 * EDGE_P;
    plant();
    run r = {0};
    CTL_EXPECT(&r, 1, "--config", conf_a, "--now", at(t1), "keys", "--audit");
    assert_non_null(strstr(r.out, "finding: foreign: "));
    assert_non_null(strstr(r.out, "\"rogue\""));
    assert_non_null(strstr(r.out, "finding: unconfigured-group: "));
    assert_non_null(strstr(r.out, "ghost"));
    assert_non_null(strstr(r.out, "finding: not-sensitive: "));
    assert_non_null(strstr(r.out, "finding: duplicate-chain: "));
    run_free(&r);

    CTL_EXPECT(&r, 1, "--config", conf_a, "--now", at(t1), "keys", "--json", "--audit");
    assert_int_equal(count_findings(r.out, "foreign", "rogue"), 1);
    assert_int_equal(count_findings(r.out, "unconfigured-group", "stek:chain:ghost:1"), 1);
    assert_int_equal(count_findings(r.out, "not-sensitive", "stek:chain:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "wrappable-chain", "stek:chain:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "duplicate-chain", "stek:chain:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "not-sensitive", "stek:ticket:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "unnamed-ticket", "stek:ticket:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "duplicate-ticket", "stek:ticket:edge:1"), 1);
    assert_int_equal(count_findings(r.out, "expired", NULL), 0);
    run_free(&r);

    /* The listing shows the unconfigured group too, without a schedule. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "keys");
    assert_non_null(strstr(r.out, "ghost"));
    run_free(&r);

    unplant();
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "keys", "--audit");
    run_free(&r);
}

static void test_rekey(void **state)
{
    (void)state;
    use(&tok_a);
    int64_t t1 = T0 + 30 * EDGE_P;
    uint64_t e1 = E0 + 30;
    run r = {0};
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "rekey", "edge");
    assert_non_null(strstr(r.out, "generation 1 -> 2"));
    run_free(&r);

    size_t n;
    key_entry *k = keys_json(conf_a, t1, "edge", &n);
    assert_int_equal(n, 1);
    assert_string_equal(k[0].kind, "chain");
    assert_int_equal(k[0].generation, 2);
    assert_int_equal(k[0].epoch, e1);
    free(k);

    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "advance", "edge");
    run_free(&r);
    k = keys_json(conf_a, t1, "edge", &n);
    assert_int_equal(n, 4);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(k[i].generation, 2);
        assert_string_not_equal(k[i].name, gen1_names[0]);
        assert_string_not_equal(k[i].name, gen1_names[1]);
    }
    free(k);
    /* api was not touched. */
    k = keys_json(conf_a, t1, "api", &n);
    assert_int_equal(k[0].generation, 1);
    free(k);
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "keys", "--audit");
    run_free(&r);
}

static void test_pin_and_config_errors(void **state)
{
    (void)state;
    use(&tok_a);
    run r = {0};
    assert_int_equal(unsetenv(tok_a.pin_env), 0);
    CTL_EXPECT(&r, 3, "--config", conf_a, "keys");
    assert_non_null(strstr(r.err, "stekctl: keys: "));
    assert_non_null(strstr(r.err, "STEK_ERR_PIN_MISSING"));
    assert_non_null(strstr(r.err, tok_a.pin_env));
    run_free(&r);
    /* --pin-file instead of the variable. */
    CTL_EXPECT(&r, 0, "--config", conf_a, "--pin-file", tok_a.pin_file, "keys");
    run_free(&r);
    use(&tok_a);

    char bad_pin[FX_PATH_MAX];
    path_in(bad_pin, &tok_a, "bad-pin");
    assert_int_equal(fx_write_file(bad_pin, "0000000000000000", 0600), 0);
    CTL_EXPECT(&r, 3, "--config", conf_a, "--pin-file", bad_pin, "keys");
    assert_non_null(strstr(r.err, "STEK_ERR_PIN_INCORRECT"));
    run_free(&r);

    char bad_conf[FX_PATH_MAX];
    path_in(bad_conf, &tok_a, "bad.conf");
    assert_int_equal(fx_write_file(bad_conf,
                                   "listen = \"127.0.0.1:0\";\n"
                                   "hsm = { module = \"x\"; token = \"y\"; };\n"
                                   "groups = ( { name = \"edge\" epoch = ; } );\n",
                                   0644),
                     0);
    CTL_EXPECT(&r, 2, "--config", bad_conf, "keys");
    assert_non_null(strstr(r.err, "bad.conf:3"));
    assert_non_null(strstr(r.err, "STEK_ERR_CONFIG"));
    run_free(&r);

    char missing[FX_PATH_MAX];
    path_in(missing, &tok_a, "no-such.conf");
    CTL_EXPECT(&r, 2, "--config", missing, "keys");
    run_free(&r);
}

/* Reads, edits and rewrites an export file. */
static void edit_export(const char *from, const char *to, void (*edit)(Stek__V1__ChainExport *))
{
    FILE *f = fopen(from, "rb");
    assert_non_null(f);
    uint8_t buf[4096];
    size_t len = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    Stek__V1__ChainExport *m = stek__v1__chain_export__unpack(NULL, len, buf);
    assert_non_null(m);
    edit(m);
    size_t out_len = stek__v1__chain_export__get_packed_size(m);
    assert_true(out_len <= sizeof(buf));
    stek__v1__chain_export__pack(m, buf);
    stek__v1__chain_export__free_unpacked(m, NULL);
    f = fopen(to, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, out_len, f), out_len);
    assert_int_equal(fclose(f), 0);
}

static void flip_wrapped(Stek__V1__ChainExport *m)
{
    assert_true(m->wrapped.len == 256);
    m->wrapped.data[100] ^= 0x01;
}

static void wrong_context(Stek__V1__ChainExport *m)
{
    free(m->context); /* free_unpacked frees every field with free() */
    m->context = strdup("stek-chain-v0");
    assert_non_null(m->context);
}

static void other_group(Stek__V1__ChainExport *m)
{
    free(m->group);
    m->group = strdup("nope");
    assert_non_null(m->group);
}

static void test_export_import(void **state)
{
    (void)state;
    int64_t t1 = T0 + 30 * EDGE_P, t2 = t1 + 5 * EDGE_P;
    char pub1[FX_PATH_MAX], pub2[FX_PATH_MAX], pub3[FX_PATH_MAX];
    char exp1[FX_PATH_MAX], exp2[FX_PATH_MAX], bad[FX_PATH_MAX], bad_so[FX_PATH_MAX];
    path_in(pub1, &tok_b, "t1.pem");
    path_in(pub2, &tok_b, "t2.pem");
    path_in(pub3, &tok_b, "t3.pem");
    path_in(exp1, &tok_a, "edge-1.export");
    path_in(exp2, &tok_a, "edge-2.export");
    path_in(bad, &tok_a, "edge-bad.export");
    path_in(bad_so, &tok_a, "bad-so-pin");
    run r = {0};

    /* B makes a transport key; A wraps its chain key to it (SO PIN from the variable). */
    use(&tok_b);
    CTL_EXPECT(&r, 0, "--config", conf_b, "transport-create", "--id", "t1", "--out", pub1);
    run_free(&r);
    char *pem = slurp(pub1);
    assert_non_null(strstr(pem, "-----BEGIN PUBLIC KEY-----"));
    free(pem);
    use(&tok_a);
    CTL_EXPECT(&r, 0, "--config", conf_a, "export-chain", "edge", "--transport", pub1, "--id", "t1",
               "--out", exp1);
    assert_non_null(strstr(r.out, "exported edge generation 2"));
    run_free(&r);
    struct stat sb;
    assert_int_equal(stat(exp1, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);

    /* Tampered on the way: the unwrap fails inside B, and no chain key appears. */
    edit_export(exp1, bad, flip_wrapped);
    use(&tok_b);
    CTL_EXPECT(&r, 1, "--config", conf_b, "import-chain", "--in", bad);
    assert_non_null(strstr(r.err, "stekctl: import-chain: "));
    assert_non_null(strstr(r.err, "damaged"));
    run_free(&r);
    size_t n;
    key_entry *k = keys_json(conf_b, t1, "edge", &n);
    assert_int_equal(n, 0);
    free(k);
    /* The genuine file is useless now: the transport key was single use. */
    CTL_EXPECT(&r, 1, "--config", conf_b, "import-chain", "--in", exp1);
    run_free(&r);

    /* Files that are not valid exports never reach the HSM. */
    edit_export(exp1, bad, wrong_context);
    CTL_EXPECT(&r, 2, "--config", conf_b, "import-chain", "--in", bad);
    assert_non_null(strstr(r.err, "context"));
    run_free(&r);
    edit_export(exp1, bad, other_group);
    CTL_EXPECT(&r, 2, "--config", conf_b, "import-chain", "--in", bad);
    assert_non_null(strstr(r.err, "nope"));
    run_free(&r);
    static char big[8192];
    memset(big, 'x', sizeof(big) - 1);
    assert_int_equal(fx_write_file(bad, big, 0600), 0);
    CTL_EXPECT(&r, 2, "--config", conf_b, "import-chain", "--in", bad);
    assert_non_null(strstr(r.err, "allowed"));
    run_free(&r);
    assert_int_equal(fx_write_file(bad, "\x0a\x05hello\xff", 0600), 0);
    CTL_EXPECT(&r, 2, "--config", conf_b, "import-chain", "--in", bad);
    run_free(&r);

    /* A wrong SO PIN: nothing is imported on A. */
    CTL_EXPECT(&r, 0, "--config", conf_b, "transport-create", "--id", "t3", "--out", pub3);
    run_free(&r);
    use(&tok_a);
    assert_int_equal(fx_write_file(bad_so, "ffffffffffffffff", 0600), 0);
    CTL_EXPECT(&r, 3, "--config", conf_a, "--so-pin-file", bad_so, "export-chain", "edge",
               "--transport", pub3, "--id", "t3", "--out", exp2);
    assert_non_null(strstr(r.err, "SO PIN"));
    run_free(&r);
    assert_int_equal(access(exp2, F_OK), -1);
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t1), "keys", "--audit");
    run_free(&r);

    /* The real thing, SO PIN from a file this time. */
    use(&tok_b);
    CTL_EXPECT(&r, 0, "--config", conf_b, "transport-create", "--id", "t2", "--out", pub2);
    run_free(&r);
    use(&tok_a);
    CTL_EXPECT(&r, 0, "--config", conf_a, "--so-pin-file", tok_a.so_pin_file, "export-chain",
               "edge", "--transport", pub2, "--id", "t2", "--out", exp2);
    run_free(&r);
    use(&tok_b);
    CTL_EXPECT(&r, 0, "--config", conf_b, "import-chain", "--in", exp2);
    assert_non_null(strstr(r.out, "imported edge generation 2"));
    run_free(&r);

    /* Both step to the same time and name the same keys for the same epochs. */
    use(&tok_a);
    CTL_EXPECT(&r, 0, "--config", conf_a, "--now", at(t2), "advance", "edge");
    run_free(&r);
    size_t na, nb;
    key_entry *ka = keys_json(conf_a, t2, "edge", &na);
    use(&tok_b);
    CTL_EXPECT(&r, 0, "--config", conf_b, "--now", at(t2), "advance", "edge");
    run_free(&r);
    key_entry *kb = keys_json(conf_b, t2, "edge", &nb);
    size_t common = 0;
    for (size_t i = 0; i < nb; i++) {
        assert_int_equal(kb[i].generation, 2);
        if (strcmp(kb[i].kind, "ticket") != 0)
            continue;
        const key_entry *a = find_entry(ka, na, "ticket", kb[i].epoch);
        assert_non_null(a);
        assert_string_equal(a->name, kb[i].name);
        assert_string_equal(a->state, kb[i].state);
        common++;
    }
    assert_true(common >= 4);
    uint64_t e2 = (uint64_t)(t2 / EDGE_P);
    assert_non_null(find_entry(kb, nb, "ticket", e2));
    assert_non_null(find_entry(kb, nb, "ticket", e2 + 1));
    assert_non_null(find_entry(kb, nb, "chain", e2 + 3));
    free(ka);
    free(kb);
    CTL_EXPECT(&r, 0, "--config", conf_b, "--now", at(t2), "keys", "--audit");
    run_free(&r);

    /* B never ran init: group add starts api there on its own. */
    CTL_EXPECT(&r, 0, "--config", conf_b, "--now", at(t2), "group", "add", "api");
    char want[96];
    snprintf(want, sizeof(want), "group api: generation 1 starts at epoch %" PRIu64,
             (uint64_t)(t2 / API_P));
    assert_non_null(strstr(r.out, want));
    run_free(&r);
    k = keys_json(conf_b, t2, "api", &n);
    assert_int_equal(n, 1);
    assert_string_equal(k[0].kind, "chain");
    assert_int_equal(k[0].epoch, (uint64_t)(t2 / API_P));
    free(k);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init),          cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_advance_keys),  cmocka_unit_test(test_audit_window),
        cmocka_unit_test(test_advance_jump),  cmocka_unit_test(test_audit_plants),
        cmocka_unit_test(test_rekey),         cmocka_unit_test(test_pin_and_config_errors),
        cmocka_unit_test(test_export_import),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
