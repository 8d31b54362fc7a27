#!/usr/bin/env bash
# The daemon under systemd's Type=notify protocol (issue 14), with a listener playing
# systemd: READY=1 only once the control and NBD sockets exist, a STATUS line saying what
# it serves, WATCHDOG=1 at half of WATCHDOG_USEC while the pool answers, STOPPING=1 on
# SIGTERM; the same over an abstract socket; nothing breaks without NOTIFY_SOCKET.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)

listen() { # ADDR OUT
    python3 "$here/notify_listener.py" "$1" "$2" "$SNAPBLK_SOCKET" "$NBD_SOCK" &
    LPID=$!
    defer "kill $LPID"
    for _ in $(seq 50); do { [[ $1 == @* ]] || [ -S "$1" ]; } && break; sleep 0.05; done
    sleep 0.2
}
check_run() { # OUT
    python3 - "$1" <<'PY' || fail "notify protocol: see above"
import json, sys
msgs = [json.loads(l) for l in open(sys.argv[1])]
assert msgs, "no message"
ready = [m for m in msgs if "READY=1" in m["msg"].split("\n")]
assert len(ready) == 1, f"READY=1 sent {len(ready)} times"
assert all(ready[0]["present"]), f"READY=1 before the sockets existed: {ready[0]}"
assert any(l.startswith("STATUS=") and "volume" in l for l in ready[0]["msg"].split("\n")), ready[0]
dogs = [m for m in msgs if "WATCHDOG=1" in m["msg"].split("\n")]
assert len(dogs) >= 3, f"{len(dogs)} watchdog pings in ~3 s at a 1 s interval"
assert msgs[-1]["msg"].startswith("STOPPING=1"), msgs[-1]
assert all(m["t"] >= ready[0]["t"] for m in dogs), "a watchdog ping before READY"
print(f"notify: READY with {ready[0]['msg'].splitlines()[1]}; {len(dogs)} pings; STOPPING last")
PY
}

create_pool 1G
export WATCHDOG_USEC=2000000
for addr in "$T/notify.sock" "@snapblk-e2e-notify-$$"; do
    log "NOTIFY_SOCKET=$addr"
    out=$T/notify.$RANDOM.log
    listen "$addr" "$out"
    NOTIFY_SOCKET=$addr start_daemon
    snapblk volume create v --size 16M >/dev/null 2>&1 || true
    sleep 3.2
    stop_daemon
    sleep 0.3
    check_run "$out"
done

log "without NOTIFY_SOCKET nothing changes; the packaged config file starts the daemon"
unset WATCHDOG_USEC
sed -e "s|^meta = .*|meta = \"$META\"|" -e "s|^data = .*|data = \"$DATA\"|" \
    -e "s|^socket = .*|socket = \"$SNAPBLK_SOCKET\"|" -e "s|^nbd_socket = .*|nbd_socket = \"$NBD_SOCK\"|" \
    "$here/../../packaging/snapblk.toml" > "$T/snapblk.toml"
"$SNAPBLK_BIN" daemon --config "$T/snapblk.toml" >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do [ -S "$SNAPBLK_SOCKET" ] && [ -S "$NBD_SOCK" ] && break; sleep 0.05; done
snapblk pool info >/dev/null || fail "daemon from packaging/snapblk.toml does not serve"
stop_daemon

log "the packaged unit passes systemd-analyze verify (with the man pages it names)"
command -v systemd-analyze >/dev/null || fail "systemd-analyze missing (scripts/setup.sh installs systemd)"
mkdir -p "$T/mr/man1" "$T/unit"
snapblk manpages "$T/mr/man1" >/dev/null
sed "s|/usr/bin/snapblk|$SNAPBLK_BIN|" "$here/../../packaging/snapblk.service" > "$T/unit/snapblk.service"
out=$(MANPATH=$T/mr systemd-analyze verify "$T/unit/snapblk.service" 2>&1) || fail "systemd-analyze: $out"
[ -z "$out" ] || fail "systemd-analyze warns: $out"
log "systemd_notify: ok"
