#!/usr/bin/env bash
# S3 faults between snapblk and a real S3 server: s3_fault_proxy.py on 127.0.0.1 in front
# of s3s-fs injects 500/503 errors, dropped connections, hung requests and a slow link.
# Transient faults: backups retry and succeed, verify and restores are exact. Persistent
# faults: backups fail naming the target and the cause, no manifest appears, the daemon
# keeps serving, and the rerun reuses what was stored. Hung requests and a link slower
# than --s3-min-rate fail within (--s3-timeout + bytes / rate) x --s3-attempts; a slow link
# above it completes however large the packs. Lazy restore: reads of
# unhydrated cells fail with EIO (never wrong data) while S3 fails, and hydration recovers
# when it answers again.
# S3_FAULTS_STRICT=0 logs the once-known issues as "KNOWN ISSUE" instead of failing.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
STRICT=${S3_FAULTS_STRICT:-1}

# No command may hang the test: a hung S3 request must end in --s3-timeout x --s3-attempts.
snapblk() { timeout 180 "$SNAPBLK_BIN" "$@"; }
fail() {
    echo "FAIL: $*" >&2
    if [ -f "$T/proxy.log" ]; then echo "--- proxy log (last 20 lines) ---" >&2; tail -20 "$T/proxy.log" >&2; fi
    exit 1
}
known_issue() {
    [ "$STRICT" = 1 ] && fail "$*"
    log "KNOWN ISSUE (S3_FAULTS_STRICT=1 fails on it): $*"
}

preset() { python3 "$PROXY" ctl "$PROXY_CTL" reset >/dev/null; }
# pstat COUNTER: how many since the last preset (0 if none)
pstat() {
    python3 "$PROXY" ctl "$PROXY_CTL" stats |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$1"
}
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
same() { qemu-img compare -q -f raw -F raw "$(uri "$1")" "$(uri "$2")" || fail "$2 differs from $1"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# change SNAP: 48 random 64 KiB cells of v, then snapshot v@SNAP (3 MiB of new chunks)
change() {
    /usr/bin/python3 "$HERE/nbd_write_random.py" "$(uri v)" 48 65536
    snapblk snapshot create "v@$1" >/dev/null
}
listed() { snapblk --json backup list "$S3" | jq_ '" ".join(b["volume"]+"@"+b["snapshot"] for b in v["backups"])'; }
manifests() { { find "$S3_ROOT/snapblk-test/faults/manifests" -type f 2>/dev/null || true; } | wc -l; }
daemon_serves() {
    kill -0 "$DAEMON_PID" 2>/dev/null || fail "the daemon died ($1)"
    snapblk pool info >/dev/null || fail "pool info failed ($1)"
    assert_check_clean
}
# expect_failure NAME SNAP [backup options]: the backup fails; output in $T/NAME.out, and
# no manifest of it appears
expect_failure() {
    local name=$1 snap=$2 before rc=0
    shift 2
    before=$(manifests)
    snapblk backup "v@$snap" --to "$S3" "$@" >"$T/$name.out" 2>&1 || rc=$?
    cat "$T/$name.out" >&2
    [ $rc -ne 0 ] || fail "$name: backup of v@$snap succeeded"
    [ $rc -ne 124 ] || fail "$name: backup of v@$snap hung (killed after 180 s)"
    grep -q "s3://snapblk-test/faults" "$T/$name.out" || fail "$name: the error does not name the target"
    [ "$(manifests)" -eq "$before" ] || fail "$name: a manifest was stored by a failed backup"
    case " $(listed) " in *" v@$snap "*) fail "$name: backup list shows v@$snap" ;; esac
    daemon_serves "$name"
}

start_s3
create_pool 2G
AWS_ACCESS_KEY_ID= AWS_SECRET_ACCESS_KEY= start_daemon
start_proxy
head -c 32 /dev/urandom >"$T/key"
export SNAPBLK_KEY_FILE=$T/key
S3=s3://snapblk-test/faults
snapblk repo init "$S3" >/dev/null

log "repo init whose config upload is answered by a lost connection: the retry recognises its own config"
preset; fault lose count=1 method=PUT path=/config
snapblk repo init s3://snapblk-test/lost >"$T/init.out" 2>&1 || { cat "$T/init.out" >&2; fail "repo init after a lost answer"; }
[ "$(pstat fault_lose)" -eq 1 ] || fail "the proxy lost $(pstat fault_lose) answers, not 1"
snapblk backup list s3://snapblk-test/lost >/dev/null || fail "the repository created through a lost answer does not open"
snapblk repo init s3://snapblk-test/lost >/dev/null 2>&1 && fail "a second repo init over an existing repository succeeded"
fault pass

snapblk volume create v --size 32M >/dev/null
head -c 16M /dev/urandom >"$T/rand"
nbdcopy "$T/rand" "$(uri v)"
rm "$T/rand"
snapblk snapshot create v@t503 >/dev/null

log "transient 503 SlowDown on the next 3 requests: the backup retries and succeeds"
preset; fault 503 count=3
snapblk --json backup v@t503 --to "$S3" >"$T/t503.json" || fail "backup through 3 transient 503s"
[ "$(pstat fault_503)" -eq 3 ] || fail "the proxy injected $(pstat fault_503) 503s, not 3"

log "transient 500 InternalError on 4 attempts of a pack upload: the 5th attempt stores it"
change t500
preset; fault 500 count=4 method=PUT path=/packs/
snapblk --json backup v@t500 --to "$S3" >"$T/t500.json" || fail "backup through 4 transient 500s"
[ "$(pstat fault_500)" -eq 4 ] || fail "the proxy injected $(pstat fault_500) 500s, not 4"
# (Chunks a compaction stored again count as new too.)
[ "$(jq_ 'v["stats"]["chunks_new"] - v["stats"].get("chunks_compacted", 0)' <"$T/t500.json")" -eq 48 ] \
    || fail "v@t500 did not store its 48 chunks: $(cat "$T/t500.json")"

log "a pack upload cut mid-body: the backup retries and succeeds"
change tdrop
preset; fault drop count=1 method=PUT path=/packs/
snapblk backup v@tdrop --to "$S3" >/dev/null || fail "backup through a dropped upload"
[ "$(pstat fault_drop_put)" -eq 1 ] || fail "the proxy cut $(pstat fault_drop_put) uploads, not 1"
grep -q "cut after [0-9]* body bytes" "$T/proxy.log" || fail "no upload was cut mid-body"

log "the answer to the catalog upload (the commit point, create-only) is lost (S3 stored it): the retry's 412 is recognised as our own write"
change tlose
preset; fault lose count=1 method=PUT path=/catalogs/
snapblk backup v@tlose --to "$S3" >/dev/null || fail "backup whose catalog answer was lost"
[ "$(pstat fault_lose)" -eq 1 ] || fail "the proxy lost $(pstat fault_lose) answers, not 1"

log "a response cut mid-body (loading the chunk index)"
change tget
# As a host that has not cached the pack indexes yet (its local chunk index is built
# from them): this host's were cached when it uploaded them.
rm -rf "$SNAPBLK_STATE_DIR/cache"
preset; fault drop count=1 method=GET path=/ix/
if snapblk backup v@tget --to "$S3" >"$T/tget.out" 2>&1; then
    [ "$(pstat fault_drop_get)" -eq 1 ] || fail "the proxy cut $(pstat fault_drop_get) responses, not 1"
else
    cat "$T/tget.out" >&2
    [ "$(pstat fault_drop_get)" -eq 1 ] || fail "the proxy cut $(pstat fault_drop_get) responses, not 1"
    grep -q "get ix/.*reading the body" "$T/tget.out" || fail "unclear error for a cut response"
    case " $(listed) " in *" v@tget "*) fail "backup list shows the failed v@tget" ;; esac
    known_issue "a GET response cut after its head is not retried: one dropped connection fails the backup"
    fault pass
    snapblk backup v@tget --to "$S3" >/dev/null || fail "rerun of v@tget"
fi

log "verify --read-data and restores after the transient faults"
fault pass
snapblk --json backup verify "$S3" --read-data >"$T/v.json" || { cat "$T/v.json"; fail "verify after transient faults"; }
[ "$(jq_ 'v["chunks_unreferenced"]' <"$T/v.json")" -eq 0 ] || fail "unreferenced chunks after retried uploads"
for s in t503 tdrop tlose tget; do
    snapblk restore "$S3" "v@$s" --as "r-$s" >/dev/null || fail "restore of v@$s"
    same "v@$s" "r-$s"
done

log "a pack download cut mid-body during verify --read-data and during a restore"
preset; fault drop count=1 method=GET path=/packs/
if ! snapblk backup verify "$S3" --read-data >"$T/vget.out" 2>&1; then
    cat "$T/vget.out" >&2
    known_issue "one cut response makes verify --read-data report a pack as unreadable and exit 1"
fi
[ "$(pstat fault_drop_get)" -eq 1 ] || fail "the proxy cut $(pstat fault_drop_get) responses, not 1"
preset; fault drop count=1 method=GET path=/packs/
if snapblk restore "$S3" v@tdrop --as r-get >"$T/rget.out" 2>&1; then
    same v@tdrop r-get
else
    cat "$T/rget.out" >&2
    grep -q "get packs/.*reading the body" "$T/rget.out" || fail "unclear error for a cut download"
    snapblk volume info r-get >/dev/null 2>&1 && fail "a failed restore left a volume behind"
    known_issue "one cut response fails a restore (cleanly: the new volume is removed)"
fi
[ "$(pstat fault_drop_get)" -eq 1 ] || fail "the proxy cut $(pstat fault_drop_get) responses, not 1"
fault pass

log "persistent 503 on pack uploads: the backup fails after 5 attempts per pack"
change p
preset; fault 503 method=PUT path=/packs/
expect_failure p503 p
grep -q "put packs/.*SlowDown (HTTP 503)" "$T/p503.out" || fail "the error does not say 503 SlowDown"
[ "$(pstat fault_503)" -ge 5 ] || fail "only $(pstat fault_503) attempts: the upload was not retried"

log "persistent dropped connections on pack uploads"
preset; fault drop method=PUT path=/packs/
expect_failure pdrop p
grep -Eq "put packs/.* failed: cannot reach the server.*(reset|closed|broken pipe)" "$T/pdrop.out" ||
    fail "the error does not say the connection was lost"
[ "$(pstat fault_drop_put)" -ge 5 ] || fail "only $(pstat fault_drop_put) attempts: the upload was not retried"

log "persistent 500 on the catalog (the commit point): fails with everything else stored"
preset; fault 500 method=PUT path=/catalogs/
expect_failure p500 p
grep -q "catalogs/.*InternalError (HTTP 500)" "$T/p500.out" || fail "the error does not say 500 InternalError"
[ "$(pstat fault_500)" -eq 5 ] || fail "$(pstat fault_500) attempts of the catalog upload, not 5"

log "S3 answers again: the same backup completes, reusing the stored chunks"
fault pass
snapblk --json backup v@p --to "$S3" >"$T/p.json" || fail "backup v@p after the faults"
new=$(jq_ 'v["stats"]["chunks_new"]' <"$T/p.json")
reused=$(jq_ 'v["stats"]["chunks_reused"]' <"$T/p.json")
up=$(jq_ 'v["stats"]["bytes_uploaded"]' <"$T/p.json")
# A backup may also compact (store again chunks of its sparsest packs, read from the
# snapshot): those count as new; nothing else may be uploaded again.
compacted=$(jq_ 'v["stats"].get("chunks_compacted", 0)' <"$T/p.json")
log "rerun: $new new chunks ($compacted of them compaction), $reused reused, $up bytes uploaded"
[ "$new" -eq "$compacted" ] && { [ "$compacted" -gt 0 ] || [ "$up" -eq 0 ]; } && [ "$reused" -ge 48 ] \
    || fail "the rerun did not reuse the stored chunks"
[ "$(listed | tr ' ' '\n' | grep -c '^v@p$')" -eq 1 ] || fail "v@p is not listed once"
snapblk restore "$S3" v@p --as r-p >/dev/null
same v@p r-p

log "S3 stops answering pack uploads: fails within (--s3-timeout 2 + bytes at --s3-min-rate) x --s3-attempts 2"
change to
preset; fault timeout method=PUT path=/packs/
t0=$(now_ms)
expect_failure timeout to --s3-timeout 2 --s3-attempts 2 --s3-min-rate 1024
el=$(($(now_ms) - t0))
log "failed after $el ms"
grep -q "put packs/.* failed: timed out" "$T/timeout.out" || fail "the error does not say timed out"
[ "$(pstat fault_timeout)" -ge 2 ] || fail "only $(pstat fault_timeout) hung requests"
[ "$el" -ge 4000 ] && [ "$el" -lt 30000 ] || fail "failed after $el ms (2 attempts of 2 s + 3 MiB at 1 MiB/s expected)"

log "throttled to 1 MiB/s: the backup completes, slowly"
preset; fault throttle rate=1024
t0=$(now_ms)
snapblk backup v@to --to "$S3" >/dev/null || fail "backup through a 1 MiB/s link"
el=$(($(now_ms) - t0))
thr=$(pstat throttled_bytes)
log "3 MiB of new chunks in $el ms; $thr bytes paced"
[ "$thr" -ge $((3 << 20)) ] || fail "only $thr bytes went through the throttle"
[ "$el" -ge 2500 ] || fail "a 3 MiB upload at 1 MiB/s took $el ms: not throttled"
fault pass
snapblk restore "$S3" v@to --as r-to >/dev/null
same v@to r-to

log "--limit-upload 1M: 3 MiB of new chunks take at least ~3 s"
change lim
t0=$(now_ms)
snapblk backup v@lim --to "$S3" --limit-upload 1M >/dev/null || fail "backup with --limit-upload"
el=$(($(now_ms) - t0))
log "3 MiB uploaded under a 1 MiB/s limit in $el ms"
[ "$el" -ge 2800 ] || fail "--limit-upload 1M: 3 MiB uploaded in $el ms"

log "a link slower than --s3-min-rate (256 KiB/s vs 1024; 3 MiB pack; 2 s + 3 s per attempt): times out"
change slow
preset; fault throttle rate=256
expect_failure slow slow --s3-timeout 2 --s3-attempts 2 --s3-min-rate 1024
grep -q "put packs/.* failed: timed out" "$T/slow.out" || fail "the error does not say timed out"
log "the same slow link with the default --s3-min-rate: each attempt gets time for its bytes; completes"
# (With a fixed per-attempt timeout, as before, a 2 s attempt could never move a 3 MiB
# pack at 256 KiB/s: links slower than pack size / timeout could never finish a backup.)
preset; fault throttle rate=256
snapblk backup v@slow --to "$S3" --s3-timeout 2 --s3-attempts 2 >"$T/slow2.out" 2>&1 ||
    { cat "$T/slow2.out"; fail "v@slow over a slow link with the default minimum rate"; }
fault pass

log "lazy restore: S3 fails while cells are unhydrated"
rs() { snapblk --json restore-status | jq_ "[r for r in v if r['volume']=='lz'][0]['$1']"; }
# reads CHECK FIRST COUNT: read cells [FIRST, FIRST+COUNT) of lz against v@t503
reads() {
    timeout 120 /usr/bin/python3 "$HERE/nbd_read_cells.py" "$(uri lz)" "$(uri v@t503)" 65536 "$2" "$3" \
        >"$T/$1.json" || fail "$1: reading lz failed or hung"
    log "$1: $(cat "$T/$1.json")"
    [ "$(jq_ 'v["wrong"]' <"$T/$1.json")" -eq 0 ] || fail "$1: reads returned wrong data"
    [ "$(jq_ 'v["other"]' <"$T/$1.json")" -eq 0 ] || fail "$1: reads failed other than with EIO"
    [ "$(jq_ 'v.get("reconnects", 0)' <"$T/$1.json")" -eq 0 ] || fail "$1: the server dropped the NBD connection"
}
preset; fault throttle rate=64
snapblk --json restore "$S3" v@t503 --as lz --lazy --s3-attempts 2 --s3-timeout 3 >"$T/lazy.json"
fault 503 cut
remaining=$(rs cells_remaining)
log "$remaining cells to hydrate when S3 started failing"
[ "$remaining" -gt 0 ] || fail "hydration finished before the fault; the test proves nothing"
# Cells 224..255 hold data, 256..287 are zeros (not in the backup, no fetch needed).
reads r503 224 64
[ "$(jq_ 'v["eio"]' <"$T/r503.json")" -ge 1 ] || fail "no read failed with 503 from S3"
[ "$(jq_ 'v["ok"]' <"$T/r503.json")" -ge 32 ] || fail "zero cells failed to read"
[ "$(jq_ 'v["eio"] + v["ok"]' <"$T/r503.json")" -eq 64 ] || fail "cells missing from the 503 reads"
[ "$(pstat fault_503)" -ge 1 ] || fail "no 503 injected"
fault drop
reads rdrop 0 32
[ "$(jq_ 'v["eio"]' <"$T/rdrop.json")" -ge 1 ] || fail "no read failed with cut responses"
[ "$(pstat fault_drop_get)" -ge 1 ] || fail "no response cut"
fault timeout
t0=$(now_ms)
reads rtimeout 100 1
el=$(($(now_ms) - t0))
[ "$(jq_ 'v["eio"]' <"$T/rtimeout.json")" -eq 1 ] || fail "a read with S3 hung did not fail with EIO"
[ "$el" -lt 20000 ] || fail "a read with S3 hung took $el ms (2 attempts of 3 s)"
[ "$(rs complete)" = False ] || fail "lazy restore complete while S3 failed"
err=$(rs error)
log "restore-status error: $err"
case "$err" in *"get packs/"*) ;; *) fail "restore-status does not report the fetch error" ;; esac

log "S3 answers again: reads succeed, hydration completes, the volume is exact"
fault pass
reads rpass 224 64
[ "$(jq_ 'v["ok"]' <"$T/rpass.json")" -eq 64 ] || fail "reads still fail after S3 recovered"
for _ in $(seq 1 600); do
    [ "$(rs complete)" = True ] && break
    sleep 0.1
done
snapblk restore-status >&2
[ "$(rs complete)" = True ] || fail "hydration did not complete within 60 s of S3 recovering"
[ "$(rs cells_remaining)" -eq 0 ] || fail "complete with cells remaining"
[ "$(rs error)" = None ] || fail "restore-status still shows an error: $(rs error)"
fault 503 cut
same v@t503 lz
fault pass
daemon_serves "after the lazy restore"
log "s3_faults: all checks passed"
