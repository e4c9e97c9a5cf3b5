#!/usr/bin/env bash
# Builds v2 of the Debian disk the boot benchmarks boot (issue 31): v1 (benchmarks/debian_image.sh)
# with its package lists updated and a few packages installed, changed in place on a copy, the
# kind of change a monthly image update brings. Needs root, e2fsprogs and the Debian mirror apt
# uses. Idempotent: an existing OUT_DIR/disk.raw is kept.
#
# Usage: benchmarks/debian_v2.sh V1_DISK OUT_DIR      (prints OUT_DIR/disk.raw)
set -euo pipefail
v1=${1:?usage: debian_v2.sh V1_DISK OUT_DIR}
out=${2:?usage: debian_v2.sh V1_DISK OUT_DIR}
packages="less nano iproute2 procps"
mkdir -p "$out"
disk=$out/disk.raw
if [ -s "$disk" ]; then echo "$disk"; exit 0; fi

root=$(mktemp -d "$out/root.XXXX")
cp --sparse=always "$v1" "$disk.tmp"
cleanup() {
    for m in dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
    umount -l "$root" 2>/dev/null || true
    rmdir "$root" 2>/dev/null || true
}
trap cleanup EXIT
mount -o loop "$disk.tmp" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get update -q && apt-get install -y -q --no-install-recommends $packages && apt-get clean" \
    >"$out/apt.log" 2>&1 || { tail -20 "$out/apt.log"; exit 1; }
echo "v2: $packages" >"$root/etc/thunderfs-image-version"
cleanup
trap - EXIT
e2fsck -fy "$disk.tmp" >/dev/null 2>&1 || [ $? -le 1 ]
mv "$disk.tmp" "$disk"
echo "$disk"
