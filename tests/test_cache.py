"""The local cache: survives restarts, stays in its bound, never serves wrong bytes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness.local_glance import LocalGlance
from harness.mounts import thunderfs
from harness.pagecache import drop_page_cache

from conftest import wait_for

CHUNK = 64 * 1024


def allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*.data"))


def test_remount_serves_cached_chunks_with_glance_stopped(own_glance, mounts, tmp_path):
    data = os.urandom(3 * 2**20 + 999)
    image_id = own_glance.upload("c", data)["id"]
    m = mounts(own_glance.url, "--fetch-timeout", "2", "--connect-timeout", "1", "--readahead", "0",
               "--kernel-readahead", "128K")
    m.mount()
    with open(m.image(image_id), "rb") as f:
        assert f.read(2 * 2**20) == data[:2 * 2**20]
    m.umount()
    own_glance.stop()

    m.mount()
    # The listing comes from the cache, and cached bytes are served.
    assert image_id in os.listdir(m.path / "images")
    with open(m.image(image_id), "rb", buffering=0) as f:
        assert f.read(2 * 2**20) == data[:2 * 2**20]
        # An uncached chunk fails with EIO after the bounded timeout, never hangs.
        f.seek(3 * 2**20)
        t = time.monotonic()
        with pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - t < 2 + 5
    log = m.log_tail()
    assert f"image {image_id} chunk 48" in log  # one line naming the image and the chunk
    assert m.stats()["glance"]["bytes"] == 0

    # Glance back: reads work again without a remount, once the breaker's probe (at most 2 s
    # apart) has found it back; until then a read fails at once.
    own_glance.start()
    wait_for(lambda: not m.stats()["fetch"]["origin_breaker"]["open"], what="the probe to find Glance back")
    with open(m.image(image_id), "rb") as f:
        assert f.read() == data


def test_eviction_keeps_the_cache_within_its_bound(glance, mounts, images):
    image_id = images.add(6 * 2**20, seed=60)
    data = images.data[image_id]
    m = mounts(glance.url, "--cache-size", "1M", "--readahead", "0")
    m.mount()
    for _ in range(2):
        with open(m.image(image_id), "rb", buffering=0) as f:
            for off in range(0, len(data), 256 * 1024):
                assert f.read(256 * 1024) == data[off:off + 256 * 1024]
        # Evicted chunks are punched out once their index deletes are durable (the committer).
        wait_for(lambda: allocated(m.cache_dir) <= 2**20 + 256 * 1024, what="evicted chunks punched out")
        s = m.stats()["cache"]
        assert s["used"] <= 2**20
    assert s["evictions"] > 0
    # What the index says is there, after a restart, is within the bound and reads right.
    m.umount()
    m.mount()
    assert m.stats()["cache"]["used"] <= 2**20
    assert m.image(image_id).read_bytes() == data


def test_a_smaller_cache_size_on_restart_evicts_at_once(glance, mounts, images):
    image_id = images.add(3 * 2**20, seed=61)
    m = mounts(glance.url)
    m.mount()
    m.image(image_id).read_bytes()
    m.umount()
    m.mount("--cache-size", "512K")
    assert m.stats()["cache"]["used"] <= 512 * 1024
    assert allocated(m.cache_dir) <= 512 * 1024 + 64 * 1024


def test_corrupted_cache_file_is_detected_and_refetched(glance, mounts, images):
    image_id = images.add(20 * CHUNK, seed=62)
    data = images.data[image_id]
    m = mounts(glance.url)
    m.mount()
    assert m.image(image_id).read_bytes() == data
    path = m.data_file(image_id)
    m.umount()
    with open(path, "r+b") as f:  # flip bytes in chunks 3 and 17 behind thunderfs's back
        for off in (3 * CHUNK + 100, 17 * CHUNK + 5):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    m.mount()
    before = m.stats()["glance"]["range_requests"]
    assert m.image(image_id).read_bytes() == data
    s = m.stats()
    assert s["cache"]["corrupt_dropped"] == 2
    assert s["glance"]["range_requests"] > before
    assert "failed its checksum" in m.log_tail()


def test_a_reused_image_id_with_other_bytes_is_not_served_from_old_chunks(mounts, tmp_path):
    """Two real Glances hold the same image id with different bytes; one cache dir serves both."""
    image_id = "6b0c1f44-3f5c-4d1e-9a57-1e3f0c5a9b21"
    a, b = LocalGlance(tmp_path / "ga"), LocalGlance(tmp_path / "gb")
    try:
        a.start()
        b.start()
        payloads = {}
        for g, fill in ((a, b"A"), (b, b"B")):
            g.request("POST", "/v2/images", json.dumps({"id": image_id, "name": "same", "disk_format": "raw",
                                                        "container_format": "bare"}).encode(),
                      {"Content-Type": "application/json"})
            payloads[g] = fill * (5 * CHUNK)
            g.request("PUT", f"/v2/images/{image_id}/file", payloads[g], {"Content-Type": "application/octet-stream"})
        cache = tmp_path / "shared-cache"
        ma = mounts(a.url, name="a", cache_dir=cache)
        ma.mount()
        assert ma.image(image_id).read_bytes() == payloads[a]
        ma.umount()
        mb = mounts(b.url, name="b", cache_dir=cache)
        mb.mount()
        assert mb.image(image_id).read_bytes() == payloads[b]
        assert mb.stats()["glance"]["bytes"] == 5 * CHUNK
    finally:
        a.stop()
        b.stop()


def test_bytes_flipped_under_a_running_daemon_are_caught_on_the_next_read(glance, mounts, images):
    """Checked on every read, not once per process: chunks read (and so checked) a moment ago,
    damaged on disk since, are never served again."""
    import mmap

    image_id = images.add(20 * CHUNK, seed=63)
    data = images.data[image_id]
    m = mounts(glance.url)
    m.mount()
    assert m.image(image_id).read_bytes() == data
    # On the disk first: a chunk still held in its receive buffer is served from memory (the right
    # bytes) and written over the flip (one run of the full suite saw 1 of 2 caught that way).
    wait_for(lambda: m.stats()["cache"]["chunks_committed"] >= 20, what="every chunk written and indexed")
    with open(m.data_file(image_id), "r+b") as f:  # the daemon's page cache sees it at once
        for off in (3 * CHUNK + 100, 17 * CHUNK + 5):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    buf = mmap.mmap(-1, len(data))  # O_DIRECT: past the mount's own page cache, to the daemon
    fd = os.open(m.image(image_id), os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == len(data)
    finally:
        os.close(fd)
    assert bytes(buf) == data
    assert m.stats()["cache"]["corrupt_dropped"] == 2


def test_full_cache_disk_evicts_to_make_room_and_leaves_nothing_corrupt(glance, mounts, images, tmp_path):
    """The cache on a file system of its own (tmpfs, 8 MiB) with a cache size far beyond it: it
    fills to the brim, eviction makes room, the hot image stays cached; another file filling the
    disk shrinks the cache, its removal lets it grow back; nothing is ever corrupt."""
    MiB = 2**20
    cold, hot = images.add(6 * MiB, seed=63), images.add(6 * MiB + 5, seed=62)
    fs = tmp_path / "small"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(fs)], check=True)

    def read(m, image_id):
        drop_page_cache(m.image(image_id))
        assert m.image(image_id).read_bytes() == images.data[image_id]

    def free() -> int:
        st = os.statvfs(fs)
        return st.f_bavail * st.f_frsize

    try:
        m = mounts(glance.url, "--cache-size", "1G", "--readahead", "0", cache_dir=fs / "cache")
        m.mount()
        read(m, cold)
        read(m, hot)  # 12 MiB through an 8 MiB disk
        s = m.stats()["cache"]
        assert s["evictions"] > 0
        assert s["used"] <= s["room"] < 8 * MiB
        assert free() > 0
        # The hot image is kept: read again and again, it comes mostly from the cache, not Glance.
        # (A burst of fetches faster than evictions are punched is served partly uncached: the
        # disk never holds more than it can, so the hot image settles over a few reads.)
        def hot_from_cache() -> bool:
            before = m.stats()["glance"]["bytes"]
            read(m, hot)
            return m.stats()["glance"]["bytes"] - before < 2 * MiB

        wait_for(hot_from_cache, what="the hot image to stay cached")
        # Another file takes every free byte: the cache gives room back (keeping its reserve free
        # for everyone) and goes on.
        room = s["room"]
        filler = fs / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        assert free() < 65536

        def reads_see_the_disk_short() -> bool:  # (the cache looks at its file system once a second)
            read(m, cold)
            read(m, hot)
            return m.stats()["cache"]["room"] < room

        wait_for(reads_see_the_disk_short, what="the cache to see its disk short")
        # (The evictions' index commit may find no free page: the ballast gives it room, ballast.py.)
        wait_for(lambda: free() >= 2**20 - 65536, what="the cache to give room back")
        s = m.stats()["cache"]
        assert s["room"] < room and s["used"] <= s["room"]  # (by what the file took from the free space)
        shrunk = s["room"]
        assert "short of space" in m.log_tail()
        took = filler.stat().st_size
        filler.unlink()

        def grown_back() -> bool:
            read(m, hot)
            read(m, cold)
            return m.stats()["cache"]["room"] > shrunk + took // 2

        wait_for(grown_back, what="the cache to grow back")
        wait_for(lambda: (fs / "cache" / "ballast").stat().st_blocks * 512 >= 256 * 2**10,
                 what="the ballast laid again")
        assert m.stats()["cache"]["corrupt_dropped"] == 0
        m.umount()
        # Restart on the brim-full disk: whatever was indexed verifies, reads are right.
        m.mount()
        read(m, hot)
        read(m, cold)
        assert m.stats()["cache"]["corrupt_dropped"] == 0
        m.umount()
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_kill_9_during_filling_loses_nothing_cached_and_serves_nothing_wrong(glance, mounts, images):
    image_id = images.add(16 * 2**20, seed=64)
    data = images.data[image_id]
    m = mounts(glance.url, "--readahead", "0")
    for round_ in range(3):
        m.mount()
        with open(m.image(image_id), "rb", buffering=0) as f:
            f.seek(round_ * 4 * 2**20)
            f.read(3 * 2**20)
        m.kill9()
    m.mount()
    assert m.image(image_id).read_bytes() == data
    assert m.stats()["cache"]["corrupt_dropped"] == 0


def test_glance_record_is_fetched_for_verify_from_the_mount_record(mount, images):
    image_id = images.add(1000, seed=65)
    rec = json.loads(urllib.request.urlopen(f"{mount.glance_url}/v2/images/{image_id}").read())
    res = thunderfs("verify", str(mount.path), image_id)
    assert res.returncode == 0 and rec["os_hash_value"]
