# In the VM: the kernel's own NBD client (nbd-client + /dev/nbdN) on snapblk exports:
# mkfs, mount, write, snapshot with --freeze, change, then the snapshot read-only on a
# second nbd device verifies the original files, and the live volume its new ones.
source "$(dirname "$0")/lib.sh"
cleanup() {
    umount "$T/snap" "$T/fs" 2>/dev/null || true
    nbd-client -d /dev/nbd1 >/dev/null 2>&1 || true
    nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
    stop_daemon
}
trap cleanup EXIT
modprobe nbd
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size 2G >/dev/null
start_daemon
"$BIN" volume create kv --size 512M >/dev/null
mkdir -p "$T/fs" "$T/snap"
log "nbd-client: attach kv to /dev/nbd0"
nbd-client -unix "$NBD_SOCK" -N kv -b 4096 /dev/nbd0 >/dev/null
[ "$(blockdev --getsize64 /dev/nbd0)" = $((512 << 20)) ] || fail "wrong nbd0 size"
mkfs.ext4 -q /dev/nbd0
mount /dev/nbd0 "$T/fs"
write_tree "$T/fs"
sums "$T/fs" >"$T/sums"
"$BIN" snapshot create kv@s1 --freeze "$T/fs" >/dev/null
rm -rf "$T/fs/a"; echo changed >"$T/fs/b/f1"; sync
sums "$T/fs" >"$T/sums-after"
log "nbd-client: the snapshot read-only on /dev/nbd1"
nbd-client -unix "$NBD_SOCK" -N kv@s1 -R -b 4096 /dev/nbd1 >/dev/null
mount -o ro,noload /dev/nbd1 "$T/snap"
(cd "$T/snap" && sha256sum -c --quiet "$T/sums") || fail "snapshot contents differ"
umount "$T/snap"; nbd-client -d /dev/nbd1 >/dev/null
umount "$T/fs"
e2fsck -fn /dev/nbd0 >/dev/null || fail "e2fsck on the live volume"
mount /dev/nbd0 "$T/fs"
(cd "$T/fs" && sha256sum -c --quiet "$T/sums-after") || fail "live volume contents differ"
umount "$T/fs"; nbd-client -d /dev/nbd0 >/dev/null
"$BIN" pool check >/dev/null || fail "pool check"
log "nbd_kernel: ok"
