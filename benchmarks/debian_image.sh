#!/usr/bin/env bash
# Builds the Debian disk the boot benchmarks boot: debootstrap minbase + systemd-sysv on a 2 GiB
# sparse raw ext4 disk, with a oneshot unit that prints a marker on the serial console once
# multi-user is reached and powers off. Needs root, debootstrap, e2fsprogs and the Debian
# mirror apt uses. Idempotent: an existing OUT_DIR/disk.raw is kept.
#
# Usage: benchmarks/debian_image.sh OUT_DIR      (prints OUT_DIR/disk.raw)
set -euo pipefail
out=${1:?usage: debian_image.sh OUT_DIR}
mkdir -p "$out"
disk=$out/disk.raw
if [ -s "$disk" ]; then echo "$disk"; exit 0; fi

mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
[ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1 || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

root=$out/root
rm -rf "$root" "$disk.tmp"
debootstrap --variant=minbase --include=systemd-sysv,udev,kmod bookworm "$root" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log"; exit 1; }

cat >"$root/etc/systemd/system/boot-marker.service" <<'UNIT'
[Unit]
Description=Tell the benchmark that the boot reached multi-user, then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo THUNDERFS-BOOT-DONE > /dev/ttyS0; systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/boot-marker.service "$root/etc/systemd/system/multi-user.target.wants/boot-marker.service"
echo "/dev/vda / ext4 defaults 0 1" >"$root/etc/fstab"
echo thunderfs-guest >"$root/etc/hostname"

truncate -s 2G "$disk.tmp"
mke2fs -q -t ext4 -d "$root" "$disk.tmp"
mv "$disk.tmp" "$disk"
rm -rf "$root"
echo "$disk"
