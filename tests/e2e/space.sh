#!/usr/bin/env bash
# Space (issue 13): a volume over its quota gets ENOSPC while another keeps writing; a pool
# driven under the space guard's threshold by a writer and a policy's snapshots loses its
# oldest unprotected policy snapshots — never the protected one, the newest or a hand-made
# one — and the writer never sees ENOSPC while deletable snapshots remain; the deletions
# and, once nothing is left to delete, the exhaustion are notified.
source "$(dirname "$0")/lib.sh"

# writer.py URI MIB [SNAPSHOT-JOB ROUNDS]: writes MIB MiB of random data from offset 0 in
# 1 MiB requests (FLUSH at the end); with a job, ROUNDS times, running the job after each
# (a new policy snapshot each round). Prints "ENOSPC AT <MiB written>" on ENOSPC.
cat >"$T/writer.py" <<'PY'
import errno, os, subprocess, sys, time
import nbd
uri, mib = sys.argv[1], int(sys.argv[2])
job, rounds = (sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 4 else (None, 1)
h = nbd.NBD()
h.connect_uri(uri)
done = 0
for r in range(rounds):
    for i in range(mib):
        try:
            h.pwrite(os.urandom(1 << 20), i << 20)
        except nbd.Error as e:
            if e.errnum == errno.ENOSPC:
                print(f"ENOSPC AT {done} round {r}", flush=True)
                sys.exit(3)
            raise
        done += 1
    h.flush()
    if job:
        subprocess.run([os.environ["SNAPBLK_BIN"], "jobs", "run", job], check=True,
                       stdout=subprocess.DEVNULL)
        time.sleep(1.05)  # policy snapshot names have one-second resolution
h.shutdown()
print(f"WROTE {done}")
PY
export SNAPBLK_BIN
names() { snapblk --json snapshot list "$1" | python3 -c '
import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))'; }
used_of() { snapblk --json volume info "$1" | json_get used; }

create_pool 64M
start_daemon

log "quota: q may hold 4 MiB; o, beside it, is not limited"
snapblk volume create q --size 16M >/dev/null
snapblk volume create o --size 16M >/dev/null
snapblk volume set-quota q 4M >/dev/null
snapblk volume list | grep -q "QUOTA" || fail "volume list shows no QUOTA column"
/usr/bin/python3 "$T/writer.py" "$(uri o)" 12 >"$T/o.out" &
OW=$!
rc=0; /usr/bin/python3 "$T/writer.py" "$(uri q)" 12 >"$T/q.out" || rc=$?
wait $OW || fail "the writer of o failed: $(cat "$T/o.out")"
grep -q "WROTE 12" "$T/o.out" || fail "o: $(cat "$T/o.out")"
[ $rc -eq 3 ] || fail "q over its quota: expected ENOSPC, got rc $rc: $(cat "$T/q.out")"
grep -q "ENOSPC AT 4 " "$T/q.out" || fail "q refused at the wrong place: $(cat "$T/q.out")"
[ "$(used_of q)" -le $((4 << 20)) ] || fail "q holds $(used_of q) bytes, over 4 MiB"
log "a snapshot's data counts: q at its quota, snapshotted, refuses an overwrite"
snapblk volume set-quota q 6M >/dev/null
snapblk snapshot create q@keep >/dev/null
rc=0; /usr/bin/python3 "$T/writer.py" "$(uri q)" 4 >"$T/q2.out" || rc=$?
[ $rc -eq 3 ] && grep -q "ENOSPC AT 2 " "$T/q2.out" || fail "overwrite under a snapshot: $(cat "$T/q2.out")"
snapblk volume set-quota q none >/dev/null
snapblk volume delete q --recursive >/dev/null
snapblk volume delete o >/dev/null

log "space guard: 8 MiB rewritten per round, a policy snapshot after each, in a 64 MiB pool"
snapblk notify set --command "cat >>$T/events; echo >>$T/events" >/dev/null
snapblk volume create g --size 16M >/dev/null
snapblk snapshot create g@by-hand >/dev/null
snapblk policy set p --volume g --schedule yearly >/dev/null
snapblk pool guard --min-free 25 --target-free 35 >/dev/null
snapblk pool guard | grep -q "25" || fail "pool guard does not show its threshold"
# Round one, then protect the policy's first snapshot.
/usr/bin/python3 "$T/writer.py" "$(uri g)" 8 snapshot:p 1 >"$T/g0.out" || fail "round 1: $(cat "$T/g0.out")"
first=$(names g | tr ' ' '\n' | grep '^p-' | head -1)
[ -n "$first" ] || fail "the policy took no snapshot"
snapblk snapshot protect "g@$first" >/dev/null
snapblk snapshot delete "g@$first" 2>"$T/err" && fail "a protected snapshot was deleted by hand"
grep -q protected "$T/err" || fail "refusal does not say protected: $(cat "$T/err")"
/usr/bin/python3 "$T/writer.py" "$(uri g)" 8 snapshot:p 10 >"$T/g.out" || fail "the writer saw an error while deletable snapshots remained: $(cat "$T/g.out")"
left=$(names g)
log "left: $left"
echo " $left " | grep -q " $first " || fail "the protected snapshot $first was deleted"
echo " $left " | grep -q " by-hand " || fail "the hand-made snapshot was deleted"
[ "$(echo "$left" | wc -w)" -lt 13 ] || fail "nothing was deleted: $left"
grep -q "space guard: deleted" "$T/daemon.log" || fail "no deletion logged"
for _ in $(seq 1 50); do grep -q snapshots_deleted_for_space "$T/events" 2>/dev/null && break; sleep 0.2; done
grep -q snapshots_deleted_for_space "$T/events" || fail "no snapshots_deleted_for_space event"

log "nothing deletable left under the threshold: notified once, the kept ones stay"
snapblk pool guard --min-free 99 >/dev/null
for _ in $(seq 1 50); do grep -q space_exhausted "$T/events" 2>/dev/null && break; sleep 0.2; done
grep -q space_exhausted "$T/events" || fail "no space_exhausted event"
left=$(names g)
newest=$(echo "$left" | tr ' ' '\n' | grep '^p-' | sort | tail -1)
[ "$(echo "$left" | tr ' ' '\n' | sort | tr '\n' ' ')" = "$(printf '%s\n' by-hand "$first" "$newest" | sort -u | tr '\n' ' ')" ] \
    || fail "expected by-hand, $first and $newest to stay, have: $left"

log "a threshold of 0.01% (one block): the pool fills between the guard's checks; writes wait for it"
snapblk pool guard --min-free 0.01 --target-free 30 >/dev/null
/usr/bin/python3 "$T/writer.py" "$(uri g)" 8 snapshot:p 8 >"$T/g2.out" || fail "the writer saw an error while deletable snapshots remained: $(cat "$T/g2.out")"
waited=$(grep -c 'asking the space guard' "$T/daemon.log" || true)
log "writes that found the pool full and waited for the guard: $waited"
[ "$waited" -gt 0 ] || fail "no write found the pool full (the test did not test the relief)"
echo " $(names g) " | grep -q " $first " || fail "the protected snapshot $first was deleted"

log "guard off: the same writer now gets ENOSPC (what the guard prevented)"
snapblk pool guard --off >/dev/null
rc=0; /usr/bin/python3 "$T/writer.py" "$(uri g)" 8 snapshot:p 10 >"$T/off.out" || rc=$?
[ $rc -eq 3 ] || fail "with the guard off the pool never filled: rc $rc $(cat "$T/off.out")"
assert_check_clean
log "ok"
