#!/usr/bin/env bash
# ublk vs a loop device vs the kernel NBD client, in the test VM (Debian 6.12 kernel,
# virtme-ng, qemu TCG): runs tests/vm/bench_ublk.sh in the guest and prints its table.
# Usage: benches/ublk_vm.sh   (after scripts/vm/setup.sh; 256 MiB devices, 8 s per job)
set -euo pipefail
cd "$(dirname "$0")/.."
VM_TIMEOUT=${VM_TIMEOUT:-1500} bash scripts/vm/run.sh tests/vm/bench_ublk.sh
