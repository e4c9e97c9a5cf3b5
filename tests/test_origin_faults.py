"""Glance misbehaving or gone: bounded EIO, retries, and nothing wrong cached.

Short bodies, wrong Content-Range and 503s come from ``harness.fault_proxy`` in front of the
real Glance (a real Glance cannot be made to send them); a hung Glance is the real one SIGSTOPped.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from harness.fault_proxy import FaultProxy

CHUNK = 64 * 1024


@pytest.fixture
def proxy(glance):
    p = FaultProxy(glance.url).start()
    yield p
    p.stop()


def read_at(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["short", "wrong_range", "error"])
def test_a_bad_answer_is_retried_then_served_right(proxy, mounts, images, mode):
    image_id = images.add(8 * CHUNK, seed=70)
    m = mounts(proxy.url, "--readahead", "0", name=mode)
    m.mount()
    proxy.mode, proxy.fail_next = mode, 2
    assert read_at(m.image(image_id), CHUNK, CHUNK) == images.data[image_id][CHUNK:2 * CHUNK]
    assert proxy.faults == 2
    assert m.stats()["glance"]["errors"] >= 2


def test_a_cut_answer_is_resumed_where_it_stopped(proxy, mounts, images):
    # What arrived before the cut is cached in 1 MiB pieces; the retry asks only for the rest.
    # Demand reads come in 128 KiB requests: a sequential reader's readahead makes the big ones.
    image_id = images.add(128 * CHUNK, seed=72)
    data = images.data[image_id]
    m = mounts(proxy.url, name="resume")
    m.mount()
    proxy.mode, proxy.fail_next, proxy.fault_min_bytes = "short", 1, 2 * 2**20
    assert m.image(image_id).read_bytes() == data
    spans = [tuple(int(x) for x in r.removeprefix("bytes=").split("-")) for r in proxy.ranges]
    cut = next(s for s in spans if s[1] - s[0] + 1 >= 2 * 2**20)  # the first large request was cut
    assert proxy.faults == 1
    # The proxy sent half of it: the retry starts past at least 1 MiB of it, at a chunk boundary.
    half = (cut[1] - cut[0] + 1) // 2
    resumed = [a for a, b in spans if b == cut[1] and a != cut[0]]
    assert len(resumed) == 1 and cut[0] + 16 * CHUNK <= resumed[0] <= cut[0] + half, (cut, resumed)
    assert resumed[0] % CHUNK == 0


@pytest.mark.parametrize("mode", ["short", "wrong_range", "error"])
def test_a_glance_that_keeps_answering_wrong_gives_eio_and_caches_nothing(proxy, mounts, images, mode):
    image_id = images.add(8 * CHUNK, seed=71)
    data = images.data[image_id]
    m = mounts(proxy.url, "--readahead", "0", "--fetch-timeout", "2", name=mode)
    m.mount()
    proxy.mode = mode
    t = time.monotonic()
    with pytest.raises(OSError) as exc:
        read_at(m.image(image_id), 0, 4096)
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - t < 2 + 5
    assert m.stats()["cache"]["chunks_staged"] == 0
    # Glance heals: the same read now returns the right bytes, without a remount.
    proxy.mode = "pass"
    assert read_at(m.image(image_id), 0, 8 * CHUNK) == data


def test_a_hung_glance_gives_eio_within_the_timeout_then_recovers(own_glance, mounts):
    data = os.urandom(16 * CHUNK)
    image_id = own_glance.upload("h", data)["id"]
    m = mounts(own_glance.url, "--readahead", "0", "--fetch-timeout", "2")
    m.mount()
    assert read_at(m.image(image_id), 0, CHUNK) == data[:CHUNK]
    own_glance.pause()
    try:
        t = time.monotonic()
        with pytest.raises(OSError) as exc:
            read_at(m.image(image_id), 8 * CHUNK, 4096)
        took = time.monotonic() - t
        assert exc.value.errno == errno.EIO
        assert 1.5 < took < 2 + 5, took
        # Cached chunks are still served while Glance hangs.
        assert read_at(m.image(image_id), 0, CHUNK) == data[:CHUNK]
    finally:
        own_glance.resume()
    assert read_at(m.image(image_id), 8 * CHUNK, CHUNK) == data[8 * CHUNK:9 * CHUNK]
    log = m.log_tail()
    assert f"image {image_id} chunk 8" in log


def test_many_readers_of_a_dead_glance_all_get_eio_promptly(own_glance, mounts):
    import threading

    data = os.urandom(64 * CHUNK)
    image_id = own_glance.upload("d", data)["id"]
    m = mounts(own_glance.url, "--readahead", "0", "--fetch-timeout", "2", "--connect-timeout", "1")
    m.mount()
    own_glance.stop()
    errors = []

    def reader(i):
        try:
            read_at(m.image(image_id), i * 4 * CHUNK, 4096)
        except OSError as exc:
            errors.append(exc.errno)

    t = time.monotonic()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors == [errno.EIO] * 10
    assert time.monotonic() - t < 2 + 6
