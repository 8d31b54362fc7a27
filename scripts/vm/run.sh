#!/usr/bin/env bash
# Runs a script inside the test VM (Debian 6.12 kernel under qemu TCG via virtme-ng) and
# returns its exit status. The guest sees the host's filesystem (writes outside --rwdir go
# to an overlay). vng itself always exits 255 with this kernel, so the guest script's status
# comes back through a sentinel line on the console.
# Usage: scripts/vm/run.sh GUEST_SCRIPT [ARGS...]     (env: VM_TIMEOUT seconds, default 600;
#        VM_DISK=FILE adds FILE as a virtio-scsi disk)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kimg=$(bash "$here/setup.sh" | tail -1)
# The guest cannot see the host's /var (virtme overlays it), so the binary under test goes
# into the VM cache, which the guest sees at the same path.
cache=${SNAPBLK_VM_CACHE:-/root/.cache/snapblk-vm}
bin=${SNAPBLK_BIN:-${CARGO_TARGET_DIR:-/var/cache/snapblk/target}/release/snapblk}
[ -x "$bin" ] || { echo "vm: snapblk binary not found at $bin" >&2; exit 2; }
mkdir -p "$cache/bin" && cp "$bin" "$cache/bin/snapblk"
# The ublk ceiling helper for benches/ublk_vm.sh, when built (cargo build --examples).
null=$(dirname "$bin")/examples/null_ceiling
rm -f "$cache/bin/null_ceiling"
[ -x "$null" ] && cp "$null" "$cache/bin/null_ceiling"
export SNAPBLK_VM_BIN=$cache/bin/snapblk
# A directory the guest can write back to, for logs of failed runs.
out=$cache/out
rm -rf "$out" && mkdir -p "$out"
# Likewise the guest scripts: the clone may live where the guest cannot see it.
repo=$(cd "$here/../.." && pwd)
rm -rf "$cache/src" && mkdir -p "$cache/src/tests"
cp -r "$repo/tests/vm" "$cache/src/tests/" && cp -r "$repo/udev" "$repo/packaging" "$cache/src/"
script=$(realpath "$1"); shift
case "$script" in
    "$repo"/tests/vm/*) script=$cache/src/tests/vm/${script##*/} ;;
esac
args=$(printf '%q ' "$@")
log=$(mktemp /tmp/snapblk-vm.XXXXXX.log)
cmd="RUST_LOG=${RUST_LOG:-warn} SNAPBLK_BIN=$SNAPBLK_VM_BIN SNAPBLK_VM_OUT=$out bash $script $args >$out/guest.log 2>&1; st=\$?; sync -f $out/guest.log; echo SNAPBLK-VM-STATUS=\$st"
# A boot that never reaches the script (seen once in CI, after 6 s) is retried once, and so
# is a run whose guest kernel panicked (seen once in CI under TCG: `pcpu_alloc`, "Fatal
# exception in interrupt", before the daemon did any I/O), its console tail printed first;
# a script that started and then hung or failed is not.
for attempt in 1 2; do
    rm -f "$out/guest.log"
    timeout --kill-after=10 "${VM_TIMEOUT:-600}" \
        vng -r "$kimg" --disable-kvm --force-9p --verbose --cpus 2 --memory 2G --cwd /tmp --rwdir="$out" \
            ${VM_DISK:+--disk "$VM_DISK"} -e "$cmd" >"$log" 2>&1 || true
    status=$(grep -ao "SNAPBLK-VM-STATUS=[0-9]*" "$log" | tail -1 | cut -d= -f2 || true)
    [ -n "$status" ] && break
    if grep -aq "Kernel panic" "$log"; then
        echo "vm: the guest kernel panicked (attempt $attempt); guest log and console tail:" >&2
        cat "$out/guest.log" >&2 2>/dev/null || true
        grep -av 'powernow\|kvm_amd' "$log" | tail -40 >&2
        continue
    fi
    grep -aq "starting script" "$log" && break
    echo "vm: the guest did not boot (attempt $attempt); console tail:" >&2
    tail -20 "$log" >&2
done
cat "$out/guest.log" 2>/dev/null || true
[ -n "${VM_KEEP_LOG:-}" ] && cp "$log" /tmp/snapblk-vm-console.log
if [ -z "$status" ]; then
    echo "vm: the guest did not report a status (boot failure or timeout); console tail:" >&2
    grep -av 'powernow\|kvm_amd' "$log" | tail -30 >&2
    rm -f "$log"
    exit 124
fi
rm -f "$log"
exit "$status"
