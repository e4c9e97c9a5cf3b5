"""Receive buffers that go on serving what they received: the cache's memory tier.

A source receives a run of chunks into a pooled, page-aligned buffer (``ReceiveBuffers.take``)
and stages it (``ChunkStore.stage(..., buffer=)``).  The store *holds* the buffer: its chunks are
served from it at once, written to the data file behind the reader's back (in a thread, off the
event loop), and the buffer goes back to the pool once they are written and each was read, or
sooner, the oldest written first, when a receive needs a buffer and none is free.  So a reader of
chunks just fetched takes them from memory: no read back from the disk, no second hash, no hop
to a thread (a cold whole-image read hopped to a thread for every 1 MiB read to read back what
had just arrived, while its event loop waited 0.6 ms a MiB on the write: ~400 MiB/s, ~550 now).

Memory for received bytes stays at ``count * size`` whatever the number of transfers: a receive
waits for a buffer when every one is either receiving or holds chunks still being written.  A
peer's answer arrives in memory of its own; the store holds it the same way (``Buffer.wrap``),
within a budget of as many bytes again, and writes it itself where the budget is spent.
A buffer goes back to the pool only when nobody refers to it any more (the source that received
into it, the store that holds it); one handed back more often than it was taken is a bug,
refused loudly.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import trio


class Buffer:
    """One page-aligned buffer, and, while the store holds it, what it holds: chunks ``first``
    .. ``first + count - 1`` of the image content ``owner`` (the store's ``ImageData``).  A
    *loose* one (``wrap``) is memory a source allocated for one transfer (a peer's answer): held
    within the pool's byte budget, and handed to its ``on_free`` (or dropped) once neither the
    store nor the source refers to it."""

    __slots__ = ("mm", "refs", "pooled", "on_free", "owner", "first", "count", "nbytes", "unread", "written",
                 "failed", "_done")

    def __init__(self, size: int):
        self.mm: mmap.mmap | memoryview = mmap.mmap(-1, size)
        self.refs = 0
        self.pooled = True
        self.on_free = None
        self._clear()

    @classmethod
    def wrap(cls, memory: memoryview, on_free: Callable[[memoryview], None] | None = None) -> "Buffer":
        """Loose: ``memory`` as a buffer, referred to once (by the source, until ``drop``);
        ``on_free(memory)`` once nobody refers to it any more."""
        buf = cls.__new__(cls)
        buf.mm, buf.refs, buf.pooled, buf.on_free = memory, 1, False, on_free
        buf._clear()
        return buf

    def drop(self) -> None:
        """One reference to a loose buffer less (the source's, or the store's when it lets go)."""
        if self.pooled or self.refs < 1:
            raise RuntimeError("a loose receive buffer was dropped twice, or a pooled one dropped")
        self.refs -= 1
        if not self.refs and self.on_free is not None:
            on_free, self.on_free = self.on_free, None
            on_free(self.mm)

    def _clear(self) -> None:
        self.owner = None
        self.first = self.count = self.nbytes = 0
        self.unread: set[int] = set()
        self.written = self.failed = False
        self._done: trio.Event | None = None

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def view(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of what it holds (offsets from its first chunk's start)."""
        return memoryview(self.mm)[start:min(stop, self.nbytes)]

    async def wait_written(self) -> None:
        if not self.written:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()


class ReceiveBuffers:
    """``count`` buffers of ``size`` bytes, made on first use and never freed.  ``let_go(buffer)``
    (the store's) is called when a held buffer is taken back from the store: after it, nothing
    may serve from it."""

    def __init__(self, size: int, count: int, let_go: Callable[[Buffer], None] | None = None):
        if size % mmap.PAGESIZE or count < 1:
            raise ValueError("buffers are whole pages, and a pool has at least one")
        self.size = size
        self.count = count
        self._let_go_hook = let_go
        self._free: list[Buffer] = []
        self._made = 0
        self._held: OrderedDict[int, Buffer] = OrderedDict()  # id -> buffer, oldest held first
        self._changed = trio.Event()  # a buffer came free, or a held one was written
        self._loose = 0  # bytes held in loose buffers
        self._stats = dict.fromkeys(("waits", "taken_back", "held", "let_go_unread", "loose_refused"), 0)

    def set_let_go(self, let_go: Callable[[Buffer], None]) -> None:
        self._let_go_hook = let_go

    @contextlib.asynccontextmanager
    async def take(self) -> AsyncIterator[tuple[Buffer, memoryview]]:
        """A buffer, and a view of it for the block (released after it: a view kept past the
        block raises instead of reading reused bytes).  The buffer stays out of the pool while
        the store holds it."""
        buf = await self._get()
        buf.refs = 1
        view = memoryview(buf.mm)
        try:
            yield buf, view
        finally:
            view.release()
            self.unref(buf)

    async def _get(self) -> Buffer:
        waited = False
        while True:
            if self._free:
                return self._free.pop()
            if self._made < self.count:
                self._made += 1
                return Buffer(self.size)
            victim = next((b for b in self._held.values() if b.written and b.pooled), None)
            if victim is not None:
                self._stats["taken_back"] += 1
                self.release_held(victim)
                continue
            if not waited:
                waited = True
                self._stats["waits"] += 1
            await self._changed.wait()

    def hold(self, buf: Buffer, owner, first: int, count: int, nbytes: int) -> bool:
        """The store keeps ``buf``'s first ``nbytes`` as chunks ``first..first+count-1``; False
        for a loose one that does not fit the budget (``count * size`` bytes held loose), even
        once the oldest written are let go."""
        if buf.owner is not None or buf.refs < 1:
            raise RuntimeError("a receive buffer held twice, or after it went back")
        if not buf.pooled:
            budget = self.size * self.count
            for victim in [b for b in self._held.values() if b.written and not b.pooled]:
                if self._loose + nbytes <= budget:
                    break
                self._stats["taken_back"] += 1
                self.release_held(victim)
            if self._loose + nbytes > budget:
                self._stats["loose_refused"] += 1
                return False
            self._loose += nbytes
        buf.refs += 1
        buf.owner, buf.first, buf.count, buf.nbytes = owner, first, count, nbytes
        buf.unread = set(range(first, first + count))
        self._held[id(buf)] = buf
        self._stats["held"] += 1
        return True

    def mark_written(self, buf: Buffer, ok: bool) -> None:
        buf.written, buf.failed = True, not ok
        if buf._done is not None:
            buf._done.set()
        if ok and not buf.unread:
            self.release_held(buf)
        self._wake()

    def mark_read(self, buf: Buffer, first: int, last: int) -> None:
        unread = buf.unread
        unread.difference_update(range(first, last + 1))
        if not unread and buf.written and not buf.failed:
            self.release_held(buf)

    def release_held(self, buf: Buffer) -> None:
        """The store lets go of ``buf`` now (written: its chunks are read from the disk after)."""
        if self._held.pop(id(buf), None) is None:
            return
        if buf.unread:
            self._stats["let_go_unread"] += 1
        if self._let_go_hook is not None:
            self._let_go_hook(buf)
        if not buf.pooled:
            self._loose -= buf.nbytes
        buf._clear()
        self.unref(buf)

    def unref(self, buf: Buffer) -> None:
        if not buf.pooled:
            buf.drop()
            return
        if buf.refs < 1:
            raise RuntimeError("a receive buffer was handed back twice")
        buf.refs -= 1
        if not buf.refs:
            self._free.append(buf)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def statistics(self) -> dict:
        return {"buffers": self._made, "in_use": self._made - len(self._free), "holding": len(self._held),
                "buffer_bytes": self._made * self.size, "loose_bytes": self._loose, **self._stats}
