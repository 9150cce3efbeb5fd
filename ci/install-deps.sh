#!/usr/bin/env bash
# Install the Debian packages that stek's build, tests and demo need.
#
# The package list lives in ci/packages.txt (one per line, '#' comments).
#
#   ci/install-deps.sh            install whatever is missing (nothing if none is)
#   ci/install-deps.sh --check    exit 0 if all are installed, 1 otherwise; installs nothing
#   ci/install-deps.sh --dry-run  print the commands an install would run; runs nothing
#   ci/install-deps.sh --list     print the package list
#
# Installing needs root: the script runs apt-get directly as root, through
# `sudo -n` when sudo works without a password, and otherwise prints the exact
# apt-get command to run and exits 1. `apt-get update` runs only when
# something is missing.
#
# Environment:
#   STEK_PACKAGES_FILE  another package list (tests of this script use it)
set -euo pipefail

prog=ci/install-deps.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
list=${STEK_PACKAGES_FILE:-$here/packages.txt}

usage() {
    echo "usage: $prog [--check | --dry-run | --list | --help]"
}

mode=install
if [[ $# -gt 1 ]]; then
    usage >&2
    exit 2
fi
case "${1:-}" in
"") ;;
--check) mode=check ;;
--dry-run) mode=dry-run ;;
--list) mode=list ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage >&2
    exit 2
    ;;
esac

if [[ ! -r $list ]]; then
    echo "$prog: cannot read package list $list" >&2
    exit 2
fi

# Strip comments and blanks; accept several names per line.
pkgs=()
while read -r name; do
    if [[ ! $name =~ ^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$ ]]; then
        echo "$prog: bad package name '$name' in $list" >&2
        exit 2
    fi
    pkgs+=("$name")
done < <(awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) print $i }' "$list")

if [[ ${#pkgs[@]} -eq 0 ]]; then
    echo "$prog: $list lists no packages" >&2
    exit 2
fi

if [[ $mode == list ]]; then
    printf '%s\n' "${pkgs[@]}"
    exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "$prog: dpkg-query not found; this script supports Debian 12." >&2
    echo "$prog: install the equivalents of: ${pkgs[*]}" >&2
    exit 1
fi

# A package counts as present only when dpkg says "... ok installed"
# (not half-installed, not config-files only).
find_missing() {
    missing=()
    local p status
    for p in "${pkgs[@]}"; do
        # shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not ours
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        if [[ $status != *" ok installed" ]]; then
            missing+=("$p")
        fi
    done
}

find_missing
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "$prog: all ${#pkgs[@]} packages are installed"
    exit 0
fi

apt_install=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}")

echo "$prog: missing ${#missing[@]} of ${#pkgs[@]} packages: ${missing[*]}" >&2
if [[ $mode == check ]]; then
    exit 1
fi

if [[ $EUID -eq 0 ]]; then
    as_root=(env DEBIAN_FRONTEND=noninteractive)
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as_root=(sudo -n env DEBIAN_FRONTEND=noninteractive)
else
    echo "$prog: installing needs root, and sudo is missing or asks for a password." >&2
    echo "$prog: as root, run:" >&2
    echo "apt-get update && ${apt_install[*]}"
    exit 1
fi

if [[ $mode == dry-run ]]; then
    echo "${as_root[*]} apt-get update -q"
    echo "${as_root[*]} ${apt_install[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
installed_now=("${missing[@]}")
"${as_root[@]}" apt-get update -q
"${as_root[@]}" "${apt_install[@]}"

find_missing
if [[ ${#missing[@]} -ne 0 ]]; then
    echo "$prog: still missing after apt-get install: ${missing[*]}" >&2
    exit 1
fi

# nginx, haproxy and prometheus are here only as programs the tests start on
# loopback ports of their own. Under systemd, Debian starts and enables their
# stock services on install (nginx on port 80, Prometheus on 9090): stop and
# disable those that this run installed. Ones installed before are left alone.
if [[ -d /run/systemd/system ]]; then
    for svc in nginx haproxy prometheus; do
        if [[ " ${installed_now[*]} " == *" $svc "* ]]; then
            "${as_root[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 &&
                echo "$prog: stopped and disabled the $svc service installed for the tests" ||
                echo "$prog: could not stop the $svc service; the tests do not need it" >&2
        fi
    done
fi
echo "$prog: all ${#pkgs[@]} packages are installed"
