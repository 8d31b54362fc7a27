#!/usr/bin/env bash
# The Prometheus endpoint (issue 14, acceptance 3): scraped while fio runs and while a
# backup runs, `promtool check metrics` finds nothing to say, and the counters match the
# I/O this test made (requests, bytes, flushes, errors, the latency histogram's count),
# the jobs it ran (backup, restore) and the pool's state (volumes, snapshots, sizes).
source "$(dirname "$0")/lib.sh"

PROMTOOL=${PROMTOOL:-/var/cache/snapblk/tools/promtool/usr/bin/promtool}
[ -x "$PROMTOOL" ] || PROMTOOL=$(command -v promtool) || fail "promtool not found (scripts/setup.sh fetches it)"
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
REPO=file://$T/repo
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT/metrics
create_pool 1G
DAEMON_EXTRA="--metrics-listen 127.0.0.1:$PORT" start_daemon

scrape() { curl -fsS "$URL" >"$1" || fail "scraping $URL"; }
lint() { # FILE
    "$PROMTOOL" check metrics <"$1" >"$T/lint.out" 2>&1 || { cat "$T/lint.out" "$1" >&2; fail "promtool check metrics: $(head -5 "$T/lint.out")"; }
}
# value FILE NAME [label=value ...]: the one sample of NAME with those labels (0 if none).
value() {
    python3 - "$@" <<'PY'
import re, sys
path, name, want = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
found = []
for line in open(path):
    if line.startswith("#") or not line.strip():
        continue
    m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line.strip())
    if not m or m.group(1) != name:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        found.append(float(m.group(3)))
if len(found) > 1:
    sys.exit(f"{name} {want}: {len(found)} samples")
v = found[0] if found else 0
print(int(v) if v == int(v) else v)
PY
}
expect() { # FILE EXPECTED NAME [labels...]
    local f=$1 want=$2; shift 2
    local got
    got=$(value "$f" "$@")
    [ "$got" = "$want" ] || { grep "^$1" "$f" >&2 || true; fail "$*: $got, expected $want"; }
}

log "an idle daemon: the endpoint answers, promtool finds nothing to say"
snapblk volume create a --size 64M >/dev/null
snapblk volume create b --size 32M >/dev/null
scrape "$T/m0"
lint "$T/m0"
expect "$T/m0" 2 snapblk_pool_volumes
expect "$T/m0" $((64 << 20)) snapblk_volume_size_bytes volume=a
expect "$T/m0" 0 snapblk_io_requests_total
[ "$(value "$T/m0" process_resident_memory_bytes)" -gt $((1 << 20)) ] || fail "process RSS"
[ "$(value "$T/m0" snapblk_pool_capacity_bytes)" -eq "$(snapblk --json pool info | json_get capacity)" ] \
    || fail "pool capacity differs from pool info"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code "http://127.0.0.1:$PORT/")" = 404 ] || fail "/ is not 404"
[ "$(code -X POST "$URL")" = 405 ] || fail "POST is not 405"

log "fio writes 16 MiB in 64 KiB requests and flushes, scraped while it runs"
fio --name=w --ioengine=nbd --uri="$(uri a)" --rw=write --bs=64k --size=16M --iodepth=4 \
    --end_fsync=1 --rate=8m >"$T/fio-w.out" 2>&1 &
FIO=$!
mid=0
for _ in $(seq 1 100); do
    scrape "$T/m1"
    mid=$(value "$T/m1" snapblk_io_requests_total volume=a op=write frontend=nbd)
    [ "$mid" -gt 0 ] && break
    sleep 0.1
done
lint "$T/m1"
[ "$mid" -gt 0 ] && [ "$mid" -lt 256 ] || fail "mid-run scrape saw $mid writes (expected some, not all)"
wait $FIO || { cat "$T/fio-w.out"; fail "fio write"; }
scrape "$T/m2"
lint "$T/m2"
expect "$T/m2" 256 snapblk_io_requests_total volume=a op=write frontend=nbd
expect "$T/m2" $((16 << 20)) snapblk_io_bytes_total volume=a op=write frontend=nbd
expect "$T/m2" 256 snapblk_io_duration_seconds_count volume=a op=write frontend=nbd
expect "$T/m2" 0 snapblk_io_errors_total volume=a op=write frontend=nbd
[ "$(value "$T/m2" snapblk_io_requests_total volume=a op=flush frontend=nbd)" -ge 1 ] || fail "no flush counted"
expect "$T/m2" $((16 << 20)) snapblk_volume_written_bytes volume=a

log "fio reads it back in 128 KiB requests"
fio --name=r --ioengine=nbd --uri="$(uri a)" --rw=read --bs=128k --size=16M --iodepth=4 \
    >"$T/fio-r.out" 2>&1 || { cat "$T/fio-r.out"; fail "fio read"; }
scrape "$T/m3"
expect "$T/m3" 128 snapblk_io_requests_total volume=a op=read frontend=nbd
expect "$T/m3" $((16 << 20)) snapblk_io_bytes_total volume=a op=read frontend=nbd
expect "$T/m3" 256 snapblk_io_requests_total volume=a op=write frontend=nbd

log "errors are counted: a write past the end of a volume"
/usr/bin/python3 - "$NBD_SOCK" <<'PY' || fail "the out-of-range write was not refused"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)  # let the request reach the server
h.connect_uri(f"nbd+unix:///b?socket={sys.argv[1]}")
try:
    h.pwrite(b"x" * 4096, (32 << 20) - 2048)
    sys.exit(1)
except nbd.Error:
    pass
PY
scrape "$T/m4"
lint "$T/m4"
expect "$T/m4" 1 snapblk_io_errors_total volume=b op=write frontend=nbd

log "a backup while fio writes: the job, its upload and the snapshot are counted"
snapblk snapshot create a@s1 >/dev/null
snapblk repo init "$REPO" >/dev/null
fio --name=bg --ioengine=nbd --uri="$(uri a)" --rw=randwrite --bs=4k --size=16M --offset=32M \
    --time_based --runtime=4 --rate=2m >"$T/fio-bg.out" 2>&1 &
FIO=$!
snapblk --json backup a@s1 --to "$REPO" >"$T/backup.json" &
BK=$!
sleep 0.5
scrape "$T/m5"
lint "$T/m5"
wait $BK || fail "backup"
wait $FIO || { cat "$T/fio-bg.out"; fail "background fio"; }
scrape "$T/m6"
lint "$T/m6"
up=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stats"]["bytes_uploaded"])' "$T/backup.json")
[ "$up" -gt 0 ] || fail "the backup uploaded nothing"
expect "$T/m6" 1 snapblk_jobs_total kind=backup outcome=ok
expect "$T/m6" 1 snapblk_job_duration_seconds_count kind=backup
expect "$T/m6" 1 snapblk_backups_created_total "repository=$REPO"
expect "$T/m6" "$up" snapblk_backup_uploaded_bytes_total "repository=$REPO"
expect "$T/m6" 1 snapblk_volume_snapshots volume=a
expect "$T/m6" 1 snapblk_pool_snapshots
bg_writes=$(python3 - "$T/fio-bg.out" <<'PY'
import re, sys
m = re.search(r"issued rwts: total=\d+,(\d+),", open(sys.argv[1]).read())
print(m.group(1))
PY
)
expect "$T/m6" $((256 + bg_writes)) snapblk_io_requests_total volume=a op=write frontend=nbd

log "a full restore is counted; a failed one too"
snapblk --json restore "$REPO" a@s1 --as r >"$T/restore.json"
written=$(json_get bytes_written <"$T/restore.json")
snapblk restore "$REPO" a@nope --as r2 >/dev/null 2>&1 && fail "restoring a missing backup succeeded"
scrape "$T/m7"
lint "$T/m7"
expect "$T/m7" 1 snapblk_jobs_total kind=restore outcome=ok
expect "$T/m7" 1 snapblk_jobs_total kind=restore outcome=failed
expect "$T/m7" "$written" snapblk_restored_bytes_total
expect "$T/m7" 3 snapblk_pool_volumes
expect "$T/m7" 0 snapblk_pool_clones

log "a deleted volume's gauges go; a clone shows in the clone count"
snapblk clone a@s1 c >/dev/null
snapblk volume delete b >/dev/null
scrape "$T/m8"
lint "$T/m8"
expect "$T/m8" 0 snapblk_volume_size_bytes volume=b
expect "$T/m8" $((64 << 20)) snapblk_volume_size_bytes volume=c
expect "$T/m8" 1 snapblk_pool_clones
log "a policy's snapshot job is counted, with the snapshots it took"
snapblk policy set p --volume a --schedule yearly --keep-last 5 >/dev/null
snapblk jobs run snapshot:p >/dev/null
scrape "$T/m9"
lint "$T/m9"
expect "$T/m9" 1 snapblk_jobs_total kind=snapshot outcome=ok
expect "$T/m9" 1 snapblk_policy_snapshots_created_total
expect "$T/m9" 2 snapblk_volume_snapshots volume=a
log "metrics: ok"
