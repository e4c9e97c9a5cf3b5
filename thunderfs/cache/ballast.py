"""The ballast: a file that holds room on the cache's file system for the index's next commit.

When other files take the file system's last free block, the cache can give room back only by
committing its evictions: an evicted chunk's bytes are punched once its index delete is durable
(the store's rule 4), and that commit needs new pages on the disk (LMDB writes copy on write).
Without room for them the disk stays full for good.  The ballast (after CockroachDB's emergency
ballast file) holds that room: a commit that fails for want of space lets the ballast go and tries
again (``Space.disk_full``), and the ballast is laid again once the disk has room for it and the
cache's reserve (``Space.give_back``).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a file system with no room (the cache's one list)


def ballast_size(fs_bytes: int, capacity: int) -> int:
    """A thousandth of the file system or a 512th of the cache's capacity, whichever is less, at
    least 256 KiB and at most 16 MiB.  The index takes about 100 bytes a chunk (a 655th of the
    cached bytes with 64 KiB chunks), and no commit rewrites more than all of it; a commit deleting
    a hundred thousand chunks at once (6 GiB evicted) rewrites about 10 MiB of index pages."""
    return min(max(min(fs_bytes // 1000, capacity // 512), 256 * 2**10), 16 * 2**20)


class Ballast:
    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self.held = self._on_disk()

    @classmethod
    def in_dir(cls, directory: Path, capacity: int) -> Ballast:
        """The ballast of a cache of ``capacity`` bytes in ``directory``, sized for it and its file
        system, laid if it can be."""
        try:
            st = os.statvfs(directory)
            size = ballast_size(st.f_blocks * st.f_frsize, capacity)
        except OSError:
            size = ballast_size(0, capacity)
        ballast = cls(directory / "ballast", size)
        ballast.lay()
        return ballast

    @property
    def missing(self) -> int:
        """Bytes of the ballast not on the disk now (room the cache keeps free for it)."""
        return self.size - self.held

    def _on_disk(self) -> int:
        try:
            return min(os.stat(self.path).st_blocks * 512, self.size)
        except FileNotFoundError:
            return 0

    def lay(self) -> bool:
        """Take the ballast's room on the disk now; True if it is whole.  A disk too full for it
        leaves it short (laid again later), never an error."""
        if not self.missing:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                log.warning("cannot lay the cache's ballast file %s: %s", self.path, exc)
        self.held = self._on_disk()
        return not self.missing

    def release(self) -> int:
        """Give the ballast's room to the file system; the bytes it held (0: none)."""
        held = self.held
        if not held:
            return 0
        try:
            os.truncate(self.path, 0)
        except FileNotFoundError:
            pass
        self.held = self._on_disk()
        return held
