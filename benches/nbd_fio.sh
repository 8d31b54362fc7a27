#!/usr/bin/env bash
# fio (nbd engine) against snapblk and peers in one run: the data file system itself (fio's
# io_uring engine with O_DIRECT, no NBD: what snapblk's data device can do at best),
# nbdkit's file plugin on a raw file (it reads through the page cache),
# qemu-nbd on a qcow2 image with an internal snapshot, snapblk (default data_cache "reads":
# writes O_DIRECT, reads through the host page cache) on a fresh volume and on a volume
# with 10 snapshots fully overwritten after the last one — then both again with the
# daemon's data I/O all O_DIRECT (--data-cache none) and all through the host page cache
# (--data-cache host: like nbdkit's file plugin). Prints IOPS / MB/s and ratios, then
# snapshot-create latency with 1 GiB and 20 GiB written (default daemon).
# Usage: benches/nbd_fio.sh [SIZE_MIB=2048] [RUNTIME_S=15]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
RUNTIME=${2:-15}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/snapblk/target}
BIN=$CARGO_TARGET_DIR/release/snapblk
[ -x "$BIN" ] || cargo build --release --bin snapblk
W=$(mktemp -d /var/tmp/snapblk-bench.XXXXXX)
export SNAPBLK_SOCKET=$W/control.sock
PIDS=()
# Runs under set -e: no step may fail, or the rest of the cleanup is skipped.
cleanup() { set +e; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; pkill -f "$W/" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

JOBS=("randwrite 4k 32" "randread 4k 32" "write 1M 8" "read 1M 8")
declare -A R
run_fio() { # LABEL URI (or "direct:FILE": fio's io_uring engine, O_DIRECT, on FILE)
    local label=$1 uri=$2 target
    if [[ $uri == direct:* ]]; then
        target=(--ioengine=io_uring --direct=1 --filename="${uri#direct:}")
    else
        target=(--ioengine=nbd --uri="$uri")
    fi
    for j in "${JOBS[@]}"; do
        set -- $j
        local out
        fio --name=b "${target[@]}" --rw="$1" --bs="$2" --iodepth="$3" \
            --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time=2 --group_reporting \
            --output-format=json --output="$W/fio.json" >/dev/null 2>&1
        out=$(cat "$W/fio.json")
        local v
        if [ "$2" = 4k ]; then
            v=$(python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["write"]["iops"]+j["read"]["iops"]))' <<<"$out")
        else
            v=$(python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int((j["write"]["bw_bytes"]+j["read"]["bw_bytes"])/1e6))' <<<"$out")
        fi
        R["$label|$1 $2"]=$v
        echo "  $label $1 $2: $v" >&2
    done
}

fill() { # URI: write every byte once (so reads hit data)
    fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 --size="${SIZE_MIB}M" >/dev/null
}

echo "== the data file system itself: fio io_uring, O_DIRECT (what snapblk's data device does)" >&2
truncate -s "${SIZE_MIB}M" "$W/direct.img"
fio --name=fill --ioengine=io_uring --direct=1 --filename="$W/direct.img" --rw=write --bs=1M --iodepth=8 \
    --size="${SIZE_MIB}M" >/dev/null
run_fio direct "direct:$W/direct.img"
rm -f "$W/direct.img"

echo "== nbdkit file" >&2
truncate -s "${SIZE_MIB}M" "$W/raw.img"
nbdkit -f -U "$W/nbdkit.sock" file "$W/raw.img" cache=none 2>/dev/null & PIDS+=($!)
wait_sock "$W/nbdkit.sock"
fill "nbd+unix:///?socket=$W/nbdkit.sock"
run_fio nbdkit "nbd+unix:///?socket=$W/nbdkit.sock"

echo "== qemu-nbd qcow2 after an internal snapshot" >&2
qemu-img create -q -f qcow2 "$W/q.qcow2" "${SIZE_MIB}M"
qemu-nbd -f qcow2 -k "$W/qemu.sock" -x q --cache=none --aio=native -t "$W/q.qcow2" 2>/dev/null & PIDS+=($!)
wait_sock "$W/qemu.sock"
fill "nbd+unix:///q?socket=$W/qemu.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; rm -f "$W/qemu.sock"
qemu-img snapshot -c snap1 "$W/q.qcow2"
qemu-nbd -f qcow2 -k "$W/qemu.sock" -x q --cache=none --aio=native -t "$W/q.qcow2" 2>/dev/null & PIDS+=($!)
wait_sock "$W/qemu.sock"
run_fio qemu-qcow2-snap "nbd+unix:///q?socket=$W/qemu.sock"

echo "== snapblk" >&2
"$BIN" pool create --meta "$W/meta" --data "$W/data.img" --size "$((SIZE_MIB * 16 + 24576))M" >/dev/null
"$BIN" daemon --meta "$W/meta" --data "$W/data.img" --nbd-socket "$W/snapblk.sock" --nbd-tcp none 2>"$W/daemon.log" & PIDS+=($!)
wait_sock "$W/snapblk.sock"; wait_sock "$SNAPBLK_SOCKET"
"$BIN" volume create fresh --size "${SIZE_MIB}M" >/dev/null
fill "nbd+unix:///fresh?socket=$W/snapblk.sock"
run_fio snapblk "nbd+unix:///fresh?socket=$W/snapblk.sock"
"$BIN" volume create snapped --size "${SIZE_MIB}M" >/dev/null
for i in $(seq 1 10); do
    fio --name=o --ioengine=nbd --uri="nbd+unix:///snapped?socket=$W/snapblk.sock" --rw=randwrite --bs=64k \
        --iodepth=8 --size="${SIZE_MIB}M" --io_size=$((SIZE_MIB / 10))M >/dev/null
    "$BIN" snapshot create "snapped@s$i" >/dev/null
done
fill "nbd+unix:///snapped?socket=$W/snapblk.sock"
run_fio snapblk-10snaps "nbd+unix:///snapped?socket=$W/snapblk.sock"

snapblk_daemon() { # [daemon flags...]: restarts the daemon on the same pool
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
    rm -f "$W/snapblk.sock" "$SNAPBLK_SOCKET"
    "$BIN" daemon --meta "$W/meta" --data "$W/data.img" --nbd-socket "$W/snapblk.sock" --nbd-tcp none "$@" 2>>"$W/daemon.log" & PIDS+=($!)
    wait_sock "$W/snapblk.sock"; wait_sock "$SNAPBLK_SOCKET"
}
echo "== snapblk, data I/O all O_DIRECT (--data-cache none)" >&2
snapblk_daemon --data-cache none
run_fio snapblk-none "nbd+unix:///fresh?socket=$W/snapblk.sock"
run_fio snapblk-10snaps-none "nbd+unix:///snapped?socket=$W/snapblk.sock"
echo "== snapblk, data I/O all through the host page cache (--data-cache host)" >&2
snapblk_daemon --data-cache host
run_fio snapblk-host "nbd+unix:///fresh?socket=$W/snapblk.sock"
run_fio snapblk-10snaps-host "nbd+unix:///snapped?socket=$W/snapblk.sock"
snapblk_daemon

echo
COLS=(direct nbdkit qemu-qcow2-snap snapblk snapblk-10snaps snapblk-none snapblk-10snaps-none snapblk-host snapblk-10snaps-host)
printf "%-16s" "job (IOPS, MB/s)"; printf " %11.11s" device nbdkit qcow2-snap reads 10s-reads none 10s-none host 10s-host; echo
for j in "${JOBS[@]}"; do
    set -- $j; k="$1 $2"
    printf "%-16s" "$k"; for c in "${COLS[@]}"; do printf " %11s" "${R[$c|$k]}"; done; echo
done
echo
echo "ratio to nbdkit-file (reads = the default data_cache), and 10 snapshots to qemu-qcow2:"
printf "%-16s" "job"; printf " %11.11s" reads 10s-reads none 10s-none host 10s-host 10s/qcow2; echo
for j in "${JOBS[@]}"; do
    set -- $j; k="$1 $2"
    python3 - "$k" "${R[nbdkit|$k]}" "${R[qemu-qcow2-snap|$k]}" "${R[snapblk|$k]}" "${R[snapblk-10snaps|$k]}" \
        "${R[snapblk-none|$k]}" "${R[snapblk-10snaps-none|$k]}" "${R[snapblk-host|$k]}" "${R[snapblk-10snaps-host|$k]}" <<'PY'
import sys
k, nk, q, *s = sys.argv[1], *map(float, sys.argv[2:])
r = lambda a, b: f"{a / b:.2f}x" if b else "-"
print(f"{k:<16}" + "".join(f" {r(v, nk):>11}" for v in s) + f" {r(s[1], q):>11}")
PY
done

echo
echo "snapshot create latency (daemon-side, microseconds):"
for gib in 1 20; do
    "$BIN" volume create "lat$gib" --size "$((gib + 1))G" >/dev/null
    fio --name=f --ioengine=nbd --uri="nbd+unix:///lat$gib?socket=$W/snapblk.sock" --rw=write --bs=1M --iodepth=8 \
        --size="${gib}G" >/dev/null
    for i in 1 2 3; do
        us=$("$BIN" --json snapshot create "lat$gib@l$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["create_micros"])')
        echo "  ${gib} GiB written, snapshot $i: ${us} us"
    done
done
