"""Crash consistency (issue 7, item 2): the daemon SIGKILLed at random moments while it fills its
cache, at least 50 times (``THUNDERFS_CRASH_KILLS=N`` for a longer run by hand).

After each kill, before the restart, the cache the dead process left is read directly, as files:
every chunk its LMDB index lists has exactly Glance's bytes in the data file, and the xxh3 the
index holds for it.  Each restart opens the index again (stale LMDB readers of the killed process
cleared, a crash-interrupted map growth survived).  At the end the whole image reads back exactly
and no cached chunk ever failed its checksum.  The cache is smaller than the image, so eviction
runs (holes punched, index entries deleted) while the kills land.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import xxhash

from thunderfs.cache.index import ChunkIndex

KILLS = int(os.environ.get("THUNDERFS_CRASH_KILLS", "50"))
CHUNK = 64 * 2**10


def _check_cache(cache_dir, data: bytes) -> int:
    """Every indexed chunk of the cache as a dead daemon left it has the image's bytes; how many."""
    index = ChunkIndex(cache_dir / "index")
    checked = 0
    try:
        for content in index.contents():
            with open(cache_dir / "data" / f"{content.hex()}.data", "rb") as f:
                for rec in index.chunks_of(content):
                    f.seek(rec.chunk * CHUNK)
                    got = f.read(rec.length)
                    want = data[rec.chunk * CHUNK:rec.chunk * CHUNK + rec.length]
                    assert got == want, f"chunk {rec.chunk} is indexed with wrong bytes"
                    assert xxhash.xxh3_64_intdigest(got) == rec.xxh3, f"chunk {rec.chunk}: wrong xxh3 indexed"
                    checked += 1
    finally:
        index.close()
    return checked


def test_sigkill_while_filling_never_leaves_a_wrong_chunk_indexed(glance, images, mounts):
    image_id = images.add(24 * 2**20 + 777, seed=71)
    data = images.data[image_id]
    rng = random.Random(71)
    m = mounts(glance.url, "--cache-size", "16M")
    checked = kills = 0
    for _ in range(KILLS):
        m.mount()
        # Heavy filling: the whole image as fast as Glance sends it, and a reader elsewhere.
        warm = subprocess.Popen([sys.executable, "-m", "thunderfs", "warm", str(m.path), image_id, "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(m.image(image_id), "rb", buffering=0) as f:
            f.seek(rng.randrange(len(data)))
            f.read(256 * 1024)
        time.sleep(rng.uniform(0.0, 0.5))
        m.kill9()
        kills += 1
        warm.wait(30)
        checked += _check_cache(m.cache_dir, data)
    m.mount()
    assert m.image(image_id).read_bytes() == data
    s = m.stats()["cache"]
    assert s["corrupt_dropped"] == 0 and s["used"] <= 16 * 2**20
    assert kills >= min(50, KILLS) and checked > kills  # the kills left chunks behind to check
