#!/usr/bin/env bash
# ublk vs a loop device vs the kernel NBD client, in the test VM (Debian 6.12 kernel,
# virtme-ng, qemu TCG): runs tests/vm/bench_ublk.sh in the guest and prints its table.
# Usage: benches/ublk_vm.sh [disk]   (after scripts/vm/setup.sh and `cargo build --release
#        --workspace --all-targets`; 256 MiB devices, 8 s per job). With `disk`, the data
#        files live on an extra virtio-scsi disk (a sparse file next to the VM cache) instead
#        of the guest's tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = disk ]; then
    img=${SNAPBLK_VM_CACHE:-/root/.cache/snapblk-vm}/bench-disk.img
    rm -f "$img" && truncate -s 4G "$img"
    trap 'rm -f "$img"' EXIT
    export VM_DISK=$img
fi
VM_TIMEOUT=${VM_TIMEOUT:-1500} bash scripts/vm/run.sh tests/vm/bench_ublk.sh "$@"
