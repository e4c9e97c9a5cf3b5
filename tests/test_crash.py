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

from conftest import wait_for
from thunderfs.cache.holes import data_extents
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


SHARE_KILLS = max(12, KILLS // 4)


def _check_shares(cache_dir, versions: dict[bytes, bytes]) -> tuple[int, int]:
    """Every share a dead daemon left in the index points at an indexed chunk whose bytes are the
    sharing image's (so a chunk is never referenced and missing), and every indexed chunk has its
    own image's bytes; (indexed chunks, shares) checked."""
    index = ChunkIndex(cache_dir / "index")
    checked = shares = 0
    try:
        for content in index.contents():
            data = versions[content]
            with open(cache_dir / "data" / f"{content.hex()}.data", "rb") as f:
                for rec in index.chunks_of(content):
                    f.seek(rec.chunk * CHUNK)
                    assert f.read(rec.length) == data[rec.chunk * CHUNK:rec.chunk * CHUNK + rec.length]
                    checked += 1
            for s in index.shared_of(content):
                homes = {r.chunk: r for r in index.chunks_of(s.home)}
                assert s.home_chunk in homes, f"chunk {s.chunk} shares a chunk that is not indexed"
                home = versions[s.home][s.home_chunk * CHUNK:(s.home_chunk + 1) * CHUNK]
                assert home == data[s.chunk * CHUNK:(s.chunk + 1) * CHUNK], f"chunk {s.chunk} shares other bytes"
                shares += 1
    finally:
        index.close()
    return checked, shares


def test_sigkill_while_two_versions_share_chunks_and_evict_leaves_no_share_dangling(make_cluster, glance, tmp_path):
    """Issue 31: two versions of an image sharing most chunks, read in turn through a cache that
    holds less than one, so homes are evicted (and their shares with them) while the kills land.
    No share ever points at a chunk missing from the index, no indexed chunk has wrong bytes, and
    after the last restart nothing is left on the disk that the index does not list."""
    proxy, tracker, node = make_cluster()
    rng = random.Random(31)
    v1 = rng.randbytes(12 * 2**20) + bytes(2**20) + rng.randbytes(2**20)
    v2 = bytearray(v1)
    for c in rng.sample(range(len(v1) // CHUNK), 12):
        v2[c * CHUNK:(c + 1) * CHUNK] = rng.randbytes(CHUNK)
    v2 = bytes(v2)
    ids = [glance.upload("v1", v1)["id"], glance.upload("v2", v2)["id"]]
    m = node("n", "z1/r1/n", "--cache-size", "8M")
    for image_id in ids:  # the tracker builds both manifests
        with open(m.image(image_id), "rb") as f:
            f.read(4096)
    for image_id in ids:
        wait_for(lambda: (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists(), 60, "the manifests")
    keys = {os.getxattr(m.image(i), "user.thunderfs.content_key").decode(): d for i, d in zip(ids, (v1, v2))}
    versions = {bytes.fromhex(k): d for k, d in keys.items()}
    checked = shares = 0
    for k in range(SHARE_KILLS):
        if k:
            m.mount()
        image_id, data = (ids[k % 2], (v1, v2)[k % 2])
        with open(m.image(image_id), "rb", buffering=0) as f:
            for _ in range(rng.randrange(4, 24)):
                off = rng.randrange(len(data) // CHUNK) * CHUNK
                f.seek(off)
                assert f.read(512 * 1024) == data[off:off + 512 * 1024]
        time.sleep(rng.uniform(0.0, 0.4))
        m.kill9()
        c, s = _check_shares(m.cache_dir, versions)
        checked, shares = checked + c, shares + s
    m.mount()
    for image_id, data in zip(ids, (v1, v2)):
        assert m.image(image_id).read_bytes() == data
    st = m.stats()["cache"]
    assert st["corrupt_dropped"] == 0 and st["used"] <= 8 * 2**20 and st["chunks_shared"] > 0
    assert shares > 0 and checked > 0  # the kills left shares and chunks behind to check
    # What the disk holds is what the index lists: nothing unreferenced stays past a start, which
    # punches what no index entry covers.
    m.kill9()
    m.mount()
    m.kill9()
    index = ChunkIndex(m.cache_dir / "index")
    try:
        for content in index.contents():
            indexed = {r.chunk for r in index.chunks_of(content)}
            fd = os.open(m.cache_dir / "data" / f"{content.hex()}.data", os.O_RDONLY)
            try:
                for start, end in data_extents(fd):
                    assert set(range(start // CHUNK, -(-end // CHUNK))) <= indexed, "bytes nobody references"
            finally:
                os.close(fd)
    finally:
        index.close()
