"""The one thing thunderfs reads of Nova's instance disks: the backing file a qcow2 header names."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

_QCOW2_MAGIC = b"QFI\xfb"


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file named in a qcow2 header; None for a disk of another format, none, or
    anything that is not a regular file (opened without following a link or waiting on a FIFO:
    the instance directories belong to Nova's user, and this runs as root)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        header = f.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset or not size or size > 4096:
            return None
        f.seek(offset)
        return os.fsdecode(f.read(size))
