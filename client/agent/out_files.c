/*
 * files: raw 80-byte key files (name | hmac | aes) for any other server,
 * listed in order in the target's manifest (<dir>/<name>.manifest.json:
 * the first key encrypts, "next" keys follow, then the decrypt window),
 * with an optional reload like nginx's. Key files of keys that left are
 * zeroed and removed.
 */
#include "agent.h"

stek_status out_files_apply(const agent_target_cfg *t, const agent_view *v)
{
    for (size_t i = 0; i < v->n; i++)
        STEK_GUARD(agent_write_key_file(t, v, i));
    /* The manifest names the new files before the old ones go. */
    STEK_GUARD(agent_write_manifest(t, v, true, 0, NULL));
    STEK_GUARD(agent_scrub_key_files(t, v));
    return agent_reload(t);
}
