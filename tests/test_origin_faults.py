"""Glance misbehaving or gone: bounded EIO, retries, and nothing wrong cached.

Short bodies, wrong Content-Range and 503s come from ``harness.fault_proxy`` in front of the
real Glance (a real Glance cannot be made to send them); a hung Glance is the real one SIGSTOPped.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from conftest import wait_for
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
    # Glance heals: the same read returns the right bytes again, without a remount, once the
    # probe has found Glance answering (the read that gave up marked it down).
    proxy.mode = "pass"
    assert wait_for(lambda: _read_or_none(m.image(image_id), 0, 8 * CHUNK) == data, 15, "Glance healed")


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
    # Glance counts as down until the probe finds it back (within its interval).
    wait_for(lambda: not m.stats()["fetch"]["origin_breaker"]["open"], 15, "the probe to find Glance back")
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


def test_a_known_glance_outage_fails_later_reads_at_once_and_ends_when_glance_answers(own_glance, mounts):
    """The first read of an outage waits its timeout; the reads after it fail within a second
    (not the timeout each); the cache serves on; Glance back, reads go to it again."""
    data = os.urandom(32 * CHUNK)
    image_id = own_glance.upload("o", data)["id"]
    m = mounts(own_glance.url, "--readahead", "0", "--fetch-timeout", "3", "--connect-timeout", "1")
    m.mount()
    assert read_at(m.image(image_id), 0, CHUNK) == data[:CHUNK]
    own_glance.stop()
    try:
        t = time.monotonic()
        with pytest.raises(OSError) as exc:
            read_at(m.image(image_id), 8 * CHUNK, 4096)
        assert exc.value.errno == errno.EIO and 2.5 < time.monotonic() - t < 3 + 3
        for chunk in (12, 16, 20):  # Glance is known down now
            t = time.monotonic()
            with pytest.raises(OSError) as exc:
                read_at(m.image(image_id), chunk * CHUNK, 4096)
            assert exc.value.errno == errno.EIO and time.monotonic() - t < 1.0
        assert read_at(m.image(image_id), 0, CHUNK) == data[:CHUNK]  # the cache serves on
    finally:
        own_glance.start()
    assert wait_for(lambda: _read_or_none(m.image(image_id), 12 * CHUNK, CHUNK) == data[12 * CHUNK:13 * CHUNK],
                    15, "reads from Glance again")
    breaker = m.stats()["fetch"]["origin_breaker"]
    assert breaker["opened"] == 1 and breaker["failed_fast"] >= 3 and not breaker["open"]
    assert "Glance unreachable" in m.log_tail() and "Glance answers again" in m.log_tail()


def _read_or_none(path, off, n):
    try:
        return read_at(path, off, n)
    except OSError:
        return None
