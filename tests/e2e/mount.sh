#!/usr/bin/env bash
# File-level restore (issue 13): `snapblk mount VOL@SNAP DIR` shows an ext4 filesystem on
# the first partition of an MBR-partitioned volume and an xfs filesystem on a whole volume
# as they were at the snapshot (taken while mounted: no journal replay, and the xfs snapshot
# mounts beside its mounted original), read-only; `snapblk umount` leaves no mount, loop
# device, nbdfuse process or record behind, and the snapshot is no longer in use. The
# snapshot's backup mounts the same way (`--from REPO`, a temporary lazy restore) and
# leaves no volume behind. A failed mount leaves nothing either.
source "$(dirname "$0")/lib.sh"
export SNAPBLK_RUN_DIR=$T/run SNAPBLK_NBD_SOCKET=$NBD_SOCK
create_pool 4G
start_daemon
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
REPO=file://$T/repo
snapblk repo init "$REPO" >/dev/null

sums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
nothing_left() { # DIR
    findmnt -rn -o TARGET | grep -q "^$1\$" && fail "$1 is still mounted"
    losetup -nO BACK-FILE | grep -q "$T/run" && { losetup -a; fail "a loop device is left"; }
    pgrep -f "nbdfuse .*$T/run" >/dev/null && fail "an nbdfuse process is left"
    [ -z "$(ls -A "$T/run/mounts" 2>/dev/null)" ] || { ls -l "$T/run/mounts"; fail "mount records are left"; }
}
mbr() { # DEV: one Linux partition from 1 MiB to the end
    python3 - "$1" <<'PY'
import os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.lseek(fd, 0, os.SEEK_END) // 512
entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, size - 2048)
sector = bytearray(512)
sector[446:462] = entry
sector[510:512] = b"\x55\xaa"
os.pwrite(fd, bytes(sector), 0)
os.fsync(fd)
os.close(fd)
PY
}

for fs in ext4 xfs; do
    vol=m-$fs
    mnt=$T/live-$fs
    view=$T/view-$fs
    mkdir -p "$mnt" "$view"
    snapblk volume create "$vol" --size 512M >/dev/null
    dev=$(attach_loop "$vol")
    if [ $fs = ext4 ]; then
        log "ext4 on the first partition of an MBR disk"
        mbr "$dev"
        fsdev=$(losetup -f --show -o 1048576 --direct-io=off "$T/fuse-$vol.file")
        mkfs.ext4 -q "$fsdev"
    else
        log "xfs on the whole volume"
        fsdev=$dev
        mkfs.xfs -q "$fsdev"
    fi
    mount "$fsdev" "$mnt"
    for i in $(seq 1 20); do head -c $((RANDOM * 8 + 1)) /dev/urandom >"$mnt/f$i"; done
    mkdir "$mnt/sub" && echo "as it was" >"$mnt/sub/note"
    sums "$mnt" >"$T/before-$fs"
    snapblk snapshot create "$vol@s1" --freeze "$mnt" >/dev/null
    echo changed >"$mnt/sub/note"
    head -c 100000 /dev/urandom >"$mnt/after"
    sync

    log "$fs: mount the snapshot beside the mounted original"
    snapblk mount "$vol@s1" "$view" >"$T/mount.out" || fail "$fs: snapblk mount"
    grep -q "$fs" "$T/mount.out" || { cat "$T/mount.out"; fail "mount does not name the filesystem"; }
    sums "$view" | diff - "$T/before-$fs" >/dev/null || fail "$fs: the snapshot's files differ"
    [ -e "$view/after" ] && fail "$fs: a file written after the snapshot shows"
    touch "$view/x" 2>/dev/null && fail "$fs: the view is writable"
    findmnt -n -o OPTIONS "$view" | grep -q '\bro\b' || fail "$fs: not mounted read-only"
    snapblk umount "$view" >/dev/null || fail "$fs: snapblk umount"
    nothing_left "$view"

    log "$fs: mount the snapshot's backup: a temporary lazy restore, gone after umount"
    snapblk backup "$vol@s1" --to "$REPO" >/dev/null
    snapblk mount --from "$REPO" "$vol@s1" "$view" >"$T/mount.out" || fail "$fs: snapblk mount --from"
    sums "$view" | diff - "$T/before-$fs" >/dev/null || fail "$fs: the backup's files differ"
    [ -e "$view/after" ] && fail "$fs: a file written after the snapshot shows in its backup"
    tmpvol=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["lazy_volume"])' "$T/run/mounts/"*.json)
    case $tmpvol in snapblk-mount-*) ;; *) fail "no temporary volume recorded: $tmpvol" ;; esac
    snapblk umount "$view" >/dev/null || fail "$fs: snapblk umount of a backup mount"
    nothing_left "$view"
    snapblk volume list | grep -q snapblk-mount- && { snapblk volume list; fail "the temporary volume is left"; }
    snapblk --json restore-status | python3 -c '
import json,sys; left=[r for r in json.load(sys.stdin) if r["volume"] == sys.argv[1] and not r.get("complete")]
assert not left, left' "$tmpvol" || fail "the temporary restore is still running"
    # Its hold on the backup (crate::hold) went with it: retention may remove the backup.
    [ -z "$(find "$T/repo/holds" -type f 2>/dev/null)" ] || fail "umount left a hold: $(find "$T/repo/holds" -type f)"
    umount "$mnt"
    [ $fs = ext4 ] && losetup -d "$fsdev"
    detach_loop "$vol" "$dev"
    log "$fs: nothing left: the snapshot can be deleted"
    snapblk snapshot delete "$vol@s1" >/dev/null || fail "$fs: the snapshot is still in use after umount"
done

log "failures leave nothing behind"
mkdir -p "$T/v2"
snapblk mount "m-xfs@nope" "$T/v2" >"$T/out" 2>&1 && fail "mounting a missing snapshot succeeded"
grep -q "m-xfs@nope" "$T/out" || { cat "$T/out"; fail "the error does not name the snapshot"; }
nothing_left "$T/v2"
snapblk umount "$T/v2" >"$T/out" 2>&1 && fail "umount of a directory snapblk did not mount succeeded"
grep -q "was not mounted by snapblk mount" "$T/out" || { cat "$T/out"; fail "unclear umount error"; }
snapblk mount --from "$REPO" "m-xfs@nope" "$T/v2" >"$T/out" 2>&1 && fail "mounting a missing backup succeeded"
nothing_left "$T/v2"
snapblk volume list | grep -q snapblk-mount- && fail "a failed backup mount left its volume"
snapblk volume create empty --size 16M >/dev/null
snapblk snapshot create empty@s >/dev/null
snapblk mount empty@s "$T/v2" >"$T/out" 2>&1 && fail "mounting a volume without a filesystem succeeded"
grep -q "no filesystem" "$T/out" || { cat "$T/out"; fail "unclear error for no filesystem"; }
nothing_left "$T/v2"
log "mount: ok"
