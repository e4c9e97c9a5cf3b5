"""Reading cached chunks: whole chunks from the data file, each checked against its xxh3, or
from the receive buffer a chunk is held in, or from bytes just fetched (``extra``); and hints
that bring what a sequential reader will want into the page cache.

Invariants (the store's rules 1, 5 and 7):

- A chunk is served only while it is not ``ABSENT``: a hole is never served.
- Every chunk is checked against its xxh3 every time its bytes come from the data file, however
  recently it was checked before: a byte on disk can rot after its first read.  A mismatch
  drops the chunk (``Space.release``) and raises ``ChunkCorrupt`` so that the caller fetches it
  again.  Bytes from memory (``extra``, a held receive buffer) were verified on arrival and never
  left it: not hashed again.
- A ``WRITING`` chunk is served from its buffer only, never from the file.
- A ``SHARED`` chunk is read from its home's file (rule 8), checked against its xxh3 as the home
  itself; a mismatch drops the home and so the chunk.  A ``ZERO`` chunk reads as zeros.
- The caller pins what it reads (``pin``): eviction takes no pinned chunk.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable

import trio

from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.cache.image_data import (ABSENT, PENDING, INDEXED, SHARED, WRITING, ZERO, FileSpan, ImageData, check_mapped,
                                        now_ms, read_checked)
from thunderfs.cache.space import Space
from thunderfs.errors import ChunkCorrupt, ChunkNotCached

log = logging.getLogger(__name__)


class Reading:
    # A read that must wait for the disk runs in the event loop when it is small and the disk's
    # recent reads took less than this (a moving average); else in a worker thread.
    INLINE_DISK_READ = 256 * 1024
    INLINE_DISK_WAIT = 300e-6

    def __init__(self, chunk_size: int, stats: dict, space: Space, buffers: ReceiveBuffers | None, *,
                 registered: Callable[[ImageData], bool], io_threads: int = 8):
        self.chunk_size = chunk_size
        self._stats = stats
        self._space = space
        self.buffers = buffers
        self._registered = registered
        self._pin_ids = itertools.count()
        self._io = trio.CapacityLimiter(io_threads)  # reads that wait for the disk, at once
        self.disk_wait: float | None = None  # seconds a small read from the disk took lately
        self._will_need, self._will_need_recv = trio.open_memory_channel[tuple[ImageData, int, int]](64)

    def pin(self, img: ImageData, first: int, last: int) -> int:
        token = next(self._pin_ids)
        img.pins[token] = (first, last)
        return token

    def unpin(self, img: ImageData, token: int) -> None:
        del img.pins[token]

    async def read(self, img: ImageData, offset: int, size: int, extra: dict[int, bytes] | None = None, *,
                   borrow: bool = False) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)``: every chunk must be cached or given in ``extra``, else
        ``ChunkNotCached`` (a hole is never served); a cached chunk whose bytes fail their checksum
        is dropped and ``ChunkCorrupt`` raised (rule 5).  The caller pins the chunks (rule 4).
        ``borrow``: where every byte lies in one receive buffer (rule 7), a view of it rather
        than a copy, valid only until the caller's next checkpoint (the pool may reuse the
        buffer after it): the FUSE reply is written before any."""
        first, last = img.chunk_range(offset, size)
        state = img.state
        for c in range(first, last + 1):
            if not state[c] and not (extra and c in extra):
                raise ChunkNotCached(c)
        cs, end = self.chunk_size, offset + size
        held = img.held
        parts = []
        c = first
        while c <= last:
            if state[c] == SHARED or state[c] == ZERO:
                start, stop = max(offset, c * cs), min(end, (c + 1) * cs)
                parts.append(await self._shared(img, c, start - c * cs, stop - c * cs) if state[c] == SHARED
                             else bytes(stop - start))
                c += 1
                continue
            if extra and c in extra:
                start, stop = max(offset, c * cs), min(end, (c + 1) * cs)
                parts.append(extra[c][start - c * cs:stop - c * cs])
                self._stats["bytes_read_memory"] += stop - start
                c += 1
                continue
            buf = held.get(c)
            if buf is not None:  # rule 7: from the receive buffer, as one run
                run_last = min(last, buf.last)
                base = buf.first * cs
                view = buf.view(max(offset, c * cs) - base, min(end, (run_last + 1) * cs) - base)
                if borrow and c == first and run_last == last:
                    parts.append(view)  # the whole read: lent, not copied
                else:
                    parts.append(bytes(view))
                    view.release()
                self._stats["bytes_read_memory"] += len(parts[-1])
                # A chunk is read once its last byte is: a reader whose reads are not chunk
                # aligned (a guest's, at 512-byte offsets) reads the rest of it next, from here
                # rather than back from the disk.
                done = run_last if end >= min(img.size, (run_last + 1) * cs) else run_last - 1
                if done >= c:
                    # Read once, as a read back from the disk would have: later reads try the
                    # page cache first, and a sequential reader's readahead fills it (``read_ahead``).
                    img.direct[c:done + 1] = bytes(done - c + 1)
                    self.buffers.mark_read(buf, c, done)
                c = run_last + 1
                continue
            run_last = c
            while (run_last < last and not (extra and run_last + 1 in extra) and run_last + 1 not in held
                   and state[run_last + 1] != SHARED and state[run_last + 1] != ZERO):
                run_last += 1
            base = c * cs
            parts.append(await self._checked(img, c, run_last, max(offset, base) - base,
                                             min(end, (run_last + 1) * cs) - base))
            self._stats["bytes_read_disk"] += len(parts[-1])
            c = run_last + 1
        img.touched.update(dict.fromkeys(range(first, last + 1), now_ms()))
        return parts[0] if len(parts) == 1 and isinstance(parts[0], (bytes, memoryview)) else b"".join(parts)

    async def sendable(self, img: ImageData, offset: int, size: int) -> list[FileSpan | tuple[int, int]]:
        """Bytes ``[offset, offset+size)`` for a peer, as parts to send in order: the image's own
        chunks on its data file as ``FileSpan``s, every one checked against its xxh3 where it
        lies (rule 5; in a worker thread, through a mapping: no copy, the kernel sends the
        page cache's pages, ``os.sendfile``); the rest (held in a receive buffer, shared, zero)
        as ``(offset, size)``, for ``read`` as it is sent.  ``ChunkNotCached``/``ChunkCorrupt``
        as ``read``.  The caller pins the chunks until the last part is sent."""
        first, last = img.chunk_range(offset, size)
        state, held, cs, end = img.state, img.held, self.chunk_size, offset + size
        parts: list[FileSpan | tuple[int, int]] = []
        runs: list[tuple[int, int]] = []

        def on_file(c: int) -> bool:  # its own bytes, in the data file and nowhere else
            return (state[c] == INDEXED or state[c] == PENDING) and c not in held

        c = first
        while c <= last:
            filed = on_file(c)
            run_last = c
            while run_last < last and on_file(run_last + 1) == filed:
                run_last += 1
            if not filed and ABSENT in state[c:run_last + 1]:
                raise ChunkNotCached(c + state[c:run_last + 1].index(ABSENT))
            a, b = max(offset, c * cs), min(end, (run_last + 1) * cs)
            if filed:
                parts.append(FileSpan(img, a, b - a))
                runs.append((c, run_last))
            else:
                parts.append((a, b - a))
            c = run_last + 1
        if runs:
            expects = [img.xxh[f:l + 1] for f, l in runs]
            bad = await trio.to_thread.run_sync(self._check_runs, img.fd, img.size, runs, expects, limiter=self._io)
            if bad is not None:
                self._corrupt(img, *bad)
            for f, l in runs:  # in the page cache now (the check read them there)
                img.direct[f:l + 1] = bytes(l - f + 1)
                self._stats["bytes_checked"] += min(img.size, (l + 1) * cs) - f * cs
            self._stats["bytes_sendable"] += sum(len(p) for p in parts if isinstance(p, FileSpan))
        img.touched.update(dict.fromkeys(range(first, last + 1), now_ms()))
        return parts

    def _check_runs(self, fd: int, size: int, runs: list[tuple[int, int]], expects: list) -> tuple[int, int] | None:
        """The first bad chunk of ``runs`` and the xxh3 it was checked against, or None."""
        cs = self.chunk_size
        for (first, last), expect in zip(runs, expects):
            bad = check_mapped(fd, first * cs, min(size, (last + 1) * cs) - first * cs, expect, cs)
            if bad is not None:
                return first + bad, expect[bad]
        return None

    async def _shared(self, img: ImageData, c: int, a: int, b: int) -> bytes:
        """Bytes ``[a, b)`` of ``SHARED`` chunk ``c``, from its home (rule 8), checked."""
        home, hc = img.home[c]
        token = self.pin(home, hc, hc)
        try:
            data = await self._checked(home, hc, hc, a, b)
        except ChunkCorrupt:
            raise ChunkCorrupt(c) from None  # the home is dropped, and this chunk with it
        finally:
            self.unpin(home, token)
        if img.state[c] != SHARED or img.home.get(c) != (home, hc):
            raise ChunkNotCached(c)  # its home went while it was read
        home.touched[hc] = now_ms()
        self._stats["bytes_read_shared"] += len(data)
        return data

    def _note_disk_wait(self, seconds: float) -> None:
        last = self.disk_wait
        self.disk_wait = seconds if last is None else last + 0.1 * (seconds - last)

    def _timed_read(self, *args) -> tuple[bytes, int | None]:
        t = time.perf_counter()
        got = read_checked(*args)
        if args[2] <= self.INLINE_DISK_READ:
            self._note_disk_wait(time.perf_counter() - t)  # (a float store: safe from a thread)
        return got

    async def verify(self, img: ImageData, run: int = 4 * 2**20) -> bool:
        """Check every chunk of a complete image against its xxh3 now (in worker threads); False
        if a chunk is missing or fails (and is dropped, rule 5).  The caller pins it."""
        per = max(1, run // self.chunk_size)
        for first in range(0, img.nchunks, per):
            last = min(img.nchunks - 1, first + per - 1)
            if img.missing(first, last) or SHARED in img.state[first:last + 1]:
                return False  # a shared chunk's bytes are not in this image's file
            for c in range(first, last + 1):
                buf = img.held.get(c)
                if img.state[c] == WRITING and buf is not None:  # rule 7: wait until it is on disk
                    await buf.wait_written()
                    if buf.failed:
                        return False
            try:
                await self._checked(img, first, last, 0, 0, nowait=False)
            except ChunkCorrupt:
                return False
        return True

    async def _checked(self, img: ImageData, first: int, last: int, a: int, b: int, nowait: bool = True) -> bytes:
        """Bytes ``[a, b)`` of chunks ``first..last`` (offsets from the first chunk's start), read
        whole from the data file, each chunk checked against its xxh3 (``read_checked``).  In the
        event loop when the page cache holds the whole run (``preadv2(RWF_NOWAIT)``: a copy and
        a hash cost ~70 us a MiB, a hop to a thread ~100 us).  Else from the disk with O_DIRECT:
        in the loop too while the disk is fast (a small run, recent reads under
        ``INLINE_DISK_WAIT``), in a worker thread when it is slow, so that reads waiting for it
        overlap (up to ``io_threads``) instead of stalling the loop one after the other.
        ``nowait`` False (``verify``): always in a thread."""
        cs = self.chunk_size
        offset = first * cs
        n = min(img.size, (last + 1) * cs) - offset
        expect = img.xxh[first:last + 1]
        cold = img.direct[first] or img.direct[last]
        got = read_checked(img.fd, offset, n, a, b, expect, cs, nowait=True) if nowait and not cold else None
        self._stats["reads_inline"] += got is not None
        fast = self.disk_wait is not None and self.disk_wait < self.INLINE_DISK_WAIT
        if got is None and nowait and n <= self.INLINE_DISK_READ and fast:
            # The disk answers faster than a hop to a thread costs: read it here (measured on this
            # 2-core VM, a thread per 4 KiB read cost about a fifth of the IOPS at depth 32).
            t = time.perf_counter()
            got = read_checked(img.direct_fd, offset, n, a, b, expect, cs)
            self._note_disk_wait(time.perf_counter() - t)
            self._stats["reads_disk_inline"] += 1
        if got is None:
            self._stats["reads_threaded"] += 1
            got = await trio.to_thread.run_sync(self._timed_read, img.direct_fd, offset, n, a, b, expect, cs,
                                                limiter=self._io)
        data, bad = got
        if cold:  # read back once from the disk: from now on, as any chunk (the page cache first)
            img.direct[first:last + 1] = bytes(last - first + 1)
        self._stats["bytes_checked"] += n
        if bad is not None:
            self._corrupt(img, first + bad, expect[bad])
        return data

    def _corrupt(self, img: ImageData, c: int, xxh: int) -> None:
        """Chunk ``c`` failed its check against ``xxh``: dropped, and ``ChunkCorrupt`` raised.
        Dropped only if it is still the chunk that was read: one staged again meanwhile
        (another reader found the same rot and it was fetched anew) is left alone."""
        if img.state[c] != ABSENT and img.xxh[c] == xxh:
            log.warning("cached chunk %d of %s failed its checksum: dropped, fetching it again",
                        c, img.content.hex())
            self._stats["corrupt_dropped"] += 1
            self._space.release(img, c)
        raise ChunkCorrupt(c)

    def will_need_nowait(self, img: ImageData, first: int, last: int) -> None:
        """A sequential reader will want chunks ``first..last`` soon: have the kernel read them
        into the page cache now (``POSIX_FADV_WILLNEED``, in a worker), so that its reads find
        them there and are served in the event loop.  Dropped when too many are queued."""
        try:
            self._will_need.send_nowait((img, first, last))
        except trio.WouldBlock:
            pass

    async def read_ahead(self) -> None:
        """Serve ``will_need_nowait``'s hints (a task of the store's)."""
        async for img, first, last in self._will_need_recv:
            offset = first * self.chunk_size
            length = min(img.size, (last + 1) * self.chunk_size) - offset
            # Not chunks written straight (their first read goes to the disk anyway), nor ones
            # served from a receive buffer (rule 7: perhaps not on the disk yet).
            if self._registered(img) and not img.direct[first] and first not in img.held:
                await trio.to_thread.run_sync(os.posix_fadvise, img.fd, offset, length, os.POSIX_FADV_WILLNEED,
                                              limiter=self._io)
