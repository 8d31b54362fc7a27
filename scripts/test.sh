#!/usr/bin/env bash
# The test command: formatting, lints, unit/property/conformance tests, the end-to-end
# tests with real NBD clients and kernel filesystems, then the real-kernel tests in a VM
# (ublk, the kernel NBD client). Run as root. Also runs each fuzz target briefly.
# One cargo profile (release) only, so RocksDB's C++ is compiled once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
mkdir -p "$CARGO_TARGET_DIR"
step() { echo; echo "=== $* ($(date +%T))"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo build --release"
cargo build --release --workspace --all-targets
save_rocksdb_cache
step "cargo clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
step "cargo test"
cargo test --release --workspace
step "fuzzing (every cargo-fuzz target, 30 s each, from the committed seeds)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
step "end-to-end tests (host: NBD clients, nbdfuse + loop, crash cycles)"
bash tests/e2e/run.sh
step "real-kernel tests (VM: ublk, kernel nbd client)"
bash tests/vm/run.sh
