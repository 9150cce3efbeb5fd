#!/usr/bin/env bash
# make demo: stek working end to end on this machine, in about a minute.
#
# It makes a throwaway SoftHSM token and certificates under .demo/ (ignored
# by git), starts stekd with 10-second epochs, starts two example TLS servers
# built on libstek (client/examples/stek_demo_server.c), and uses
# `openssl s_client` to show a session started on server A resuming on
# server B, under TLS 1.3 and 1.2, and again after a key rotation. It ends
# with `stekctl fleet`: what each server reported holding, converged or not.
# Everything it starts is stopped when it ends; a failure exits non-zero
# with the reason. Run through `make demo`, which installs and builds first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
demo="$root/.demo"
EPOCH=10
LIFETIME=30
GROUP=demo

bin_stekd="$build/server/stekd"
bin_stekctl="$build/server/stekctl"
bin_server="$build/client/examples/stek-demo-server"
softhsm_module="${STEK_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
fail() {
    printf '\ndemo: FAILED: %s\n' "$*" >&2
    for log in "$demo"/*.log; do
        [[ -s $log ]] || continue
        printf -- '--- last lines of %s\n' "$log" >&2
        tail -n 5 "$log" >&2
    done
    exit 1
}

for b in "$bin_stekd" "$bin_stekctl" "$bin_server"; do
    [[ -x $b ]] || fail "$b is missing: run 'make demo' (it builds first)"
done

pids=()
cleanup() {
    local p i
    # Newest first: the TLS servers stop before the stekd they watch.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        p=${pids[i]:-}
        [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]:-}"; do
        [[ -n $p ]] && wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

# Waits for a file to exist and be non-empty, up to $2 seconds: readiness is
# a condition with a deadline, never a guess.
wait_for_file() {
    local file=$1 deadline=$((SECONDS + $2))
    until [[ -s $file ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------
say "A throwaway HSM token and certificates in .demo/"
rm -rf "$demo"
mkdir -p "$demo/tokens" "$demo/pki" "$demo/state-a" "$demo/state-b"
chmod 700 "$demo"
cat >"$demo/softhsm2.conf" <<EOF
directories.tokendir = $demo/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
export SOFTHSM2_CONF="$demo/softhsm2.conf"
# Random PINs for a token that lives only as long as this demo. stek itself
# reads its PIN from the environment; softhsm2-util only takes it on argv.
STEK_PIN="$(openssl rand -hex 8)"
STEK_SO_PIN="$(openssl rand -hex 8)"
export STEK_PIN STEK_SO_PIN
softhsm2-util --init-token --free --label stek-demo --pin "$STEK_PIN" \
    --so-pin "$STEK_SO_PIN" >"$demo/softhsm.log" 2>&1 || fail "softhsm2-util could not make a token"
note "SoftHSM token 'stek-demo' (PIN in the environment only)"

pki="$demo/pki"
cert() { # name, subjectAltName, extendedKeyUsage, key type args...
    local name=$1 san=$2 eku=$3
    shift 3
    openssl req -new -newkey "$@" -nodes -keyout "$pki/$name-key.pem" -out "$pki/$name.csr" \
        -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca-key.pem" \
        -CAcreateserial -out "$pki/$name.pem" -days 1 -extfile <(printf '%s\n' \
            "subjectAltName=$san" "extendedKeyUsage=$eku" "keyUsage=critical,digitalSignature" \
            "basicConstraints=critical,CA:FALSE") 2>/dev/null
    chmod 600 "$pki/$name-key.pem"
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$pki/ca-key.pem" -out "$pki/ca.pem" -days 1 -subj "/CN=stek demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null || fail "openssl could not make the CA"
cert stekd "DNS:localhost" serverAuth ec -pkeyopt ec_paramgen_curve:P-256
cert host-a "URI:spiffe://demo/web/a" clientAuth ec -pkeyopt ec_paramgen_curve:P-256
cert host-b "URI:spiffe://demo/web/b" clientAuth rsa:2048
cert web "DNS:localhost" serverAuth ec -pkeyopt ec_paramgen_curve:P-256
note "fleet CA; stekd's certificate; host A (EC, spiffe://demo/web/a) and host B (RSA, spiffe://demo/web/b)"

cat >"$demo/stekd.conf" <<EOF
listen = "127.0.0.1:0";
tls = { cert = "pki/stekd.pem"; key = "pki/stekd-key.pem"; client_ca = "pki/ca.pem"; };
hsm = { module = "$softhsm_module"; token = "stek-demo"; pin_env = "STEK_PIN";
        so_pin_env = "STEK_SO_PIN"; };
schedule = { max_jump = 2; heartbeat = "2s"; jitter = "0s"; };
metrics = { listen = "127.0.0.1:0"; };
groups = (
  { name = "$GROUP"; epoch = "${EPOCH}s"; decrypt_lifetime = "${LIFETIME}s"; origin = 0;
    allow = [ "uri:spiffe://demo/web/*" ]; }
);
EOF

# ---------------------------------------------------------------------------
say "stekctl init: the service signing key and the group's first generation, in the HSM"
"$bin_stekctl" --config "$demo/stekd.conf" init --pubkey-out "$demo/service.pem" \
    >"$demo/stekctl.log" 2>&1 || fail "stekctl init"
note "hosts pin the service key: $(openssl pkey -pubin -in "$demo/service.pem" -noout -text 2>/dev/null | head -1)"

say "stekd: group '$GROUP', ${EPOCH}-second epochs, ${LIFETIME}-second decrypt window"
"$bin_stekd" --config "$demo/stekd.conf" --port-file "$demo/stekd.port" >"$demo/stekd.log" 2>&1 &
pids+=($!)
wait_for_file "$demo/stekd.port" 15 || fail "stekd did not start"
stekd_port="$(cat "$demo/stekd.port")"
note "stekd listening on 127.0.0.1:$stekd_port (mutual TLS)"
# Port 0 in the config: stekd picked one and logged it.
metrics_port=""
deadline=$((SECONDS + 10))
until [[ -n $metrics_port ]]; do
    metrics_port="$(sed -n 's/.*metrics listening on .*(port \([0-9]*\)).*/\1/p' "$demo/stekd.log")"
    [[ -n $metrics_port ]] && break
    ((SECONDS < deadline)) || fail "stekd did not log its metrics port"
    sleep 0.1
done
note "metrics and the fleet table on http://127.0.0.1:$metrics_port (plain HTTP, loopback only)"

start_server() { # name, host cert stem, state dir
    local name=$1 host=$2 state=$3
    "$bin_server" --name "$name" --listen 127.0.0.1:0 --port-file "$demo/server-$name.port" \
        --tls-cert "$pki/web.pem" --tls-key "$pki/web-key.pem" \
        --stekd "127.0.0.1:$stekd_port" --stekd-name localhost --ca "$pki/ca.pem" \
        --host-cert "$pki/$host.pem" --host-key "$pki/$host-key.pem" \
        --service-key "$demo/service.pem" --group "$GROUP" --state-dir "$state" \
        --max-seconds 300 >"$demo/server-$name.log" 2>&1 &
    pids+=($!)
}
start_server A host-a "$demo/state-a"
start_server B host-b "$demo/state-b"
wait_for_file "$demo/server-A.port" 20 || fail "server A did not start"
wait_for_file "$demo/server-B.port" 20 || fail "server B did not start"
port_a="$(cat "$demo/server-A.port")"
port_b="$(cat "$demo/server-B.port")"
say "Two TLS servers on libstek, each with its own host identity and its own ephemeral key"
note "server A on 127.0.0.1:$port_a, server B on 127.0.0.1:$port_b"
note "both hold the same ticket keys, fetched from stekd and unwrapped in memory:"
"$bin_stekctl" --config "$demo/stekd.conf" keys 2>/dev/null | sed 's/^/     /' || true

# One s_client connection; prints "New" or "Reused". -ign_eof keeps s_client
# reading until the server closes, so a TLS 1.3 ticket (sent after the
# handshake) always arrives before -sess_out writes the session.
connect() { # port, tls flag, sess flag, sess file
    printf 'GET / HTTP/1.0\r\n\r\n' |
        openssl s_client -connect "127.0.0.1:$1" -servername localhost \
            -CAfile "$pki/ca.pem" -verify_return_error -ign_eof "$2" "$3" "$4" 2>/dev/null |
        grep -Eo '^(New|Reused), TLSv1\.[23]' | head -1
}

resume_across() { # tls flag, label
    local sess="$demo/session$1.pem" first second
    rm -f "$sess"
    first="$(connect "$port_a" "$1" -sess_out "$sess")"
    [[ $first == New* ]] || fail "$2: the first handshake on server A did not complete ($first)"
    note "$2: full handshake on server A ($first); session ticket saved"
    second="$(connect "$port_b" "$1" -sess_in "$sess")"
    [[ $second == Reused* ]] || fail "$2: the ticket from A did not resume on B ($second)"
    note "$2: resumed on server B: $second"
}

say "A session started on server A resumes on server B"
resume_across -tls1_3 "TLS 1.3"
resume_across -tls1_2 "TLS 1.2"

say "Across a key rotation"
now="$(date +%s)"
next=$(((now / EPOCH + 1) * EPOCH))
note "epoch $((now / EPOCH)) now; waiting $((next - now + 1)) s for epoch $((next / EPOCH)) to begin"
while (($(date +%s) <= next)); do sleep 0.2; done
third="$(connect "$port_b" -tls1_3 -sess_in "$demo/session-tls1_3.pem")"
[[ $third == Reused* ]] || fail "the ticket did not resume after the rotation ($third)"
note "the ticket from before the rotation still resumes on B: $third"
note "(its key is now decrypt-only, so B issued a fresh ticket under the new key)"
"$bin_stekctl" --config "$demo/stekd.conf" keys 2>/dev/null | sed 's/^/     /' || true

say "What the servers saw"
sed 's/^/   /' "$demo/server-A.log" | tail -n 4
sed 's/^/   /' "$demo/server-B.log" | tail -n 4

say "stekctl fleet: what each server reports holding"
# Each server reports after every set it accepts (and every 10 s), so both
# have reported the new epoch within moments of the rotation.
fleet() {
    "$bin_stekctl" --config "$demo/stekd.conf" fleet "$GROUP" \
        --url "http://127.0.0.1:$metrics_port" "$@" 2>>"$demo/stekctl.log"
}
deadline=$((SECONDS + 10))
table="$(fleet || true)"
until [[ $table == *"2 host(s): 2 converged"* ]]; do
    if ((SECONDS >= deadline)); then
        printf '%s\n' "$table" | sed 's/^./   &/'
        fail "the two servers did not both converge"
    fi
    sleep 0.2
    table="$(fleet || true)"
done
printf '%s\n' "$table" | sed 's/^./   &/'
note "(counters as of each server's last report; the config's metrics.listen is port 0"
note " here, so the demo names the port with --url)"

say "Done: stopping stekd and both servers"
cleanup
pids=()
note "stek works: shared, rotating ticket keys from an HSM, resumed across servers."
note "Logs and the throwaway token are in .demo/ (delete it at will)."
