#!/usr/bin/env bash
# Backup and restore throughput against a local S3-compatible server (s3s-fs on loopback),
# compared in the same run with `aws s3 cp` of the same raw image to and from the same
# server; incremental bytes uploaded vs bytes changed; time from `restore --lazy` to the
# first successful read. Prints a table and ratios.
# Usage: benches/backup_s3.sh [SIZE_MIB=4096]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-4096}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/snapblk/target}
BIN=$CARGO_TARGET_DIR/release/snapblk
S3S=/var/cache/snapblk/tools/bin/s3s-fs
[ -x "$BIN" ] || { echo "build snapblk first (cargo build --release)" >&2; exit 2; }
[ -x "$S3S" ] || { echo "s3s-fs missing: run scripts/setup.sh" >&2; exit 2; }
W=$(mktemp -d /var/tmp/snapblk-bbench.XXXXXX)
export SNAPBLK_SOCKET=$W/control.sock
PIDS=()
# Runs under set -e: no step may fail, or the rest of the cleanup is skipped.
cleanup() { set +e; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; pkill -f "$W/" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_EC2_METADATA_DISABLED=true AWS_DEFAULT_REGION=us-east-1
mkdir -p "$W/s3"
"$S3S" --host 127.0.0.1 --port 9515 --access-key bench --secret-key bench-secret "$W/s3" >"$W/s3.log" 2>&1 &
PIDS+=($!)
export SNAPBLK_S3_ENDPOINT=http://127.0.0.1:9515
aws_() { aws --endpoint-url "$SNAPBLK_S3_ENDPOINT" "$@"; }
head -c 32 /dev/urandom >"$W/key"; export SNAPBLK_KEY_FILE=$W/key
"$BIN" pool create --meta "$W/meta" --data "$W/data.img" --size $((SIZE_MIB * 4))M >/dev/null
"$BIN" daemon --meta "$W/meta" --data "$W/data.img" --nbd-socket "$W/nbd.sock" --nbd-tcp none 2>"$W/daemon.log" &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$W/nbd.sock" ] && [ -S "$SNAPBLK_SOCKET" ] && break; sleep 0.05; done
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mbs() { python3 -c "print(f'{$1 / ($3 - $2) / 1048576:.1f}')"; }

echo "preparing a ${SIZE_MIB} MiB volume of random (incompressible) data..."
head -c "${SIZE_MIB}M" /dev/urandom >"$W/image.raw"
"$BIN" volume create v --size "${SIZE_MIB}M" >/dev/null
nbdcopy "$W/image.raw" "nbd+unix:///v?socket=$W/nbd.sock"
"$BIN" snapshot create v@full >/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true

aws_ s3 mb s3://raw >/dev/null
t0=$(now); aws_ s3 cp --quiet "$W/image.raw" s3://raw/image.raw; t1=$(now)
aws_up=$(mbs $((SIZE_MIB << 20)) "$t0" "$t1")
rm "$W/image.raw"
t0=$(now); aws_ s3 cp --quiet s3://raw/image.raw "$W/down.raw"; t1=$(now)
aws_down=$(mbs $((SIZE_MIB << 20)) "$t0" "$t1")
rm "$W/down.raw"; aws_ s3 rm --quiet s3://raw/image.raw

"$BIN" repo init s3://bench/repo >/dev/null
t0=$(now); "$BIN" --json backup v@full --to s3://bench/repo >"$W/full.json"; t1=$(now)
sb_up=$(mbs $((SIZE_MIB << 20)) "$t0" "$t1")
t0=$(now); "$BIN" restore s3://bench/repo v@full --as r >/dev/null; t1=$(now)
sb_down=$(mbs $((SIZE_MIB << 20)) "$t0" "$t1")
qemu-img compare -q -f raw -F raw "nbd+unix:///v@full?socket=$W/nbd.sock" "nbd+unix:///r?socket=$W/nbd.sock" || { echo "restore differs!" >&2; exit 1; }
"$BIN" volume delete r >/dev/null

# 1% changed in 64 KiB writes (a filesystem's extents), then 0.1% in scattered 4 KiB writes.
/usr/bin/python3 tests/e2e/nbd_write_random.py "nbd+unix:///v?socket=$W/nbd.sock" $((SIZE_MIB * 16 / 100)) 65536
"$BIN" snapshot create v@inc1 >/dev/null
ch1=$("$BIN" --json diff v@full v@inc1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["changed_bytes"])')
"$BIN" --json backup v@inc1 --to s3://bench/repo >"$W/inc1.json"
up1=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["bytes_uploaded"])' <"$W/inc1.json")
/usr/bin/python3 tests/e2e/nbd_write_random.py "nbd+unix:///v?socket=$W/nbd.sock" $((SIZE_MIB * 256 / 1000)) 4096
"$BIN" snapshot create v@inc2 >/dev/null
ch2=$("$BIN" --json diff v@inc1 v@inc2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["changed_bytes"])')
"$BIN" --json backup v@inc2 --to s3://bench/repo >"$W/inc2.json"
up2=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["bytes_uploaded"])' <"$W/inc2.json")

# Lazy restore: from the command to the first 4 KiB read that returns data.
t0=$(now)
"$BIN" restore s3://bench/repo v@inc2 --as lz --lazy >/dev/null
/usr/bin/python3 -c "
import nbd, sys
h = nbd.NBD(); h.connect_uri('nbd+unix:///lz?socket=$W/nbd.sock')
h.pread(4096, $(( (SIZE_MIB / 2) << 20 )))
"
t1=$(now)
lazy_first=$(secs "$t0" "$t1")
for _ in $(seq 1200); do
    "$BIN" --json restore-status | grep -q '"complete": true' && break; sleep 0.5
done
t2=$(now)
lazy_all=$(mbs $((SIZE_MIB << 20)) "$t0" "$t2")
qemu-img compare -q -f raw -F raw "nbd+unix:///v@inc2?socket=$W/nbd.sock" "nbd+unix:///lz?socket=$W/nbd.sock" || { echo "lazy restore differs!" >&2; exit 1; }

echo
echo "== backup/restore of a ${SIZE_MIB} MiB random image, local s3s-fs (same run)"
printf '%-28s %10s %10s %8s\n' "" "snapblk" "aws s3 cp" "ratio"
printf '%-28s %7s MB/s %7s MB/s %7sx\n' "full backup (upload)" "$sb_up" "$aws_up" "$(python3 -c "print(f'{$sb_up/$aws_up:.2f}')")"
printf '%-28s %7s MB/s %7s MB/s %7sx\n' "full restore (download)" "$sb_down" "$aws_down" "$(python3 -c "print(f'{$sb_down/$aws_down:.2f}')")"
echo "incremental, 1% in 64 KiB writes: changed $ch1 B, uploaded $up1 B ($(python3 -c "print(f'{$up1/$ch1:.3f}')")x)"
echo "incremental, 0.1% in 4 KiB writes: changed $ch2 B, uploaded $up2 B ($(python3 -c "print(f'{$up2/$ch2:.3f}')")x; 64 KiB chunks)"
echo "restore --lazy to first read: ${lazy_first} s; fully hydrated at ${lazy_all} MB/s"
