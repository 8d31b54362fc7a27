#!/usr/bin/env bash
# kill -9 of the daemon at random points of a lazy restore while a client writes (plain,
# FUA, flush): after each restart the same `restore --lazy` resumes it; at the end every
# block the client wrote holds its last acknowledged write (or one sent after it that was
# never acknowledged), every other block holds the backup's data: no acknowledged write
# lost, never zeros or stale data. Also: while the restore is interrupted (daemon
# stopped), direct-mode commands that would see half-restored data are refused; while it
# runs, snapshot/rename are refused by the daemon; once it finishes the volume is released
# (it can be deleted at once) and its state files are gone. While interrupted, its hold
# keeps its backup from `backup prune` and `backup forget`; once finished, prune removes it.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
CYCLES=${LAZY_CRASH_CYCLES:-4}
start_s3
create_pool 2G
start_daemon
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-test/lazy

log "source volume: 192 MiB of random data, backed up"
snapblk volume create src --size 192M >/dev/null
head -c 192M /dev/urandom >"$T/rand"
nbdcopy "$T/rand" "$(uri src)"
rm "$T/rand"
snapblk snapshot create src@s >/dev/null
snapblk repo init "$S3" >/dev/null
snapblk backup src@s --to "$S3" >/dev/null

start_proxy
# Slow enough that the background hydration lasts through every cycle.
fault throttle method=GET path=/packs/ rate=8192

snapblk restore "$S3" src@s --as lz --lazy >/dev/null
snapblk snapshot create lz@x >"$T/e.out" 2>&1 && fail "a snapshot of a volume being restored was taken"
grep -q "being restored lazily\|not whole" "$T/e.out" || { cat "$T/e.out"; fail "unclear refusal"; }
for c in $(seq 1 "$CYCLES"); do
    /usr/bin/python3 "$HERE/lazy_writer.py" write "$(uri lz)" "$T/writes.log" "$c" >>"$T/writer.log" 2>&1 &
    wpid=$!
    sleep "$(python3 -c "import random; print(round(random.uniform(0.5, 2.0), 2))")"
    left=$(snapblk --json restore-status | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r["volume"]=="lz"][0]["cells_remaining"])')
    kill9_daemon
    wait $wpid || fail "the writer failed"
    log "cycle $c: daemon killed with $left cells still to hydrate; $(grep -c '^A' "$T/writes.log") requests acknowledged so far"
    [ "$left" -gt 0 ] || fail "hydration finished before the kill: the cycle proves nothing"
    if [ "$c" = 1 ]; then
        for cmd in "volume rename lz other" "snapshot create lz@x" "volume resize lz --size 200M"; do
            # shellcheck disable=SC2086
            if env -u SNAPBLK_SOCKET "$SNAPBLK_BIN" --socket "$T/none.sock" --meta "$META" --data "$DATA" $cmd >"$T/d.out" 2>&1; then
                fail "direct mode ran '$cmd' on an interrupted lazy restore"
            fi
            grep -q "not whole" "$T/d.out" || { cat "$T/d.out"; fail "unclear refusal of '$cmd' in direct mode"; }
        done
    fi
    start_daemon
    snapblk restore-status | grep -q "interrupted" || fail "the restart does not report the interrupted restore"
    if [ "$c" = 1 ]; then
        # Interrupted, so no lease: its hold keeps src@s from retention and forget.
        snapblk snapshot create src@s2 >/dev/null
        snapblk backup src@s2 --to "$S3" >/dev/null
        snapblk backup prune "$S3" --keep-last 1 --no-gc >"$T/prune.out" 2>&1 || { cat "$T/prune.out"; fail "prune failed"; }
        grep -q "kept src@s (.*held by the lazy restore of lz" "$T/prune.out" || { cat "$T/prune.out"; fail "prune did not keep the held backup"; }
        snapblk backup forget "$S3" src@s >"$T/forget.out" 2>&1 && fail "forget removed a held backup"
        grep -q "held by the lazy restore of lz" "$T/forget.out" || { cat "$T/forget.out"; fail "unclear refusal of forget"; }
    fi
    snapblk restore "$S3" src@s --as lz --lazy >/dev/null || fail "resume failed"
done
fault pass
for _ in $(seq 1 600); do
    [ "$(snapblk --json volume info lz | python3 -c 'import json,sys; print(json.load(sys.stdin).get("incomplete") is None)')" = True ] && break
    sleep 0.1
done
snapblk --json volume info lz | grep -q '"incomplete"' && fail "the restore did not finish"
/usr/bin/python3 "$HERE/lazy_writer.py" verify "$(uri lz)" "$(uri src@s)" "$T/writes.log" || fail "lost or wrong data"
[ -z "$(ls -A "$META/restores" 2>/dev/null)" ] || fail "state files left: $(ls "$META/restores")"
snapblk backup prune "$S3" --keep-last 1 --no-gc >"$T/prune.out" 2>&1 || { cat "$T/prune.out"; fail "prune failed"; }
grep -q "^  - src@s (" "$T/prune.out" || { cat "$T/prune.out"; fail "the finished restore's hold still keeps src@s"; }
for _ in $(seq 1 50); do snapblk volume delete lz >/dev/null 2>&1 && break; sleep 0.1; done
snapblk volume info lz >/dev/null 2>&1 && fail "the finished restore still holds its volume"
assert_check_clean
log "lazy_crash: all checks passed"
