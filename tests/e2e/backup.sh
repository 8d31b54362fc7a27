#!/usr/bin/env bash
# Backup and restore against a real S3-compatible server (s3s-fs on 127.0.0.1) and a
# file:// directory: full backup + restore byte-identical with an ext4 filesystem that
# mounts and verifies; incremental bytes ~ changed bytes; dedup across clones; S3 dying
# mid-backup then a resumed rerun; a flipped bit named by verify and refused by restore;
# wrong key and missing repository; prune + gc leaving only referenced chunks; a deleted
# catalog generation refused as a rollback (CLI and daemon) and reported by verify.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
start_s3
create_pool 4G
# The daemon has no S3 credentials of its own: it must use the ones the CLI resolves.
AWS_ACCESS_KEY_ID= AWS_SECRET_ACCESS_KEY= start_daemon
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-test/main
FILE=file://$T/filerepo
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
same() { qemu-img compare -q -f raw -F raw "$(uri "$1")" "$(uri "$2")" || fail "$2 differs from $1"; }

log "repo init on S3 and file://"
snapblk repo init "$S3" >/dev/null
snapblk repo init "$FILE" --chunk-size 16K >/dev/null
snapblk repo init "$S3" >"$T/out" 2>&1 && fail "init over an existing repository succeeded"
grep -q "already exists" "$T/out" || { cat "$T/out"; fail "unclear error for an existing repository"; }

log "ext4 volume: files with checksums, frozen snapshot"
snapblk volume create fs --size 256M >/dev/null
dev=$(attach_loop fs)
mkfs.ext4 -q "$dev"
mkdir -p "$T/mnt"
mount "$dev" "$T/mnt"
for i in $(seq 1 30); do head -c $((RANDOM * 64)) /dev/urandom >"$T/mnt/f$i"; done
mkdir "$T/mnt/dir"; cp -r /usr/share/doc/bash "$T/mnt/dir/" 2>/dev/null || true
(cd "$T/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
snapblk snapshot create fs@one --freeze "$T/mnt" >/dev/null
rm "$T/mnt/f1"; echo changed >"$T/mnt/f2"
umount "$T/mnt"; detach_loop fs "$dev"

for tgt in "$S3" "$FILE"; do
    log "full backup + restore via $tgt"
    snapblk --json backup fs@one --to "$tgt" >"$T/b.json"
    [ "$(jq_ 'v["base"]' <"$T/b.json")" = None ] || fail "first backup is not full"
    n=${tgt%%:*}
    snapblk --json restore "$tgt" fs@one --as "fs-$n" >"$T/r.json"
    same fs@one "fs-$n"
    dev=$(attach_loop "fs-$n" ro)
    mount -o ro,noload "$dev" "$T/mnt"
    (cd "$T/mnt" && sha256sum --quiet -c "$T/sums") || fail "restored files differ ($tgt)"
    umount "$T/mnt"; detach_loop "fs-$n" "$dev"
done

log "incremental: change 1% of a 256 MiB volume"
snapblk volume create inc --size 256M >/dev/null
head -c 256M /dev/urandom >"$T/rand"
nbdcopy "$T/rand" "$(uri inc)"
rm "$T/rand"
snapblk snapshot create inc@a >/dev/null
snapblk --json backup inc@a --to "$S3" >"$T/a.json"
/usr/bin/python3 "$HERE/nbd_write_random.py" "$(uri inc)" 40 65536
snapblk snapshot create inc@b >/dev/null
snapblk --json backup inc@b --to "$S3" >"$T/b.json"
changed=$(snapblk --json diff inc@a inc@b | jq_ 'v["changed_bytes"]')
up=$(jq_ 'v["stats"]["bytes_uploaded"]' <"$T/b.json")
rd=$(jq_ 'v["stats"]["bytes_read"]' <"$T/b.json")
log "changed $changed bytes; incremental read $rd, uploaded $up"
[ "$changed" -eq $((40 * 65536)) ] || fail "diff reports $changed changed bytes"
[ "$up" -le $((changed * 105 / 100 + 65536)) ] || fail "uploaded $up bytes for $changed changed"
[ "$rd" -le $((changed + 65536)) ] || fail "read $rd bytes for $changed changed"
snapblk restore "$S3" inc@a --as inc-a >/dev/null
snapblk restore "$S3" inc@b --as inc-b >/dev/null
same inc@a inc-a
same inc@b inc-b

log "lazy restore: mount and read while hydrating; afterwards S3 is not needed"
snapblk volume create lz --size 512M >/dev/null
dev=$(attach_loop lz)
mkfs.ext4 -q "$dev"
mount "$dev" "$T/mnt"
for i in $(seq 1 20); do head -c $((RANDOM * 16)) /dev/urandom >"$T/mnt/small$i"; done
head -c 300M /dev/urandom >"$T/mnt/big"
(cd "$T/mnt" && sha256sum small* big) >"$T/lzsums"
snapblk snapshot create lz@s --freeze "$T/mnt" >/dev/null
umount "$T/mnt"; detach_loop lz "$dev"
snapblk backup lz@s --to "$S3" >/dev/null
snapblk --json restore "$S3" lz@s --as lz-r --lazy >"$T/lazy.json"
ready=$(jq_ 'v["ready_seconds"]' <"$T/lazy.json")
log "lazy restore ready after $ready s"
python3 -c "import sys; sys.exit(0 if $ready < 2 else 1)" || fail "lazy restore took $ready s to be ready"
dev=$(attach_loop lz-r)
mount "$dev" "$T/mnt"
(cd "$T/mnt" && grep small "$T/lzsums" | sha256sum --quiet -c) || fail "files differ while hydrating"
echo "written during hydration" >"$T/mnt/new"
remaining=$(snapblk --json restore-status | jq_ '[r for r in v if r["volume"]=="lz-r"][0]["cells_remaining"]')
log "read and wrote files with $remaining cells still to hydrate"
[ "$remaining" -gt 0 ] || fail "hydration finished before the first read; the test proves nothing"
(cd "$T/mnt" && sha256sum --quiet -c "$T/lzsums") || fail "files differ while hydrating"
umount "$T/mnt"
for _ in $(seq 1 600); do
    [ "$(snapblk --json restore-status | jq_ '[r for r in v if r["volume"]=="lz-r"][0]["complete"]')" = True ] && break
    sleep 0.1
done
snapblk restore-status
# A reader that stops early (`| grep -q`, `| head -1`) is not a crash: exit 0, no panic.
{ sleep 0.3; snapblk --json restore-status 2>"$T/pipe.err"; echo $? >"$T/pipe.rc"; } | true
[ "$(cat "$T/pipe.rc")" = 0 ] && [ ! -s "$T/pipe.err" ] \
    || fail "output into a closed pipe: exit $(cat "$T/pipe.rc"), $(cat "$T/pipe.err")"
stop_s3
e2fsck -fn "$dev" >/dev/null || fail "fsck of the lazily restored volume"
mount "$dev" "$T/mnt"
(cd "$T/mnt" && sha256sum --quiet -c "$T/lzsums") || fail "files differ after hydration"
grep -q "written during hydration" "$T/mnt/new" || fail "write during hydration lost"
umount "$T/mnt"; detach_loop lz-r "$dev"
start_s3

log "dedup: two clones of one snapshot"
D=s3://snapblk-test/dedup
snapblk repo init "$D" >/dev/null
for c in c1 c2; do
    snapblk clone inc@a "$c" >/dev/null
    /usr/bin/python3 "$HERE/nbd_write_random.py" "$(uri "$c")" 16 65536
    snapblk snapshot create "$c@x" >/dev/null
    snapblk --json backup "$c@x" --to "$D" --full >"$T/$c.json"
done
u1=$(jq_ 'v["stats"]["bytes_uploaded"]' <"$T/c1.json")
u2=$(jq_ 'v["stats"]["bytes_uploaded"]' <"$T/c2.json")
log "clone backups uploaded $u1 and $u2 bytes"
[ "$u1" -ge $((256 << 20)) ] || fail "first clone uploaded only $u1"
# New for c2: its own 16 cells, and the 16 cells of the origin that c1 overwrote.
[ "$u2" -le $((32 * 65536 * 105 / 100 + 65536)) ] || fail "second clone uploaded $u2: shared data stored twice"
snapblk restore "$D" c2@x --as c2-r >/dev/null
same c2@x c2-r

log "S3 server dies mid-backup; rerun resumes"
snapblk volume create big --size 384M >/dev/null
head -c 384M /dev/urandom >"$T/rand"
nbdcopy "$T/rand" "$(uri big)"
rm "$T/rand"
snapblk snapshot create big@x >/dev/null
R=s3://snapblk-test/resume
snapblk repo init "$R" >/dev/null
snapblk backup big@x --to "$R" >"$T/kill.out" 2>&1 &
bpid=$!
packs() { find "$S3_ROOT/snapblk-test/resume/packs" -type f 2>/dev/null | wc -l; }
for _ in $(seq 1 600); do [ "$(packs)" -ge 4 ] && break; sleep 0.05; done
[ "$(packs)" -ge 4 ] || fail "backup stored no packs"
stop_s3
if wait $bpid; then fail "backup succeeded with the S3 server gone"; fi
cat "$T/kill.out" >&2
grep -q "s3://snapblk-test/resume" "$T/kill.out" || fail "the error does not name the target"
grep -Eq "cannot reach|timed out|failed" "$T/kill.out" || fail "unclear error when S3 is down"
before=$(find "$S3_ROOT/snapblk-test/resume/ix" -type f | wc -l)
start_s3
snapblk --json backup big@x --to "$R" >"$T/resume.json"
reused=$(jq_ 'v["stats"]["chunks_reused"]' <"$T/resume.json")
log "$before packs were stored before the failure; the rerun reused $reused chunks"
[ "$reused" -ge $((before * 100)) ] || fail "rerun reused only $reused chunks of $before stored packs"
snapblk --json backup verify "$R" >"$T/v.json" || fail "verify after resume"
[ "$(jq_ 'v["chunks_duplicate"]' <"$T/v.json")" -eq 0 ] || fail "the rerun stored chunks again"
snapblk restore "$R" big@x --as big-r >/dev/null
same big@x big-r

log "a flipped bit in a pack stored by the S3 server is named and never restored"
victim=$(find "$S3_ROOT/snapblk-test/dedup/packs" -type f -size +1M | head -1)
[ -n "$victim" ] || fail "no pack to damage"
python3 - "$victim" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
b[len(b) // 2] ^= 0x04
open(p, 'wb').write(b)
PY
if snapblk backup verify "$D" --read-data >"$T/v.out" 2>&1; then cat "$T/v.out"; fail "verify missed a flipped bit"; fi
cat "$T/v.out" >&2
chunk=$(grep -o 'chunk [0-9a-f]\{64\}' "$T/v.out" | head -1 | cut -d' ' -f2)
[ -n "$chunk" ] || fail "verify did not name the bad chunk"
hit=$(grep -o 'affects: c[12]@x' "$T/v.out" | head -1 | cut -d' ' -f2)
[ -n "$hit" ] || fail "verify did not name the affected backup"
if snapblk restore "$D" "$hit" --as bad-r >"$T/r.out" 2>&1; then fail "restore of damaged data succeeded"; fi
grep -q "$chunk" "$T/r.out" || { cat "$T/r.out"; fail "restore did not name the bad chunk"; }
snapblk volume info bad-r >/dev/null 2>&1 && fail "a partly restored volume was left behind"

log "wrong key, missing repository, bad target"
head -c 32 /dev/urandom >"$T/key2"
if SNAPBLK_KEY_FILE=$T/key2 snapblk backup list "$S3" >"$T/e.out" 2>&1; then fail "wrong key accepted"; fi
grep -qi "wrong key" "$T/e.out" || { cat "$T/e.out"; fail "unclear wrong-key error"; }
for t in s3://snapblk-test/nothing "file://$T/nothing"; do
    if snapblk backup list "$t" >"$T/e.out" 2>&1; then fail "missing repository $t listed"; fi
    grep -q "no snapblk backup repository" "$T/e.out" || { cat "$T/e.out"; fail "unclear error for missing $t"; }
done
if snapblk backup list "ftp://x" >"$T/e.out" 2>&1; then fail "bad target accepted"; fi
grep -q "not a backup target" "$T/e.out" || { cat "$T/e.out"; fail "unclear bad-target error"; }

log "prune + gc"
snapblk --json backup verify "$S3" >"$T/v.json"
[ "$(jq_ 'v["chunks_unreferenced"]' <"$T/v.json")" -eq 0 ] || fail "garbage before prune"
snapblk backup prune "$S3" --keep-last 1 --grace 0 --max-unused 0 >"$T/p.out"
cat "$T/p.out" >&2
grep -q "inc@a" "$T/p.out" || fail "prune --keep-last 1 kept inc@a"
snapblk --json backup verify "$S3" --read-data >"$T/v.json" || { cat "$T/v.json"; fail "verify after gc"; }
[ "$(jq_ 'v["chunks_unreferenced"]' <"$T/v.json")" -eq 0 ] || fail "unreferenced chunks left after gc"
snapblk --json backup list "$S3" | jq_ '"\n".join(b["volume"]+"@"+b["snapshot"] for b in v["backups"])' >"$T/left"
[ "$(sort "$T/left" | tr "\n" " ")" = "fs@one inc@b lz@s " ] || fail "unexpected backups left: $(cat "$T/left")"
snapblk restore "$S3" inc@b --as inc-b2 >/dev/null
same inc@b inc-b2
snapblk restore "$S3" fs@one --as fs-2 >/dev/null
same fs@one fs-2
log "the newest catalog generation deleted from the store: refused by the host that saw it"
snapblk backup inc@b --to "$FILE" >/dev/null
cat_dir=$(ls -d "$T"/filerepo/catalogs/*)
newest=$(ls "$cat_dir" | sort | tail -1)
[ "$newest" = 00000000000000000002 ] || fail "catalog generations: $(ls "$cat_dir")"
mv "$cat_dir/$newest" "$T/catalog.saved"
rc=0; snapblk backup list "$FILE" >"$T/rb.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q "rolled back" "$T/rb.out" || { cat "$T/rb.out"; fail "backup list of a rolled-back repository: rc $rc"; }
snapblk restore "$FILE" fs@one --as fs-rb >"$T/rb.out" 2>&1 && fail "the daemon restored from a rolled-back repository"
grep -q "rolled back" "$T/rb.out" || { cat "$T/rb.out"; fail "unclear error from the daemon"; }
# A host that never saw generation 2 cannot tell, but verify finds the backup's header
# that no catalog lists.
rc=0; SNAPBLK_STATE_DIR=$T/other-host snapblk --json backup verify "$FILE" >"$T/rb.json" || rc=$?
[ "$rc" -eq 1 ] || fail "verify on a host without marks: rc $rc"
[ "$(jq_ 'len(v["uncatalogued"])' <"$T/rb.json")" -eq 1 ] || { cat "$T/rb.json"; fail "verify did not report the orphaned header"; }
mv "$T/catalog.saved" "$cat_dir/$newest"
snapblk backup verify "$FILE" >"$T/rb.out" || { cat "$T/rb.out"; fail "verify after putting the catalog back"; }
grep -q "catalog of pool .* generation 2" "$T/rb.out" || { cat "$T/rb.out"; fail "verify does not name the catalog generation"; }
snapblk backup forget "$FILE" inc@b >/dev/null
log "hosts: list and restore select by host; a restore says whose backup it took"
host=$(cat /proc/sys/kernel/hostname)
snapblk backup list "$FILE" --from "$host" | grep -q "fs@one .* $host " || fail "backup list --from $host"
snapblk backup list "$FILE" --from no-such-host >/dev/null 2>&1 && fail "list --from an unknown host succeeded"
snapblk --json restore "$FILE" fs@one --as fs-from --from "$host" >"$T/from.json"
[ "$(jq_ 'v["host"]' <"$T/from.json")" = "$host" ] || { cat "$T/from.json"; fail "restore does not say the host"; }
same fs@one fs-from
snapblk --json backup list "$FILE" | jq_ '" ".join(b["volume"]+"@"+b["snapshot"] for b in v["backups"])' >"$T/left"
[ "$(cat "$T/left")" = "fs@one" ] || fail "after forget: $(cat "$T/left")"
assert_check_clean
log "no key material or S3 secret in logs or JSON output"
keyhex=$(od -An -tx1 "$T/key" | tr -d ' \n')
if grep -rl -e "$AWS_SECRET_ACCESS_KEY" -e "$keyhex" "$T"/*.json "$T"/*.out "$T/daemon.log" 2>/dev/null; then
    fail "a secret appears in output"
fi
log "backup: all checks passed"
