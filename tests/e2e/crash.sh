#!/usr/bin/env bash
# kill -9 of the daemon during a fio verify workload that issues flushes (and while
# snapshots are being taken and deleted); after each restart every write fio saw complete
# must verify (fio's saved verify state lists them) and `pool check` must be clean.
# CRASH_CYCLES sets the number of cycles (default 10).
source "$(dirname "$0")/lib.sh"

CYCLES=${CRASH_CYCLES:-10}
create_pool 4G
start_daemon
snapblk volume create cv --size 1G >/dev/null
cd "$T"

fio_job() { # extra fio args...
    fio --name=crash --ioengine=nbd --uri="$(uri cv)" --rw=randwrite --bs=4k --iodepth=16 \
        --size=768M --verify=crc32c --randrepeat=1 --randseed="$cycle" "$@"
}

verified_total=0
for cycle in $(seq 1 "$CYCLES"); do
    rm -f ./*.state
    fio_job --do_verify=0 --verify_state_save=1 --fsync=16 >"fio-w$cycle.out" 2>&1 &
    fio_pid=$!
    sleep "0.$((RANDOM % 5 + 3))"
    snapblk snapshot create "cv@c$cycle" >/dev/null
    if [ "$cycle" -gt 2 ]; then snapblk snapshot delete "cv@c$((cycle - 2))" >/dev/null; fi
    sleep "0.$((RANDOM % 9 + 1))"
    kill9_daemon
    wait "$fio_pid" && log "cycle $cycle: fio finished before the kill" || true
    start_daemon
    args=(--verify_only=1 --verify_fatal=1)
    if ls ./*.state >/dev/null 2>&1; then args+=(--verify_state_load=1); fi
    fio_job "${args[@]}" >"fio-v$cycle.out" 2>&1 || { cat "fio-w$cycle.out" "fio-v$cycle.out"; fail "cycle $cycle: verify after kill -9 failed"; }
    grep -q "err= 0" "fio-v$cycle.out" || { cat "fio-v$cycle.out"; fail "cycle $cycle: fio reported errors"; }
    io=$(grep -o 'READ: bw=[^,]*, [^,]*, io=[0-9.]*[KMG]iB' "fio-v$cycle.out" | grep -o 'io=.*' || echo "io=0")
    log "cycle $cycle: verified $io after kill -9"
    verified_total=$((verified_total + 1))
    assert_check_clean
done
log "crash: $verified_total cycles, 0 lost writes"
