"""The recorded Debian boot's reads (``../shared/data/debian-boot-trace.txt``), replayed.

A line is ``seconds-since-first-read byte-offset byte-count``.  ``replay`` issues the reads in
order with O_DIRECT (the page cache would hide repeated reads), either as fast as they complete
or at the recorded pace (a read is not issued before its recorded time).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "debian-boot-trace.txt"


@dataclass(frozen=True)
class Read:
    at: float
    offset: int
    size: int


def load(path: Path = TRACE) -> list[Read]:
    if not path.exists():
        raise SystemExit(f"the boot trace is missing: {path}")
    reads = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            at, off, n = line.split()
            reads.append(Read(float(at), int(off), int(n)))
    return reads


def replay(path: Path, reads: list[Read], paced: bool = False) -> float:
    """Seconds from the first read issued to the last one done."""
    buf = mmap.mmap(-1, max(r.size for r in reads))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    start = time.perf_counter()
    try:
        for r in reads:
            if paced:
                wait = start + r.at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            os.preadv(fd, [view[:r.size]], r.offset)
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return time.perf_counter() - start
