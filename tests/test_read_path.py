"""Reads through a real mount: correct bytes, chunk arithmetic, single flight, coalescing."""

from __future__ import annotations

import os
import random
import threading

from harness.mounts import thunderfs

CHUNK = 64 * 1024


def test_whole_image_reads_back_exactly_when_size_is_not_a_chunk_multiple(mount, images):
    image_id = images.add(5 * CHUNK + 12345, seed=50)
    assert mount.image(image_id).read_bytes() == images.data[image_id]


def test_random_reads_across_chunk_boundaries(mount, images):
    size = 40 * CHUNK + 777
    image_id = images.add(size, seed=51)
    data = images.data[image_id]
    rng = random.Random(5)
    fd = os.open(mount.image(image_id), os.O_RDONLY)
    try:
        cases = [(0, 1), (CHUNK - 1, 2), (size - 1, 1), (size - 10, 100), (size, 10), (size + 5000, 10),
                 (3 * CHUNK - 100, 2 * CHUNK + 200)]
        cases += [(rng.randrange(size), rng.randrange(1, 3 * CHUNK)) for _ in range(200)]
        for off, n in cases:
            assert os.pread(fd, n, off) == data[off:off + n], (off, n)
    finally:
        os.close(fd)


def test_a_chunk_is_fetched_once_however_many_readers_wait(glance, mounts, images):
    m = mounts(glance.url, "--readahead", "0")
    m.mount()
    image_id = images.add(64 * CHUNK, seed=52)
    data = images.data[image_id]
    before = m.stats()["fetch"]
    barrier = threading.Barrier(8)
    results, errors = [], []

    def reader():
        try:
            with open(m.image(image_id), "rb", buffering=0) as f:
                barrier.wait()
                f.seek(10 * CHUNK)
                results.append(f.read(16 * CHUNK))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == [data[10 * CHUNK:26 * CHUNK]] * 8
    # 16 chunks were wanted by 8 readers; each crossed the network once (the kernel may read
    # a little past the end of the request, so allow its readahead, never duplicates).
    import time
    deadline = time.monotonic() + 10
    while (s := m.stats())["fetch"]["in_flight"]:  # one quiet snapshot, not two moments
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fetched = s["fetch"]["chunks_fetched"] - before["chunks_fetched"]
    assert 16 <= fetched <= 16 + 1024 * 1024 // CHUNK
    assert s["cache"]["chunks_staged"] == fetched
    assert s["glance"]["bytes"] == fetched * CHUNK


def test_adjacent_missing_chunks_are_fetched_in_one_request(glance, mounts, images):
    m = mounts(glance.url, "--readahead", "0", "--kernel-readahead", "0")
    m.mount()
    image_id = images.add(64 * CHUNK, seed=53)
    fd = os.open(m.image(image_id), os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 8 * CHUNK)
        before = m.stats()
        assert os.preadv(fd, [buf], 4 * CHUNK) == 8 * CHUNK
        after = m.stats()
    finally:
        os.close(fd)
    assert bytes(buf) == images.data[image_id][4 * CHUNK:12 * CHUNK]
    assert after["fetch"]["chunks_fetched"] - before["fetch"]["chunks_fetched"] == 8
    assert after["glance"]["range_requests"] - before["glance"]["range_requests"] == 1


def test_sequential_read_fetches_ahead_in_large_requests(glance, mounts, images):
    m = mounts(glance.url)
    m.mount()
    image_id = images.add(24 * 2**20 + 5, seed=54)
    assert m.image(image_id).read_bytes() == images.data[image_id]
    s = m.stats()
    assert s["fetch"]["readahead_chunks"] > 0
    # Far fewer requests than 1 MiB kernel reads would need one by one.
    assert s["glance"]["range_requests"] < 24


def test_scattered_reads_do_not_trigger_readahead(mount, images):
    image_id = images.add(256 * CHUNK, seed=55)
    rng = random.Random(9)
    fd = os.open(mount.image(image_id), os.O_RDONLY | os.O_DIRECT)
    import mmap
    buf = mmap.mmap(-1, 4096)
    try:
        for _ in range(60):
            os.preadv(fd, [buf], rng.randrange(256) * CHUNK)
    finally:
        os.close(fd)
    assert mount.stats()["fetch"]["readahead_chunks"] == 0


def test_verify_compares_with_glance(mount, images):
    image_id = images.add(3 * 2**20 + 1, seed=56)
    res = thunderfs("verify", str(mount.path), image_id)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("OK") and "matches Glance" in res.stdout


def test_status_reports_bytes_by_source(mount, images):
    image_id = images.add(2 * 2**20, seed=57)
    mount.image(image_id).read_bytes()
    res = thunderfs("status", str(mount.path))
    assert res.returncode == 0
    assert "Glance" in res.stdout and "2.0 MiB" in res.stdout
