#!/usr/bin/env bash
# Installs what building and testing snapblk needs on a fresh Debian machine (run as root).
# Idempotent: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(libclang-dev clang libnbd-bin python3-libnbd nbdkit fio qemu-utils e2fsprogs xfsprogs fuse3 kmod python3 python3-venv util-linux awscli iproute2 passwd openssl man-db systemd curl dpkg-dev lintian binutils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (rustup) first" >&2
    exit 1
fi
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
done
# FUSE and loop devices for the host-side end-to-end tests.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
# A real S3-compatible server for the backup tests: s3s-fs from crates.io (checks SigV4
# signatures). Built once into a cache outside the clone, with its own target dir.
S3S_ROOT=/var/cache/snapblk/tools
if [ ! -x "$S3S_ROOT/bin/s3s-fs" ]; then
    echo "setup: installing s3s-fs 0.14.1 (cargo install, a few minutes)"
    mkdir -p "$S3S_ROOT"
    CARGO_TARGET_DIR=/var/cache/snapblk/tools-target cargo install s3s-fs@0.14.1 --locked \
        --features binary --root "$S3S_ROOT" --quiet
    rm -rf /var/cache/snapblk/tools-target
fi
# A second S3-compatible server for tests/e2e/s3_moto.sh: moto's server from PyPI, in its
# own venv (Debian's python3, not the system site-packages).
if [ ! -x "$S3S_ROOT/moto/bin/moto_server" ]; then
    echo "setup: installing moto[server] 5.2.1 (pip, about a minute)"
    rm -rf "$S3S_ROOT/moto"
    /usr/bin/python3 -m venv "$S3S_ROOT/moto"
    "$S3S_ROOT/moto/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
fi
# promtool for tests/e2e/metrics.sh: Debian's prometheus package, extracted, not installed
# (installing it would start a Prometheus server).
if [ ! -x "$S3S_ROOT/promtool/usr/bin/promtool" ]; then
    echo "setup: fetching promtool (Debian's prometheus package, extracted)"
    d=$(mktemp -d)
    (cd "$d" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    rm -rf "$S3S_ROOT/promtool"
    dpkg-deb -x "$d"/prometheus_*.deb "$S3S_ROOT/promtool"
    rm -rf "$d"
fi
# cargo-fuzz for scripts/fuzz.sh (runs on the stable toolchain with RUSTC_BOOTSTRAP=1).
if [ ! -x "$S3S_ROOT/bin/cargo-fuzz" ]; then
    echo "setup: installing cargo-fuzz 0.13.2 (cargo install, a minute or two)"
    CARGO_TARGET_DIR=/var/cache/snapblk/tools-target cargo install cargo-fuzz@0.13.2 --locked \
        --root "$S3S_ROOT" --quiet
    rm -rf /var/cache/snapblk/tools-target
fi
