/*
 * The configuration parsers: stekd's (server/config.c, stekd_config_load,
 * which stekctl shares) and stek-agent's (client/agent/config.c,
 * agent_config_load). Both parse with libconfig and then validate every
 * setting. The first byte picks the parser (even: stekd, odd: agent), the
 * rest is the file, written to a temporary file since both load paths.
 *
 * libconfig's @include is left as the parsers have it: the harness's file
 * sits alone in its own directory, so relative includes find nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "config.h"
#include "fuzz.h"

static void check_stekd(const stekd_config *c)
{
    if (c->n_groups < 1 || c->listen == NULL || c->hsm_module == NULL || c->hsm_token == NULL)
        fuzz_fail("stekd config accepted without its required settings");
    for (size_t i = 0; i < c->n_groups; i++) {
        if (stek_group_name_check(c->groups[i].name) != STEK_OK ||
            c->groups[i].sched.epoch_s == 0 || c->groups[i].n_allow < 1)
            fuzz_fail("stekd config accepted a bad group");
        if (stekd_config_group(c, c->groups[i].name) == NULL)
            fuzz_fail("a loaded group cannot be found by name");
    }
}

static void check_agent(const agent_config *c)
{
    if (c->n_servers < 1 || c->n_targets < 1 || c->n_targets > AGENT_MAX_TARGETS || c->ca == NULL ||
        c->cert == NULL || c->key == NULL || c->n_service_keys < 1)
        fuzz_fail("agent config accepted without its required settings");
    for (size_t i = 0; i < c->n_targets; i++)
        if (c->targets[i].name == NULL || c->targets[i].group == NULL ||
            c->targets[i].dir == NULL || c->targets[i].dir[0] != '/')
            fuzz_fail("agent config accepted a bad target");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    char path[512];
    const bool agent = data[0] & 1;
    fuzz_write_file(agent ? "agent.conf" : "stekd.conf", data + 1, size - 1, path);
    stek_status st;
    if (agent) {
        agent_config *c = NULL;
        st = agent_config_load(path, &c);
        if (st == STEK_OK)
            check_agent(c);
        agent_config_free(c);
    } else {
        stekd_config *c = NULL;
        st = stekd_config_load(path, &c);
        if (st == STEK_OK)
            check_stekd(c);
        stekd_config_free(c);
    }
    if (fuzz_verbose())
        fprintf(stderr, "%s: %s %s\n", agent ? "agent" : "stekd", stek_status_name(st),
                st == STEK_OK ? "" : stek_error_detail());
    if (st != STEK_OK && st != STEK_ERR_CONFIG && st != STEK_ERR_IO && st != STEK_ERR_NOMEM)
        fuzz_fail("config load: %s", stek_status_name(st));
    return 0;
}

/* ---- seeds ------------------------------------------------------------------------------ */

static const char agent_example[] = /* docs/agent.md */
    "stekd = {\n"
    "  servers = [\"stekd-1.example:7443\", \"stekd-2.example:7443\"];\n"
    "  server_name = \"stekd.example\";\n"
    "  ca = \"/etc/stek/fleet-ca.pem\";\n"
    "  cert = \"/etc/stek/host.pem\";\n"
    "  key = \"/etc/stek/host-key.pem\";\n"
    "  service_keys = [\"/etc/stek/service.pem\"];\n"
    "  state_dir = \"/var/lib/stek-agent\";\n"
    "};\n"
    "strict = false;\n"
    "retry = { min = \"500ms\"; max = \"30s\"; };\n"
    "targets = (\n"
    "  { name = \"web\"; group = \"edge\"; type = \"nginx\"; dir = \"/run/stek/web\";\n"
    "    reload = [\"/usr/sbin/nginx\", \"-s\", \"reload\"];\n"
    "    server_config = \"/etc/nginx/nginx.conf\"; },\n"
    "  { name = \"lb\"; group = \"edge\"; type = \"haproxy\"; dir = \"/run/stek/lb\";\n"
    "    socket = \"/run/haproxy/admin.sock\"; server_config = \"/etc/haproxy/haproxy.cfg\"; },\n"
    "  { name = \"other\"; group = \"edge\"; type = \"files\"; dir = \"/run/stek/other\";\n"
    "    pid_file = \"/run/other.pid\"; signal = \"USR1\"; }\n"
    ");\n";

static const char stekd_small[] =
    "listen = \"127.0.0.1:7443\";\n"
    "tls = { cert = \"c.pem\"; key = \"pkcs11:token=stek;object=tls\"; client_ca = \"ca.pem\"; };\n"
    "hsm = { module = \"/m.so\"; token = \"t\"; pin_env = \"P\"; };\n"
    "schedule = { max_jump = 3; heartbeat = \"15m\"; jitter = \"250ms\"; };\n"
    "limits = { max_request_bytes = 8192; wrap_cache_entries = 7; max_watchers = 9; };\n"
    "metrics = { listen = \"127.0.0.1:9464\"; };\n"
    "audit_log = \"/var/log/stek/audit.log\";\n"
    "groups = ( { name = \"edge\"; epoch = \"1h\"; decrypt_lifetime = \"18h\";\n"
    "  origin = \"2024-01-01T00:00:00Z\"; allow = [ \"uri:spiffe://fleet/edge/*\",\n"
    "  \"dns:*.edge.example\" ]; },\n"
    "  { name = \"b\"; epoch = \"90s\"; origin = 0; allow = [ \"dns:b.example\" ]; } );\n";

static void emit_text(fuzz_emit_fn emit, const char *name, uint8_t sel, const char *text,
                      size_t len)
{
    uint8_t *buf = malloc(len + 1);
    if (buf == NULL)
        fuzz_fail("out of memory");
    buf[0] = sel;
    memcpy(buf + 1, text, len);
    emit(name, buf, len + 1);
    free(buf);
}

void fuzz_seeds(fuzz_emit_fn emit)
{
    FILE *f = fopen(FUZZ_SOURCE_DIR "/docs/stekd.conf.example", "rb");
    char ex[16384];
    size_t n = f != NULL ? fread(ex, 1, sizeof(ex), f) : 0;
    if (f == NULL || n == 0 || n == sizeof(ex))
        fuzz_fail("docs/stekd.conf.example");
    fclose(f);
    emit_text(emit, "stekd-example", 0, ex, n);
    emit_text(emit, "stekd-small", 0, stekd_small, sizeof(stekd_small) - 1);
    emit_text(emit, "stekd-pin-in-file", 0, "hsm = { pin = \"1234\"; };\n", 25);
    emit_text(emit, "agent-example", 1, agent_example, sizeof(agent_example) - 1);
    emit_text(emit, "agent-syntax-error", 1, "stekd = { servers = [ ;\n", 24);
}
