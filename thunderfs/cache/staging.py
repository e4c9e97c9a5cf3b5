"""Staging: verified bytes into the cache, written now or behind the reader's back.

Invariants (the store's rules 2, 6 and 7):

- Only verified bytes are staged; a chunk becomes ``PENDING`` once its bytes are in the data
  file (not yet durable: the committer makes it ``INDEXED``), or ``WRITING`` while a receive
  buffer the store holds serves it and is written behind (``fresh.py``).
- A write that fails leaves nothing servable from the file: its range is punched out (not in a
  sealed image, rule 6), and a chunk written behind stays servable from its buffer until the
  pool takes it back, then ``ABSENT``.
- Bytes are written straight to the disk (O_DIRECT) when they are whole pages in page-aligned
  memory, through the page cache otherwise; a chunk written straight has its first read go to
  the disk (``ImageData.direct``).
"""

from __future__ import annotations

import errno
import os

import trio
import xxhash

from thunderfs.cache.changes import ChangeFeed
from thunderfs.cache.committer import Committer
from thunderfs.cache.fresh import Buffer, ReceiveBuffers
from thunderfs.cache.image_data import ABSENT, PAGE, PENDING, SHARED, WRITING, ZERO, ImageData
from thunderfs.cache.space import Space


class Staging:
    def __init__(self, chunk_size: int, stats: dict, space: Space, changes: ChangeFeed, committer: Committer,
                 buffers: ReceiveBuffers | None, *, io_threads: int = 8):
        self.chunk_size = chunk_size
        self._stats = stats
        self._space = space
        self._changes = changes
        self._committer = committer
        self.buffers = buffers
        if buffers is not None:
            buffers.set_let_go(self._let_go)
        # Writes behind (rule 7) at once: with two, they fell ~100 ms behind a 500 MiB/s receive
        # on this VM's disk (1 MiB O_DIRECT writes took 1.8 ms beside the reads) and the receive
        # waited for buffers; with six, none waited.
        self._writes = trio.CapacityLimiter(io_threads)
        self.nursery: trio.Nursery | None = None  # where writes behind run, while the store runs

    def stage(self, img: ImageData, first: int, data: bytes | bytearray | memoryview,
              buffer: Buffer | None = None) -> bool:
        """Cache verified bytes of chunks ``first..``; False when they could not be cached
        (cache full of chunks in use, or disk full): the caller serves them from memory.
        ``buffer``: the pooled receive buffer (``self.buffers``) whose start ``data`` is; the store
        holds it and writes behind (rule 7) where it can."""
        n = len(data)
        for c in range(first, first + -(-n // self.chunk_size)):
            if img.state[c] == SHARED or img.state[c] == ZERO:  # arrived for a chunk shared meanwhile
                self._space.release(img, c)
        if not self._space.make_room(n):
            return False
        offset = first * self.chunk_size
        if (buffer is not None and self.nursery is not None and not img.sealed and self.buffers is not None
                and self._hold(img, first, data, buffer)):
            try:
                self.nursery.start_soon(self._write_behind, img, buffer)
            except RuntimeError as exc:  # the store stops: never written (served until let go)
                self._write_behind_failed(img, buffer, OSError(errno.ESHUTDOWN, str(exc)))
            return True
        try:
            written = self._write(img, data, offset)
            if written != n:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            if not img.sealed:  # rule 6: a sealed file keeps what it had (the chunk is not indexed)
                self._space.scrub(img, offset, n)
            self._space.failed_write(exc, n)
            return False
        cs = self.chunk_size
        view = memoryview(data)
        for i in range(-(-n // cs)):
            c = first + i
            img.xxh[c] = xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs])
            img.state[c] = PENDING
            self._committer.add_pending(img, c)
            self._changes.note(img, c, True)
        self._space.used += n
        self._stats["chunks_staged"] += -(-n // cs)
        self._committer.wake_nowait()
        img.wake_waiters()
        return True

    def _hold(self, img: ImageData, first: int, data, buffer: Buffer) -> bool:
        """Rule 7: serve ``data`` from ``buffer`` from now on, for ``_write_behind`` to write;
        False if the pool cannot hold it (a loose buffer past its budget)."""
        n, cs = len(data), self.chunk_size
        count = -(-n // cs)
        if not self.buffers.hold(buffer, img, first, count, n):
            return False
        with buffer.view(0, n) as view:
            for i in range(count):
                c = first + i
                img.xxh[c] = xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs])
                img.state[c] = WRITING
                img.held[c] = buffer
                self._changes.note(img, c, True)
        self._space.used += n
        self._stats["chunks_staged"] += count
        img.wake_waiters()
        return True

    async def _write_behind(self, img: ImageData, buffer: Buffer) -> None:
        first, n = buffer.first, buffer.nbytes
        offset = first * self.chunk_size
        error: OSError | None = None
        try:
            with buffer.view(0, n) as view:
                written, direct = await trio.to_thread.run_sync(self._pwrite, img, view, offset, limiter=self._writes,
                                                                abandon_on_cancel=False)
            if written != n:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            error = exc
        chunks = range(first, first + buffer.count)
        if error is None:
            if direct:  # those not read from the buffer yet: their first read goes to the disk
                for c in buffer.unread:
                    img.direct[c] = 1
            self._stats["bytes_written_behind"] += n
            for c in chunks:
                if img.state[c] == WRITING and img.held.get(c) is buffer:
                    img.state[c] = PENDING
                    self._committer.add_pending(img, c)
            self._committer.wake_nowait()
            self.buffers.mark_written(buffer, True)
        else:
            self._write_behind_failed(img, buffer, error)

    def _write_behind_failed(self, img: ImageData, buffer: Buffer, error: OSError) -> None:
        """The bytes stay servable from the buffer until the pool takes it back (``_let_go``)."""
        n = buffer.nbytes
        self._stats["write_behind_failures"] += 1
        self._space.used -= n
        if not img.sealed:
            self._space.scrub(img, buffer.first * self.chunk_size, n)
        self._space.failed_write(error, n)
        self.buffers.mark_written(buffer, False)

    def _pwrite(self, img: ImageData, data, offset: int) -> tuple[int, bool]:
        """Straight to the disk (O_DIRECT) when the bytes are whole pages in page-aligned memory
        (a pooled receive buffer, a peer's answer); through the page cache otherwise: ``bytes``
        (the tracker's seed), or unaligned memory (the kernel refuses it with EINVAL, which costs
        one system call).  (bytes written, whether straight); in any thread."""
        if img.direct_fd != img.fd and len(data) % PAGE == 0 and not memoryview(data).readonly:
            try:
                return os.pwrite(img.direct_fd, data, offset), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.pwrite(img.fd, data, offset), False

    def _let_go(self, buffer: Buffer) -> None:
        """The pool takes ``buffer`` back: its chunks are served from the file from now on, or,
        where its write failed, not at all."""
        img: ImageData = buffer.owner
        for c in range(buffer.first, buffer.first + buffer.count):
            if img.held.get(c) is buffer:
                del img.held[c]
                if img.state[c] == WRITING:
                    img.state[c] = ABSENT
                    self._changes.note(img, c, False)

    def _write(self, img: ImageData, data, offset: int) -> int:
        """``data`` written now, in the event loop (``_pwrite``), and marked as written straight
        or not."""
        first, n = offset // self.chunk_size, -(-len(data) // self.chunk_size)
        written, direct = self._pwrite(img, data, offset)
        if direct:
            self._stats["bytes_written_direct"] += written
        img.direct[first:first + n] = (b"\1" if direct else b"\0") * n
        return written
