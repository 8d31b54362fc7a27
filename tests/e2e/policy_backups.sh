#!/usr/bin/env bash
# Backup targets of protection policies in the real daemon (issue 13): two registered
# repositories (a directory and s3s-fs), a policy that snapshots every 2 s and backs up to
# each on its own schedule and retention while a writer runs; an unchanged volume is not
# backed up again; the newest backup restores to the snapshot it was taken of; scheduled
# gc and a rotating verify run; the S3 server going away fails the off-site job (naming
# the repository) without touching the other, and it recovers when the server is back;
# the key stays in its file; targets survive `policy set` and a daemon restart.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
start_s3
create_pool 2G
start_daemon
head -c 32 /dev/urandom >"$T/key"
S3=s3://snapblk-test/policies
USB=file://$T/usb
jobs_json() { snapblk --json jobs >"$T/jobs.json"; }
job() { # NAME PYTHON-EXPR-ON-j
    jobs_json
    python3 - "$T/jobs.json" "$1" "$2" <<'PY'
import json, sys
j = [x for x in json.load(open(sys.argv[1])) if x["name"] == sys.argv[2]]
assert j, sys.argv[2] + " missing"
j = j[0]
h = j["history"]
ok = eval(sys.argv[3])
if not ok:
    print(json.dumps(j, indent=1)[:4000], file=sys.stderr)
    sys.exit(1)
PY
}
expect_error() { # PATTERN CMD...
    local pat=$1; shift
    if "$@" >"$T/out" 2>"$T/err"; then fail "expected failure: $*"; fi
    grep -qiE "$pat" "$T/err" || { cat "$T/err"; fail "error for '$*' does not mention '$pat'"; }
}

snapblk repo init "$S3" --key-file "$T/key" >/dev/null
snapblk repo init "$USB" --key-file "$T/key" >/dev/null
snapblk volume create a --size 64M >/dev/null
snapblk volume create b --size 64M >/dev/null
qemu-io -f raw -c "write -P 0x21 0 16M" "$(uri a)" >/dev/null
qemu-io -f raw -c "write -P 0x42 4M 8M" "$(uri b)" >/dev/null

log "repositories are registered by name; the key stays in its file"
snapblk repo add usb "$USB" --key-file "$T/key" --verify "*:*:0/3" --verify-read-runs 2 >/dev/null
snapblk repo add offsite "$S3" --key-file "$T/key" --gc "*:*:0/5" --gc-grace 0 >/dev/null
expect_error "absolute path" snapblk repo add bad "$USB" --key-file key
expect_error "s3://BUCKET" snapblk repo add bad http://example.com --key-file "$T/key"
snapblk --json repo list >"$T/repos.json"
grep -q "$(xxd -p -c 64 "$T/key")" "$T/repos.json" && fail "the key itself was stored"
snapblk repo list | grep -q "offsite *$S3" || { snapblk repo list; fail "repo list"; }

log "a policy backs up to both, each on its own schedule, while a writer runs"
snapblk policy set p --volume a --volume b --schedule "*:*:0/2" --keep-last 3 >/dev/null
expect_error "not registered" snapblk policy backup-to p nowhere --schedule daily
snapblk policy backup-to p usb --schedule "*:*:0/3" --keep-last 2 >/dev/null
snapblk policy backup-to p offsite --schedule "*:*:0/4" --keep-last 1 >/dev/null
# `policy set` again (as an admin changing the snapshot schedule) keeps the targets.
snapblk policy set p --volume a --volume b --schedule "*:*:0/2" --keep-last 3 >/dev/null
snapblk --json policy show p | python3 -c '
import json,sys; p=json.load(sys.stdin)["policy"]
assert [b["repository"] for b in p["backups"]] == ["usb", "offsite"], p' || fail "policy set dropped the targets"
( for i in $(seq 1 30); do qemu-io -f raw -c "write -P $((i % 200 + 1)) $((i % 16))M 1M" "$(uri a)" >/dev/null 2>&1; sleep 0.3; done ) &
WRITER=$!
sleep 10
wait $WRITER
sleep 5
# Freeze the schedules so the state below is not taken in the middle of a run (setting a
# policy waits for nothing, but the next elapses are a year away; a run in progress ends).
snapblk policy set p --volume a --volume b --schedule yearly --keep-last 3 >/dev/null
snapblk policy backup-to p usb --schedule yearly --keep-last 2 >/dev/null
snapblk policy backup-to p offsite --schedule yearly --keep-last 1 >/dev/null
sleep 3
job backup:p:usb 'j["state"]["runs"] >= 3 and all(r["outcome"]["status"] == "ok" for r in h)' \
    || fail "usb backups did not all succeed"
job backup:p:usb 'sum(c.startswith("a@") for r in h for c in r["created"]) >= 2' \
    || fail "a was not backed up again after it changed"
job backup:p:usb 'sum(c.startswith("b@") for r in h for c in r["created"]) == 1 and any("unchanged since" in s for r in h for s in r.get("skipped", []))' \
    || fail "unchanged b backed up again (or never)"
job backup:p:offsite 'j["state"]["runs"] >= 2 and h[-1]["outcome"]["status"] == "ok"' || fail "offsite backups"
job verify:usb 'j["state"]["runs"] >= 2 and all(r["outcome"]["status"] == "ok" and "part" in r["detail"] for r in h)' \
    || fail "scheduled verify"
job gc:offsite 'j["state"]["runs"] >= 1 and h[-1]["outcome"]["status"] == "ok" and "gc:" in h[-1]["detail"]' \
    || fail "scheduled gc"

log "retention per target: usb keeps 2 of a, offsite 1"
count() { # REPO VOL
    snapblk --json backup list "$1" --key-file "$T/key" | python3 -c '
import json,sys; print(sum(b["volume"] == sys.argv[1] for b in json.load(sys.stdin)["backups"]))' "$2"
}
[ "$(count "$USB" a)" -eq 2 ] || { snapblk backup list "$USB" --key-file "$T/key"; fail "usb keeps $(count "$USB" a) of a"; }
[ "$(count "$S3" a)" -eq 1 ] || fail "offsite keeps $(count "$S3" a) of a"
[ "$(count "$USB" b)" -eq 1 ] || fail "usb holds $(count "$USB" b) of b"

log "the newest backup restores to its snapshot"
newest=$(snapblk --json backup list "$USB" --key-file "$T/key" | python3 -c '
import json,sys; b=[x for x in json.load(sys.stdin)["backups"] if x["volume"] == "a"]; print(b[-1]["snapshot"])')
snapblk snapshot info "a@$newest" >/dev/null || fail "the base a@$newest was deleted by snapshot retention"
snapblk restore "$USB" "a@$newest" --as a-back --key-file "$T/key" >/dev/null
qemu-img compare -q -f raw -F raw "$(uri "a@$newest")" "$(uri a-back)" || fail "restored a differs from a@$newest"

log "the S3 server goes away: the off-site job fails naming it, the other target goes on"
stop_s3
qemu-io -f raw -c "write -P 0x77 32M 1M" "$(uri a)" >/dev/null
snapblk jobs run snapshot:p >/dev/null
snapblk --json jobs run backup:p:offsite >"$T/run.json" || true
python3 -c '
import json,sys; r=json.load(open(sys.argv[1]))
assert r["outcome"]["status"] == "failed" and "repository offsite" in r["outcome"]["error"], r' "$T/run.json" \
    || { cat "$T/run.json"; fail "offsite run with S3 down"; }
snapblk --json jobs run backup:p:usb | python3 -c '
import json,sys; r=json.load(sys.stdin); assert r["outcome"]["status"] == "ok" and r["created"], r' \
    || fail "usb run while S3 is down"
start_s3
snapblk --json jobs run backup:p:offsite | python3 -c '
import json,sys; r=json.load(sys.stdin); assert r["outcome"]["status"] == "ok" and any(c.startswith("a@") for c in r["created"]), r' \
    || fail "offsite did not recover"

log "restart: targets, history and bases persist"
stop_daemon
start_daemon
job backup:p:usb 'len(h) >= 4' || fail "history lost"
snapblk --json policy show p | python3 -c '
import json,sys; p=json.load(sys.stdin)["policy"]; assert len(p["backups"]) == 2, p' || fail "targets lost"

log "a repository in use cannot be removed; a removed target frees it"
expect_error "policy 'p' backs up there" snapblk repo remove usb
snapblk policy backup-remove p usb >/dev/null
snapblk repo remove usb >/dev/null
snapblk repo list | grep -q "^usb " && fail "usb still registered"
snapblk policy delete p >/dev/null
assert_check_clean
log "policy_backups: ok"
