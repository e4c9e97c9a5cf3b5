"""A small bootable disk and a qemu (TCG) boot of it, for the tests that boot what Nova would.

The disk is an ext4 root file system holding a static busybox and an ``/sbin/init`` that checks a
payload file (random bytes spread over the disk), prints its md5 on the serial console and powers
off.  The host's kernel and initramfs boot it (Debian's initramfs mounts ``root=/dev/vda`` and runs
``/sbin/init``), so a boot reads the disk through whatever backs it: the test puts a qcow2
overlay made by Nova in front of a thunderfs mount.  A boot takes about 10 s under TCG.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MARKER = "THUNDERFS-TINY-VM"
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
sum=$(/bin/busybox md5sum /payload)
echo "{MARKER} md5 ${{sum%% *}}" > /dev/ttyS0
/bin/busybox sync
/bin/busybox poweroff -f
"""


class TinyVmError(RuntimeError):
    pass


@dataclass
class TinyDisk:
    raw: Path
    payload_md5: str


def kernel() -> tuple[Path, Path]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise TinyVmError("no kernel in /boot: scripts/setup.sh installs linux-image-amd64")
    vmlinuz = Path(kernels[-1])
    initrd = Path("/boot") / vmlinuz.name.replace("vmlinuz", "initrd.img")
    if not initrd.exists():
        raise TinyVmError(f"{initrd} is missing")
    return vmlinuz, initrd


def build(workdir: Path, size: int = 256 * 2**20, payload: int = 1 * 2**20, unread: int = 32 * 2**20,
          seed: int = 1) -> TinyDisk:
    """A raw disk of ``size`` bytes (sparse) with the root file system, a payload of ``payload``
    random bytes that the boot reads, and ``unread`` random bytes that it does not (so that even a
    compact qcow2 of the disk holds much that a boot never needs)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise TinyVmError("busybox is missing: scripts/setup.sh installs busybox-static")
    root = workdir / "root"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "sbin" / "init").write_text(INIT)
    (root / "sbin" / "init").chmod(0o755)
    data = random.Random(seed).randbytes(payload)
    (root / "payload").write_bytes(data)
    (root / "unread").write_bytes(random.Random(seed + 1).randbytes(unread))
    raw = workdir / "tiny.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(raw)], check=True)
    return TinyDisk(raw, hashlib.md5(data).hexdigest())


def to_qcow2(raw: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    return out


def boot(disk: Path, fmt: str = "qcow2", cache: str = "none", aio: str = "threads", timeout: float = 120.0) -> str:
    """Boots ``disk`` and returns the md5 the guest printed; TinyVmError if it did not.  Nova's
    libvirt driver uses cache=none (O_DIRECT, backing files included) where the instance
    directory supports it, so that is the default here; ``aio`` is qemu's (``threads``,
    ``native``, ``io_uring``)."""
    vmlinuz, initrd = kernel()
    cmd = ["qemu-system-x86_64", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults",
           "-serial", "stdio", "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 root=/dev/vda rw quiet panic=-1",
           "-drive", f"file={disk},format={fmt},if=virtio,cache={cache},aio={aio}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise TinyVmError(f"no power-off within {timeout:g}s: {out.decode(errors='replace')[-2000:]}") from None
    text = out.decode(errors="replace")
    found = re.search(MARKER + r" md5 ([0-9a-f]{32})", text)  # the console puts escapes before it
    if found:
        return found.group(1)
    raise TinyVmError(f"the guest printed no {MARKER} line (exit {proc.returncode}): {text[-2000:]}")
