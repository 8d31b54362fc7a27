#!/usr/bin/env bash
# Backup jobs on a host with little memory: the daemon and every CLI call run under an
# address-space limit (ulimit -v, LOWMEM_LIMIT_KIB) far below the 10 GiB that reading a
# manifest table once allocated up front, which aborted every restore, verify, gc and
# incremental backup (and the daemon with them). Full backup, incremental backup, list,
# verify --read-data, full restore, lazy restore, prune + gc and a direct-mode restore (no
# daemon) all complete and the daemon keeps serving. Then a full restore cut by kill -9
# leaves a volume that says it is incomplete, never one that passes for a good copy.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
# Address space of the daemon at rest is ~0.5 GiB (thread stacks, malloc arenas, RocksDB,
# io_uring rings); jobs must fit in what is left.
LIMIT=${LOWMEM_LIMIT_KIB:-1048576}
export MALLOC_ARENA_MAX=4
start_s3
create_pool 2G

limited() { (ulimit -v "$LIMIT"; exec "$SNAPBLK_BIN" "$@"); }
export DAEMON_ULIMIT_KIB=$LIMIT
alive() { kill -0 "$DAEMON_PID" 2>/dev/null || fail "the daemon died ($1)"; }
same() { qemu-img compare -q -f raw -F raw "$(uri "$1")" "$(uri "$2")" || fail "$2 differs from $1"; }
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

start_daemon
log "daemon at rest: $(awk '/VmSize/ {print $2, $3}' /proc/$DAEMON_PID/status) of ${LIMIT} kB allowed"
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-test/lowmem

log "volume: 192 MiB of random data, snapshot, 5% changed, snapshot"
snapblk volume create v --size 256M >/dev/null
head -c 192M /dev/urandom >"$T/rand"
nbdcopy "$T/rand" "$(uri v)"
rm "$T/rand"
snapblk snapshot create v@a >/dev/null
/usr/bin/python3 "$HERE/nbd_write_random.py" "$(uri v)" 200 65536
snapblk snapshot create v@b >/dev/null

log "every backup job under a ${LIMIT} kB address-space limit"
limited repo init "$S3" >/dev/null || fail "repo init"
limited backup v@a --to "$S3" >/dev/null || fail "full backup"
limited --json backup v@b --to "$S3" >"$T/b.json" || fail "incremental backup"
[ "$(jq_ 'v["base"]' <"$T/b.json")" != None ] || fail "second backup is not incremental"
alive "backup"
limited backup list "$S3" >/dev/null || fail "backup list"
limited backup verify "$S3" --read-data >"$T/verify.out" 2>&1 || { cat "$T/verify.out"; fail "verify"; }
alive "verify"
limited restore "$S3" v@b --as rb >"$T/restore.out" 2>&1 || { cat "$T/restore.out"; fail "full restore"; }
alive "full restore"
same v@b rb
[ "$(snapblk --json volume info rb | jq_ 'v.get("incomplete")')" = None ] || fail "a finished restore is marked incomplete"
limited restore "$S3" v@a --as lz --lazy >/dev/null || fail "lazy restore"
for _ in $(seq 1 600); do
    [ "$(snapblk --json restore-status | jq_ '[r for r in v if r["volume"]=="lz"][0]["complete"]')" = True ] && break
    alive "lazy restore"
    sleep 0.1
done
snapblk --json restore-status | jq_ '[r for r in v if r["volume"]=="lz"][0]["complete"]' | grep -q True ||
    fail "lazy restore did not complete: $(snapblk restore-status)"
same v@a lz
limited backup prune "$S3" --keep-last 1 --grace 0 --max-unused 0 >/dev/null || fail "prune + gc"
alive "prune + gc"
limited backup verify "$S3" >/dev/null || fail "verify after gc"

log "direct mode (no daemon): restore in the CLI process under the same limit"
stop_daemon
limited restore "$S3" v@b --as rb2 --meta "$META" --data "$DATA" >"$T/direct.out" 2>&1 ||
    { cat "$T/direct.out"; fail "direct-mode restore"; }
start_daemon
same v@b rb2

log "a full restore killed midway leaves a volume marked incomplete"
start_proxy
fault throttle method=GET path=/packs/ rate=4096
snapblk restore "$S3" v@b --as cut >"$T/cut.out" 2>&1 &
rpid=$!
for _ in $(seq 1 600); do
    w=$(snapblk --json volume info cut 2>/dev/null | json_get written 2>/dev/null || echo 0)
    [ "$w" -gt 0 ] && break
    sleep 0.05
done
[ "$w" -gt 0 ] || { cat "$T/cut.out"; fail "the throttled restore wrote nothing"; }
kill9_daemon
wait $rpid 2>/dev/null || true
fault pass
start_daemon
snapblk --json volume info cut >"$T/cut.json"
grep -q '"incomplete"' "$T/cut.json" || { cat "$T/cut.json"; fail "the interrupted restore's volume is not marked incomplete"; }
grep -q "v@b" "$T/cut.json" || fail "the mark does not name the backup"
snapblk volume info cut | grep -q "^incomplete" || fail "volume info does not show the mark"
snapblk volume list | awk '$1 == "cut" {print $NF}' | grep -qx incomplete || fail "volume list does not show the state"
snapblk volume list | awk '$1 == "rb" {print $NF}' | grep -qx ok || fail "volume list: a good volume is not ok"
snapblk volume delete cut >/dev/null
limited restore "$S3" v@b --as cut >/dev/null || fail "restore again after deleting the incomplete volume"
same v@b cut
alive "the end"
assert_check_clean
log "lowmem: all checks passed"
