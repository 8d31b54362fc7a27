# In the VM: the ublk queues' concurrent paths under fio verify while metadata changes
# underneath. Two fio jobs on one device — mixed 4K/64K/1M random writes at QD32 (the
# direct path on the queue rings) and 512-byte random writes (the synchronous path) on
# disjoint halves — while snapshots are created and deleted every second (snapshot
# create syncs; deletes make reclaim free blocks that reads may still be pinning), then
# fio verifies everything it wrote. Afterwards: a snapshot taken mid-run reads the same as
# the volume did at that moment, discard reads back as zeros, `pool check` and `pool
# scrub` are clean, and no request failed. The metrics endpoint counted every request the
# device served (per op, as ublk frontend), none as an error.
source "$(dirname "$0")/lib.sh"
cleanup() { stop_daemon; }
trap cleanup EXIT
modprobe ublk_drv
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size 1G >/dev/null
start_daemon --metrics-listen 127.0.0.1:9850
"$BIN" volume create st --size 256M >/dev/null
dev=$("$BIN" attach st --queues 2 --depth 64)
log "fio verify on $dev with snapshots created and deleted underneath"
fio --output="$T/fio.out" --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --filename="$dev" --randrepeat=0 \
    --name=big --rw=randwrite --bssplit=4k/50:64k/30:1m/20 --iodepth=32 --offset=0 --size=64M \
    --name=small --rw=randwrite --bs=512 --iodepth=8 --offset=128M --size=2M &
fio_pid=$!
i=0
while kill -0 "$fio_pid" 2>/dev/null; do
    i=$((i + 1))
    "$BIN" snapshot create "st@s$i" >/dev/null || fail "snapshot create s$i during fio"
    [ $i -gt 2 ] && { "$BIN" snapshot delete "st@s$((i - 2))" >/dev/null || fail "snapshot delete"; }
    sleep 1
done
wait "$fio_pid" || { cat "$T/fio.out"; fail "fio failed"; }
grep -q "err= 0" "$T/fio.out" || { cat "$T/fio.out"; fail "fio reported errors"; }
[ $i -ge 3 ] || fail "fio ended before any snapshot churn ($i rounds)"
log "fio verified ($i snapshot rounds)"
# A snapshot taken now must keep reading what the volume reads now, while the volume changes.
sync
"$BIN" snapshot create st@final >/dev/null
before=$(head -c $((136 << 20)) "$dev" | sha256sum)
head -c $((4 << 20)) /dev/urandom | dd of="$dev" bs=1M seek=16 oflag=direct status=none
sdev=$("$BIN" attach st@final)
[ "$(head -c $((136 << 20)) "$sdev" | sha256sum)" = "$before" ] || fail "snapshot differs from the volume at snapshot time"
"$BIN" detach "$sdev" >/dev/null
blkdiscard -o $((64 << 20)) -l $((32 << 20)) "$dev"
cmp -n $((32 << 20)) /dev/zero "$dev" --ignore-initial=0:$((64 << 20)) || fail "discarded range not zero"
"$BIN" list --json | python3 -c '
import json, sys
d = json.load(sys.stdin)[0]
assert d["requests_direct"] > 1000 and d["requests_via_api"] > 8000 and d["requests_failed"] == 0, d
print("requests: %d direct, %d via the volume API, 0 failed" % (d["requests_direct"], d["requests_via_api"]))
' || fail "request counters: $("$BIN" list --json)"
"$BIN" list --json >"$T/list.json"
python3 - "$T/list.json" <<'PY' || fail "metrics of the ublk device"
import json, re, sys, urllib.request
d = json.load(open(sys.argv[1]))[0]
text = urllib.request.urlopen("http://127.0.0.1:9850/metrics").read().decode()
def total(name, **want):
    n = 0
    for m in re.finditer(r'^%s\{([^}]*)\} (\S+)$' % name, text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(labels.get(k) == v for k, v in want.items()):
            n += float(m.group(2))
    return n
served = d["requests_direct"] + d["requests_via_api"]
got = total("snapblk_io_requests_total", volume="st", frontend="ublk")
assert got == served, (got, served)
assert total("snapblk_io_errors_total", volume="st", frontend="ublk") == 0
assert total("snapblk_io_requests_total", volume="st", frontend="ublk", op="trim") >= 1
assert total("snapblk_io_bytes_total", volume="st", frontend="ublk", op="write") >= 66 << 20
assert total("snapblk_io_duration_seconds_count", volume="st", frontend="ublk") == served
print("metrics: %d ublk requests counted, as served" % served)
PY
"$BIN" detach st >/dev/null
"$BIN" pool check >"$T/check.out" 2>&1 || { cat "$T/check.out"; fail "pool check"; }
"$BIN" pool scrub >"$T/scrub.out" 2>&1 || { cat "$T/scrub.out"; fail "pool scrub"; }
log "ublk_stress: ok"
