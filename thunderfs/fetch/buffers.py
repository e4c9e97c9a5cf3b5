"""Page-aligned memory for peers' answers, used again once the cache is done with it (Glance's
pieces arrive in the cache's pooled buffers, ``cache/fresh.py``).

An answer is received into memory of its own (the peer client's ``AnswerMemory.take``), which
the cache may hold and serve from (``Buffer.wrap(memory, on_free=give_back)``).  Once nobody
refers to it any more, the source that received it (the store let go of it, or never held it),
it comes back here and the next answer of its size class is received into it: a fresh, zeroed
allocation per answer cost the reader a page fault per page and the zeroing of every byte.
Memory handed back twice is refused loudly (two answers in one memory would serve wrong bytes).
Memory an answer that failed or lied held is simply dropped: only what the cache was done with
comes back.
"""

from __future__ import annotations

import ctypes
import mmap

STEP = 64 * 1024  # the smallest size class; the others are its powers of two


def size_class(n: int) -> int:
    return max(STEP, 1 << (max(n, 1) - 1).bit_length())


def _aligned(raw: bytearray) -> memoryview:
    """The page-aligned size class inside ``raw`` (one page longer than the class)."""
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % mmap.PAGESIZE
    return memoryview(raw)[skip:skip + len(raw) - mmap.PAGESIZE]


class AnswerMemory:
    """Page-aligned memory of power-of-two size classes; at most ``keep`` bytes of it kept free.
    Fresh memory comes from the heap (memory the process reuses: a fresh mmap per answer cost
    more than the zeroing of heap memory for the storms' small answers)."""

    def __init__(self, keep: int):
        self._keep = keep
        self._free: dict[int, list[memoryview]] = {}  # size class -> free memory of that size
        self._free_ids: set[int] = set()  # which memory is free now (a second hand-back is a bug)
        self._kept = 0
        self._stats = dict.fromkeys(("answers", "reused", "dropped"), 0)

    def take(self, n: int) -> memoryview:
        """``n`` writable bytes starting on a page: memory used before where one of its size
        is free, else fresh."""
        size = size_class(n)
        self._stats["answers"] += 1
        free = self._free.get(size)
        if free:
            memory = free.pop()
            self._free_ids.discard(id(memory.obj))
            self._kept -= size
            self._stats["reused"] += 1
        else:
            memory = _aligned(bytearray(size + mmap.PAGESIZE))
        return memory[:n]

    def give_back(self, memory: memoryview) -> None:
        """Nobody refers to ``memory`` (a view ``take`` gave) any more."""
        raw = memory.obj
        if not isinstance(raw, bytearray):
            return  # not from here
        size = len(raw) - mmap.PAGESIZE
        if size < STEP or size & (size - 1):
            return  # not from here
        if id(raw) in self._free_ids:
            raise RuntimeError("a peer answer's memory was handed back twice")
        if self._kept + size > self._keep:
            self._stats["dropped"] += 1
            return
        self._free.setdefault(size, []).append(_aligned(raw))
        self._free_ids.add(id(raw))
        self._kept += size

    def statistics(self) -> dict:
        return {**self._stats, "free_bytes": self._kept}
