#!/usr/bin/env bash
# The demo: pool -> volume -> NBD export -> nbdfuse + loop -> mkfs.ext4 -> mount -> write
# -> snapshot (frozen) -> change files -> mount the snapshot -> verify it kept the original
# files -> back up the snapshot to S3 (a local S3-compatible server, s3s-fs) -> restore it
# as a new volume -> mount and verify. Run as root on a fresh machine; everything happens
# under a temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
echo "building snapblk (release; the first build compiles RocksDB and takes a while)..."
cargo build --release --bin snapblk
save_rocksdb_cache
BIN=$CARGO_TARGET_DIR/release/snapblk
W=$(mktemp -d /tmp/snapblk-demo.XXXXXX)
export SNAPBLK_SOCKET=$W/control.sock
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }
cleanup() {
    set +e
    umount "$W/restored" "$W/snap" "$W/fs" 2>/dev/null
    [ -n "${L3:-}" ] && losetup -d "$L3"
    [ -n "${L2:-}" ] && losetup -d "$L2"
    [ -n "${L1:-}" ] && losetup -d "$L1"
    fusermount3 -u "$W/disk-restored" 2>/dev/null
    fusermount3 -u "$W/disk-snap" 2>/dev/null; fusermount3 -u "$W/disk" 2>/dev/null
    [ -n "${DPID:-}" ] && kill "$DPID" && wait "$DPID"
    [ -n "${S3PID:-}" ] && kill "$S3PID" && wait "$S3PID"
    rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/fs" "$W/snap" "$W/restored" "$W/s3"; touch "$W/disk" "$W/disk-snap" "$W/disk-restored"

run "$BIN" pool create --meta "$W/meta" --data "$W/data.img" --size 4G
say "$BIN daemon --meta $W/meta --data $W/data.img --nbd-socket $W/nbd.sock --nbd-tcp none &"
"$BIN" daemon --meta "$W/meta" --data "$W/data.img" --nbd-socket "$W/nbd.sock" --nbd-tcp none 2>"$W/daemon.log" &
DPID=$!
for _ in $(seq 100); do [ -S "$W/nbd.sock" ] && [ -S "$SNAPBLK_SOCKET" ] && break; sleep 0.05; done
run "$BIN" volume create db --size 1G
say "nbdfuse $W/disk nbd+unix:///db?socket=$W/nbd.sock &   # the volume as a file"
nbdfuse "$W/disk" "nbd+unix:///db?socket=$W/nbd.sock" & sleep 0.5
L1=$(losetup -f --show "$W/disk"); say "losetup -f --show $W/disk   # -> $L1"
run mkfs.ext4 -q "$L1"
run mount "$L1" "$W/fs"
say "write files and record their checksums"
for i in $(seq 1 20); do head -c $((RANDOM * 8)) /dev/urandom >"$W/fs/file$i"; done
(cd "$W/fs" && sha256sum file*) >"$W/sums"
run "$BIN" snapshot create db@before-upgrade --freeze "$W/fs"
say "change and delete files on the live volume"
rm "$W/fs/file1" "$W/fs/file2"; echo changed >"$W/fs/file3"; sync
run "$BIN" volume list
run "$BIN" snapshot list
run "$BIN" diff db@before-upgrade db
say "nbdfuse -r $W/disk-snap nbd+unix:///db@before-upgrade?socket=$W/nbd.sock &"
nbdfuse -r "$W/disk-snap" "nbd+unix:///db@before-upgrade?socket=$W/nbd.sock" & sleep 0.5
L2=$(losetup -f --show -r "$W/disk-snap")
run mount -o ro,noload "$L2" "$W/snap"
say "verify the snapshot kept the original files"
(cd "$W/snap" && sha256sum -c "$W/sums")

say "start a local S3-compatible server (s3s-fs on 127.0.0.1:9514, checks SigV4 signatures)"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret-key AWS_EC2_METADATA_DISABLED=true
/var/cache/snapblk/tools/bin/s3s-fs --host 127.0.0.1 --port 9514 --access-key demo \
    --secret-key demo-secret-key "$W/s3" >"$W/s3.log" 2>&1 &
S3PID=$!; sleep 0.5
export SNAPBLK_S3_ENDPOINT=http://127.0.0.1:9514
head -c 32 /dev/urandom >"$W/backup.key"; export SNAPBLK_KEY_FILE=$W/backup.key
run "$BIN" repo init s3://demo-backups/db
run "$BIN" backup db@before-upgrade --to s3://demo-backups/db
run "$BIN" snapshot create db@after --freeze "$W/fs"
run "$BIN" backup db@after --to s3://demo-backups/db
run "$BIN" backup list s3://demo-backups/db
run "$BIN" backup verify s3://demo-backups/db --read-data
run "$BIN" restore s3://demo-backups/db db@before-upgrade --as db-restored
say "nbdfuse -r $W/disk-restored nbd+unix:///db-restored?socket=$W/nbd.sock &"
nbdfuse -r "$W/disk-restored" "nbd+unix:///db-restored?socket=$W/nbd.sock" & sleep 0.5
L3=$(losetup -f --show -r "$W/disk-restored")
run mount -o ro,noload "$L3" "$W/restored"
say "verify the restored volume has the original files"
(cd "$W/restored" && sha256sum -c "$W/sums")
run "$BIN" pool info
run "$BIN" pool check
echo; echo "demo: the snapshot db@before-upgrade and its restore from S3 verified against the original checksums"
