#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang (ASan+UBSan, every
# library instrumented for coverage) and runs each for FUZZ_SECONDS from its
# committed corpus. Prints per target: executions, exec/s, coverage, crashes.
# Exits non-zero if any target found a crash, leak or timeout.
#
#   ci/fuzz.sh                    every target (FUZZ_TARGETS), FUZZ_SECONDS each
#   ci/fuzz.sh --seeds            rewrite tests/fuzz/corpus/* from the harnesses'
#                                 seed writers (normal build in BUILD_DIR)
#
# Environment: FUZZ_SECONDS (600), FUZZ_BUILD_DIR (build-fuzz), FUZZ_TARGETS
# (request keyset cache ticket config), FUZZ_ARGS (extra libFuzzer flags),
# BUILD_DIR (build, for --seeds), JOBS.
# Artifacts (crashes, the grown corpus, logs) stay in FUZZ_BUILD_DIR/fuzz-out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-600}
FUZZ_BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
FUZZ_TARGETS=${FUZZ_TARGETS:-request keyset cache ticket config}
FUZZ_ARGS=${FUZZ_ARGS:-}
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

if [[ ${1:-} == --seeds ]]; then
    cmake -S . -B "$BUILD_DIR" -DSTEK_WERROR=ON
    cmake --build "$BUILD_DIR" -j"$JOBS" --target $(printf 'fuzz_replay_%s ' $FUZZ_TARGETS)
    for t in $FUZZ_TARGETS; do
        rm -rf "tests/fuzz/corpus/$t"
        mkdir -p "tests/fuzz/corpus/$t"
        "$BUILD_DIR/tests/fuzz/fuzz_replay_$t" --write-seeds "tests/fuzz/corpus/$t"
    done
    exit 0
fi

command -v clang >/dev/null || { echo "clang not found (ci/install-deps.sh)" >&2; exit 1; }
cmake -S . -B "$FUZZ_BUILD_DIR" -DCMAKE_C_COMPILER=clang -DSTEK_FUZZ=ON \
    -DSTEK_SANITIZE=address,undefined -DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link
cmake --build "$FUZZ_BUILD_DIR" -j"$JOBS" --target $(printf 'fuzz_%s ' $FUZZ_TARGETS)

out="$(cd "$FUZZ_BUILD_DIR" && pwd)/fuzz-out"
mkdir -p "$out/tmp"
export STEK_TEST_TMPDIR="$out/tmp"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export LSAN_OPTIONS=suppressions=$PWD/tests/fuzz/lsan.supp
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
failed=0
summary=()
for t in $FUZZ_TARGETS; do
    work="$out/$t"
    rm -rf "$work/crashes"
    mkdir -p "$work/corpus" "$work/crashes"
    log="$work/fuzz.log"
    echo "== fuzz_$t: ${FUZZ_SECONDS}s (log $log)"
    rc=0
    # The grown corpus first (written to), the committed seeds second (read only).
    "$FUZZ_BUILD_DIR/tests/fuzz/fuzz_$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/crashes/" \
        $FUZZ_ARGS "$work/corpus" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    crashes=$(find "$work/crashes" -type f | wc -l)
    line=$(printf '%-8s execs %-10s exec/s %-7s %-20s crashes %s exit %s' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$crashes" "$rc")
    echo "$line"
    summary+=("$line")
    if [[ $rc -ne 0 || $crashes -ne 0 ]]; then
        failed=1
        grep -E '^(==[0-9]+==ERROR|SUMMARY|fuzz: )' "$log" | head -5 || true
        find "$work/crashes" -type f -printf '  artifact: %p\n'
    fi
done
echo
echo "== fuzzing summary (${FUZZ_SECONDS}s per target)"
printf '%s\n' "${summary[@]}"
exit $failed
