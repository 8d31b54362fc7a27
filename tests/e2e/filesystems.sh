#!/usr/bin/env bash
# Kernel filesystems on snapblk volumes through nbdfuse + loop: ext4 and xfs each get
# mkfs, files with checksums, a snapshot while mounted (--freeze), changes, the snapshot
# mounted read-only and verified, rollback, clone, fstrim returning space, and fsck.
source "$(dirname "$0")/lib.sh"

create_pool 8G
start_daemon

write_tree() { # DIR: 60 files of mixed sizes in 3 directories
    local d=$1
    for sub in a b c; do
        mkdir -p "$d/$sub"
        for i in $(seq 1 20); do
            head -c $(( (RANDOM % 64 + 1) * 4096 + RANDOM )) /dev/urandom >"$d/$sub/f$i"
        done
    done
}

ro_opts() { case $1 in ext4) echo ro,noload ;; xfs) echo ro,norecovery,nouuid ;; esac; }
fsck_clean() { # FSTYPE DEV
    case $1 in
        ext4) e2fsck -fn "$2" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out"; fail "e2fsck on $2"; } ;;
        xfs) xfs_repair -n "$2" >"$T/fsck.out" 2>&1 || { head -20 "$T/fsck.out"; fail "xfs_repair on $2"; } ;;
    esac
}

for fs in ext4 xfs; do
    vol=fs-$fs
    mnt=$T/mnt-$fs
    mkdir -p "$mnt"
    log "$fs: mkfs and write a tree"
    snapblk volume create "$vol" --size 1G >/dev/null
    dev=$(attach_loop "$vol")
    case $fs in ext4) mkfs.ext4 -q "$dev" ;; xfs) mkfs.xfs -q "$dev" ;; esac
    mount "$dev" "$mnt"
    write_tree "$mnt"
    (cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums-$fs"

    log "$fs: snapshot while mounted, with fsfreeze"
    snapblk snapshot create "$vol@before" --freeze "$mnt" >/dev/null

    log "$fs: change and delete files"
    rm -rf "$mnt/a"
    for i in 1 2 3; do head -c 100000 /dev/urandom >"$mnt/b/f$i"; done
    echo new >"$mnt/new-file"
    sync
    ! (cd "$mnt" && sha256sum -c --quiet "$T/sums-$fs" >/dev/null 2>&1) || fail "$fs: origin should have changed"

    log "$fs: mount the snapshot read-only and verify"
    sdev=$(attach_loop "$vol@before" ro)
    smnt=$T/snap-$fs
    mkdir -p "$smnt"
    mount -o "$(ro_opts $fs)" "$sdev" "$smnt"
    (cd "$smnt" && sha256sum -c --quiet "$T/sums-$fs") || fail "$fs: snapshot contents differ"
    [ ! -e "$smnt/new-file" ] || fail "$fs: snapshot shows a later file"
    umount "$smnt"
    detach_loop "$vol@before" "$sdev"

    log "$fs: fstrim returns space to the pool"
    head -c 200M /dev/urandom >"$mnt/big"
    sync
    sleep 2
    used_before=$(pool_used)
    rm "$mnt/big"
    # The filesystem frees the file's blocks only once its journal commits (and XFS keeps
    # them busy a little longer), so sync and retry fstrim a few times.
    for attempt in 1 2 3 4 5; do
        sync
        fstrim "$mnt"
        sleep 1.5 # the daemon returns trimmed blocks at its next periodic sync
        used_after=$(pool_used)
        [ "$used_after" -lt $((used_before - 150 * 1048576)) ] && break
    done
    [ "$used_after" -lt $((used_before - 150 * 1048576)) ] || fail "$fs: fstrim freed too little ($used_before -> $used_after)"

    log "$fs: rollback"
    umount "$mnt"
    detach_loop "$vol" "$dev"
    snapblk rollback "$vol@before" >/dev/null
    dev=$(attach_loop "$vol")
    # A snapshot of a frozen, mounted filesystem is like a crash-consistent image with a
    # quiesced journal: mounting replays it (XFS needs that before xfs_repair -n).
    mount "$dev" "$mnt"
    (cd "$mnt" && sha256sum -c --quiet "$T/sums-$fs") || fail "$fs: rollback contents differ"
    [ ! -e "$mnt/new-file" ] || fail "$fs: rollback kept a later file"
    umount "$mnt"
    fsck_clean $fs "$dev"
    detach_loop "$vol" "$dev"

    log "$fs: clone, write to the clone, origin untouched"
    snapblk clone "$vol@before" "$vol-clone" >/dev/null
    cdev=$(attach_loop "$vol-clone")
    cmnt=$T/clone-$fs
    mkdir -p "$cmnt"
    mount "$cdev" "$cmnt"
    (cd "$cmnt" && sha256sum -c --quiet "$T/sums-$fs") || fail "$fs: clone contents differ"
    rm -rf "$cmnt/c"
    head -c 3000000 /dev/urandom >"$cmnt/clone-only"
    umount "$cmnt"
    fsck_clean $fs "$cdev"
    detach_loop "$vol-clone" "$cdev"
    dev=$(attach_loop "$vol")
    fsck_clean $fs "$dev"
    mount "$dev" "$mnt"
    (cd "$mnt" && sha256sum -c --quiet "$T/sums-$fs") || fail "$fs: origin changed by the clone"
    [ ! -e "$mnt/clone-only" ] || fail "$fs: clone write visible in origin"
    umount "$mnt"
    detach_loop "$vol" "$dev"
done

snapblk snapshot list >/dev/null
assert_check_clean
snapblk pool scrub >"$T/scrub.out" 2>&1 || { cat "$T/scrub.out"; fail "pool scrub found bad blocks"; }
grep -q "pool scrub: clean" "$T/scrub.out" || { cat "$T/scrub.out"; fail "unexpected scrub output"; }
log "$(tail -1 "$T/scrub.out")"
log "filesystems: ok"
