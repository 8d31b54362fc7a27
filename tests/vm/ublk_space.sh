# In the VM: file-level restore and the space guard over ublk. `snapblk mount VOL@SNAP`
# attaches the snapshot as a read-only ublk device (no nbdfuse) and mounts its ext4 as it
# was; `snapblk umount` detaches it. Then a volume attached as a ublk device is rewritten
# 8 MiB a round with a policy snapshot after each in a 64 MiB pool; with the guard at 0.01%
# free the pool fills between the guard's checks, so direct-path writes find it full and
# are retried on the queue's helper thread, which waits for the guard: no write fails.
source "$(dirname "$0")/lib.sh"
export SNAPBLK_RUN_DIR=$T/run
cleanup() {
    umount "$T/mnt" 2>/dev/null || true
    "$BIN" umount "$T/view" 2>/dev/null || true
    stop_daemon
}
trap cleanup EXIT
modprobe ublk_drv
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size 64M >/dev/null
start_daemon

log "snapblk mount over ublk"
"$BIN" volume create m --size 24M >/dev/null
dev=$("$BIN" attach m)
mkfs.ext4 -q "$dev"
mkdir -p "$T/mnt" "$T/view"
mount "$dev" "$T/mnt"
write_tree "$T/mnt"
sums "$T/mnt" >"$T/before"
"$BIN" snapshot create m@s --freeze "$T/mnt" >/dev/null
echo changed >"$T/mnt/a/f1"
"$BIN" mount m@s "$T/view" >/dev/null
src=$(findmnt -n -o SOURCE "$T/view")
case "$src" in /dev/ublkb*) ;; *) fail "mounted from $src, not a ublk device" ;; esac
sums "$T/view" | diff - "$T/before" >/dev/null || fail "the snapshot's files differ"
"$BIN" umount "$T/view" >/dev/null
findmnt -n "$T/view" >/dev/null && fail "still mounted"
"$BIN" list | grep -q "m@s" && fail "the snapshot's ublk device is left"
umount "$T/mnt"
"$BIN" detach m >/dev/null

log "space guard over ublk: 8 MiB a round, a policy snapshot after each"
"$BIN" volume create g --size 16M >/dev/null
"$BIN" policy set p --volume g --schedule yearly >/dev/null
"$BIN" pool guard --min-free 0.01 --target-free 30 >/dev/null
gdev=$("$BIN" attach g)
head -c $((8 << 20)) /dev/urandom >"$T/rnd"
for round in $(seq 1 10); do
    dd if="$T/rnd" of="$gdev" bs=1M oflag=direct conv=fsync status=none \
        || fail "round $round: a write failed while deletable snapshots remained"
    "$BIN" jobs run snapshot:p >/dev/null
    sleep 1.05
done
cmp -n $((8 << 20)) "$T/rnd" "$gdev" || fail "the device does not read back what was written"
grep -q "asking the space guard" "$T/daemon.log" || fail "no write found the pool full (the test did not test the relief)"
grep -q "space guard: deleted" "$T/daemon.log" || fail "the guard deleted nothing"
"$BIN" detach g >/dev/null
"$BIN" pool check >/dev/null || fail "pool check"
log "ok"
