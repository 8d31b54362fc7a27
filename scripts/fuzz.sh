#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 30), starting
# from the committed seeds (fuzz/corpus/<target>); exits non-zero on the first crash, leak
# or timeout, naming the reproducer. Uses the one stable toolchain (RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its -Z flags: sanitizer coverage, AddressSanitizer).
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}; shift || true
export PATH=/var/cache/snapblk/tools/bin:$PATH
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/snapblk/fuzz-target}
export RUSTC_BOOTSTRAP=1
export LSAN_OPTIONS=suppressions=$PWD/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz not found (run scripts/setup.sh)" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(nbd control repo_objects metadata calendar)
cargo fuzz build --fuzz-dir fuzz 2>&1 | tail -1
work=$(mktemp -d /tmp/snapblk-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "$work/artifacts/$t"
    log=$work/$t.log
    if cargo fuzz run --fuzz-dir fuzz "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 \
        -artifact_prefix="$work/artifacts/$t/" >"$log" 2>&1; then
        echo "fuzz $t: $(grep -E '^Done [0-9]+ runs' "$log" | head -1), 0 crashes"
    else
        status=1
        echo "fuzz $t: FAILED" >&2
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -10 >&2 || tail -30 "$log" >&2
        mkdir -p fuzz/artifacts/"$t" && cp "$work/artifacts/$t/"* fuzz/artifacts/"$t"/ 2>/dev/null || true
        echo "reproducer(s) copied to fuzz/artifacts/$t/" >&2
    fi
done
exit $status
