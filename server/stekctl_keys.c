/*
 * stekctl keys [--json] [--audit]: what the token holds, by group,
 * generation and epoch, with each ticket key's public name and window.
 * Never a value: the layer has no call that reads one.
 *
 * --audit compares the token with what the schedule expects and reports
 * every difference as a finding (DESIGN.md: a PIN holder can make objects
 * the schedule did not, and a missed destroy leaves a key past its window).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <getopt.h>
#include <json-c/json.h>

#include "log.h"
#include "stekctl_cmd.h"

typedef struct row {
    const stek_p11_object_info *obj; /* kind CHAIN or TICKET */
    const stekd_group_cfg *g;        /* NULL: the group is not configured */
    bool has_name;
    bool gone; /* destroyed between the listing and the naming (stekd runs too) */
    /* The HSM would not name it (not an HMAC key: not made by stek). */
    char name_error[160];
    uint8_t name[STEK_TICKET_NAME_BYTES];
} row;

typedef struct group_info {
    const char *name;
    const stekd_group_cfg *g; /* NULL when not configured */
    stek_p11_generation *gens;
    size_t n_gens;
} group_info;

typedef struct finding {
    char check[32];
    char label[4 * STEK_P11_LABEL_MAX];
    char message[512];
} finding;

typedef struct listing {
    stek_p11_object_info *objs;
    size_t n_objs;
    row *rows;
    size_t n_rows;
    group_info *groups;
    size_t n_groups;
    finding *findings;
    size_t n_findings;
    size_t cap_findings;
} listing;

static void listing_free(listing *l)
{
    for (size_t i = 0; i < l->n_groups; i++)
        free(l->groups[i].gens);
    free(l->groups);
    free(l->rows);
    free(l->objs);
    free(l->findings);
}

/* Labels of foreign objects are arbitrary bytes: print them escaped. */
static void escape_label(const char *in, char *out, size_t out_len)
{
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && k + 5 < out_len; p++) {
        if (*p >= 0x20 && *p < 0x7f && *p != '\\' && *p != '"')
            out[k++] = (char)*p;
        else
            k += (size_t)snprintf(out + k, out_len - k, "\\x%02x", *p);
    }
    out[k] = '\0';
}

static stek_status add_finding(listing *l, const char *check, const char *label, const char *fmt,
                               ...) __attribute__((format(printf, 4, 5)));

static stek_status add_finding(listing *l, const char *check, const char *label, const char *fmt,
                               ...)
{
    if (l->n_findings == l->cap_findings) {
        size_t cap = l->cap_findings ? 2 * l->cap_findings : 16;
        finding *f = realloc(l->findings, cap * sizeof(*f));
        STEK_ENSURE(f != NULL, STEK_ERR_NOMEM);
        l->findings = f;
        l->cap_findings = cap;
    }
    finding *f = &l->findings[l->n_findings++];
    snprintf(f->check, sizeof(f->check), "%s", check);
    escape_label(label ? label : "", f->label, sizeof(f->label));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->message, sizeof(f->message), fmt, ap);
    va_end(ap);
    return STEK_OK;
}

static int kind_rank(stek_p11_kind k)
{
    return k == STEK_P11_KIND_TICKET ? 0 : 1;
}

static int cmp_row(const void *a, const void *b)
{
    const stek_p11_object_info *x = ((const row *)a)->obj, *y = ((const row *)b)->obj;
    int c = strcmp(x->group, y->group);
    if (c != 0)
        return c;
    if (x->generation != y->generation)
        return x->generation < y->generation ? -1 : 1;
    if (x->epoch != y->epoch)
        return x->epoch < y->epoch ? -1 : 1;
    return kind_rank(x->kind) - kind_rank(y->kind);
}

static group_info *find_group(listing *l, const char *name)
{
    for (size_t i = 0; i < l->n_groups; i++)
        if (strcmp(l->groups[i].name, name) == 0)
            return &l->groups[i];
    return NULL;
}

/* The configured groups, then every other group the token names. */
static stek_status collect_groups(stekctl *c, listing *l)
{
    l->groups = calloc(c->cfg->n_groups + l->n_objs + 1, sizeof(*l->groups));
    STEK_ENSURE(l->groups != NULL, STEK_ERR_NOMEM);
    for (size_t i = 0; i < c->cfg->n_groups; i++) {
        l->groups[l->n_groups].name = c->cfg->groups[i].name;
        l->groups[l->n_groups++].g = &c->cfg->groups[i];
    }
    for (size_t i = 0; i < l->n_objs; i++) {
        const stek_p11_object_info *o = &l->objs[i];
        bool named = o->kind == STEK_P11_KIND_CHAIN || o->kind == STEK_P11_KIND_TICKET ||
                     o->kind == STEK_P11_KIND_GENERATION;
        if (named && find_group(l, o->group) == NULL)
            l->groups[l->n_groups++].name = o->group;
    }
    for (size_t i = 0; i < l->n_groups; i++) {
        group_info *gi = &l->groups[i];
        stek_status st = stek_p11_generation_list(c->p11, gi->name, &gi->gens, &gi->n_gens);
        if (st != STEK_OK)
            return stekctl_fail(c, st, "cannot read the generations of group %s", gi->name);
    }
    return STEK_OK;
}

/* Names one epoch at a time, skipping keys that vanished meanwhile. */
static stek_status name_each(stekctl *c, row **rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const stek_p11_object_info *o = rows[i]->obj;
        stek_status st =
            stek_p11_ticket_names(c->p11, o->group, o->generation, &o->epoch, 1, &rows[i]->name);
        if (st == STEK_ERR_NOT_FOUND) {
            rows[i]->gone = true;
        } else if (st == STEK_ERR_HSM) {
            /* A planted object with a stek label must not stop the audit that
             * is there to find it: list it unnamed, and report it. */
            snprintf(rows[i]->name_error, sizeof(rows[i]->name_error), "%s", stek_error_detail());
        } else if (st != STEK_OK) {
            return stekctl_fail(c, st, "cannot name the ticket keys of group %s generation %u",
                                o->group, (unsigned)o->generation);
        } else {
            rows[i]->has_name = true;
        }
    }
    return STEK_OK;
}

/*
 * Names the ticket keys rows[0..n), which share a (group, generation), with
 * one HSM call for all of them when none vanished meanwhile.
 */
static stek_status name_run(stekctl *c, row **rows, size_t n)
{
    uint64_t *epochs = calloc(n, sizeof(*epochs));
    uint8_t(*names)[STEK_TICKET_NAME_BYTES] = calloc(n, STEK_TICKET_NAME_BYTES);
    if (epochs == NULL || names == NULL) {
        free(epochs);
        free(names);
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "names"), "out of memory");
    }
    for (size_t i = 0; i < n; i++)
        epochs[i] = rows[i]->obj->epoch;
    const stek_p11_object_info *o = rows[0]->obj;
    stek_status st = stek_p11_ticket_names(c->p11, o->group, o->generation, epochs, n, names);
    if (st == STEK_OK) {
        for (size_t i = 0; i < n; i++) {
            memcpy(rows[i]->name, names[i], STEK_TICKET_NAME_BYTES);
            rows[i]->has_name = true;
        }
    } else if (st == STEK_ERR_NOT_FOUND || st == STEK_ERR_HSM) {
        /* stekd destroyed one since the listing, or one is not stek's: name
         * them one by one to tell which. */
        st = name_each(c, rows, n);
    } else {
        st = stekctl_fail(c, st, "cannot name the ticket keys of group %s generation %u", o->group,
                          (unsigned)o->generation);
    }
    free(epochs);
    free(names);
    return st;
}

static stek_status collect(stekctl *c, listing *l)
{
    stek_status st = stek_p11_list(c->p11, &l->objs, &l->n_objs);
    if (st != STEK_OK)
        return stekctl_fail(c, st, "cannot list the token");
    l->rows = calloc(l->n_objs + 1, sizeof(*l->rows));
    if (l->rows == NULL)
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "rows"), "out of memory");
    for (size_t i = 0; i < l->n_objs; i++) {
        const stek_p11_object_info *o = &l->objs[i];
        if (o->kind != STEK_P11_KIND_CHAIN && o->kind != STEK_P11_KIND_TICKET)
            continue;
        l->rows[l->n_rows].obj = o;
        l->rows[l->n_rows++].g = stekd_config_group(c->cfg, o->group);
    }
    qsort(l->rows, l->n_rows, sizeof(*l->rows), cmp_row);
    STEK_GUARD(collect_groups(c, l));

    /* After the sort, each (group, generation) is one stretch of rows. */
    row **run = calloc(l->n_rows + 1, sizeof(*run));
    if (run == NULL)
        return stekctl_fail(c, stek_error_set(STEK_ERR_NOMEM, "rows"), "out of memory");
    for (size_t i = 0, j; st == STEK_OK && i < l->n_rows; i = j) {
        const stek_p11_object_info *o = l->rows[i].obj;
        size_t n = 0;
        for (j = i; j < l->n_rows && strcmp(l->rows[j].obj->group, o->group) == 0 &&
                    l->rows[j].obj->generation == o->generation;
             j++)
            if (l->rows[j].obj->kind == STEK_P11_KIND_TICKET)
                run[n++] = &l->rows[j];
        if (n > 0)
            st = name_run(c, run, n);
    }
    free(run);
    return st;
}

static void name_hex(const uint8_t name[STEK_TICKET_NAME_BYTES], char out[2 * 16 + 1])
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < STEK_TICKET_NAME_BYTES; i++) {
        out[2 * i] = hex[name[i] >> 4];
        out[2 * i + 1] = hex[name[i] & 15];
    }
    out[2 * STEK_TICKET_NAME_BYTES] = '\0';
}

static const char *state_name(stek_key_state s)
{
    switch (s) {
    case STEK_KEY_NEXT:
        return "next";
    case STEK_KEY_CURRENT:
        return "current";
    case STEK_KEY_DECRYPT_ONLY:
        return "decrypt-only";
    default:
        return "expired";
    }
}

/* The printable fields of one row. */
typedef struct row_text {
    const char *state;
    char name[2 * STEK_TICKET_NAME_BYTES + 1];
    bool timed;
    char not_before[32], encrypt_until[32], decrypt_until[32];
} row_text;

static void row_fields(const stekctl *c, const row *r, row_text *t)
{
    const stek_p11_object_info *o = r->obj;
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "-");
    snprintf(t->not_before, sizeof(t->not_before), "-");
    snprintf(t->encrypt_until, sizeof(t->encrypt_until), "-");
    snprintf(t->decrypt_until, sizeof(t->decrypt_until), "-");
    if (o->kind == STEK_P11_KIND_CHAIN) {
        t->state = "chain";
        return;
    }
    if (r->has_name)
        name_hex(r->name, t->name);
    if (r->g == NULL) {
        /* No schedule to place it in: that alone is an audit finding. */
        t->state = "unconfigured";
        return;
    }
    t->state = state_name(stek_sched_state(&r->g->sched, o->epoch, c->now));
    /* K(e+2) exists ahead of need (schedule.h): not `next` yet. */
    uint64_t e;
    if (stek_sched_epoch_at(&r->g->sched, c->now, &e) == STEK_OK && o->epoch > e + 1)
        t->state = "staged";
    stek_key_times kt;
    stek_sched_key_times(&r->g->sched, o->epoch, &kt);
    t->timed = true;
    stekctl_rfc3339(kt.not_before, t->not_before);
    stekctl_rfc3339(kt.encrypt_until, t->encrypt_until);
    stekctl_rfc3339(kt.decrypt_until, t->decrypt_until);
}

/* ---- the audit ---------------------------------------------------------- */

static bool has_record(const group_info *gi, uint32_t gen)
{
    for (size_t i = 0; i < gi->n_gens; i++)
        if (gi->gens[i].generation == gen)
            return true;
    return false;
}

static uint32_t newest_record(const group_info *gi)
{
    return gi->n_gens > 0 ? gi->gens[gi->n_gens - 1].generation : 0;
}

/* Findings about a chain or ticket key's place in its group's schedule. */
static stek_status audit_key(const stekctl *c, listing *l, const row *r, const row *prev)
{
    const stek_p11_object_info *o = r->obj;
    const char *kind = stek_p11_kind_name(o->kind);
    const group_info *gi = find_group(l, o->group);
    if (r->g == NULL)
        return add_finding(l, "unconfigured-group", o->label,
                           "%s key %s epoch %" PRIu64 " belongs to group %s, which is not in %s",
                           kind, o->label, o->epoch, o->group, c->config_path);
    uint32_t newest = newest_record(gi);
    if (!has_record(gi, o->generation))
        return add_finding(l, "unrecorded-generation", o->label,
                           "%s key %s epoch %" PRIu64
                           " is of generation %u, which has no generation record",
                           kind, o->label, o->epoch, (unsigned)o->generation);
    if (o->generation < newest)
        return add_finding(l, "old-generation", o->label,
                           "%s key %s epoch %" PRIu64
                           " is of generation %u, older than the group's newest generation %u",
                           kind, o->label, o->epoch, (unsigned)o->generation, (unsigned)newest);
    bool same_epoch = prev != NULL && prev->obj->kind == o->kind &&
                      strcmp(prev->obj->group, o->group) == 0 &&
                      prev->obj->generation == o->generation && prev->obj->epoch == o->epoch;
    /* Names go by epoch, so every key of that epoch shares the failure: one finding. */
    if (r->name_error[0] != '\0' && !same_epoch)
        STEK_GUARD(add_finding(l, "unnamed-ticket", o->label,
                               "ticket key %s epoch %" PRIu64
                               " cannot be named in the HSM (%s): a key stek did not make holds "
                               "that epoch",
                               o->label, o->epoch, r->name_error));
    if (o->kind == STEK_P11_KIND_TICKET && same_epoch)
        STEK_GUARD(add_finding(l, "duplicate-ticket", o->label,
                               "ticket key %s epoch %" PRIu64 " exists more than once", o->label,
                               o->epoch));
    uint64_t e;
    if (o->kind == STEK_P11_KIND_TICKET &&
        stek_sched_epoch_at(&r->g->sched, c->now, &e) == STEK_OK) {
        uint64_t past = stek_sched_past_epochs(&r->g->sched);
        uint64_t first = e >= past ? e - past : 0;
        if (o->epoch < first) {
            char until[32];
            stek_key_times kt;
            stek_sched_key_times(&r->g->sched, o->epoch, &kt);
            stekctl_rfc3339(kt.decrypt_until, until);
            STEK_GUARD(add_finding(l, "expired", o->label,
                                   "ticket key %s epoch %" PRIu64
                                   " is past its window (decrypt until %s; the window starts at "
                                   "epoch %" PRIu64 ") and should have been destroyed",
                                   o->label, o->epoch, until, first));
        }
    }
    return STEK_OK;
}

/* Findings about an object's attributes, whatever its place. */
static stek_status audit_attributes(listing *l, const stek_p11_object_info *o)
{
    switch (o->kind) {
    case STEK_P11_KIND_OTHER:
        return add_finding(l, "foreign", o->label, "%s object \"%s\" was not made by stek",
                           o->is_private_key  ? "private key"
                           : o->is_public_key ? "public key"
                                              : "secret key or data",
                           o->label);
    case STEK_P11_KIND_CHAIN:
    case STEK_P11_KIND_TICKET:
        if (!o->sensitive)
            STEK_GUARD(add_finding(l, "not-sensitive", o->label,
                                   "%s key %s epoch %" PRIu64
                                   " is not sensitive: its value can be read",
                                   stek_p11_kind_name(o->kind), o->label, o->epoch));
        if (o->kind == STEK_P11_KIND_CHAIN && o->extractable && !o->wrap_with_trusted)
            STEK_GUARD(add_finding(l, "wrappable-chain", o->label,
                                   "chain key %s epoch %" PRIu64
                                   " can be wrapped by an untrusted key (CKA_WRAP_WITH_TRUSTED "
                                   "is false)",
                                   o->label, o->epoch));
        return STEK_OK;
    case STEK_P11_KIND_SIGNING:
    case STEK_P11_KIND_TRANSPORT:
        if (o->is_private_key && !o->sensitive)
            STEK_GUARD(add_finding(l, "not-sensitive", o->label,
                                   "private key %s is not sensitive: its value can be read",
                                   o->label));
        if (o->kind == STEK_P11_KIND_SIGNING && o->is_private_key && o->extractable)
            STEK_GUARD(
                add_finding(l, "extractable", o->label, "signing key %s is extractable", o->label));
        if (o->kind == STEK_P11_KIND_TRANSPORT && o->is_public_key && o->trusted)
            STEK_GUARD(add_finding(l, "trusted-transport", o->label,
                                   "trusted transport key %s is still present: it can export "
                                   "chain keys (an export-chain did not finish)",
                                   o->label));
        return STEK_OK;
    default:
        return STEK_OK;
    }
}

static stek_status audit(const stekctl *c, listing *l)
{
    for (size_t i = 0; i < l->n_objs; i++) {
        const stek_p11_object_info *o = &l->objs[i];
        STEK_GUARD(audit_attributes(l, o));
        if (o->kind != STEK_P11_KIND_GENERATION)
            continue;
        const group_info *gi = find_group(l, o->group);
        if (gi->g == NULL)
            STEK_GUARD(add_finding(l, "unconfigured-group", o->label,
                                   "generation record %s belongs to group %s, which is not in %s",
                                   o->label, o->group, c->config_path));
        else if (o->generation < newest_record(gi))
            STEK_GUARD(add_finding(l, "old-generation", o->label,
                                   "generation record %s is older than the group's newest "
                                   "generation %u",
                                   o->label, (unsigned)newest_record(gi)));
    }
    for (size_t i = 0; i < l->n_rows; i++)
        if (!l->rows[i].gone)
            STEK_GUARD(audit_key(c, l, &l->rows[i], i > 0 ? &l->rows[i - 1] : NULL));

    /* One chain key per generation at rest; the newest generation needs one. */
    for (size_t i = 0; i < l->n_groups; i++) {
        const group_info *gi = &l->groups[i];
        for (size_t k = 0; k < gi->n_gens; k++) {
            uint32_t gen = gi->gens[k].generation;
            size_t chains = 0;
            for (size_t r = 0; r < l->n_rows; r++) {
                const stek_p11_object_info *o = l->rows[r].obj;
                chains += o->kind == STEK_P11_KIND_CHAIN && o->generation == gen &&
                          strcmp(o->group, gi->name) == 0;
            }
            char label[STEK_P11_LABEL_MAX];
            snprintf(label, sizeof(label), "stek:chain:%s:%u", gi->name, (unsigned)gen);
            if (chains > 1)
                STEK_GUARD(add_finding(l, "duplicate-chain", label,
                                       "group %s generation %u has %zu chain keys; the ratchet "
                                       "keeps exactly one",
                                       gi->name, (unsigned)gen, chains));
            if (chains == 0 && gi->g != NULL && gen == newest_record(gi))
                STEK_GUARD(add_finding(l, "missing-chain", label,
                                       "group %s generation %u has no chain key: no new key can "
                                       "be derived (rekey the group)",
                                       gi->name, (unsigned)gen));
        }
    }
    return STEK_OK;
}

/* ---- output ------------------------------------------------------------- */

static stek_status print_table(const stekctl *c, const listing *l)
{
    int wg = 5, wn = 3, we = 5, ws = 5;
    for (size_t i = 0; i < l->n_rows; i++) {
        const row *r = &l->rows[i];
        if (r->gone)
            continue;
        row_text t;
        row_fields(c, r, &t);
        char num[32];
        int n = (int)strlen(r->obj->group);
        wg = n > wg ? n : wg;
        n = snprintf(num, sizeof(num), "%u", (unsigned)r->obj->generation);
        wn = n > wn ? n : wn;
        n = snprintf(num, sizeof(num), "%" PRIu64, r->obj->epoch);
        we = n > we ? n : we;
        n = (int)strlen(t.state);
        ws = n > ws ? n : ws;
    }
    printf("%-*s  %*s  %*s  %-*s  %-32s  %-20s  %-20s  %s\n", wg, "GROUP", wn, "GEN", we, "EPOCH",
           ws, "STATE", "NAME", "NOT_BEFORE", "ENCRYPT_UNTIL", "DECRYPT_UNTIL");
    for (size_t i = 0; i < l->n_rows; i++) {
        const row *r = &l->rows[i];
        if (r->gone)
            continue;
        row_text t;
        row_fields(c, r, &t);
        printf("%-*s  %*u  %*" PRIu64 "  %-*s  %-32s  %-20s  %-20s  %s\n", wg, r->obj->group, wn,
               (unsigned)r->obj->generation, we, r->obj->epoch, ws, t.state, t.name, t.not_before,
               t.encrypt_until, t.decrypt_until);
    }
    return STEK_OK;
}

static json_object *row_json(const stekctl *c, const row *r)
{
    row_text t;
    row_fields(c, r, &t);
    json_object *o = json_object_new_object();
    if (o == NULL)
        return NULL;
    json_object_object_add(o, "group", json_object_new_string(r->obj->group));
    json_object_object_add(o, "generation", json_object_new_int64(r->obj->generation));
    json_object_object_add(o, "epoch", json_object_new_uint64(r->obj->epoch));
    json_object_object_add(o, "kind", json_object_new_string(stek_p11_kind_name(r->obj->kind)));
    json_object_object_add(o, "state", json_object_new_string(t.state));
    if (r->has_name)
        json_object_object_add(o, "name", json_object_new_string(t.name));
    if (t.timed) {
        json_object_object_add(o, "not_before", json_object_new_string(t.not_before));
        json_object_object_add(o, "encrypt_until", json_object_new_string(t.encrypt_until));
        json_object_object_add(o, "decrypt_until", json_object_new_string(t.decrypt_until));
    }
    return o;
}

static stek_status print_json(stekctl *c, const listing *l, bool with_audit)
{
    stek_status st = STEK_OK;
    json_object *keys = json_object_new_array(), *top = NULL;
    STEK_ENSURE_GOTO(keys != NULL, STEK_ERR_NOMEM);
    for (size_t i = 0; i < l->n_rows; i++) {
        if (l->rows[i].gone)
            continue;
        json_object *o = row_json(c, &l->rows[i]);
        STEK_ENSURE_GOTO(o != NULL, STEK_ERR_NOMEM);
        json_object_array_add(keys, o);
    }
    if (with_audit) {
        json_object *findings = json_object_new_array();
        top = json_object_new_object();
        if (findings == NULL || top == NULL)
            json_object_put(findings);
        STEK_ENSURE_GOTO(findings != NULL && top != NULL, STEK_ERR_NOMEM);
        json_object_object_add(top, "keys", keys);
        keys = NULL;
        json_object_object_add(top, "findings", findings);
        for (size_t i = 0; i < l->n_findings; i++) {
            const finding *f = &l->findings[i];
            json_object *o = json_object_new_object();
            STEK_ENSURE_GOTO(o != NULL, STEK_ERR_NOMEM);
            json_object_object_add(o, "check", json_object_new_string(f->check));
            json_object_object_add(o, "label", json_object_new_string(f->label));
            json_object_object_add(o, "message", json_object_new_string(f->message));
            json_object_array_add(findings, o);
        }
    }
    const char *text = json_object_to_json_string_ext(
        top ? top : keys,
        JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
    STEK_ENSURE_GOTO(text != NULL, STEK_ERR_NOMEM);
    printf("%s\n", text);
done:
    json_object_put(keys);
    json_object_put(top);
    if (st != STEK_OK)
        st = stekctl_fail(c, st, "cannot build the JSON output");
    return st;
}

stek_status stekctl_cmd_keys(stekctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"audit", no_argument, NULL, 'a'},
        {NULL, 0, NULL, 0},
    };
    bool json = false, with_audit = false;
    int o;
    optind = 0;
    opterr = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'j')
            json = true;
        else if (o == 'a')
            with_audit = true;
        else
            return stekctl_usage(c, "unknown option %s", argv[optind - 1]);
    }
    if (optind != argc)
        return stekctl_usage(c, "unexpected argument \"%s\"", argv[optind]);
    STEK_GUARD(stekctl_open(c));

    listing l = {0};
    stek_status st = collect(c, &l);
    if (st == STEK_OK && with_audit) {
        st = audit(c, &l);
        if (st != STEK_OK)
            st = stekctl_fail(c, st, "audit");
    }
    if (st == STEK_OK && json)
        st = print_json(c, &l, with_audit);
    else if (st == STEK_OK)
        st = print_table(c, &l);
    if (st == STEK_OK && with_audit && !json) {
        for (size_t i = 0; i < l.n_findings; i++)
            printf("finding: %s: %s\n", l.findings[i].check, l.findings[i].message);
        if (l.n_findings == 0)
            printf("audit: no findings\n");
    }
    if (st == STEK_OK && with_audit && l.n_findings > 0) {
        stek_log(STEK_LOG_WARN, "stekctl", "audit: %zu finding(s)", l.n_findings);
        st = stekctl_fail(c,
                          stek_error_set(STEK_ERR_VERIFY, "%zu finding(s) on stdout", l.n_findings),
                          "the audit found objects the schedule does not expect");
    }
    listing_free(&l);
    return st;
}
