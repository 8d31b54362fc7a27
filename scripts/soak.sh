#!/usr/bin/env bash
# Torture run: N cycles (default 100) of kill -9 of the daemon while fio writes with verify
# state and a libnbd writer keeps QD16 with flushes, while snapshots are created and
# deleted (tests/e2e/crash.sh does one batch of cycles on a fresh pool). Batches of 10
# continue after a failure; prints one summary line:
#   soak: N cycles, W libnbd writes verified, F MiB fio-verified, K failures
# Run as root after building (cargo build --release). Usage: scripts/soak.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
BATCH=10
cycles=0 writes=0 mib=0 failures=0
log=$(mktemp /tmp/snapblk-soak.XXXXXX)
while [ "$cycles" -lt "$N" ]; do
    n=$(( N - cycles < BATCH ? N - cycles : BATCH ))
    if CRASH_CYCLES=$n bash tests/e2e/crash.sh >"$log" 2>&1; then
        done_cycles=$n
    else
        failures=$((failures + 1))
        echo "--- failed batch:" >&2; grep -E 'FAIL|lost|verify' "$log" | tail -10 >&2
        done_cycles=$(grep -c 'cycle [0-9]*: fio verified' "$log")
        done_cycles=$((done_cycles + 1))
    fi
    w=$(grep -o 'verify: [0-9]* acknowledged writes' "$log" | awk '{s += $2} END {print s + 0}')
    m=$(grep -o 'fio verified io=[0-9.]*MiB' "$log" | sed 's/.*io=//; s/MiB//' | awk '{s += $1} END {printf "%d", s}')
    cycles=$((cycles + done_cycles)); writes=$((writes + w)); mib=$((mib + m))
    echo "soak: $cycles/$N cycles so far, $failures failures" >&2
done
rm -f "$log"
echo "soak: $cycles cycles, $writes libnbd writes verified, $mib MiB fio-verified, $failures failures"
[ "$failures" -eq 0 ]
