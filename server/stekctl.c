/*
 * stekctl: the administration tool. It works on the HSM directly, with the
 * same configuration file as stekd (for the module, the token and the groups).
 *
 *   stekctl --config FILE [--pin-file FILE] [--so-pin-file FILE] [--now T]
 *           [--verbose] COMMAND [ARGS]
 *
 * The user PIN comes from --pin-file or the variable named by hsm.pin_env,
 * the SO PIN (export-chain only) from --so-pin-file or hsm.so_pin_env;
 * never from argv or the config. --now replaces the clock: it exists so tests
 * can pin epochs, and is for testing and debugging only.
 *
 * Exit codes: 0 ok; 1 the command failed or the audit found something;
 * 2 usage or configuration; 3 HSM (module, token, PIN, unavailable).
 * Every error is one line on stderr:
 *   stekctl: <command>: <what> (<stek_status name>: <detail>)
 *
 * This file holds main, the shared helpers and the commands that shape a
 * group's generations (init, group add, rekey, advance); `keys` is in
 * stekctl_keys.c, the replica seeding commands in stekctl_chain.c, `fetch`
 * in stekctl_fetch.c and `fleet` (no HSM: it asks stekd) in stekctl_fleet.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "stekctl_cmd.h"

enum { EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_HSM = 3 };

/* A jump is stepped in slices, with expired keys destroyed between them:
 * the ratchet lists a generation's ticket keys at every step, so a long
 * jump done in one call would cost quadratic time in the number of epochs. */
#define ADVANCE_SLICE 16

static const char usage_text[] =
    "usage: stekctl --config FILE [--pin-file FILE] [--so-pin-file FILE] [--now UNIXSECONDS]\n"
    "               [--verbose] COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  init [--pubkey-out FILE]       create the signing key and every configured group;\n"
    "                                 print the signing public key (PEM)\n"
    "  group add GROUP                start generation 1 of a configured group\n"
    "  keys [--json] [--audit]        list chain and ticket keys (never values); --audit\n"
    "                                 reports every object the schedule does not expect\n"
    "  rekey GROUP                    start a new generation and destroy the older ones\n"
    "  advance GROUP                  confirm a schedule jump larger than max_jump\n"
    "  transport-create --id ID --out FILE\n"
    "                                 (target HSM) make a single-use transport key\n"
    "  export-chain GROUP --transport FILE --id ID --out FILE\n"
    "                                 (source HSM, SO PIN) wrap the chain key to it\n"
    "  import-chain --in FILE         (target HSM) unwrap an exported chain key\n"
    "  fetch GROUP --target HOST:PORT --ca FILE --cert FILE --key FILE --pubkey FILE\n"
    "        [--server-name NAME] [--timeout MS]\n"
    "                                 debugging client: GetKeySet as a host would, then\n"
    "                                 print the set's metadata and whether it is accepted\n"
    "  fleet GROUP [--json] [--url URL]... [--timeout MS]\n"
    "                                 which hosts hold which epoch, who lags and since when,\n"
    "                                 resumption hits per host; read from stekd's\n"
    "                                 metrics.listen (or each replica's --url http://H:P)\n"
    "\n"
    "The user PIN comes from --pin-file or the variable named by hsm.pin_env, the SO PIN\n"
    "from --so-pin-file or hsm.so_pin_env; never from the command line.\n"
    "--now replaces the clock: a test and debugging option, never for production.\n"
    "Exit status: 0 ok, 1 failed or audit findings, 2 usage or configuration, 3 HSM.\n";

/* ---- reporting ---------------------------------------------------------- */

static void vreport(stekctl *c, stek_status st, const char *fmt, va_list ap)
{
    if (c->reported)
        return;
    c->reported = true;
    char what[512];
    vsnprintf(what, sizeof(what), fmt, ap);
    const char *detail = stek_error_detail();
    fprintf(stderr, "stekctl: %s: %s (%s: %s)\n", c->command ? c->command : "stekctl", what,
            stek_status_name(st), detail && *detail ? detail : "no detail");
}

stek_status stekctl_fail(stekctl *c, stek_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, st, fmt, ap);
    va_end(ap);
    return st;
}

stek_status stekctl_usage(stekctl *c, const char *fmt, ...)
{
    stek_status st = stek_error_set(STEK_ERR_INVALID_ARG, "see stekctl --help");
    va_list ap;
    va_start(ap, fmt);
    vreport(c, st, fmt, ap);
    va_end(ap);
    return st;
}

static int exit_code(stek_status st)
{
    switch (st) {
    case STEK_OK:
        return 0;
    case STEK_ERR_CONFIG:
    case STEK_ERR_INVALID_ARG:
        return EXIT_USAGE;
    case STEK_ERR_MODULE_LOAD:
    case STEK_ERR_TOKEN_NOT_FOUND:
    case STEK_ERR_PIN_MISSING:
    case STEK_ERR_PIN_INCORRECT:
    case STEK_ERR_PIN_LOCKED:
    case STEK_ERR_HSM_UNAVAILABLE:
    case STEK_ERR_HSM:
        return EXIT_HSM;
    default:
        return EXIT_FAILED;
    }
}

/* ---- shared helpers ----------------------------------------------------- */

stek_status stekctl_open(stekctl *c)
{
    const stekd_config *cfg = c->cfg;
    stek_p11_config pc = {
        .module_path = cfg->hsm_module,
        .token_label = cfg->hsm_token,
        /* A file given on the command line wins over the variable. */
        .pin_env = c->pin_file ? NULL : cfg->pin_env,
        .pin_file = c->pin_file,
        .so_pin_env = c->so_pin_file ? NULL : cfg->so_pin_env,
        .so_pin_file = c->so_pin_file,
        .pool_size = 2, /* one command at a time */
    };
    stek_status st = stek_p11_open(&pc, &c->p11);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot open token '%s' with module %s", cfg->hsm_token,
                            cfg->hsm_module);
    return STEK_OK;
}

stek_status stekctl_group(stekctl *c, const char *name, const stekd_group_cfg **out)
{
    *out = stekd_config_group(c->cfg, name);
    if (*out == NULL) {
        stek_status st =
            stek_error_set(STEK_ERR_CONFIG, "no group \"%.64s\" in %s", name, c->config_path);
        return stekctl_fail(c, st, "group \"%.64s\" is not configured", name);
    }
    return STEK_OK;
}

stek_status stekctl_epoch_now(stekctl *c, const stekd_group_cfg *g, uint64_t *e)
{
    stek_status st = stek_sched_epoch_at(&g->sched, c->now, e);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "group %s: the schedule has not started at %lld (origin %lld)",
                            g->name, (long long)c->now, (long long)g->sched.origin);
    return STEK_OK;
}

stek_status stekctl_newest_generation(stekctl *c, const char *group, uint32_t *gen, int64_t *start)
{
    stek_p11_generation *gens = NULL;
    size_t n = 0;
    stek_status st = stek_p11_generation_list(c->p11, group, &gens, &n);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot read the generations of group %s", group);
    *gen = n > 0 ? gens[n - 1].generation : 0;
    *start = n > 0 ? gens[n - 1].start : 0;
    free(gens);
    return STEK_OK;
}

stek_status stekctl_destroy_generations_below(stekctl *c, const char *group, uint32_t below,
                                              unsigned *destroyed)
{
    *destroyed = 0;
    stek_p11_object_info *objs = NULL;
    size_t n = 0;
    stek_status st = stek_p11_list(c->p11, &objs, &n);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot list the token");
    uint32_t *gens = calloc(n > 0 ? n : 1, sizeof(*gens));
    size_t n_gens = 0;
    if (gens == NULL) {
        free(objs);
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "generations"), "out of memory");
    }
    /* Records and keys alike: a generation half made or half destroyed by an
     * interrupted run has one without the other. */
    for (size_t i = 0; i < n; i++) {
        const stek_p11_object_info *o = &objs[i];
        bool gen_object = o->kind == STEK_P11_KIND_CHAIN || o->kind == STEK_P11_KIND_TICKET ||
                          o->kind == STEK_P11_KIND_GENERATION;
        if (!gen_object || strcmp(o->group, group) != 0 || o->generation >= below)
            continue;
        size_t j = 0;
        while (j < n_gens && gens[j] != o->generation)
            j++;
        if (j == n_gens)
            gens[n_gens++] = o->generation;
    }
    free(objs);
    for (size_t i = 0; i < n_gens; i++) {
        unsigned k = 0;
        st = stek_p11_generation_destroy(c->p11, group, gens[i], &k);
        if (st != STEK_OK) {
            st = stekctl_fail(c, st, "cannot destroy generation %u of group %s", (unsigned)gens[i],
                              group);
            break;
        }
        *destroyed += k;
        stek_log(STEK_LOG_INFO, "stekctl", "group %s: destroyed generation %u (%u keys)", group,
                 (unsigned)gens[i], k);
    }
    free(gens);
    return st;
}

stek_status stekctl_write_file(const char *path, const void *data, size_t len, mode_t mode)
{
    STEK_ENSURE_REF(path);
    char tmp[4096];
    int n = snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path);
    STEK_ENSURE(n > 0 && (size_t)n < sizeof(tmp), STEK_ERR_INVALID_ARG);
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "%s: cannot create a temporary file: %s", path, strerror(errno));
    stek_status st = STEK_OK;
    /* The final mode before any byte is written, whatever the umask. */
    if (fchmod(fd, mode) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: fchmod: %s", tmp, strerror(errno));
    const uint8_t *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: write: %s", tmp, strerror(errno));
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: fsync: %s", tmp, strerror(errno));
    int rc = close(fd);
    fd = -1;
    if (rc != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: close: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: rename: %s", path, strerror(errno));
done:
    if (fd >= 0)
        close(fd);
    if (st != STEK_OK)
        unlink(tmp);
    return st;
}

stek_status stekctl_read_file(const char *path, size_t max, uint8_t **out, size_t *len)
{
    STEK_ENSURE_REF(path);
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        STEK_BAIL(STEK_ERR_IO, "%s: %s", path, strerror(errno));
    stek_status st = STEK_OK;
    uint8_t *buf = NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
        STEK_BAIL_GOTO(STEK_ERR_IO, "%s: not a regular file", path);
    if ((uint64_t)sb.st_size > max)
        STEK_BAIL_GOTO(STEK_ERR_INVALID_ARG, "%s: %lld bytes, more than the %zu allowed", path,
                       (long long)sb.st_size, max);
    /* One byte more than allowed, to notice a file that grew meanwhile. */
    buf = malloc(max + 1);
    STEK_ENSURE_GOTO(buf != NULL, STEK_ERR_NOMEM);
    size_t have = 0;
    for (;;) {
        ssize_t r = read(fd, buf + have, max + 1 - have);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            STEK_BAIL_GOTO(STEK_ERR_IO, "%s: read: %s", path, strerror(errno));
        if (r == 0)
            break;
        have += (size_t)r;
        if (have > max)
            STEK_BAIL_GOTO(STEK_ERR_INVALID_ARG, "%s: more than the %zu bytes allowed", path, max);
    }
    *out = buf;
    *len = have;
    buf = NULL;
done:
    free(buf);
    close(fd);
    return st;
}

void stekctl_rfc3339(int64_t t, char out[32])
{
    struct tm tm;
    time_t tt = (time_t)t;
    if (t < 0 || gmtime_r(&tt, &tm) == NULL || tm.tm_year > 9999 - 1900 ||
        strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, 32, "-");
}

/* Parses a command's options; returns an option, -1 at the end, or '?' (reported). */
static int next_opt(stekctl *c, int argc, char **argv, const struct option *opts)
{
    int idx = 0;
    int o = getopt_long(argc, argv, "", opts, &idx);
    if (o == '?' || o == ':') {
        STEK_IGNORE(stekctl_usage(c, "unknown option or missing value: %s",
                                  optind > 0 && optind <= argc ? argv[optind - 1] : "?"));
        return '?';
    }
    return o;
}

/* Resets getopt for a command's own arguments (glibc: optind 0 reinitializes). */
static void opts_reset(void)
{
    optind = 0;
    opterr = 0;
}

/* ---- init and group add ------------------------------------------------- */

/*
 * Starts generation n of g: a root chain key at the current epoch, then the
 * generation record with start = now. The record comes second because
 * stekd serves nothing of a generation without one: a crash in between
 * leaves an unrecorded chain key, which the next run replaces.
 */
static stek_status start_generation(stekctl *c, const stekd_group_cfg *g, uint32_t n,
                                    uint64_t *epoch)
{
    STEK_GUARD(stekctl_epoch_now(c, g, epoch));
    stek_status st = stek_p11_root_create(c->p11, g->name, n, *epoch);
    if (st == STEK_ERR_EXISTS) {
        /* No record names generation n (the callers checked): these keys were
         * never served. They are what an interrupted run left behind. */
        unsigned k = 0;
        st = stek_p11_generation_destroy(c->p11, g->name, n, &k);
        if (st != STEK_OK)
            return stekctl_fail(c, st, "cannot remove unrecorded keys of group %s generation %u",
                                g->name, (unsigned)n);
        stek_log(STEK_LOG_WARN, "stekctl",
                 "group %s: removed %u unrecorded key(s) of generation %u left by an "
                 "interrupted run",
                 g->name, k, (unsigned)n);
        st = stek_p11_root_create(c->p11, g->name, n, *epoch);
    }
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot create the root chain key of group %s generation %u",
                            g->name, (unsigned)n);
    st = stek_p11_generation_record(c->p11, g->name, n, c->now);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot record generation %u of group %s", (unsigned)n, g->name);
    stek_log(STEK_LOG_INFO, "stekctl", "group %s: generation %u starts at %lld, epoch %" PRIu64,
             g->name, (unsigned)n, (long long)c->now, *epoch);
    return STEK_OK;
}

/*
 * group add for one configured group: *added is false when it already has a
 * generation (*have, the newest), else *epoch is generation 1's first epoch.
 */
static stek_status group_add(stekctl *c, const stekd_group_cfg *g, bool *added, uint32_t *have,
                             uint64_t *epoch)
{
    *added = false;
    int64_t start;
    STEK_GUARD(stekctl_newest_generation(c, g->name, have, &start));
    if (*have > 0)
        return STEK_OK;
    STEK_GUARD(start_generation(c, g, 1, epoch));
    *added = true;
    return STEK_OK;
}

static stek_status cmd_init(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"pubkey-out", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    const char *pubkey_out = NULL;
    int o;
    opts_reset();
    while ((o = next_opt(c, argc, argv, opts)) != -1) {
        if (o == '?')
            return STEK_ERR_INVALID_ARG;
        pubkey_out = optarg;
    }
    if (optind != argc)
        return stekctl_usage(c, "unexpected argument \"%s\"", argv[optind]);
    STEK_GUARD(stekctl_open(c));

    stek_status st = stek_p11_signing_key_create(c->p11);
    if (st == STEK_OK)
        fprintf(stderr, "stekctl: init: created the service signing key\n");
    else if (st != STEK_ERR_EXISTS)
        return stekctl_fail(c, st, "cannot create the service signing key");
    /* stdout carries only the PEM, so that `init > service.pem` works. */
    for (size_t i = 0; i < c->cfg->n_groups; i++) {
        bool added;
        uint32_t have;
        uint64_t e;
        STEK_GUARD(group_add(c, &c->cfg->groups[i], &added, &have, &e));
        if (added)
            fprintf(stderr, "stekctl: init: group %s: generation 1 starts at epoch %" PRIu64 "\n",
                    c->cfg->groups[i].name, e);
    }

    char *pem = NULL;
    st = stek_p11_signing_pubkey_pem(c->p11, &pem);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot read the signing public key");
    size_t len = strlen(pem);
    if (pubkey_out != NULL) {
        st = stekctl_write_file(pubkey_out, pem, len, 0644);
        if (st != STEK_OK) {
            free(pem);
            return stekctl_fail(c, st, "cannot write the public key to %s", pubkey_out);
        }
    }
    fwrite(pem, 1, len, stdout);
    free(pem);
    return STEK_OK;
}

/*
 * The shape of group add, rekey and advance: no options, exactly one
 * configured GROUP, and the token open. Reports failures.
 */
static stek_status one_group(stekctl *c, int argc, char **argv, const stekd_group_cfg **g)
{
    static const struct option opts[] = {{NULL, 0, NULL, 0}};
    opts_reset();
    if (next_opt(c, argc, argv, opts) != -1)
        return STEK_ERR_INVALID_ARG;
    if (argc - optind != 1)
        return stekctl_usage(c, "expected one GROUP");
    STEK_GUARD(stekctl_group(c, argv[optind], g));
    return stekctl_open(c);
}

static stek_status cmd_group_add(stekctl *c, int argc, char **argv)
{
    const stekd_group_cfg *g = NULL;
    STEK_GUARD(one_group(c, argc, argv, &g));
    bool added;
    uint32_t have;
    uint64_t e;
    STEK_GUARD(group_add(c, g, &added, &have, &e));
    if (!added) {
        stek_status st = stek_error_set(STEK_ERR_EXISTS, "generation %u is recorded", have);
        return stekctl_fail(c, st, "group %s already has a generation (use rekey for a new one)",
                            g->name);
    }
    printf("group %s: generation 1 starts at epoch %" PRIu64 "\n", g->name, e);
    return STEK_OK;
}

/* ---- rekey and advance --------------------------------------------------- */

/* The newest recorded generation of a configured group, which must exist. */
static stek_status need_generation(stekctl *c, const stekd_group_cfg *g, uint32_t *gen,
                                   int64_t *start)
{
    STEK_GUARD(stekctl_newest_generation(c, g->name, gen, start));
    if (*gen == 0) {
        stek_status st = stek_error_set(STEK_ERR_NOT_FOUND, "no generation record");
        return stekctl_fail(c, st, "group %s is not initialized (run group add or init)", g->name);
    }
    return STEK_OK;
}

static stek_status cmd_rekey(stekctl *c, int argc, char **argv)
{
    const stekd_group_cfg *g = NULL;
    STEK_GUARD(one_group(c, argc, argv, &g));
    uint32_t old;
    int64_t start;
    STEK_GUARD(need_generation(c, g, &old, &start));
    if (old == UINT32_MAX) {
        stek_status st = stek_error_set(STEK_ERR_INVALID_ARG, "generation %u", old);
        return stekctl_fail(c, st, "group %s has no generation number left", g->name);
    }
    uint64_t e;
    STEK_GUARD(start_generation(c, g, old + 1, &e));
    /* After a compromise the old keys must go at once, not at their window's end. */
    unsigned destroyed = 0;
    STEK_GUARD(stekctl_destroy_generations_below(c, g->name, old + 1, &destroyed));
    stek_log(STEK_LOG_WARN, "stekctl", "group %s rekeyed: generation %u -> %u, %u old key(s) gone",
             g->name, (unsigned)old, (unsigned)old + 1, destroyed);
    printf("rekeyed %s: generation %u -> %u (starts at epoch %" PRIu64
           "); destroyed %u key(s) of older generations\n",
           g->name, (unsigned)old, (unsigned)old + 1, e, destroyed);
    return STEK_OK;
}

static stek_status cmd_advance(stekctl *c, int argc, char **argv)
{
    const stekd_group_cfg *g = NULL;
    STEK_GUARD(one_group(c, argc, argv, &g));
    uint32_t n;
    int64_t start;
    STEK_GUARD(need_generation(c, g, &n, &start));
    uint64_t e, from;
    STEK_GUARD(stekctl_epoch_now(c, g, &e));
    stek_status st = stek_p11_chain_newest(c->p11, g->name, n, &from);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot find the chain key of group %s generation %u", g->name,
                            (unsigned)n);

    /* What stekd keeps (schedule.h): K(e + 1), the next key, and K(e + 2). */
    uint64_t target = e + STEK_SCHED_CHAIN_LEAD, gen_first = 0, first;
    if (stek_sched_epoch_at(&g->sched, start, &gen_first) != STEK_OK)
        gen_first = 0;
    stek_sched_window(&g->sched, e, gen_first, &first, NULL);
    unsigned destroyed = 0;
    for (uint64_t at = from; at < target;) {
        uint64_t to = target - at > ADVANCE_SLICE ? at + ADVANCE_SLICE : target;
        st = stek_p11_ratchet_advance(c->p11, g->name, n, to);
        if (st != STEK_OK)
            return stekctl_fail(c, st, "cannot advance group %s generation %u to epoch %" PRIu64,
                                g->name, (unsigned)n, to);
        /* The keys of a long jump are past their window as soon as they exist. */
        unsigned k = 0;
        st = stek_p11_ticket_destroy_before(c->p11, g->name, n, first, &k);
        if (st != STEK_OK)
            return stekctl_fail(c, st, "cannot destroy expired keys of group %s", g->name);
        destroyed += k;
        at = to;
    }
    if (from >= target) {
        /* Nothing to step; still leave no key past its window. */
        st = stek_p11_ticket_destroy_before(c->p11, g->name, n, first, &destroyed);
        if (st != STEK_OK)
            return stekctl_fail(c, st, "cannot destroy expired keys of group %s", g->name);
        printf("group %s generation %u is already at epoch %" PRIu64 " (current epoch %" PRIu64
               ")\n",
               g->name, (unsigned)n, from, e);
    } else {
        stek_log(STEK_LOG_WARN, "stekctl",
                 "group %s generation %u advanced by the operator from epoch %" PRIu64
                 " to %" PRIu64,
                 g->name, (unsigned)n, from, target);
        printf("advanced %s generation %u from epoch %" PRIu64 " to %" PRIu64 "\n", g->name,
               (unsigned)n, from, target);
    }
    if (destroyed > 0)
        printf("destroyed %u ticket key(s) past their window (below epoch %" PRIu64 ")\n",
               destroyed, first);
    return STEK_OK;
}

/* ---- main --------------------------------------------------------------- */

static bool parse_now(const char *text, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < 0)
        return false;
    *out = (int64_t)v;
    return true;
}

typedef struct command {
    const char *name;
    stek_status (*run)(stekctl *c, int argc, char **argv);
} command;

static const command commands[] = {
    {"init", cmd_init},
    {"keys", stekctl_cmd_keys},
    {"rekey", cmd_rekey},
    {"advance", cmd_advance},
    {"transport-create", stekctl_cmd_transport_create},
    {"export-chain", stekctl_cmd_export_chain},
    {"import-chain", stekctl_cmd_import_chain},
    {"fetch", stekctl_cmd_fetch},
    {"fleet", stekctl_cmd_fleet},
};

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"pin-file", required_argument, NULL, 'p'},
        {"so-pin-file", required_argument, NULL, 's'},
        {"now", required_argument, NULL, 'n'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    stekctl c = {.command = "stekctl", .now = (int64_t)time(NULL)};
    bool verbose = false;
    int o;
    /* '+': options end at the command, whose own options come after it. */
    while ((o = getopt_long(argc, argv, "+c:p:s:n:vh", opts, NULL)) != -1) {
        switch (o) {
        case 'c':
            c.config_path = optarg;
            break;
        case 'p':
            c.pin_file = optarg;
            break;
        case 's':
            c.so_pin_file = optarg;
            break;
        case 'n':
            if (!parse_now(optarg, &c.now))
                return exit_code(stekctl_usage(&c, "--now wants Unix seconds, not \"%s\"", optarg));
            break;
        case 'v':
            verbose = true;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        default:
            fputs(usage_text, stderr);
            return EXIT_USAGE;
        }
    }
    /* A CLI's output is its answer: the layer's progress lines only on request. */
    if (verbose)
        stek_log_set_level(STEK_LOG_INFO);
    else if (getenv("STEK_LOG_LEVEL") == NULL)
        stek_log_set_level(STEK_LOG_WARN);

    if (optind >= argc) {
        fputs(usage_text, stderr);
        return EXIT_USAGE;
    }
    int cargc = argc - optind;
    char **cargv = argv + optind;
    stek_status (*run)(stekctl *, int, char **) = NULL;
    if (strcmp(cargv[0], "group") == 0) {
        c.command = "group add";
        if (cargc < 2 || strcmp(cargv[1], "add") != 0)
            return exit_code(stekctl_usage(&c, "the only group command is \"group add GROUP\""));
        run = cmd_group_add;
        cargc--;
        cargv++;
    } else {
        for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
            if (strcmp(cargv[0], commands[i].name) == 0) {
                c.command = commands[i].name;
                run = commands[i].run;
            }
        }
        if (run == NULL)
            return exit_code(stekctl_usage(&c, "unknown command \"%s\"", cargv[0]));
    }
    if (c.config_path == NULL)
        return exit_code(stekctl_usage(&c, "--config FILE is required"));

    stek_status st = stekd_config_load(c.config_path, &c.cfg);
    if (st != STEK_OK) {
        STEK_IGNORE(stekctl_fail(&c, st, "bad configuration"));
        return EXIT_USAGE;
    }
    st = run(&c, cargc, cargv);
    if (st != STEK_OK && !c.reported)
        STEK_IGNORE(stekctl_fail(&c, st, "failed"));
    /* stdout may be a pipe or a file: a failed flush is a failed command. */
    if (fflush(stdout) != 0 && st == STEK_OK) {
        st = stek_error_set(STEK_ERR_IO, "stdout: %s", strerror(errno));
        STEK_IGNORE(stekctl_fail(&c, st, "cannot write the output"));
    }
    stek_p11_close(c.p11);
    stekd_config_free(c.cfg);
    return exit_code(st);
}
