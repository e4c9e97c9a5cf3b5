"""A qemu guest (TCG) on another kernel that runs this machine's own file system: the daemon and a
test script on the kernels compute nodes run, not on this machine's.  Three, all without
``FUSE_NOTIFY_RESEND`` (``KERNELS``): Debian 12's 6.1, which ``scripts/setup.sh`` installs for
the tiny VMs, and Ubuntu 22.04's 5.15 and 24.04's 6.8, which it unpacks from Ubuntu's archive
(not installed).

The guest boots the kernel in ``/boot`` with an initramfs made here: a static busybox and the
kernel's modules for virtio, 9p and FUSE.  Its init mounts this machine's root read-only over 9p
and a tmpfs over ``/run`` (``TMPDIR`` is ``/run/tmp``: ``/tmp`` stays the host's, where a clone
of the repository may live), and runs one command chrooted there: the same Python, venv and
repository as the host, nothing copied.  The guest reaches the host's loopback
services (Glance) at 10.0.2.2 (qemu's user network).  What the command prints on the serial
console comes back; its exit status too.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

# Where scripts/setup.sh unpacks the kernels this machine does not install.
UNPACKED = Path(os.environ.get("THUNDERFS_GUEST_KERNELS", "/var/cache/thunderfs/kernels"))
# name -> (the root holding boot/vmlinuz-RELEASE and lib/modules/RELEASE, the release's glob)
KERNELS = {"debian-6.1": (Path("/"), "6.1.*"), "ubuntu-22.04": (UNPACKED / "ubuntu-22.04", "5.15.*"),
           "ubuntu-24.04": (UNPACKED / "ubuntu-24.04", "6.8.*")}
HOST = "10.0.2.2"  # the host's loopback, as the guest sees it
REPO = Path(__file__).resolve().parent.parent  # the same path in the guest (this machine's root)
EXIT = "THUNDERFS-GUEST-EXIT"
# virtio (as modules in Debian's kernel, built in in Ubuntu's), the network card, 9p over virtio,
# FUSE: in load order; those a kernel has built in are not found, and skipped.
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "failover", "net_failover", "virtio_net", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "fuse"]

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /new
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in {modules}; do [ -f /lib/modules/$m.ko ] && /bin/busybox insmod /lib/modules/$m.ko || echo "module $m: not loaded"; done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose,ro host /new || echo "9p mount failed"
/bin/busybox mount -t tmpfs run /new/run
/bin/busybox mount -t proc proc /new/proc
/bin/busybox mount -t sysfs sys /new/sys
/bin/busybox mount -t devtmpfs dev /new/dev
/bin/busybox mount -t fusectl fusectl /new/sys/fs/fuse/connections
/bin/busybox ip link set lo up
/bin/busybox ip link set eth0 up
/bin/busybox ip addr add 10.0.2.15/24 dev eth0
/bin/busybox ip route add default via 10.0.2.2
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TMPDIR=/run/tmp
/bin/busybox mkdir -p /new/run/tmp
/bin/busybox chroot /new /bin/sh -c 'cd {cwd} && {command}' > /dev/ttyS0 2>&1
echo "{exit} $?" > /dev/ttyS0
/bin/busybox sync
/bin/busybox poweroff -f
"""


class GuestError(RuntimeError):
    pass


def kernel(name: str = "debian-6.1") -> tuple[Path, Path, str]:
    """A guest kernel of ``KERNELS``: its image, its modules' directory and its release
    (``/boot/vmlinuz-6.1.0-57-amd64``, ``/lib/modules/6.1.0-57-amd64``, ``6.1.0-57-amd64``)."""
    root, release_glob = KERNELS[name]
    found = sorted(glob.glob(f"{root}/boot/vmlinuz-{release_glob}"))
    if not found:
        raise GuestError(f"no kernel {release_glob} in {root}/boot: scripts/setup.sh puts it there")
    path = Path(found[-1])
    release = path.name.removeprefix("vmlinuz-")
    return path, root / "lib/modules" / release, release


def initramfs(modules: Path, dest: Path, cwd: str, command: str) -> Path:
    """A gzipped cpio with busybox, the modules and an init that runs ``command`` (in ``cwd``)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestError("busybox is missing (scripts/setup.sh installs busybox-static)")
    root = dest.parent / "initramfs-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    (root / "lib/modules").mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    for name in MODULES:
        found = [p for p in modules.rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
        if not found:
            continue  # built in
        raw = found[0].read_bytes()
        if found[0].name.endswith(".zst"):  # Ubuntu's since 23.10; busybox's insmod takes plain ones
            raw = subprocess.run(["zstd", "-dcq"], input=raw, capture_output=True, check=True).stdout
        elif found[0].name != f"{name}.ko":
            raise GuestError(f"{found[0]} is compressed in a way this harness does not unpack")
        (root / "lib/modules" / f"{name}.ko").write_bytes(raw)
    (root / "init").write_text(INIT.format(modules=" ".join(MODULES), cwd=cwd, command=command, exit=EXIT))
    (root / "init").chmod(0o755)
    listing = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing.encode(),
                          capture_output=True, check=True).stdout
    dest.write_bytes(gzip.compress(cpio, 1))
    shutil.rmtree(root, ignore_errors=True)
    return dest


def run(command: str, work: Path, *, cwd: str = "/", timeout: float = 900, memory_mib: int = 2048,
        kernel_name: str = "debian-6.1") -> tuple[int, str]:
    """Boot the guest on ``kernel_name``, run ``command`` there, return (its exit status, the
    console's text)."""
    vmlinuz, modules, _ = kernel(kernel_name)
    work.mkdir(parents=True, exist_ok=True)
    initrd = initramfs(modules, work / "initramfs.gz", cwd, command)
    cmd = ["qemu-system-x86_64", "-m", str(memory_mib), "-smp", "2", "-nographic", "-no-reboot", "-nodefaults",
           "-serial", "stdio", "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
           "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
           "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace")
        raise GuestError(f"the guest did not finish within {timeout:g} s; its console:\n{text[-3000:]}") from None
    text = out.stdout.decode(errors="replace")
    m = re.search(rf"{EXIT} (\d+)", text)
    if m is None:
        raise GuestError(f"the guest ended without running the command; its console:\n{text[-3000:]}")
    return int(m.group(1)), text
