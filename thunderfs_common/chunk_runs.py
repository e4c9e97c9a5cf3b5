"""Chunk numbers as runs of adjacent chunks: how the daemon and the tracker ask for ranges."""

from __future__ import annotations

from collections.abc import Iterable


def runs(chunks: Iterable[int], max_len: int) -> list[tuple[int, int]]:
    """Sorted chunk numbers -> (first, count) runs of adjacent chunks, none longer than max_len."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c and out[-1][1] < max_len:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out
