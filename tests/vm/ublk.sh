# In the VM: ublk devices for ext4 and xfs. Attach a volume, mkfs, mount, write files with
# checksums, snapshot while mounted (--freeze), change files, attach the snapshot
# read-only, mount it and verify the original checksums, detach, fsck clean.
source "$(dirname "$0")/lib.sh"
cleanup() {
    for m in "$T"/mnt-* "$T"/snap-*; do umount "$m" 2>/dev/null || true; done
    stop_daemon
}
trap cleanup EXIT
modprobe ublk_drv
# udev names (the guest runs udevd when the host has udev installed).
if command -v udevadm >/dev/null && pgrep -x systemd-udevd >/dev/null; then
    sed "s|@SNAPBLK@|$BIN|" "$(dirname "$0")/../../udev/99-snapblk.rules" >/etc/udev/rules.d/99-snapblk.rules
    udevadm control --reload
    UDEV=1
else
    UDEV=0
    log "no udevd in the guest: udev names not checked"
fi
"$BIN" pool create --meta "$T/meta" --data "$T/data.img" --size 3G >/dev/null
start_daemon
for fs in ext4 xfs; do
    vol=u-$fs
    "$BIN" volume create "$vol" --size 512M >/dev/null
    dev=$("$BIN" attach "$vol")
    log "$fs: $vol attached as $dev"
    [ -b "$dev" ] || fail "$dev is not a block device"
    [ "$(blockdev --getsize64 "$dev")" = $((512 << 20)) ] || fail "$dev has the wrong size"
    "$BIN" list | grep -q "$dev" || fail "list does not show $dev"
    [ "$("$BIN" udev-name "${dev#/dev/}")" = "$vol" ] || fail "udev-name of $dev"
    if [ "$UDEV" = 1 ]; then
        udevadm settle
        [ "$(readlink -f "/dev/disk/by-snapblk/$vol")" = "$dev" ] || fail "/dev/disk/by-snapblk/$vol does not point to $dev"
    fi
    if [ "$fs" = ext4 ]; then
        # Raw requests first: writes with FUA and flushes (oflag=direct,sync / conv=fsync),
        # discard and write-zeroes (served on the queue's helper thread), unaligned I/O.
        head -c $((8 << 20)) /dev/urandom >"$T/raw"
        dd if="$T/raw" of="$dev" bs=1M oflag=direct,sync conv=fsync status=none
        cmp -n $((8 << 20)) "$T/raw" "$dev" || fail "raw data differs"
        blkdiscard -o $((1 << 20)) -l $((2 << 20)) "$dev" || fail "blkdiscard"
        blkdiscard -z -o $((4 << 20)) -l $((1 << 20)) "$dev" || fail "blkdiscard -z"
        cmp -n $((2 << 20)) /dev/zero "$dev" --ignore-initial=0:$((1 << 20)) || fail "discarded range not zero"
        cmp -n $((1 << 20)) /dev/zero "$dev" --ignore-initial=0:$((4 << 20)) || fail "zeroed range not zero"
        cmp -n $((1 << 20)) "$T/raw" "$dev" || fail "data before the discard changed"
        cmp -n $((1 << 20)) "$T/raw" "$dev" --ignore-initial=$((6 << 20)):$((6 << 20)) || fail "data after the zeroed range changed"
        # A 512-byte write and read (not 4 KiB aligned: the queue's synchronous path).
        head -c 512 /dev/urandom >"$T/sector"
        dd if="$T/sector" of="$dev" bs=512 seek=3 oflag=direct status=none || fail "512-byte write"
        [ "$(dd if="$dev" bs=512 skip=3 count=1 iflag=direct status=none | sha256sum)" = "$(sha256sum <"$T/sector")" ] \
            || fail "512-byte read back differs"
    fi
    case $fs in ext4) mkfs.ext4 -q "$dev" ;; xfs) mkfs.xfs -q "$dev" ;; esac
    mnt=$T/mnt-$fs; mkdir -p "$mnt"
    mount "$dev" "$mnt"
    write_tree "$mnt"
    sums "$mnt" >"$T/sums-$fs"
    "$BIN" snapshot create "$vol@s1" --freeze "$mnt" >/dev/null
    rm -rf "$mnt/a"; echo changed >"$mnt/b/f1"; sync
    sdev=$("$BIN" attach "$vol@s1")
    log "$fs: snapshot attached read-only as $sdev"
    [ "$(blockdev --getro "$sdev")" = 1 ] || fail "$sdev should be read-only"
    if [ "$UDEV" = 1 ]; then
        udevadm settle
        [ "$(readlink -f "/dev/disk/by-snapblk/$vol@s1")" = "$sdev" ] || fail "/dev/disk/by-snapblk/$vol@s1 missing"
    fi
    smnt=$T/snap-$fs; mkdir -p "$smnt"
    case $fs in ext4) mount -o ro,noload "$sdev" "$smnt" ;; xfs) mount -o ro,norecovery,nouuid "$sdev" "$smnt" ;; esac
    (cd "$smnt" && sha256sum -c --quiet "$T/sums-$fs") || fail "$fs: snapshot contents differ"
    umount "$smnt"
    # Whole-block I/O took the queue ring's direct path, for the volume and its snapshot.
    "$BIN" list --json | python3 -c '
import json, sys
for d in json.load(sys.stdin):
    assert d["requests_direct"] > 0 and d["requests_failed"] == 0, d
' || fail "$fs: requests did not take the direct path ($("$BIN" list --json))"
    "$BIN" detach "$sdev" >/dev/null
    umount "$mnt"
    case $fs in
        ext4) e2fsck -fn "$dev" >/dev/null || fail "e2fsck $dev" ;;
        xfs) xfs_repair -n "$dev" >/dev/null 2>&1 || fail "xfs_repair $dev" ;;
    esac
    "$BIN" detach "$vol" >/dev/null
    [ ! -e "$dev" ] || sleep 1
    "$BIN" list | grep -q "$dev" && fail "$dev still listed after detach"
    log "$fs: ok"
done
log "resize of an attached volume"
"$BIN" volume create grow --size 64M >/dev/null
gdev=$("$BIN" attach grow)
"$BIN" --json volume resize grow --size 128M >"$T/resize.json"
if grep -q '"resized": true' "$T/resize.json"; then
    [ "$(blockdev --getsize64 "$gdev")" = $((128 << 20)) ] || fail "$gdev did not grow"
    log "the kernel resized $gdev to 128 MiB"
else
    # UBLK_U_CMD_UPDATE_SIZE needs Linux 6.16; older kernels must get a clear message.
    grep -q "needs Linux 6.16" "$T/resize.json" || { cat "$T/resize.json"; fail "unclear resize error"; }
    [ "$(blockdev --getsize64 "$gdev")" = $((64 << 20)) ] || fail "$gdev changed size unexpectedly"
    log "kernel $(uname -r) cannot resize attached ublk devices; reported clearly"
fi
"$BIN" detach grow >/dev/null
gdev=$("$BIN" attach grow)
[ "$(blockdev --getsize64 "$gdev")" = $((128 << 20)) ] || fail "re-attached $gdev does not have the new size"
"$BIN" detach grow >/dev/null
"$BIN" pool check >/dev/null || fail "pool check"
log "ublk: ok"
