#!/usr/bin/env bash
# Serves an image on TCP port 10809, like `qemu-nbd -t IMAGE`.
# Usage: scripts/serve.sh [IMAGE [swiftnbd options...]]
# Without IMAGE, a 1 GiB qcow2 demo image (demo.qcow2) is made first.
# Installs only what building and serving need (and qemu-utils for the demo image).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-}
[ $# -gt 0 ] && shift
sets=(runtime build)
[ -z "$image" ] && [ ! -e demo.qcow2 ] && sets+=(demo)
if [ "$(id -u)" = 0 ]; then scripts/install-deps.sh "${sets[@]}"; else sudo scripts/install-deps.sh "${sets[@]}"; fi
swift build -c release --product swiftnbd
if [ -z "$image" ]; then
    image=demo.qcow2
    if [ ! -e "$image" ]; then
        qemu-img create -q -f qcow2 "$image" 1G
        qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' -c 'write -P 0xa5 512M 1M' "$image" >/dev/null
        echo "made $image (1 GiB qcow2 with some data)"
    fi
fi
echo "serving $image on port 10809; try: nbdinfo nbd://localhost"
exec .build/release/swiftnbd -t -v "$@" "$image"
