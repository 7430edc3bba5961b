#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, builds, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
    scripts/install-deps.sh test
else
    sudo scripts/install-deps.sh test
fi
swift build
swift test "$@"
