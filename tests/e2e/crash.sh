#!/usr/bin/env bash
# kill -9 of the daemon during write workloads that issue flushes, while snapshots are
# taken and deleted; after every restart the writes must verify and `pool check` must be
# clean. Each cycle runs two workloads:
#  1. fio (nbd engine, 4K random writes at QD16, a flush every 16 writes, crc32c verify
#     headers); fio's trigger saves its verify state (which writes completed) and then runs
#     `kill -9` on the daemon; after the restart fio verifies every completed write.
#  2. crash_writer.py (libnbd, QD16, a flush every 32 writes), killed at a random moment
#     with writes in flight; every write acknowledged before the last completed flush, and
#     in fact every acknowledged write, must read back.
# Restarts rotate the daemon through its data_cache modes: the default ("reads": writes
# O_DIRECT, reads through the host page cache), "host" (writes through the page cache too)
# with --snapshot-cache 0, and "none" (O_DIRECT both ways): acknowledged writes in the page
# cache outlive a kill -9 too, a read never sees a stale cached block, and a pool moves
# between the modes.
# CRASH_CYCLES sets the number of cycles (default 10).
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"

CYCLES=${CRASH_CYCLES:-10}
create_pool 4G
start_daemon
snapblk volume create cv --size 1G >/dev/null
snapblk volume create cw --size 256M >/dev/null
cd "$T"

fio_job() {
    fio --name=crash --ioengine=nbd --uri="$(uri cv)" --rw=randwrite --bs=4k --iodepth=16 \
        --size=768M --verify=crc32c --randrepeat=1 --randseed="$cycle" "$@"
}

# Starts the daemon in mode N % 3 (0: the defaults, 1: host page cache without the
# snapshot content cache, 2: O_DIRECT); checks in its log that the mode was taken.
MODES=(reads host none)
# (Where the file system refuses O_DIRECT every mode is buffered, and the log says so.)
mode_starts() { grep -c -e "(data_cache = \"$1\")" -e "O_DIRECT not supported here" "$T/daemon.log" || true; }
start_in_mode() {
    local mode=${MODES[$(($1 % 3))]} before
    before=$(mode_starts "$mode")
    case $mode in
        reads) DAEMON_EXTRA= ;;
        host) DAEMON_EXTRA="--data-cache host --snapshot-cache 0" ;;
        none) DAEMON_EXTRA="--data-cache none" ;;
    esac
    start_daemon
    if [ "$(mode_starts "$mode")" -le "$before" ]; then
        fail "start $1: the daemon did not run with data_cache = $mode"
    fi
}

writes=0
for cycle in $(seq 1 "$CYCLES"); do
    # 1. fio with a kill -9 trigger.
    rm -f ./*.state
    (sleep 0.4; snapblk snapshot create "cv@c$cycle" >/dev/null
     if [ "$cycle" -gt 2 ]; then snapblk snapshot delete "cv@c$((cycle - 2))" >/dev/null; fi) &
    snap_pid=$!
    fio_job --do_verify=0 --verify_state_save=1 --fsync=16 \
        --trigger-timeout="$((RANDOM % 2 + 1))" --trigger="kill -9 $DAEMON_PID" >"fio-w$cycle.out" 2>&1 || true
    wait "$snap_pid" || true
    wait "$DAEMON_PID" 2>/dev/null || true
    kill -0 "$DAEMON_PID" 2>/dev/null && fail "cycle $cycle: the fio trigger did not kill the daemon"
    DAEMON_PID=
    start_in_mode "$cycle"
    ls ./*.state >/dev/null 2>&1 || fail "cycle $cycle: fio saved no verify state"
    fio_job --verify_only=1 --verify_state_load=1 --verify_fatal=1 >"fio-v$cycle.out" 2>&1 ||
        { grep -E "err=|verify|io=" "fio-w$cycle.out" "fio-v$cycle.out" | head -20; fail "cycle $cycle: fio verify after kill -9 failed"; }
    io=$(grep -o 'io=[0-9.]*[KMG]iB' "fio-v$cycle.out" | head -1)
    assert_check_clean

    # 2. libnbd writer killed at a random moment.
    /usr/bin/python3 "$HERE/crash_writer.py" write "$(uri cw)" "cw$cycle.log" "$cycle" >"cw$cycle.out" 2>&1 &
    writer=$!
    # The kill comes a random moment after the writer is connected (it creates its log
    # once connected; on a loaded machine starting Python can take longer than the delay).
    for _ in $(seq 1 200); do [ -e "cw$cycle.log" ] && break; sleep 0.05; done
    [ -e "cw$cycle.log" ] || { cat "cw$cycle.out"; fail "cycle $cycle: the writer did not connect"; }
    sleep "0.$((RANDOM % 9 + 1))"
    kill9_daemon
    wait "$writer" || true
    start_in_mode "$((cycle + 1))"
    /usr/bin/python3 "$HERE/crash_writer.py" verify "$(uri cw)" "cw$cycle.log" 0 >"cw$cycle.verify" 2>&1 ||
        { cat "cw$cycle.out" "cw$cycle.verify"; fail "cycle $cycle: acknowledged writes lost after kill -9"; }
    assert_check_clean
    n=$(grep -c '^W' "cw$cycle.log" || true)
    writes=$((writes + n))
    log "cycle $cycle: fio verified $io; $(tail -1 "cw$cycle.verify")"
done
log "crash: $CYCLES cycles, $writes acknowledged libnbd writes checked, 0 lost"
