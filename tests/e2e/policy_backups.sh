#!/usr/bin/env bash
# Backup targets of protection policies in the real daemon (issue 13): two registered
# repositories (a directory and s3s-fs), a policy that snapshots every 2 s and backs up to
# each on its own schedule and retention while a writer runs; an unchanged volume is not
# backed up again; the newest backup restores to the snapshot it was taken of; scheduled
# gc and a rotating verify run; the S3 server going away fails the off-site job (naming
# the repository) without touching the other, and it recovers when the server is back;
# the key stays in its file; targets survive `policy set` and a daemon restart;
# `snapblk status` reports compliant (3 copies, 3 media, one off site), violated once the
# S3 server has been gone past its RPO, compliant again when it is back, and a
# repository on the pool's own device as no second medium.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/s3lib.sh"
start_s3
create_pool 2G
start_daemon
head -c 32 /dev/urandom >"$T/key"
S3=s3://snapblk-test/policies
# The "usb" repository lives on another filesystem than the pool (a second medium).
SHM=$(mktemp -d /dev/shm/snapblk-e2e.XXXXXX) || fail "no /dev/shm for a second medium"
defer "rm -rf $SHM"
[ "$(stat -c %d "$SHM")" != "$(stat -c %d "$T")" ] || fail "/dev/shm is on the pool's filesystem"
USB=file://$SHM/usb
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
# The NBD client of a compare may still be disconnecting: the volume is busy a moment.
delete_volume() {
    for _ in $(seq 1 50); do
        snapblk volume delete "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    snapblk volume delete "$1" >/dev/null
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
# A first snapshot before the targets: a backup run with no policy snapshot yet fails.
snapblk jobs run snapshot:p >/dev/null
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
delete_volume a-back

log "backup copy: by hand and on a schedule, no volume read; copies restore"
VAULT=file://$T/vault
snapblk repo init "$VAULT" --key-file "$T/key" >/dev/null
snapblk --json backup copy "$USB" "$VAULT" --key-file "$T/key" >"$T/copy.json"
n_usb=$(snapblk --json backup list "$USB" --key-file "$T/key" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["backups"]))')
python3 -c '
import json,sys; c=json.load(open(sys.argv[1]))["copied"]
assert len(c) == int(sys.argv[2]) and all(not x["summary"]["already_stored"] for x in c), c' "$T/copy.json" "$n_usb" \
    || { cat "$T/copy.json"; fail "backup copy"; }
snapblk backup copy "$USB" "$VAULT" --key-file "$T/key" | grep -q "copied 0 backups" || fail "a second copy copied again"
snapblk restore "$VAULT" "a@$newest" --as a-vault --key-file "$T/key" >/dev/null
qemu-img compare -q -f raw -F raw "$(uri "a@$newest")" "$(uri a-vault)" || fail "the copy restores differently"
delete_volume a-vault
snapblk backup verify "$VAULT" --read-data --key-file "$T/key" >/dev/null || fail "the copy does not verify"
snapblk repo add vault "$VAULT" --key-file "$T/key" --copy-from usb --copy "*:*:0/2" >/dev/null
qemu-io -f raw -c "write -P 0x66 40M 1M" "$(uri a)" >/dev/null
snapblk jobs run snapshot:p >/dev/null
snapblk jobs run backup:p:usb >/dev/null
sleep 4
job copy:vault 'h[-1]["outcome"]["status"] == "ok" and any(c.startswith("a@") for r in h for c in r["created"])' \
    || fail "the scheduled copy"
snaps_in() { snapblk --json backup list "$1" --key-file "$T/key" | python3 -c '
import json,sys; print(" ".join(sorted(b["snapshot"] for b in json.load(sys.stdin)["backups"] if b["volume"] == "a")))'; }
python3 -c 'import sys; assert set(sys.argv[1].split()) <= set(sys.argv[2].split()), sys.argv' \
    "$(snaps_in "$USB")" "$(snaps_in "$VAULT")" || fail "vault lacks a backup usb holds"
# Taking the schedule away is refused while a scheduled copy runs (every 2 s): retry.
for _ in $(seq 50); do
    snapblk repo add vault "$VAULT" --key-file "$T/key" >/dev/null 2>"$T/readd.err" && break
    grep -q "is running" "$T/readd.err" || { cat "$T/readd.err" >&2; fail "repo add vault without a schedule"; }
    sleep 0.2
done
grep -q "is running" "$T/readd.err" && fail "the scheduled copy never stopped running"

status_is() { # VERDICT EXIT [VOLUME]
    local code=0
    snapblk --json status ${3:-} >"$T/status.json" || code=$?
    python3 -c '
import json,sys; s=json.load(open(sys.argv[1]))
assert s["verdict"] == sys.argv[2], s' "$T/status.json" "$1" && [ "$code" -eq "$2" ] \
        || { snapblk status ${3:-}; fail "status ${3:-}: want $1 (exit $2), exit $code"; }
}
log "status: the live volume, a directory on another medium and S3 off site: compliant"
snapblk policy set p --volume a --volume b --schedule "*:*:0/2" --keep-last 3 >/dev/null
snapblk policy backup-to p offsite --schedule "*:*:0/2" --keep-last 1 --rpo 8s >/dev/null
sleep 5
status_is compliant 0
snapblk status | grep -qE "^a +compliant +3 +3 +yes" || { snapblk status; fail "status table"; }

log "notifications: a webhook and a command"
python3 "$(dirname "$0")/webhook_listener.py" "$T/hook.log" "$T/hook.port" &
HOOK=$!
defer "kill $HOOK"
for _ in $(seq 1 100); do [ -s "$T/hook.port" ] && break; sleep 0.05; done
snapblk notify set --webhook "http://127.0.0.1:$(cat "$T/hook.port")" \
    --command "cat >> $T/cmd.log; echo >> $T/cmd.log" >/dev/null
snapblk notify test >/dev/null || fail "notify test"
grep -q '"event": "test"' "$T/hook.log" || fail "the webhook got no test event"
grep -q '"event":"test"' "$T/cmd.log" || fail "the command got no test event"
expect_error "http" snapblk notify set --webhook ftp://x
events() { # FILE EVENT VOLUME-OR-JOB
    python3 -c '
import json,sys
n = 0
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == sys.argv[2] and sys.argv[3] in (e.get("volume"), e.get("job")):
        n += 1
print(n)' "$@"
}

log "the S3 server goes away: past its RPO the volumes are violated (notified); it recovers"
stop_s3
sleep 10
status_is violated 2
sleep 1
[ "$(events "$T/hook.log" rpo_violated a)" -eq 1 ] || { cat "$T/hook.log"; fail "no single rpo_violated event for a"; }
[ "$(events "$T/hook.log" job_failed backup:p:offsite)" -eq 1 ] || { cat "$T/hook.log"; fail "no single job_failed event"; }
[ "$(events "$T/cmd.log" rpo_violated b)" -eq 1 ] || { cat "$T/cmd.log"; fail "the command missed rpo_violated for b"; }
python3 -c '
import json,sys; s=json.load(open(sys.argv[1]))
for v in s["volumes"]:
    assert any(r.startswith("offsite: newest backup") and "over its RPO" in r for r in v["reasons"]), v' "$T/status.json" \
    || { cat "$T/status.json"; fail "the violation does not say why"; }
job backup:p:offsite 'h[-1]["outcome"]["status"] == "failed" and "repository offsite" in h[-1]["outcome"]["error"]' \
    || fail "the off-site job does not fail naming its repository"
snapblk --json jobs run backup:p:usb | python3 -c '
import json,sys; r=json.load(sys.stdin); assert r["outcome"]["status"] == "ok", r' \
    || fail "usb run while S3 is down"
start_s3
sleep 5
status_is compliant 0
sleep 1
[ "$(events "$T/hook.log" rpo_recovered a)" -eq 1 ] || { cat "$T/hook.log"; fail "no rpo_recovered event"; }
[ "$(events "$T/hook.log" job_recovered backup:p:offsite)" -eq 1 ] || { cat "$T/hook.log"; fail "no job_recovered event"; }

log "a repository on the pool's own device is a copy, not a second medium"
snapblk repo init "file://$T/local" --key-file "$T/key" >/dev/null
snapblk repo add local "file://$T/local" --key-file "$T/key" >/dev/null
snapblk volume create c --size 16M >/dev/null
snapblk policy set q --volume c --schedule yearly >/dev/null
snapblk policy backup-to q local --schedule yearly >/dev/null
snapblk jobs run snapshot:q >/dev/null
snapblk jobs run backup:q:local >/dev/null
status_is at_risk 1 c
grep -q "local is on the pool's own device: not a second medium" "$T/status.json" \
    || { cat "$T/status.json"; fail "a pool-local repository counted as a second medium"; }
log "a backup forgotten by hand no longer counts: c has none left, so it is violated"
csnap=$(snapblk --json snapshot list c | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["name"])')
snapblk backup forget "file://$T/local" "c@$csnap" --key-file "$T/key" >/dev/null
status_is violated 2 c
snapblk policy delete q >/dev/null
snapblk repo remove local >/dev/null
snapblk policy set p --volume a --volume b --schedule yearly --keep-last 3 >/dev/null
snapblk policy backup-to p offsite --schedule yearly --keep-last 1 >/dev/null

log "restart: targets, history and bases persist"
stop_daemon
start_daemon
job backup:p:usb 'len(h) >= 4' || fail "history lost"
snapblk --json policy show p | python3 -c '
import json,sys; p=json.load(sys.stdin)["policy"]; assert len(p["backups"]) == 2, p' || fail "targets lost"

log "a repository in use cannot be removed; a removed target frees it"
expect_error "policy 'p' backs up there" snapblk repo remove usb
snapblk repo add vault "$VAULT" --key-file "$T/key" --copy-from usb --copy yearly >/dev/null
snapblk policy backup-remove p usb >/dev/null
expect_error "'vault' copies from it" snapblk repo remove usb
snapblk repo remove vault >/dev/null
snapblk policy backup-to p usb --schedule yearly >/dev/null
snapblk policy backup-remove p usb >/dev/null
snapblk repo remove usb >/dev/null
snapblk repo list | grep -q "^usb " && fail "usb still registered"
snapblk policy delete p >/dev/null
assert_check_clean
log "policy_backups: ok"
