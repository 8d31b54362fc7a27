# In the VM (not a test; run by benches/ublk_vm.sh): fio 4K randread/randwrite QD32 and 1M
# read/write QD8 (libaio, O_DIRECT) on /dev/ublkb0, on a loop device over a raw file in the
# same guest directory, and on /dev/nbd0 (kernel NBD client) on the same snapblk volume;
# and on a ublk device served by the same queue code over an export that does nothing
# (crates/ublk/examples/null_ceiling.rs): the ceiling of ublk itself on this machine.
# Every device is filled first so reads hit data. Prints IOPS/MB/s and ratios.
source "$(dirname "$0")/lib.sh"
SIZE=${BENCH_SIZE_MIB:-256}
RT=${BENCH_RUNTIME:-8}
cleanup() {
    nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
    [ -n "${LOOP:-}" ] && losetup -d "$LOOP"
    exec 3>&- 2>/dev/null || true
    stop_daemon
    [ "$D" = "$T" ] || umount "$D"
}
trap cleanup EXIT
modprobe ublk_drv
modprobe nbd
modprobe loop 2>/dev/null || true
# `disk`: the pool's data file and the loop device's file live on an ext4 on the extra
# virtio disk (VM_DISK) instead of the guest's tmpfs; metadata stays on tmpfs (the "SSD").
D=$T
if [ "${1:-}" = disk ]; then
    # The guest's root is 9p, so the only disk is the one VM_DISK added.
    disk=$(lsblk -dnpbo NAME,TYPE,SIZE | awk '$2 == "disk" && $3 > 0 {print $1}' | head -1)
    [ -b "$disk" ] || fail "no extra disk in the guest (run with VM_DISK)"
    mkfs.ext4 -q -F "$disk"
    D=$T/disk; mkdir -p "$D"; mount "$disk" "$D"
    ln -s "$D/data.img" "$T/data.img"
    log "data files on $disk (ext4)"
fi
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size $((SIZE * 2))M >/dev/null
start_daemon
"$BIN" volume create b --size "${SIZE}M" >/dev/null
declare -A R
JOBS=("randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8")
run_dev() { # LABEL DEV
    fio --name=fill --filename="$2" --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 \
        --size="${SIZE}M" >/dev/null 2>&1
    for j in "${JOBS[@]}"; do
        set -- $1 $2 $j
        local out
        out=$(fio --name=b --filename="$2" --rw="$3" --bs="$4" --iodepth="$5" --ioengine=libaio \
            --direct=1 --size="${SIZE}M" --time_based --runtime="$RT" --ramp_time=1 \
            --output-format=json 2>/dev/null)
        R["$1 $3 $4"]=$(echo "$out" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
s = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.0f %.1f" % (s["iops"], s["bw_bytes"] / 1e6))')
        log "$1 $3 $4: ${R["$1 $3 $4"]}"
    done
}
dev=$("$BIN" attach b --queues 2 --depth 64)
run_dev ublk "$dev"
"$BIN" detach b >/dev/null
nbd-client -unix "$NBD_SOCK" -N b -b 4096 -C 2 /dev/nbd0 >/dev/null
run_dev nbd /dev/nbd0
nbd-client -d /dev/nbd0 >/dev/null
NULL_BIN=$(dirname "$BIN")/null_ceiling
if [ -x "$NULL_BIN" ]; then
    mkfifo "$T/null.ctl"
    "$NULL_BIN" "$SIZE" 2 64 <"$T/null.ctl" >"$T/null.path" &
    null_pid=$!
    exec 3>"$T/null.ctl"  # the device lives until this closes
    for _ in $(seq 100); do [ -s "$T/null.path" ] && break; sleep 0.2; done
    run_dev null "$(cat "$T/null.path")"
    exec 3>&-
    wait "$null_pid"
else
    log "no null_ceiling next to $BIN: ceiling not measured"
fi
# The guest's /tmp is a small tmpfs: free the pool before the loop device's file.
stop_daemon
rm -rf "$T/meta" "$D/data.img"
truncate -s "${SIZE}M" "$D/loop.img"
LOOP=$(losetup -f --show --direct-io=on "$D/loop.img" 2>/dev/null || losetup -f --show "$D/loop.img")
run_dev loop "$LOOP"
echo "== ublk vs loop vs kernel NBD, $(uname -r), $(nproc) vCPUs, data on ${disk:-tmpfs} (IOPS, MB/s); null = ublk ceiling"
printf '%-14s %14s %14s %14s %14s %10s %10s %10s %10s\n' job ublk loop nbd0 null \
    ublk/loop ublk/nbd0 ublk/null null/loop
ratio() { python3 -c "print('%.2fx' % ($1 / max($2, 1)))"; }
for j in "${JOBS[@]}"; do
    set -- $j
    u=${R["ublk $1 $2"]}; l=${R["loop $1 $2"]}; n=${R["nbd $1 $2"]}; z=${R["null $1 $2"]:-0 0}
    printf '%-14s %14s %14s %14s %14s %10s %10s %10s %10s\n' "$1 $2" "$u" "$l" "$n" "$z" \
        "$(ratio "${u%% *}" "${l%% *}")" "$(ratio "${u%% *}" "${n%% *}")" \
        "$(ratio "${u%% *}" "${z%% *}")" "$(ratio "${z%% *}" "${l%% *}")"
done
