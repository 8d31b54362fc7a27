#!/usr/bin/env bash
# Daemon logs (issue 14): `--log-format json` (or SNAPBLK_LOG_FORMAT=json) writes one JSON
# object per line with time, level, target and message, warnings included; under systemd
# (stderr is the stream JOURNAL_STREAM names) text lines carry an sd-daemon `<N>` priority
# and no time stamp; elsewhere, text lines with time and level.
source "$(dirname "$0")/lib.sh"
create_pool 1G

log "json: every line an object, warnings included"
SNAPBLK_LOG_FORMAT=json DAEMON_EXTRA="--max-connections 1" start_daemon
snapblk volume create v --size 16M >/dev/null
/usr/bin/python3 - "$NBD_SOCK" <<'PY' || fail "a second connection was not refused"
import nbd, sys, time
uri = f"nbd+unix:///v?socket={sys.argv[1]}"
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD()
try:
    b.connect_uri(uri)
    sys.exit(1)
except nbd.Error:
    pass
a.shutdown()
PY
stop_daemon
python3 - "$T/daemon.log" <<'PY' || fail "json log"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert lines, "no log lines"
objs = []
for l in lines:
    o = json.loads(l)  # every line parses
    assert {"timestamp", "level", "target", "message"} <= o.keys(), o
    objs.append(o)
assert any(o["level"] == "INFO" and o["target"] == "snapblk_daemon::run" and "ready" in o["message"] for o in objs), objs
w = [o for o in objs if o["level"] == "WARN" and "max-connections" in o["message"]]
assert w and w[0]["target"].startswith("snapblk_nbd"), objs
PY

log "under systemd: <N> priorities, no time stamps"
: >"$T/daemon.log"
JOURNAL_STREAM=$(stat -c '%d:%i' "$T/daemon.log") DAEMON_EXTRA="--max-connections 1" start_daemon
/usr/bin/python3 - "$NBD_SOCK" <<'PY' || true
import nbd, sys
uri = f"nbd+unix:///v?socket={sys.argv[1]}"
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD()
try:
    b.connect_uri(uri)
except nbd.Error:
    pass
PY
stop_daemon
grep -q "^<6>snapblk_daemon::run: .*ready" "$T/daemon.log" || { cat "$T/daemon.log"; fail "no <6> info line"; }
grep -q "^<4>snapblk_nbd::admission: .*max-connections" "$T/daemon.log" || { cat "$T/daemon.log"; fail "no <4> warning line"; }
grep -v "^<[0-7]>" "$T/daemon.log" | grep -q . && { cat "$T/daemon.log"; fail "a line without a priority"; }

log "elsewhere: text with time and level"
: >"$T/daemon.log"
start_daemon
stop_daemon
grep -qE "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z +INFO snapblk_daemon::run: .*ready" "$T/daemon.log" \
    || { cat "$T/daemon.log"; fail "text line"; }
log "logs: ok"
