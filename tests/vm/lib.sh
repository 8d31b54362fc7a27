# Helpers for scripts that run inside the test VM (see scripts/vm/run.sh).
set -euo pipefail
BIN=${SNAPBLK_BIN:?run through scripts/vm/run.sh}
T=$(mktemp -d "${VM_T_DIR:-/tmp}/snapblk-guest.XXXXXX")
export SNAPBLK_SOCKET=$T/control.sock
NBD_SOCK=$T/nbd.sock
DAEMON_PID=
log() { echo "[guest $(date +%T)] $*"; }
fail() { echo "FAIL: $*"; echo "--- daemon log"; tail -20 "$T/daemon.log" 2>/dev/null; exit 1; }
trap 'echo "--- daemon log"; tail -20 "$T/daemon.log" 2>/dev/null; echo "--- dmesg"; dmesg | tail -15' ERR
start_daemon() {
    RUST_LOG=${RUST_LOG:-warn} "$BIN" daemon --meta "$T/meta" --data "$T/data.img" --nbd-socket "$NBD_SOCK" --nbd-tcp none "$@" >>"$T/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 1 300); do
        [ -S "$SNAPBLK_SOCKET" ] && "$BIN" pool info >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$T/daemon.log"; fail "daemon did not start"
}
stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}
sums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
write_tree() {
    for d in a b; do
        mkdir -p "$1/$d"
        for i in $(seq 1 15); do head -c $(( (RANDOM % 32 + 1) * 4096 )) /dev/urandom >"$1/$d/f$i"; done
    done
}
