/*
 * nginx: one 80-byte ssl_session_ticket_key file per key (name | hmac |
 * aes, nginx's layout), and an include snippet naming them in order. nginx
 * encrypts with the first key its config names and decrypts with all of
 * them, so the snippet lists the encrypting key first, then next, then the
 * older keys of the decrypt window. nginx reads the files only at start and
 * reload, so a changed snippet is followed by the configured reload.
 *
 * Order of the steps: key files first (a snippet never names a missing
 * file), then the snippet, then the files of keys that left are zeroed and
 * removed (nothing names them any more), then the reload. A failed reload
 * leaves consistent files for the retry.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "atomic_file.h"

stek_status out_nginx_apply(const agent_target_cfg *t, const agent_view *v)
{
    for (size_t i = 0; i < v->n; i++)
        STEK_GUARD(agent_write_key_file(t, v, i));

    size_t cap = 512 + v->n * (strlen(t->dir) + 160);
    char *text = malloc(cap);
    STEK_ENSURE(text != NULL, STEK_ERR_NOMEM);
    size_t len = (size_t)snprintf(text, cap,
                                  "# Written by stek-agent for target %s (group %s, generation "
                                  "%llu). Do not edit: it is replaced at every rotation.\n"
                                  "# The first key encrypts; the others decrypt only.\n",
                                  t->name, t->group, (unsigned long long)v->generation);
    if (v->n == 0)
        len += (size_t)snprintf(text + len, cap - len,
                                "# No live key: nginx uses keys of its own, not shared.\n");
    for (size_t i = 0; i < v->n && len < cap; i++) {
        char name[128];
        agent_key_file_name(t, &v->keys[i], name, sizeof(name));
        len += (size_t)snprintf(text + len, cap - len,
                                "ssl_session_ticket_key %s/%s; # epoch %llu%s\n", t->dir, name,
                                (unsigned long long)v->keys[i].epoch, i == 0 ? ", encrypts" : "");
    }
    stek_status st = len < cap ? stek_file_replace(t->snippet, text, len)
                               : stek_error_set(STEK_ERR_INTERNAL, "snippet too long");
    free(text);
    STEK_GUARD(st);
    STEK_GUARD(agent_scrub_key_files(t, v));
    return agent_reload(t);
}
