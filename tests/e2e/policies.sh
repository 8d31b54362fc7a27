#!/usr/bin/env bash
# Protection policies in the real daemon (issue 13, first step): a policy with a
# second-scale schedule snapshots two volumes while a writer runs, retention keeps the
# last 3 of its own snapshots and never touches a manual one, `jobs` shows the history,
# a daemon restart keeps policy and history (catch-up once is tested against a driven
# clock in crates/policy), the dry run explains every decision, a missing volume fails the job without stopping the others,
# and a bad schedule is refused with a reason.
source "$(dirname "$0")/lib.sh"

expect_error() { # PATTERN CMD...
    local pat=$1; shift
    if "$@" >"$T/out" 2>"$T/err"; then fail "expected failure: $*"; fi
    grep -qiE "$pat" "$T/err" || { cat "$T/err"; fail "error for '$*' does not mention '$pat'"; }
}
autos() { snapblk --json snapshot list "$1" | python3 -c '
import json,sys; print(len([s for s in json.load(sys.stdin) if s["name"].startswith("p-")]))'; }

create_pool 1G
start_daemon
snapblk volume create a --size 64M >/dev/null
snapblk volume create b --size 64M >/dev/null
snapblk snapshot create a@manual >/dev/null

log "a bad schedule is refused with its reason"
expect_error "calendar expression 'every tuesday'" snapblk policy set p --volume a \
    --schedule "every tuesday" --keep-last 3
expect_error "policy name" snapblk policy set "bad/name" --volume a --schedule hourly

log "every 2 s, keep the last 3, while a writer runs"
qemu-io -f raw -c "write -P 0x11 0 8M" "$(uri a)" >/dev/null
( for i in $(seq 1 40); do qemu-io -f raw -c "write -P $((i % 200 + 1)) $((i % 16))M 1M" "$(uri a)" >/dev/null 2>&1; sleep 0.2; done ) &
WRITER=$!
snapblk policy set p --volume a --volume b --schedule "*:*:0/2" --keep-last 3 >/dev/null
sleep 9
wait $WRITER
# Same policy on a yearly schedule: setting it waits for a run in progress, so the counts
# below are not taken between a run's snapshot and its retention.
snapblk policy set p --volume a --volume b --schedule yearly --keep-last 3 >/dev/null
for v in a b; do
    n=$(autos $v)
    [ "$n" -eq 3 ] || { snapblk snapshot list $v; fail "$v keeps $n policy snapshots, want 3"; }
done
snapblk snapshot info a@manual >/dev/null || fail "retention deleted a manual snapshot"
runs=$(snapblk --json jobs | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["state"]["runs"])')
[ "$runs" -ge 3 ] || fail "only $runs runs in 9 s of a 2 s schedule"
snapblk jobs | grep -q "snapshot:p.*ok" || { snapblk jobs; fail "jobs does not show the ok runs"; }
assert_check_clean

log "the dry run explains every decision and changes nothing"
snapblk policy plan p > "$T/plan"
grep -q "keep    a@p-.*(last)" "$T/plan" || { cat "$T/plan"; fail "plan lacks reasons"; }
grep -q "manual" "$T/plan" && fail "the plan considers a snapshot the policy did not take"
[ "$(autos a)" -eq 3 ] || fail "plan changed something"

log "restart: policy and history survive, the job goes on"
snapblk policy set p --volume a --volume b --schedule "*:*:0/2" --keep-last 3 >/dev/null
stop_daemon
sleep 3
start_daemon
sleep 1
snapblk --json jobs > "$T/jobs"
python3 - "$T/jobs" "$runs" <<'PY' || fail "history lost over a restart"
import json, sys
j = json.load(open(sys.argv[1]))[0]
assert j["state"]["runs"] > int(sys.argv[2]), j["state"]
assert len(j["history"]) >= int(sys.argv[2]), len(j["history"])
PY
snapblk --json policy show p | python3 -c '
import json,sys; p=json.load(sys.stdin)["policy"]; assert p["snapshots"]["schedule"] == "*:*:0/2", p' \
    || fail "policy lost over a restart"

log "a missing volume fails the job, the others are still snapshotted"
snapblk policy set p --volume a --volume gone --volume b --schedule yearly --keep-last 3 >/dev/null
sleep 1.1 # not in the second of the last scheduled run (that run's snapshot would be reused)
out=$(snapblk --json jobs run snapshot:p)
echo "$out" | python3 -c '
import json,sys; r=json.load(sys.stdin)
assert r["outcome"]["status"] == "failed" and "volume gone" in r["outcome"]["error"], r
assert any(c.startswith("a@p-") for c in r["created"]) and any(c.startswith("b@p-") for c in r["created"]), r' \
    || { echo "$out"; fail "a missing volume: wrong outcome"; }
snapblk jobs | grep -q "failed" || { snapblk jobs; fail "jobs does not show the failure"; }

log "consistency groups: one snapshot name on every member, all or nothing"
snapblk group create app a b >/dev/null
expect_error "volume.*not found|no volume" snapblk group create bad a nope
snapblk group list | grep -q "app *a b" || { snapblk group list; fail "group list"; }
snapblk snapshot create app@g1 --group >/dev/null
snapblk snapshot info a@g1 >/dev/null && snapblk snapshot info b@g1 >/dev/null || fail "group snapshot missing a member"
snapblk snapshot create b@g2 >/dev/null
expect_error "exists" snapblk snapshot create app@g2 --group
snapblk snapshot info a@g2 >/dev/null 2>&1 && fail "a failed group snapshot left a member snapshot"
log "a policy on the group snapshots its members as one cut"
snapblk policy set ap --group app --schedule yearly --keep-last 2 >/dev/null
snapblk --json jobs run snapshot:ap | python3 -c '
import json,sys; r=json.load(sys.stdin)
assert r["outcome"]["status"] == "ok", r
names = sorted(c.split("@")[1] for c in r["created"])
assert len(names) == 2 and names[0] == names[1], r' || fail "policy on a group"
snapblk policy delete ap >/dev/null
snapblk group delete app >/dev/null
expect_error "not found" snapblk snapshot create app@g3 --group

log "hooks: pre and post around the snapshot; a failing pre hook aborts or warns; a hung one is killed"
run_h() { snapblk --json jobs run snapshot:h; }
snapblk policy set h --volume b --schedule yearly \
    --pre-hook "echo \"\$SNAPBLK_PHASE \$SNAPBLK_POLICY \$SNAPBLK_VOLUMES\" >> $T/hooks.log" \
    --post-hook "echo \"\$SNAPBLK_PHASE \$SNAPBLK_SNAPSHOT\" >> $T/hooks.log" >/dev/null
run_h | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["outcome"]["status"] == "ok" and len(r["created"]) == 1, r' \
    || fail "a run with hooks"
[ "$(sed -n 1p "$T/hooks.log")" = "pre h b" ] || { cat "$T/hooks.log"; fail "pre hook"; }
grep -qE "^post h-[0-9]{8}-[0-9]{6}$" "$T/hooks.log" || { cat "$T/hooks.log"; fail "post hook"; }
n=$(snapblk --json snapshot list b | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
sleep 1.1
snapblk policy set h --volume b --schedule yearly --pre-hook "echo db busy >&2; exit 3" >/dev/null
run_h | python3 -c '
import json,sys; r=json.load(sys.stdin); e=r["outcome"].get("error", "")
assert r["outcome"]["status"] == "failed" and "exit status: 3" in e and "db busy" in e and not r["created"], r' \
    || fail "a failing pre hook must abort"
[ "$(snapblk --json snapshot list b | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -eq "$n" ] \
    || fail "an aborted run took a snapshot"
snapblk policy set h --volume b --schedule yearly --pre-hook "exit 3" --on-pre-hook-failure continue >/dev/null
run_h | python3 -c '
import json,sys; r=json.load(sys.stdin)
assert r["outcome"]["status"] == "ok" and r["created"] and "crash-consistent" in r["warnings"][0], r' \
    || fail "continue: snapshot crash-consistent with a warning"
sleep 1.1
snapblk policy set h --volume b --schedule yearly --pre-hook "sleep 30" --hook-timeout 1 >/dev/null
t0=$(date +%s)
run_h | python3 -c 'import json,sys; r=json.load(sys.stdin); assert "killed after 1 s" in r["outcome"]["error"], r' \
    || fail "a hung hook is killed"
[ $(( $(date +%s) - t0 )) -le 5 ] || fail "the hung hook held the run"
snapblk policy delete h >/dev/null

log "a policy in its own time zone; a bad zone is refused"
expect_error "not known" snapblk policy set tz --volume b --schedule "*-*-* 02:00" --timezone Mars/Olympus
snapblk policy set tz --volume b --schedule "*-*-* 02:00" --timezone America/New_York >/dev/null
snapblk --json jobs | python3 -c '
import json, sys, datetime
from zoneinfo import ZoneInfo
ny = ZoneInfo("America/New_York")
now = datetime.datetime.now(ny)
want = now.replace(hour=2, minute=0, second=0, microsecond=0)
if want <= now:
    want = (want + datetime.timedelta(days=1)).replace(hour=2)
want = want.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
j = [x for x in json.load(sys.stdin) if x["name"] == "snapshot:tz"][0]
assert j["next_run"].startswith(want), (j["next_run"], want)' || fail "the policy time zone is not used"
snapblk policy delete tz >/dev/null

log "deleting the policy stops it; its snapshots stay"
snapblk policy delete p >/dev/null
n=$(autos a)
sleep 4
[ "$(autos a)" -eq "$n" ] || fail "a deleted policy still takes snapshots"
[ -z "$(snapblk --json jobs | python3 -c 'import json,sys; print("".join(j["name"] for j in json.load(sys.stdin)))')" ] \
    || fail "the job outlived its policy"
assert_check_clean
log "policies: ok"
