#!/usr/bin/env bash
# Bad input: hostile NBD clients, a second daemon on the same pool, a data device of
# another pool, bad names and sizes. Each gets a clear error and loses nothing.
source "$(dirname "$0")/lib.sh"

expect_error() { # PATTERN CMD... : CMD must fail and its stderr must match PATTERN
    local pat=$1; shift
    if "$@" >"$T/out" 2>"$T/err"; then fail "expected failure: $*"; fi
    grep -qiE "$pat" "$T/err" || { cat "$T/err"; fail "error for '$*' does not mention '$pat'"; }
}

create_pool 1G
start_daemon
snapblk volume create vol --size 64M >/dev/null
qemu-io -f raw -c "write -P 0x77 1M 1M" "$(uri vol)" >/dev/null
snapblk snapshot create vol@s >/dev/null

log "hostile NBD clients"
python3 "$(dirname "$0")/nbd_raw.py" "$NBD_SOCK" vol vol@s

log "second daemon on the same pool"
expect_error "locked by pid $DAEMON_PID" "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" \
    --socket "$T/other.sock" --nbd-socket "$T/other-nbd.sock" --nbd-tcp none
expect_error "locked by pid $DAEMON_PID" env -u SNAPBLK_SOCKET "$SNAPBLK_BIN" --socket "$T/none.sock" \
    --meta "$META" --data "$DATA" volume list

log "plain NBD over TCP on a non-loopback address needs --insecure"
expect_error "not a loopback address.*--insecure" "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" \
    --socket "$T/other.sock" --nbd-socket "$T/other-nbd.sock" --nbd-tcp 0.0.0.0:0
expect_error "NBD TCP address" "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" \
    --socket "$T/other.sock" --nbd-socket "$T/other-nbd.sock" --nbd-tcp nonsense
# With --insecure it gets past the check (and then finds the pool locked by the daemon).
expect_error "locked by pid $DAEMON_PID" "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" \
    --socket "$T/other.sock" --nbd-socket "$T/other-nbd.sock" --nbd-tcp 0.0.0.0:0 --insecure

log "bad names and sizes"
expect_error "volume name.*character '/'" snapblk volume create "a/b" --size 1G
expect_error "volume name.*must not be empty" snapblk volume create "" --size 1G
expect_error "start with a letter or digit" snapblk volume create --size 1G -- "-x"
expect_error "longer than 128" snapblk volume create "$(printf 'x%.0s' $(seq 1 200))" --size 1G
expect_error "multiple of 4 KiB" snapblk volume create odd --size 1000
expect_error "greater than zero" snapblk volume create zero --size 0
expect_error "unknown unit" snapblk volume create big --size 10Q
expect_error "too large|exceeds the maximum" snapblk volume create huge --size 9999999P
expect_error "already exists" snapblk volume create vol --size 1G
expect_error "not VOLUME@SNAPSHOT" snapblk snapshot create vol
expect_error "snapshot 'vol@nope' not found" snapblk clone vol@nope c
expect_error "volume 'nope' not found" snapblk volume info nope
expect_error "add --force" snapblk volume resize vol --size 32M
expect_error "has 1 snapshot" snapblk volume delete vol
expect_error "no daemon answers" env -u SNAPBLK_META -u SNAPBLK_DATA SNAPBLK_SOCKET="$T/none.sock" "$SNAPBLK_BIN" volume list

log "data device of another pool, and an unknown format version"
stop_daemon
snapblk pool create --meta "$T/meta2" --data "$T/data2.img" --size 64M >/dev/null
expect_error "belongs to pool .* but the metadata is pool" snapblk --socket "$T/none.sock" --meta "$META" --data "$T/data2.img" volume list
expect_error "already holds a snapblk pool|already exists" snapblk pool create --meta "$T/meta3" --data "$DATA"
cp "$DATA" "$T/data-v9.img"
python3 - "$T/data-v9.img" <<'PY'
import struct, sys, zlib
p = sys.argv[1]
with open(p, "r+b") as f:
    h = bytearray(f.read(4096))
    h[8:12] = struct.pack("<I", 9)
    # crc32c of bytes 0..48 (Castagnoli), computed in pure Python
    crc = 0xFFFFFFFF
    for b in h[:48]:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    h[48:52] = struct.pack("<I", crc ^ 0xFFFFFFFF)
    f.seek(0); f.write(h)
PY
expect_error "format version 9 is not supported" snapblk --socket "$T/none.sock" --meta "$META" --data "$T/data-v9.img" volume list

log "nothing lost"
start_daemon
qemu-io -f raw -c "read -P 0x77 1M 1M" "$(uri vol)" | grep -q "read 1048576" || fail "data changed"
qemu-io -r -f raw -c "read -P 0x77 1M 1M" "$(uri vol@s)" | grep -q "read 1048576" || fail "snapshot changed"
assert_check_clean

log "exit codes tell the kind of failure (README)"
expect_code() { # CODE CMD...
    local want=$1; shift
    set +e; "$@" >/dev/null 2>&1; local got=$?; set -e
    [ "$got" -eq "$want" ] || fail "'$*' exited $got, want $want"
}
expect_code 3 snapblk volume info nope
expect_code 3 snapblk snapshot delete vol@nope
expect_code 4 snapblk volume delete vol            # it has a snapshot: in use
expect_code 5 snapblk volume create "a/b" --size 1G
expect_code 7 snapblk snapshot create vol@s
expect_code 2 snapblk volume
expect_code 6 env SNAPBLK_SOCKET="$T/none.sock" "$SNAPBLK_BIN" volume list
expect_code 3 snapblk policy show nope             # the daemon's own errors have kinds too
expect_code 3 snapblk detach /dev/ublkb999
expect_code 5 snapblk pool guard --min-free 150
stop_daemon
expect_code 7 snapblk pool create --meta "$T/meta4" --data "$DATA"
expect_code 3 env -u SNAPBLK_SOCKET "$SNAPBLK_BIN" --socket "$T/none.sock" --meta "$META" --data "$DATA" volume info nope
log "bad_input: ok"
