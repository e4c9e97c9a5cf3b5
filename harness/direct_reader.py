"""A reader that keeps reading one image with O_DIRECT (every read goes to the daemon, none to the
page cache) and checks every byte: what a VM with ``cache=none`` does to its base image.  Used by
the takeover tests and ``benchmarks/takeover_bench.py``."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from pathlib import Path

BLOCK = 64 * 1024


class DirectReader(threading.Thread):
    """Random ``block``-sized reads until ``stop()``; counts reads, errors and wrong bytes and keeps
    every read's latency."""

    def __init__(self, path: Path, data: bytes, seed: int = 1, block: int = BLOCK):
        super().__init__(daemon=True)
        self.path, self.data, self.block = path, data, block
        self.rng = random.Random(seed)
        self.reads = self.errors = self.wrong = 0
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    @property
    def slowest(self) -> float:
        return max(self.latencies, default=0.0)

    def run(self) -> None:
        buf = mmap.mmap(-1, self.block)  # page-aligned, as O_DIRECT wants
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            blocks = len(self.data) // self.block
            while not self._halt.is_set():
                off = self.rng.randrange(blocks) * self.block
                t = time.monotonic()
                try:
                    n = os.preadv(fd, [buf], off)
                except OSError as exc:
                    self.errors += 1
                    self.failures.append(f"read at {off}: {exc}")
                    continue
                finally:
                    self.latencies.append(time.monotonic() - t)
                if n != self.block or buf[:n] != self.data[off:off + n]:
                    self.wrong += 1
                    self.failures.append(f"wrong bytes at {off} ({n} bytes)")
                self.reads += 1
        finally:
            os.close(fd)

    def wait_reads(self, more: int, timeout: float = 60) -> None:
        """Wait until ``more`` reads more have completed (fails if the reader died or stalled)."""
        target = self.reads + self.errors + more
        deadline = time.monotonic() + timeout
        while self.reads + self.errors < target:
            if not self.is_alive():
                raise RuntimeError(f"the reader died: {self.failures[-3:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{more} reads did not complete in {timeout}s")
            time.sleep(0.01)

    def halt(self) -> None:
        """Stop after the read in progress (``join`` waits for it)."""
        self._halt.set()

    def stop(self) -> None:
        self.halt()
        self.join(30)
