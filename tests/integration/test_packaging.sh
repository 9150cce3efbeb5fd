#!/usr/bin/env bash
# libstek as a user gets it: `cmake --install` of this build into a temp
# prefix, then
#   1. tests/packaging/consumer.c built with `cc $(pkg-config --cflags --libs stek)`,
#   2. tests/packaging/CMakeLists.txt built with find_package(stek) and stek::stek,
#   3. libstek.so exports only the stek_* functions of <stek/stek.h>.
# Both consumers run against the installed library (LD_LIBRARY_PATH) and
# must print what the API answers.
#
#   test_packaging.sh BUILD_DIR PACKAGING_SRC_DIR C_COMPILER VERSION [SANITIZE]
#
# SANITIZE is the build's STEK_SANITIZE: an instrumented libstek needs its
# consumers built with the same -fsanitize, or the runtime refuses to load.
set -euo pipefail

fail() {
    echo "test_packaging: FAIL: $*" >&2
    exit 1
}

[[ $# -ge 4 ]] || fail "usage: $0 BUILD_DIR PACKAGING_SRC_DIR C_COMPILER VERSION [SANITIZE]"
build=$1 src=$2 cc=$3 version=$4 sanitize=${5:-}
for tool in cmake pkg-config nm readelf; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

parent=${STEK_TEST_TMPDIR:-${TMPDIR:-/tmp}}
mkdir -p "$parent"
tmp=$(mktemp -d "$parent/packaging.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

san_flags=()
[[ -z $sanitize ]] || san_flags=("-fsanitize=$sanitize")

# ---- install ----------------------------------------------------------------
cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log" >&2; fail "cmake --install $build failed"; }
[[ -f $prefix/include/stek/stek.h ]] || fail "stek/stek.h not installed"
pc=$(find "$prefix" -name stek.pc -path '*/pkgconfig/*')
[[ -n $pc ]] || fail "stek.pc not installed"
libdir=$(dirname "$(dirname "$pc")")
lib=$libdir/libstek.so
[[ -L $lib && -L $lib.0 && -f $(readlink -f "$lib") ]] ||
    fail "libstek.so and its SONAME link libstek.so.0 are not installed in $libdir"
soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[[ $soname == libstek.so.0 ]] || fail "SONAME is '$soname', expected libstek.so.0"
[[ -f $libdir/cmake/stek/stekConfig.cmake && -f $libdir/cmake/stek/stekConfigVersion.cmake ]] ||
    fail "CMake package files not installed under $libdir/cmake/stek"
for bin in stekd stekctl; do
    [[ -x $prefix/bin/$bin ]] || fail "$bin not installed in $prefix/bin"
done

expect='consumer: add_server=STEK_RESULT_OK client_new=STEK_RESULT_CONFIG attach(NULL)=STEK_RESULT_INVALID_ARGUMENT'

# Runs a consumer against the installed libstek and checks that it printed
# the expected line and that the dynamic loader took libstek from $libdir.
run_consumer() {
    local exe=$1 how=$2 out
    local found
    found=$(LD_LIBRARY_PATH=$libdir ldd "$exe" | awk '$1 == "libstek.so.0" { print $3 }')
    [[ $(readlink -f "$found") == $(readlink -f "$lib.0") ]] ||
        fail "$how: the consumer loads libstek from '$found', not from $libdir"
    out=$(LD_LIBRARY_PATH=$libdir "$exe" 2>"$tmp/consumer.err") ||
        { cat "$tmp/consumer.err" >&2; fail "$how: the consumer exited with $?"; }
    [[ $out == "$expect" ]] || fail "$how: the consumer printed '$out', expected '$expect'"
    echo "test_packaging: $how: ok ($out)"
}

# ---- 1. pkg-config ----------------------------------------------------------
export PKG_CONFIG_PATH=$libdir/pkgconfig
got=$(pkg-config --modversion stek) || fail "pkg-config does not find stek.pc in $PKG_CONFIG_PATH"
[[ $got == "$version" ]] || fail "pkg-config --modversion stek is '$got', expected $version"
read -r -a flags <<<"$(pkg-config --cflags --libs stek)" || fail "pkg-config --cflags --libs stek"
# The installed header must build cleanly under strict flags.
"$cc" -std=c11 -Wall -Wextra -Werror "${san_flags[@]}" -o "$tmp/consumer-pc" \
    "$src/consumer.c" "${flags[@]}" 2>"$tmp/cc.log" ||
    { cat "$tmp/cc.log" >&2; fail "cc \$(pkg-config --cflags --libs stek) failed"; }
run_consumer "$tmp/consumer-pc" "pkg-config"

# ---- 2. CMake package -------------------------------------------------------
san_cmake=()
[[ -z $sanitize ]] || san_cmake=("-DCMAKE_C_FLAGS=${san_flags[*]}")
cmake -S "$src" -B "$tmp/consumer-build" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_C_COMPILER="$cc" "${san_cmake[@]}" >"$tmp/cmake.log" 2>&1 ||
    { cat "$tmp/cmake.log" >&2; fail "find_package(stek) project did not configure"; }
cmake --build "$tmp/consumer-build" >"$tmp/cmake-build.log" 2>&1 ||
    { cat "$tmp/cmake-build.log" >&2; fail "find_package(stek) project did not build"; }
run_consumer "$tmp/consumer-build/consumer" "find_package"

# ---- 3. exported symbols ----------------------------------------------------
# Defined dynamic symbols that are not functions of <stek/stek.h>. Sanitizer
# builds add their own runtime hooks; those are the sanitizer's, not ours.
nm -D --defined-only "$lib" >"$tmp/nm.txt" || fail "nm -D $lib failed"
api=$(grep -o 'STEK_API[^;]*' "$(dirname "$(dirname "$src")")/client/include/stek/stek.h" |
    grep -o 'stek_[a-z_]*[(]' | tr -d '(' | sort -u)
exported=$(awk '{ print $NF }' "$tmp/nm.txt" | sed 's/@.*//' | sort -u)
extra=$(comm -23 <(echo "$exported") <(echo "$api"))
if [[ -n $sanitize ]]; then
    extra=$(echo "$extra" | grep -Ev '^(__asan|__ubsan|__sanitizer|__lsan|__tsan|_fini|_init)' || true)
fi
[[ -z $extra ]] || fail "libstek.so exports symbols outside <stek/stek.h>: $(echo $extra)"
missing=$(comm -13 <(echo "$exported") <(echo "$api"))
[[ -z $missing ]] || fail "libstek.so does not export: $(echo $missing)"
echo "test_packaging: exports: ok ($(echo "$api" | wc -l) stek_* functions, nothing else)"
