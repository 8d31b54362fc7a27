#!/usr/bin/env bash
# Real NBD clients against the daemon: nbdinfo, qemu-img, nbdcopy, qemu-io, fio verify.
source "$(dirname "$0")/lib.sh"

create_pool 4G
start_daemon
snapblk volume create vol --size 256M >/dev/null
snapblk volume create other --size 64M >/dev/null

log "nbdinfo: list, size, flags, allocation map"
nbdinfo --list "nbd+unix://?socket=$NBD_SOCK" >"$T/list"
grep -q "export=\"vol\"" "$T/list" || grep -q "vol" "$T/list" || fail "vol not listed"
grep -q other "$T/list" || fail "other not listed"
nbdinfo --json "$(uri vol)" >"$T/info.json"
python3 - "$T/info.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
e = d["exports"][0]
assert e["export-size"] == 256 << 20, e
for k in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache", "can_fast_zero"]:
    assert e.get(k) is True, (k, e)
assert e["is_read_only"] is False
assert "base:allocation" in e["contexts"], e
assert e["block_size_maximum"] == 32 << 20
PY
nbdinfo --map "$(uri vol)" | grep -q "hole,zero" || fail "fresh volume should map as hole,zero"

log "qemu-io: write, read -v, discard, write -z"
qemu-io -f raw -c "write -P 0xab 1M 64k" -c "write -P 0xcd 5000 3000" "$(uri vol)" >/dev/null
qemu-io -f raw -c "read -P 0xab 1M 64k" -c "read -P 0xcd 5000 3000" -c "read -P 0 0 4096" "$(uri vol)" | grep -q "read 65536" || fail "qemu-io read"
qemu-io -f raw -c "read -v 5000 16" "$(uri vol)" | grep -q "cd cd cd cd" || fail "qemu-io read -v"
qemu-io -f raw -c "discard 1M 32k" -c "write -z 1081344 32k" "$(uri vol)" >/dev/null
qemu-io -f raw -c "read -P 0 1M 64k" "$(uri vol)" | grep -q "read 65536" || fail "discard/write -z must read back zeros"
nbdinfo --map "$(uri vol)" | grep -qw data || fail "map should show data at 5000"

log "qemu-img convert in and compare"
head -c 48M /dev/urandom >"$T/src.raw"
truncate -s 64M "$T/src.raw"
qemu-img convert -n -f raw -O raw "$T/src.raw" "$(uri other)"
qemu-img compare -f raw -F raw "$T/src.raw" "$(uri other)" || fail "qemu-img compare after convert"

log "nbdcopy out and back, and snapshot export"
nbdcopy "$(uri other)" "$T/copy.raw"
cmp "$T/src.raw" "$T/copy.raw" || fail "nbdcopy out differs"
snapblk snapshot create other@s1 >/dev/null
qemu-io -f raw -c "write -P 0x11 0 1M" "$(uri other)" >/dev/null
qemu-img compare -f raw -F raw "$T/src.raw" "$(uri other@s1)" || fail "snapshot export must keep old data"
nbdinfo --json "$(uri other@s1)" | python3 -c 'import json,sys; e=json.load(sys.stdin)["exports"][0]; assert e["is_read_only"], e'
/usr/bin/python3 - "$NBD_SOCK" <<'PY'
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///other@s1?socket={sys.argv[1]}")
assert h.is_read_only()
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("write to a snapshot export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
h.shutdown()
PY
log "fio nbd engine with verify (4K random, QD16, flushes)"
cd "$T" # fio leaves its verify state files in the working directory
fio --name=verify --ioengine=nbd --uri="$(uri vol)" --rw=randwrite --bs=4k --iodepth=16 \
    --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 --fsync=32 --randrepeat=0 \
    --output="$T/fio.out" || { cat "$T/fio.out"; fail "fio verify"; }
grep -q "err= 0" "$T/fio.out" || { cat "$T/fio.out"; fail "fio errors"; }
fio --name=verify-seq --ioengine=nbd --uri="$(uri vol)" --rw=write --bs=1M --iodepth=4 \
    --size=128M --offset=64M --verify=sha256 --verify_fatal=1 --do_verify=1 \
    --output="$T/fio2.out" || { cat "$T/fio2.out"; fail "fio verify sequential"; }

assert_check_clean
log "nbd_clients: ok"
