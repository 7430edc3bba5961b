#!/usr/bin/env bash
# The fuzz tier: builds every libFuzzer target under fuzz/ with AddressSanitizer
# and runs each for SECONDS (default 60) from its committed seed corpus.
# Exits non-zero on any crash, leak, timeout or out-of-memory; the input that
# caused it is left in fuzz/findings/<target>/ (crash-*, leak-*, timeout-*, oom-*).
# New coverage found goes to .build-fuzz/corpus/<target>/, not to the committed seeds.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Replay one reproducer: .build-fuzz/release/<Target> fuzz/findings/<Target>/crash-…
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(FuzzNegotiation FuzzTransmission FuzzQCOW2Metadata FuzzDecompression FuzzQCOW2Engine)

# Own scratch path: the instrumented objects must not mix with the normal build.
# -enable-testing lets the targets reach the internal parsers by @testable import;
# lld because gold crashes (dwarf_reader.cc internal error) linking the instrumented objects.
build=(swift build -c release --scratch-path .build-fuzz
       -Xswiftc -sanitize=fuzzer,address -Xswiftc -enable-testing
       -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld)
export SWIFTNBD_FUZZ=1
for t in "${targets[@]}"; do
    "${build[@]}" --product "$t" || { echo "fuzz.sh: building $t failed" >&2; exit 2; }
done

failed=()
for t in "${targets[@]}"; do
    corpus=.build-fuzz/corpus/$t findings=fuzz/findings/$t
    mkdir -p "$corpus" "$findings"
    # -timeout: one input running this long is a hang. -rss_limit_mb and
    # -malloc_limit_mb: a parser must not allocate what the input merely claims.
    .build-fuzz/release/"$t" "$corpus" "fuzz/corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -artifact_prefix="$findings/" -print_final_stats=1 >".build-fuzz/$t.log" 2>&1
    status=$?
    # The figures the closing notes quote: speed, executions, coverage, corpus.
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec)' ".build-fuzz/$t.log" \
        | sed "s/^/$t: /"
    echo "$t: corpus $(find "$corpus" -type f | wc -l) files, $(du -sb "$corpus" | cut -f1) bytes (seeds not counted)"
    if [ "$status" -ne 0 ]; then
        # What failed (a check's message, a sanitizer's verdict), then the end of the log.
        grep -m 5 -E 'Fatal error|==[0-9]+==ERROR|^SUMMARY|^ERROR: libFuzzer' ".build-fuzz/$t.log" >&2
        tail -n 40 ".build-fuzz/$t.log" >&2
        echo "fuzz.sh: $t failed (exit $status); reproducer in $findings/, log in .build-fuzz/$t.log" >&2
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: all ${#targets[@]} targets ran ${seconds}s each without a finding"
