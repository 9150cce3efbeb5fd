#!/usr/bin/env bash
# Builds and runs the stekd benchmark (bench/bench_stekd.c), printing its table.
#
#   bench/run.sh            build dir: build-bench (Release), created if missing
#   BUILD_DIR=dir bench/run.sh
#
# Knobs read by the program: STEK_BENCH_WARMUP_MS (1000), STEK_BENCH_RUN_MS
# (5000, per phase), STEK_BENCH_COLD_POOL (12000 pre-built cold requests).
# Figures depend on machine load: run it on a quiet machine, several times.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"

# Release without sanitizers: the figures are meant to be comparable.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if [[ ! -f "$build/CMakeCache.txt" ]]; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >"$log" 2>&1 || {
        cat "$log" >&2
        exit 1
    }
fi
if grep -Eq '^STEK_SANITIZE:STRING=.+' "$build/CMakeCache.txt" ||
    ! grep -Eq '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
    echo "warning: $build is not a plain Release build; figures will not compare" >&2
fi
cmake --build "$build" -j"$(nproc)" --target bench_stekd stekd >"$log" 2>&1 || {
    cat "$log" >&2
    exit 1
}

# The fixture's temp dirs (tokens, CA, stekd's log) go under the build dir.
export STEK_TEST_TMPDIR="${STEK_TEST_TMPDIR:-$build/bench-tmp}"
mkdir -p "$STEK_TEST_TMPDIR"
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# The PKCS#11 layer logs one line per provisioning step; only the table matters.
"$build/bench/bench_stekd" 2> >(grep -v ' info pkcs11: ' >&2)
