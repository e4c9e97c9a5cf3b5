"""The committer: the one writer of the index, and what makes chunks durable.

Invariants (the store's rules 2-4):

- ``PENDING`` chunks become ``INDEXED`` only once their data file was made durable (fdatasync)
  before the index transaction that lists them; a crash loses pending chunks, never corrupts.
- One transaction at a time, in a thread (``_writer``); nothing else writes the index.
- An evicted chunk's bytes are punched (``on_punched``) only once its index delete is durable,
  so the index never lists a chunk over zeros.
- A commit that fails releases its pending chunks (``on_failed``: they go back to ``ABSENT``)
  and keeps its deletes and punches for the next one.  One that fails for want of space is tried
  once more if ``on_disk_full`` made room (the ballast, ``ballast.py``).
- A share (``shared``) is written only if its chunk still shares that home when the commit
  runs; deleting a home and unsharing its users happen in one transaction (``sharing.py``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable

import trio

from thunderfs.cache.ballast import DISK_FULL
from thunderfs.cache.image_data import INDEXED, PENDING, SHARED, ImageData, now_ms
from thunderfs.cache.index import ChunkIndex, Put, Share

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, index: ChunkIndex, images: dict[bytes, ImageData], stats: dict, *,
                 on_failed: Callable[[ImageData, int], None], on_punched: Callable[[ImageData, int], None],
                 on_indexed: Callable[[ImageData, int], None] = lambda img, c: None,
                 commit_interval: float = 0.2, touch_interval: float = 5.0):
        self._index = index
        self._images = images  # the store's registry (read only here)
        self._stats = stats
        self._on_failed = on_failed
        self._on_punched = on_punched
        self.on_indexed = on_indexed
        self.on_disk_full: Callable[[], bool] = lambda: False  # True if it made room for one more try
        self._commit_interval = commit_interval
        self._touch_interval = touch_interval
        self.pending: list[tuple[ImageData, int]] = []
        self._deletes: list[tuple[bytes, int]] = []
        self._punches: list[tuple[ImageData, int]] = []  # evicted: punched once their delete is durable
        self._shares: list[tuple[ImageData, int, ImageData, int]] = []
        self._unshares: list[tuple[bytes, int]] = []
        self._digests: list[tuple[bytes, bytes]] = []
        self._wake = trio.Event()
        self._writer = trio.CapacityLimiter(1)
        self._last_warning = -1e9
        self._failed_since_warning = 0

    def add_pending(self, img: ImageData, chunk: int) -> None:
        """A chunk just written (``PENDING``): indexed at the next commit."""
        self.pending.append((img, chunk))

    def forget(self, content: bytes, chunk: int) -> None:
        """An index entry to delete at the next commit (it does not fit the image)."""
        self._deletes.append((content, chunk))

    def evicted(self, img: ImageData, chunk: int) -> None:
        """An ``INDEXED`` chunk released: its entry goes at the next commit, its bytes after."""
        self._deletes.append((img.content, chunk))
        self._punches.append((img, chunk))

    def shared(self, img: ImageData, chunk: int, home: ImageData, home_chunk: int) -> None:
        """A chunk now ``SHARED`` with ``home``'s: its share is written at the next commit."""
        self._shares.append((img, chunk, home, home_chunk))
        self.wake_nowait()

    def know(self, img: ImageData) -> None:
        """``img``'s digests became known: kept in the index at the next commit."""
        self._digests.append((img.content, img.digests))
        self.wake_nowait()

    def unshared(self, img: ImageData, chunk: int) -> None:
        """A chunk no longer shared: its share is deleted at the next commit."""
        self._unshares.append((img.content, chunk))
        self.wake_nowait()

    def backlog(self) -> int:
        """Chunks, shares and digests waiting for the next commit (0: the index is up to date)."""
        return len(self.pending) + len(self._shares) + len(self._unshares) + len(self._digests)

    def wake_nowait(self) -> None:
        self._wake.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit every ``commit_interval``, or soon after a wake; flush last-use times every
        ``touch_interval``."""
        task_status.started()
        last_touch = time.monotonic()
        while True:
            with trio.move_on_after(self._commit_interval):
                await self._wake.wait()
            await trio.sleep(0.02)  # gather a batch
            self._wake = trio.Event()
            touch = time.monotonic() - last_touch >= self._touch_interval
            if touch:
                last_touch = time.monotonic()
            await self.commit(touch=touch)

    async def commit(self, touch: bool = True) -> None:
        pending, self.pending = self.pending, []
        deletes, self._deletes = self._deletes, []
        punches, self._punches = self._punches, []
        unshares, self._unshares = self._unshares, []
        digests, self._digests = self._digests, []
        sharing = [(img, c, h, hc) for img, c, h, hc in self._shares
                   if img.state[c] == SHARED and img.home.get(c) == (h, hc)]
        self._shares = []
        shares = [Share(img.content, c, h.content, hc) for img, c, h, hc in sharing]
        now = now_ms()
        touches = []
        if touch:
            for img in self._images.values():
                # When each was read, not when the flush ran: the LRU order is the order of the reads.
                touches.extend((img.content, c, t) for c, t in img.touched.items() if img.state[c] == INDEXED)
                img.touched.clear()
        pending = [(img, c) for img, c in pending if img.state[c] == PENDING]
        if not (pending or deletes or touches or shares or unshares or digests):
            return
        puts = [Put(img.content, c, img.chunk_len(c), img.xxh[c], now) for img, c in pending]
        fds = {img.fd for img, _ in pending}
        durable_commit = functools.partial(trio.to_thread.run_sync, self._durable_commit, fds, deletes, puts,
                                           touches, unshares, shares, digests, limiter=self._writer,
                                           abandon_on_cancel=False)
        try:
            try:
                await durable_commit()
            except OSError as exc:
                if exc.errno not in DISK_FULL or not self.on_disk_full():
                    raise
                await durable_commit()  # the ballast gave its room: so the evictions become durable and go
        except OSError as exc:
            self._stats["commit_failures"] += 1
            self._failed_since_warning += 1
            if time.monotonic() - self._last_warning >= 30:
                self._last_warning = time.monotonic()
                log.warning("could not commit the cache index (%s, %d times since the last warning): %d staged "
                            "chunks dropped, %d deletes wait for the next commit", exc, self._failed_since_warning,
                            len(pending), len(deletes))
                self._failed_since_warning = 0
            self._deletes[:0] = deletes
            self._punches[:0] = punches
            self._unshares[:0] = unshares
            self._shares[:0] = sharing
            self._digests[:0] = digests
            for img, c in pending:
                if img.state[c] == PENDING:
                    self._on_failed(img, c)
            return
        for img, c in pending:
            if img.state[c] == PENDING:
                img.state[c] = INDEXED
                self.on_indexed(img, c)
        # The deletes are durable: now the evicted bytes may go (no await since the check).
        for img, c in punches:
            self._on_punched(img, c)
        self._stats["chunks_committed"] += len(pending)

    def _durable_commit(self, fds, deletes, puts, touches, unshares, shares, digests) -> None:
        for fd in fds:
            os.fdatasync(fd)
        try:
            self._index.commit(deletes=deletes, puts=puts, touches=touches, unshares=unshares, shares=shares,
                               digests=digests)
        except Exception as exc:
            full = os.strerror(errno.ENOSPC) in str(exc)  # (LMDB's errors carry strerror's text)
            raise OSError(errno.ENOSPC if full else errno.EIO, str(exc)) from exc
