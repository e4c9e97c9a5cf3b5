"""Receive buffers: page-aligned, allocated once, reused for every transfer.

A fresh buffer per transfer costs a page fault per page (and on a VM whose freed memory goes back
to the host, the host's fault too); a pool of buffers that are never freed costs them once.  The
pool is bounded: a transfer waits for a free buffer, so that memory for received bytes stays at
``count * size`` however many transfers run.  A buffer handed back twice is a bug, refused loudly.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import AsyncIterator

import trio


class BufferPool:
    def __init__(self, size: int, count: int):
        if size % mmap.PAGESIZE or count < 1:
            raise ValueError("buffers are whole pages, and a pool has at least one")
        self.size = size
        self.count = count
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._out: set[int] = set()  # id() of the buffers handed out
        self._available = trio.Semaphore(count)
        self._waits = 0

    @contextlib.asynccontextmanager
    async def take(self) -> AsyncIterator[memoryview]:
        """One buffer of ``size`` bytes for the block; back to the pool after it."""
        if self._available.value == 0:
            self._waits += 1
        await self._available.acquire()
        buf = self._free.pop() if self._free else self._make()
        self._out.add(id(buf))
        view = memoryview(buf)
        try:
            yield view
        finally:
            view.release()  # a view kept past the block raises instead of reading reused bytes
            self._give_back(buf)

    def _make(self) -> mmap.mmap:
        self._made += 1
        return mmap.mmap(-1, self.size)

    def _give_back(self, buf: mmap.mmap) -> None:
        if id(buf) not in self._out:
            raise RuntimeError("a receive buffer was handed back twice")
        self._out.discard(id(buf))
        self._free.append(buf)
        self._available.release()

    def statistics(self) -> dict:
        return {"buffers": self._made, "in_use": len(self._out), "buffer_bytes": self._made * self.size,
                "waits": self._waits}


def aligned(n: int) -> memoryview:
    """``n`` writable bytes starting on a page, from the heap (memory the process reuses, unlike a
    fresh mmap): what the cache can write with O_DIRECT (a peer's reply)."""
    raw = bytearray(n + mmap.PAGESIZE)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % mmap.PAGESIZE
    return memoryview(raw)[skip:skip + n]
