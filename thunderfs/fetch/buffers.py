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

import mmap
import weakref

STEP = 64 * 1024  # the smallest size class; the others are its powers of two


def size_class(n: int) -> int:
    return max(STEP, 1 << (max(n, 1) - 1).bit_length())


class AnswerMemory:
    """Page-aligned memory of power-of-two size classes; at most ``keep`` bytes of it kept free."""

    def __init__(self, keep: int):
        self._keep = keep
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._out: weakref.WeakSet = weakref.WeakSet()  # taken and not given back (dropped: gone)
        self._stats = dict.fromkeys(("answers", "reused", "dropped"), 0)

    def take(self, n: int) -> memoryview:
        """``n`` writable bytes starting on a page: memory used before where one of its size
        is free, else fresh."""
        size = size_class(n)
        self._stats["answers"] += 1
        free = self._free.get(size)
        if free:
            mm = free.pop()
            self._kept -= size
            self._stats["reused"] += 1
        else:
            mm = mmap.mmap(-1, size)
        self._out.add(mm)
        return memoryview(mm)[:n]

    def give_back(self, memory: memoryview) -> None:
        """Nobody refers to ``memory`` (the view ``take`` gave, whole) any more."""
        mm = memory.obj
        if not isinstance(mm, mmap.mmap):
            return  # not from here
        if mm not in self._out:
            raise RuntimeError("a peer answer's memory was handed back twice, or was not taken here")
        self._out.discard(mm)
        size = len(mm)
        if self._kept + size > self._keep:
            self._stats["dropped"] += 1
            return
        self._free.setdefault(size, []).append(mm)
        self._kept += size

    def statistics(self) -> dict:
        return {**self._stats, "free_bytes": self._kept}
