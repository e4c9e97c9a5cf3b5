"""The ceiling of the stack: a minimal pyfuse3 filesystem that shows one local file and reads it
with one pread per request, with the same mount options, open flags and kernel readahead as
thunderfs.  Usage: passthroughfs.py FILE MOUNTPOINT (foreground; SIGTERM unmounts)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from thunderfs.fuse.mounting import set_readahead

NAME = b"file"


class Passthrough(pyfuse3.Operations):
    def __init__(self, path: str):
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o555, 0
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o444, self.size
        a.st_nlink = 1
        a.st_blksize = 65536
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == NAME:
            return self._attr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(2), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


async def main(mountpoint: str):
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async with trio.open_nursery() as n:
            async def stop():
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
            n.start_soon(stop)
            await pyfuse3.main()
            n.cancel_scope.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1].startswith("-"):
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    src, mnt = sys.argv[1], os.path.abspath(sys.argv[2])
    pyfuse3.init(Passthrough(src), mnt, set(pyfuse3.default_options) | {"fsname=passthrough", "allow_other"})
    set_readahead(Path(mnt), 1024)
    print("READY", flush=True)
    try:
        trio.run(main, mnt)
    finally:
        pyfuse3.close(unmount=True)
