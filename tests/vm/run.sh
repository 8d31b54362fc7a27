#!/usr/bin/env bash
# Runs every real-kernel test in the VM (scripts/vm/run.sh), one boot each, and prints
# "N passed, M failed". VM_TESTS selects tests.
set -u
cd "$(dirname "$0")"
pass=0; failed=0; names=()
for t in ${VM_TESTS:-ublk ublk_recovery ublk_stress ublk_space nbd_kernel systemd}; do
    echo "=== vm: $t"
    start=$(date +%s)
    if bash ../../scripts/vm/run.sh "./$t.sh"; then
        pass=$((pass + 1)); echo "=== vm: $t passed ($(( $(date +%s) - start ))s)"
    else
        failed=$((failed + 1)); names+=("$t"); echo "=== vm: $t FAILED ($(( $(date +%s) - start ))s)"
    fi
done
[ $failed -eq 0 ] || echo "failed: ${names[*]}"
echo "vm: $pass passed, $failed failed"
[ $failed -eq 0 ]
