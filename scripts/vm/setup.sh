#!/usr/bin/env bash
# Prepares the real-kernel test VM (run as root): qemu (TCG), busybox for the initramfs,
# nbd-client and udev for the guest, virtme-ng, and Debian's 6.12 kernel (which has ublk_drv
# and nbd) unpacked under $SNAPBLK_VM_CACHE (default /root/.cache/snapblk-vm; it must not be
# under a directory virtme-ng overlays in the guest, such as /var, /tmp, /opt or /usr).
# Idempotent; prints the kernel image path on its last line.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
CACHE=${SNAPBLK_VM_CACHE:-/root/.cache/snapblk-vm}
mkdir -p "$CACHE"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v busybox >/dev/null || need+=(busybox-static)
command -v nbd-client >/dev/null || need+=(nbd-client)
command -v udevadm >/dev/null || need+=(udev)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # Installing Debian's qemu-system-x86 pulls qemu-utils of the same version; install both
    # in one command (the machine may carry a newer backported qemu-utils).
    if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
        ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        need+=("qemu-utils=$ver")
    fi
    apt-get install -y -qq --allow-downgrades "${need[@]}" >/dev/null
fi
if ! command -v vng >/dev/null; then
    python3 -m pip install -q virtme-ng >/dev/null
    hash -r
    command -v vng >/dev/null || { echo "vm setup: virtme-ng installed but vng is not on PATH" >&2; exit 1; }
fi

kroot=$CACHE/kroot
if ! ls "$kroot"/boot/vmlinuz-* >/dev/null 2>&1; then
    apt-get update -qq
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
    [ -n "$pkg" ] || { echo "vm setup: no linux-image-6.12.*-amd64-unsigned package found (apt-cache search)" >&2; exit 1; }
    (cd "$CACHE" && rm -f ./*.deb && apt-get download -q "$pkg" >/dev/null 2>&1) ||
        { echo "vm setup: could not download $pkg" >&2; exit 1; }
    rm -rf "$kroot.tmp" && dpkg -x "$CACHE"/*.deb "$kroot.tmp"
    kv=$(ls "$kroot.tmp/lib/modules/")
    depmod -b "$kroot.tmp" "$kv"
    rm -rf "$kroot" && mv "$kroot.tmp" "$kroot" && rm -f "$CACHE"/*.deb
fi
kimg=$(ls "$kroot"/boot/vmlinuz-* | head -1)
for m in ublk_drv nbd; do
    find "$kroot/lib/modules" -name "$m.ko*" | grep -q . || { echo "vm setup: $kimg has no $m module" >&2; exit 1; }
done
echo "$kimg"
