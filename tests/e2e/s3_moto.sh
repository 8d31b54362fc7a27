#!/usr/bin/env bash
# A second S3-compatible server (issue 12): moto's server (PyPI `moto[server]`, installed
# by scripts/setup.sh into its own venv) besides s3s-fs. Every repository operation runs
# against it once: init (creates the bucket), full and incremental backups from the
# daemon, list, verify --read-data, a full and a lazy restore compared with their
# snapshots, forget, prune + gc, and a last restore after gc. The SDK's flexible checksums
# are requested only when required (crates/s3): a server that rejects them would fail
# here. moto accepts any credentials, so signing is s3s-fs's tests' job.
source "$(dirname "$0")/lib.sh"
MOTO=${MOTO_SERVER:-/var/cache/snapblk/tools/moto/bin/moto_server}
[ -x "$MOTO" ] || MOTO=$(command -v moto_server) || fail "moto_server not found (run scripts/setup.sh)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >>"$T/moto.log" 2>&1 &
MOTO_PID=$!
defer "kill $MOTO_PID; wait $MOTO_PID"
for _ in $(seq 1 200); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    kill -0 "$MOTO_PID" 2>/dev/null || { cat "$T/moto.log" >&2; fail "moto_server exited at start"; }
    sleep 0.1
done
export AWS_ACCESS_KEY_ID=moto AWS_SECRET_ACCESS_KEY=moto-secret AWS_EC2_METADATA_DISABLED=true AWS_REGION=us-east-1
export SNAPBLK_S3_ENDPOINT=http://127.0.0.1:$PORT
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
create_pool 1G
start_daemon
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-moto/repo

snapblk repo init "$S3" --pack-size 1M >/dev/null || { cat "$T/moto.log" >&2; fail "repo init against moto"; }
snapblk volume create v --size 32M >/dev/null
head -c 12M /dev/urandom >"$T/a"; nbdcopy "$T/a" "$(uri v)"
snapblk snapshot create v@s1 >/dev/null
snapblk --json backup v@s1 --to "$S3" >"$T/b1.json" || fail "full backup to moto"
/usr/bin/python3 "$(dirname "$0")/nbd_write_random.py" "$(uri v)" 16 65536
snapblk snapshot create v@s2 >/dev/null
snapblk --json backup v@s2 --to "$S3" >"$T/b2.json" || fail "incremental backup to moto"
[ "$(jq_ 'v["base"] is not None' <"$T/b2.json")" = True ] || fail "the second backup was not incremental: $(cat "$T/b2.json")"
up=$(jq_ 'v["stats"]["bytes_uploaded"]' <"$T/b2.json")
[ "$up" -lt $((4 << 20)) ] || fail "the incremental uploaded $up bytes for 1 MiB changed"

snapblk --json backup list "$S3" >"$T/list.json" || fail "backup list"
[ "$(jq_ 'len(v["backups"])' <"$T/list.json")" -eq 2 ] || fail "list: $(cat "$T/list.json")"
snapblk backup verify "$S3" --read-data >"$T/verify.out" || { cat "$T/verify.out"; fail "verify --read-data"; }

snapblk restore "$S3" v@s2 --as r2 >/dev/null || fail "restore from moto"
qemu-img compare -q -f raw -F raw "$(uri v@s2)" "$(uri r2)" || fail "restored v@s2 differs"
snapblk restore "$S3" v@s1 --as lz --lazy >/dev/null || fail "lazy restore from moto"
for _ in $(seq 1 600); do
    [ "$(snapblk --json restore-status | jq_ '[r for r in v if r["volume"]=="lz"][0]["complete"]' 2>/dev/null)" = True ] && break
    sleep 0.1
done
qemu-img compare -q -f raw -F raw "$(uri v@s1)" "$(uri lz)" || fail "lazily restored v@s1 differs"

log "forget, prune + gc, restore after gc"
snapblk volume create w --size 8M >/dev/null
head -c 4M /dev/urandom >"$T/w"; nbdcopy "$T/w" "$(uri w)"
snapblk snapshot create w@x >/dev/null
snapblk backup w@x --to "$S3" >/dev/null || fail "backup w@x"
snapblk backup forget "$S3" w@x >/dev/null || fail "forget w@x"
snapblk backup prune "$S3" --keep-last 1 --grace 0 --max-unused 0 >"$T/prune.out" || { cat "$T/prune.out"; fail "prune + gc"; }
snapblk --json backup list "$S3" >"$T/list2.json"
[ "$(jq_ '[b["volume"]+"@"+b["snapshot"] for b in v["backups"]]' <"$T/list2.json")" = "['v@s2']" ] || fail "after prune: $(cat "$T/list2.json")"
snapblk --json backup verify "$S3" >"$T/v2.json" || fail "verify after gc: $(cat "$T/v2.json")"
[ "$(jq_ 'v["chunks_unreferenced"]' <"$T/v2.json")" -eq 0 ] || fail "gc left unreferenced chunks: $(cat "$T/v2.json")"
snapblk volume delete r2 >/dev/null
snapblk restore "$S3" v@s2 --as r3 >/dev/null || fail "restore after gc"
qemu-img compare -q -f raw -F raw "$(uri v@s2)" "$(uri r3)" || fail "v@s2 restored after gc differs"
log "s3_moto: all checks passed"
