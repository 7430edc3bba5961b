#!/usr/bin/env bash
# Installs the Debian packages that one or more sets need:
#   runtime  what the built server loads: zlib, zstd and GnuTLS
#   build    what `swift build` of the server needs: pkg-config and the -dev packages
#   demo     qemu-utils, with which serve.sh makes its demo image
#   test     everything the tests and benchmarks use (the sets above included)
# Usage: scripts/install-deps.sh [--list] SET...     (without a SET: test)
# --list prints the packages, one a line, and installs nothing.
set -euo pipefail

runtime=(zlib1g libzstd1 libgnutls30)
build=(pkg-config zlib1g-dev libzstd-dev libgnutls28-dev)
demo=(qemu-utils)
test=(
    "${runtime[@]}" "${build[@]}" "${demo[@]}"
    libnbd-dev                                       # the tests' libnbd client
    gnutls-bin                                       # certtool and psktool make test credentials
    libnbd-bin python3-libnbd nbdkit fio             # real NBD peers and reference servers
    systemd firewalld                                # unit verification, firewalld service check
    make man-db strace                               # make install test, man page checks, syscalls vs unit sandbox
    libguestfs-tools linux-image-amd64 e2fsprogs     # end to end: virt-df and guestfish over nbd://
    python3 python3-prometheus-client                # parsing the metrics file as Prometheus does
    dpkg-dev binutils lintian                        # building and checking the .deb
)

list=false
if [ "${1:-}" = --list ]; then list=true; shift; fi
[ $# -gt 0 ] || set -- test
packages=()
for set in "$@"; do
    case "$set" in
        runtime) packages+=("${runtime[@]}") ;;
        build) packages+=("${build[@]}") ;;
        demo) packages+=("${demo[@]}") ;;
        test) packages+=("${test[@]}") ;;
        *) echo "install-deps.sh: unknown set '$set' (runtime, build, demo, test)" >&2; exit 64 ;;
    esac
done
if $list; then
    printf '%s\n' "${packages[@]}" | sort -u
    exit 0
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
