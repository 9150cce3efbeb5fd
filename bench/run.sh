#!/usr/bin/env bash
# Builds and runs the benchmarks, printing their tables: bench_stekd (stekd
# over mTLS, bench/bench_stekd.c), bench_resume (libstek's ticket callback
# against OpenSSL's built-in ticket keys, bench/bench_resume.c) and, only when
# named, bench_load (one stekd under 10,000 hosts and 2,000 watch streams,
# bench/bench_load.c).
#
#   bench/run.sh [stekd|resume|load]...   default: stekd and resume; build
#                                    dir: build-bench (Release), created if
#                                    missing
#   BUILD_DIR=dir bench/run.sh
#
# Knobs read by bench_stekd: STEK_BENCH_WARMUP_MS (1000), STEK_BENCH_RUN_MS
# (5000, per phase), STEK_BENCH_COLD_POOL (12000 pre-built cold requests).
# By bench_resume: STEK_BENCH_WARMUP_MS (300), STEK_BENCH_RUN_MS (3000, per
# run), STEK_BENCH_ROUNDS (3). By bench_load: STEK_LOAD_HOSTS (10000),
# STEK_LOAD_WATCHERS (2000), STEK_LOAD_THREADS (2), STEK_LOAD_INFLIGHT (16
# per thread), STEK_LOAD_ROTATIONS (4).
# Figures depend on machine load: run it on a quiet machine, several times.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(stekd resume)
for b in "${benches[@]}"; do
    [[ $b == stekd || $b == resume || $b == load ]] || {
        echo "usage: $0 [stekd|resume|load]..." >&2
        exit 2
    }
done

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
cmake --build "$build" -j"$(nproc)" --target "${benches[@]/#/bench_}" stekd >"$log" 2>&1 || {
    cat "$log" >&2
    exit 1
}

# The fixture's temp dirs (tokens, CA, stekd's log) go under the build dir.
export STEK_TEST_TMPDIR="${STEK_TEST_TMPDIR:-$build/bench-tmp}"
mkdir -p "$STEK_TEST_TMPDIR"
for b in "${benches[@]}"; do
    echo "load before bench_$b: $(cut -d' ' -f1-3 /proc/loadavg)"
    # The PKCS#11 layer logs one line per provisioning step; only the table matters.
    "$build/bench/bench_$b" 2> >(grep -v ' info pkcs11: ' >&2)
done
