#!/usr/bin/env bash
# Runs every end-to-end test (they need root: loop devices, mounts, FUSE) and prints
# "N passed, M failed".
set -u
cd "$(dirname "$0")"
pass=0; failed=0; names=()
for t in ${E2E_TESTS:-nbd_clients nbd_tls nbd_access bad_input cli_docs package systemd_notify logs metrics policies policy_backups mount space filesystems backup lowmem lazy_crash s3_faults s3_credentials s3_moto crash}; do
    echo "=== e2e: $t"
    start=$(date +%s)
    if bash "./$t.sh"; then
        pass=$((pass + 1)); echo "=== e2e: $t passed ($(( $(date +%s) - start ))s)"
    else
        failed=$((failed + 1)); names+=("$t"); echo "=== e2e: $t FAILED ($(( $(date +%s) - start ))s)"
    fi
done
[ $failed -eq 0 ] || echo "failed: ${names[*]}"
echo "e2e: $pass passed, $failed failed"
[ $failed -eq 0 ]
