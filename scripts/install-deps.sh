#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the benchmarks use.
set -euo pipefail
packages=(
    pkg-config zlib1g-dev libzstd-dev libnbd-dev    # build
    libgnutls28-dev gnutls-bin                       # TLS; certtool and psktool make test credentials
    qemu-utils libnbd-bin python3-libnbd nbdkit fio # real NBD peers and reference servers
    systemd firewalld                                # unit verification, firewalld service check
    make man-db strace                               # make install test, man page checks, syscalls vs unit sandbox
    libguestfs-tools linux-image-amd64 e2fsprogs     # end to end: virt-df and guestfish over nbd://
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
