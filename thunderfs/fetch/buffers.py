"""Page-aligned memory for a peer's answer (Glance's pieces arrive in the cache's pooled
buffers, ``cache/fresh.py``)."""

from __future__ import annotations

import ctypes
import mmap


def aligned(n: int) -> memoryview:
    """``n`` writable bytes starting on a page, from the heap (memory the process reuses, unlike a
    fresh mmap): what the cache can write with O_DIRECT (a peer's reply)."""
    raw = bytearray(n + mmap.PAGESIZE)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % mmap.PAGESIZE
    return memoryview(raw)[skip:skip + n]
