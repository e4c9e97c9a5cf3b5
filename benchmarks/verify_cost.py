"""What checking every cached read costs the daemon (issue 18, item 4), in-process, from the page
cache (the case where the check weighs most: no disk wait to hide it).

Before issue 18 a chunk was checked once per process, so a warm read was a plain ``pread`` of the
bytes asked for; now ``ChunkStore.read`` takes the whole 64 KiB chunks from the data file and
hashes each (xxh3) before it serves its slice.  Both side by side on the same 64 MiB cache (a real
``ChunkStore`` and LMDB index in a temporary directory): 4 KiB random reads, 1 MiB sequential
reads aligned to chunks, and 1 MiB reads that are not.  Compare with what one FUSE request costs
end to end (``benchmarks/fio_bench.py``: about 100 us for a 4 KiB O_DIRECT read of a warm mount).

Usage: .venv/bin/python benchmarks/verify_cost.py [--reads 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import trio


from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ChunkStore

CHUNK = 64 * 1024
SIZE = 64 * 2**20


async def measure(store: ChunkStore, img, cases) -> list[tuple[str, float, float]]:
    rows = []
    for label, offsets, size in cases:
        for offset in offsets[:100]:  # the page cache and the code warm
            await store.read(img, offset, size)
        t = time.perf_counter()
        for offset in offsets:
            os.pread(img.fd, size, offset)
        plain = (time.perf_counter() - t) / len(offsets)
        t = time.perf_counter()
        for offset in offsets:
            await store.read(img, offset, size)
        every = (time.perf_counter() - t) / len(offsets)
        rows.append((label, plain, every))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        index = ChunkIndex(Path(tmp) / "index")
        index.check_layout(CHUNK)
        store = ChunkStore(Path(tmp), index, CHUNK, 2**30)
        img = store.image(b"\x01" * 16, SIZE)
        store.stage(img, 0, os.urandom(SIZE))
        trio.run(store.commit)
        rng = random.Random(1)
        cases = (("4 KiB random", [rng.randrange(SIZE // 4096) * 4096 for _ in range(args.reads)], 4096),
                 ("1 MiB sequential", [(i % 63) * 2**20 for i in range(args.reads // 10)], 2**20),
                 ("1 MiB unaligned", [(i % 62) * 2**20 + 4096 for i in range(args.reads // 10)], 2**20))
        rows = trio.run(measure, store, img, cases)
        store.close()
        index.close()
    print(f"  {'read':18s} {'pread only':>12s} {'ChunkStore.read':>16s} {'added':>10s}")
    for label, plain, every in rows:
        print(f"  {label:18s} {plain * 1e6:9.1f} us {every * 1e6:13.1f} us {(every - plain) * 1e6:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
