#!/usr/bin/env bash
# Runs the differential test (swiftnbd against qemu-nbd) with fresh random seeds for MINUTES
# (default 30), in batches, and prints the seeds that failed, each with the command that replays it.
#   scripts/soak.sh [MINUTES]        environment: SWIFTNBD_DIFF_OPS (default 600), BATCH (default 8)
# DIFF-FAIL seeds are swiftnbd's faults (the run fails); QEMU-FAULT seeds are runs where qemu-nbd
# lost a write or corrupted its own image while swiftnbd kept what was written (listed, not failed).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
ops=${SWIFTNBD_DIFF_OPS:-600}
batch=${BATCH:-8}
logs=$(mktemp -d /tmp/swiftnbd-soak.XXXXXX)

swift build --build-tests
deadline=$(( $(date +%s) + minutes * 60 ))
runs=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    # 48-bit seeds: plenty of room, and short enough to type back.
    seeds=$(for _ in $(seq "$batch"); do od -An -N6 -tu8 /dev/urandom | tr -d ' '; done | paste -sd, -)
    runs=$((runs + 1))
    SWIFTNBD_DIFF_SEEDS=$seeds SWIFTNBD_DIFF_OPS=$ops SWIFTNBD_DIFF_LOG=$logs \
        swift test --skip-build --filter 'DifferentialTests.swiftnbdMatchesQemuNBD' >"$logs/batch-$runs.txt" 2>&1 || true
    # A batch that failed without naming a seed (a build or harness problem) must not pass quietly.
    if ! grep -qE 'passed after|DIFF-FAIL|QEMU-FAULT' "$logs/batch-$runs.txt"; then
        echo "batch $runs ($seeds) ended without a result; see $logs/batch-$runs.txt" >&2
    fi
    echo "batch $runs: seeds $seeds"
done

fails=$(grep -ohE 'DIFF-FAIL seed=[0-9]+' "$logs"/batch-*.txt | sort -u | cut -d= -f2 || true)
qemu=$(grep -ohE 'QEMU-FAULT seed=[0-9]+' "$logs"/batch-*.txt | sort -u | cut -d= -f2 || true)
echo "$runs batches of $batch seeds, $ops operations each; logs in $logs"
for seed in $qemu; do echo "qemu-nbd fault (not swiftnbd's): seed $seed"; done
if [ -z "$fails" ]; then
    echo "no swiftnbd failures"
    exit 0
fi
for seed in $fails; do
    echo "FAILED seed $seed: SWIFTNBD_DIFF_SEEDS=$seed SWIFTNBD_DIFF_OPS=$ops swift test --filter DifferentialTests"
    grep -h -A2 "DIFF-FAIL seed=$seed:" "$logs"/batch-*.txt | head -3
done
exit 1
