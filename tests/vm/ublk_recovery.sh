# In the VM: kill -9 of the daemon while fio writes (and then verifies) a file on a
# mounted ublk device; the restarted daemon recovers the device (UBLK_F_USER_RECOVERY),
# the filesystem stays mounted, fio completes and its verify passes; fsck is clean; the
# recovered device detaches (the restarted daemon drops the copies of the users' ublk
# mounts its new mount namespace inherited, which would otherwise hold the device open).
# Then the same across a clean stop with `--ublk-on-stop keep` (a restart or an upgrade
# that leaves filesystems mounted).
source "$(dirname "$0")/lib.sh"
cleanup() {
    # A device kept by a stopped daemon holds its I/O: take it back before unmounting.
    [ -n "$DAEMON_PID" ] || start_daemon || true
    umount "$T/mnt" 2>/dev/null || true
    stop_daemon
}
trap cleanup EXIT
modprobe ublk_drv
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size 2G >/dev/null
start_daemon
"$BIN" volume create r --size 512M >/dev/null
dev=$("$BIN" attach r)
mkfs.ext4 -q "$dev"
mkdir -p "$T/mnt"
mount "$dev" "$T/mnt"
log "fio on $dev, kill -9 of the daemon in the middle"
fio --name=rec --filename="$T/mnt/f" --rw=randwrite --bs=4k --size=48M --ioengine=psync --fsync=64 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$T/fio.out" &
fio_pid=$!
sleep 4
old=$DAEMON_PID
kill -9 "$old"
wait "$old" 2>/dev/null || true
DAEMON_PID=
sleep 1
log "restarting the daemon"
start_daemon
"$BIN" list | grep -q "$dev" || fail "the restarted daemon did not recover $dev"
wait "$fio_pid" || { cat "$T/fio.out"; fail "fio failed across the daemon restart"; }
grep -q "err= 0" "$T/fio.out" || { cat "$T/fio.out"; fail "fio reported errors"; }
mountpoint -q "$T/mnt" || fail "the filesystem is no longer mounted"
umount "$T/mnt"
e2fsck -fn "$dev" >"$T/fsck.out" 2>&1 || { head -20 "$T/fsck.out"; fail "e2fsck after recovery"; }
log "fsck clean; detaching"
timeout 30 "$BIN" detach r >"$T/detach.out" 2>&1 &
det=$!
for _ in $(seq 1 25); do kill -0 $det 2>/dev/null || break; sleep 1; done
if kill -0 $det 2>/dev/null; then
    log "detach still running after 25 s; daemon threads:"
    for t in /proc/$DAEMON_PID/task/*; do
        echo "== $(cat $t/comm) wchan=$(cat $t/wchan)"; cat $t/stack 2>/dev/null | head -8
    done
    cat /sys/class/ublk-char/*/dev 2>/dev/null; ls /dev/ublk* 2>/dev/null
fi
wait $det || { cat "$T/detach.out"; fail "detach of the recovered device failed or hung"; }
"$BIN" pool check >/dev/null || fail "pool check"

log "ublk_on_stop keep: a clean stop while fio writes leaves the device; the next daemon takes it back"
stop_daemon
start_daemon --ublk-on-stop keep
dev=$("$BIN" attach r)
mount "$dev" "$T/mnt"
rm -f "$T/mnt/f"
fio --name=keep --filename="$T/mnt/g" --rw=randwrite --bs=4k --size=24M --ioengine=psync --fsync=64 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$T/fio2.out" &
fio_pid=$!
sleep 3
stop_daemon
[ -b "$dev" ] || fail "$dev went away with ublk_on_stop keep"
kill -0 "$fio_pid" 2>/dev/null || { cat "$T/fio2.out"; fail "fio ended while the daemon was stopped"; }
sleep 1
start_daemon
"$BIN" list | grep -q "$dev" || fail "the restarted daemon did not take $dev back"
wait "$fio_pid" || { cat "$T/fio2.out"; fail "fio failed across the clean stop and restart"; }
grep -q "err= 0" "$T/fio2.out" || { cat "$T/fio2.out"; fail "fio reported errors"; }
umount "$T/mnt"
e2fsck -fn "$dev" >"$T/fsck2.out" 2>&1 || { head -20 "$T/fsck2.out"; fail "e2fsck after the kept restart"; }
timeout 30 "$BIN" detach r >/dev/null || fail "detach after the kept restart"
"$BIN" pool check >/dev/null || fail "pool check after the kept restart"
log "ublk_recovery: ok"
