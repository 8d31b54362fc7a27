#!/usr/bin/env bash
# Who may reach a volume over NBD: TCP is off unless asked for; the NBD Unix socket is
# root's only (0600) unless --nbd-group names a group (0660, that group); an unprivileged
# user cannot connect by default. A connection cap (--max-connections): a flood of idle
# connections gets only the free places (the rest are closed at once), busy clients keep
# working through it, the control socket answers, threads stay bounded, and new clients
# are served once the flood ends.
source "$(dirname "$0")/lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
create_pool 1G

log "defaults: no TCP listener, NBD socket mode 0600 owned by root"
start_daemon
grep -q " and 127.0.0.1" "$T/daemon.log" && fail "the daemon listens on TCP by default"
ss -ltnH 2>/dev/null | grep -q ":10809 " && fail "something listens on 10809"
[ "$(stat -c %a "$NBD_SOCK")" = 600 ] || fail "NBD socket mode $(stat -c %a "$NBD_SOCK"), expected 600"
[ "$(stat -c %a "$SNAPBLK_SOCKET")" = 600 ] || fail "control socket mode $(stat -c %a "$SNAPBLK_SOCKET")"
snapblk volume create v --size 64M >/dev/null
id nobody >/dev/null 2>&1 || fail "no user 'nobody' to test with"
chmod 755 "$T"
if setpriv --reuid=nobody --regid=nogroup --clear-groups nbdinfo "$(uri v)" >"$T/nobody.out" 2>&1; then
    fail "an unprivileged user read a volume over the NBD socket"
fi
grep -qi "permission denied" "$T/nobody.out" || { cat "$T/nobody.out"; fail "unexpected error for an unprivileged user"; }
stop_daemon

log "--nbd-group widens the socket to one group"
groupadd -f snapblk-e2e
defer "groupdel snapblk-e2e"
"$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" --nbd-group snapblk-e2e \
    >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 200); do snapblk pool info >/dev/null 2>&1 && break; sleep 0.05; done
[ "$(stat -c %a:%G "$NBD_SOCK")" = 660:snapblk-e2e ] || fail "NBD socket is $(stat -c %a:%G "$NBD_SOCK")"
setpriv --reuid=nobody --regid=snapblk-e2e --clear-groups nbdinfo --size "$(uri v)" >/dev/null ||
    fail "a member of the NBD group could not connect"
stop_daemon
expect_fail() { # PATTERN ARGS...
    local pat=$1; shift
    if "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" "$@" >"$T/bad.out" 2>&1; then
        fail "daemon started with $*"
    fi
    grep -Eq "$pat" "$T/bad.out" || { cat "$T/bad.out" >&2; fail "no clear error for $*"; }
}
expect_fail "no group named" --nbd-group no-such-group-here
expect_fail "max_connections must be at least 1" --max-connections 0

log "a flood of connections against --max-connections 8"
"$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" --max-connections 8 \
    >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 200); do snapblk pool info >/dev/null 2>&1 && break; sleep 0.05; done
# The daemon's own threads (io_uring's kernel workers, iou-wrk-*, come and go with the
# load and are bounded by the kernel, not by us).
threads() { cat /proc/"$DAEMON_PID"/task/*/comm 2>/dev/null | grep -vc '^iou-' || true; }
base=$(threads)
/usr/bin/python3 "$HERE/nbd_flood.py" "$NBD_SOCK" v 8 &
fpid=$!
peak=0
while kill -0 $fpid 2>/dev/null; do
    n=$(threads)
    [ "$n" -gt "$peak" ] && peak=$n
    snapblk pool info >/dev/null || fail "the control socket stopped answering during the flood"
    sleep 0.2
done
wait $fpid || fail "flood test failed"
log "daemon threads: $base at rest, at most $peak during the flood"
# 8 connections x (1 reader + 16 workers + 1 reply flusher) plus control threads.
[ "$peak" -le $((base + 8 * 18 + 8)) ] || fail "$peak threads during a flood capped at 8 connections"
grep -q "refusing a connection.*--max-connections" "$T/daemon.log" || fail "refusals are not logged"
kill -0 "$DAEMON_PID" || fail "the daemon died"
assert_check_clean

log "the empty export name is the default volume (volume set-default)"
snapblk volume create dflt --size 16M >/dev/null
qemu-io -f raw -c "write -P 0x5a 0 64k" "$(uri dflt)" >/dev/null
empty="nbd+unix:///?socket=$NBD_SOCK"
if qemu-io -f raw -c "read 0 4k" "$empty" >/dev/null 2>"$T/err"; then fail "empty export name served with no default"; fi
snapblk volume set-default dflt >/dev/null
snapblk volume set-default | grep -q dflt || fail "set-default does not show the default"
qemu-io -f raw -c "read -P 0x5a 0 64k" "$empty" >/dev/null || fail "the empty export name does not serve the default volume"
snapblk volume set-default --clear >/dev/null
if qemu-io -f raw -c "read 0 4k" "$empty" >/dev/null 2>&1; then fail "cleared default still served"; fi
log "nbd_access: all checks passed"
