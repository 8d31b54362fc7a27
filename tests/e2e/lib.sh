# Shared helpers for the end-to-end tests. Source it; each test runs in its own temp dir
# with its own daemon, sockets and pool, and cleans up on exit.
set -euo pipefail

: "${CARGO_TARGET_DIR:=/var/cache/snapblk/target}"
SNAPBLK_BIN=${SNAPBLK_BIN:-$CARGO_TARGET_DIR/release/snapblk}
[ -x "$SNAPBLK_BIN" ] || { echo "snapblk binary not found at $SNAPBLK_BIN (build with cargo build --release)" >&2; exit 2; }

T=$(mktemp -d /tmp/snapblk-e2e.XXXXXX)
export SNAPBLK_SOCKET=$T/control.sock
# Catalog high-water marks of this test's repositories (not the host's /var/lib/snapblk).
export SNAPBLK_STATE_DIR=$T/state
NBD_SOCK=$T/nbd.sock
META=$T/meta
DATA=$T/data.img
DAEMON_PID=
CLEANUPS=()

log() { echo "[$(date +%T)] $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }

snapblk() { "$SNAPBLK_BIN" "$@"; }

uri() { echo "nbd+unix:///$1?socket=$NBD_SOCK"; }

on_exit() {
    local rc=$?
    set +e
    for ((i=${#CLEANUPS[@]}-1; i>=0; i--)); do eval "${CLEANUPS[$i]}" >/dev/null 2>&1; done
    # Whatever a failed test left mounted or attached under $T. Loop devices are listed
    # before the lazy unmounts (a loop over an nbdfuse file shows its path only while
    # that FUSE mount stands) and detached after them (autoclear if still busy).
    local loops
    loops=$(losetup -nO NAME,BACK-FILE | awk -v t="$T" 'index($2, t) == 1 {print $1}')
    for m in $(findmnt -rn -o TARGET | grep "^$T" | sort -r); do umount -l "$m"; done
    for l in $loops; do losetup -d "$l"; done
    pkill -f "nbdfuse .*$T/" 2>/dev/null
    stop_daemon >/dev/null 2>&1
    if [ $rc -ne 0 ] && [ -f "$T/daemon.log" ]; then
        echo "--- daemon log (last 30 lines) ---" >&2; tail -30 "$T/daemon.log" >&2
    fi
    rm -rf "$T"
    exit $rc
}
trap on_exit EXIT

# Registers a cleanup command, run in reverse order at exit.
defer() { CLEANUPS+=("$*"); }

create_pool() {
    snapblk pool create --meta "$META" --data "$DATA" --size "${1:-4G}" >/dev/null
}

# Starts the daemon on the test's pool; with DAEMON_ULIMIT_KIB set, under that
# address-space limit (ulimit -v); DAEMON_EXTRA: more flags (split on spaces).
start_daemon() {
    # shellcheck disable=SC2086
    bash -c '[ -z "$1" ] || ulimit -v "$1"; shift; exec "$@"' _ "${DAEMON_ULIMIT_KIB:-}" \
        "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" --nbd-tcp none \
        ${DAEMON_EXTRA:-} >>"$T/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 1 200); do
        [ -S "$SNAPBLK_SOCKET" ] && [ -S "$NBD_SOCK" ] && snapblk pool info >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; fail "daemon exited at start"; }
        sleep 0.05
    done
    fail "daemon did not come up"
}

stop_daemon() {
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        wait "$DAEMON_PID" || true
    fi
    DAEMON_PID=
}

kill9_daemon() {
    kill -9 "$DAEMON_PID"
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}

# json_get FIELD < json  (top-level numeric or string field)
json_get() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(v[sys.argv[1]])' "$1"; }

pool_used() { snapblk --json pool info | json_get used; }

assert_check_clean() {
    snapblk pool check >"$T/check.out" 2>&1 || { cat "$T/check.out" >&2; fail "pool check reported errors"; }
}

# Exposes an export as a kernel block device: nbdfuse (FUSE file) + loop device.
# Prints the loop device. Usage: attach_loop EXPORT [ro]
attach_loop() {
    local name=$1 mode=${2:-rw} dir
    dir=$T/fuse-${name//@/_}
    mkdir -p "$dir"
    touch "$dir.file"
    local ro=()
    [ "$mode" = ro ] && ro=(-r)
    # The volume's open exports before ours (the daemon may hold some itself, e.g. while
    # a lazy restore hydrates): detach_loop waits to get back to this.
    case $name in
        *@*) ;;
        *) snapblk --json volume info "$name" 2>/dev/null | json_get open >"$dir.open0" 2>/dev/null || echo 0 >"$dir.open0" ;;
    esac
    nbdfuse "${ro[@]}" "$dir.file" "$(uri "$name")" >>"$T/nbdfuse.log" 2>&1 &
    for _ in $(seq 1 100); do
        findmnt -n "$dir.file" >/dev/null 2>&1 && break
        sleep 0.05
    done
    local lo_ro=()
    [ "$mode" = ro ] && lo_ro=(-r)
    local dev
    dev=$(losetup -f --show "${lo_ro[@]}" --direct-io=off "$dir.file")
    echo "$dev"
}

detach_loop() {
    local name=$1 dev=$2 dir info
    dir=$T/fuse-${name//@/_}
    losetup -d "$dev" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
        fusermount3 -u "$dir.file" 2>/dev/null && break
        sleep 0.1
    done
    [ "$i" -lt 100 ] || log "detach_loop: $dir.file still mounted after 10 s"
    # nbdfuse exits (closing its NBD connections) shortly after the unmount; wait for it,
    # then for the daemon to see the connections end, so the export is no longer in use.
    for _ in $(seq 1 100); do
        pgrep -f "nbdfuse .*$dir.file" >/dev/null || break
        sleep 0.1
    done
    case $name in
        *@*) ;;
        *) for i in $(seq 1 100); do
               info=$(snapblk --json volume info "$name" 2>/dev/null) || break
               [ "$(json_get open <<<"$info")" -le "$(cat "$dir.open0" 2>/dev/null || echo 0)" ] && break
               sleep 0.1
           done
           [ "$i" -lt 100 ] || log "detach_loop: $name still has open exports after 10 s" ;;
    esac
}
