"""FUSE passthrough (``--passthrough``) on a real mount: a complete image is read by the kernel
from the cache's data file with no request to the daemon, through a SIGKILL of the serving
process and under cache pressure; an incomplete one goes through the daemon as always."""

from __future__ import annotations

import mmap
import os
import signal

from conftest import assert_kernel_waits_on_nothing, wait_for
from harness.direct_reader import DirectReader
from harness.mounts import thunderfs

MiB = 2**20


def _read_direct(path, size: int) -> bytes:
    buf = mmap.mmap(-1, MiB)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while len(out) < size:
            n = os.preadv(fd, [buf], len(out))
            if n <= 0:
                break
            out += buf[:n]
    finally:
        os.close(fd)
    return bytes(out)


def test_a_complete_image_is_read_by_the_kernel_and_a_partial_one_by_the_daemon(glance, mounts, images):
    whole = images.add(6 * MiB + 4321, seed=91)
    partial = images.add(4 * MiB, seed=92)
    m = mounts(glance.url, "--passthrough")
    m.mount()
    assert thunderfs("warm", str(m.path), whole, "--quiet").returncode == 0
    before = m.stats()["fs"]["read_requests"]
    assert _read_direct(m.image(whole), 7 * MiB) == images.data[whole]
    assert m.image(whole).read_bytes() == images.data[whole]  # buffered reads too
    fs = m.stats()["fs"]
    assert fs["read_requests"] == before and fs["passthrough_opens"] == 2 and fs["passthrough"] == "on"
    assert fs["backing_closed"] == fs["backing_opened"] >= 1
    assert _read_direct(m.image(partial), 4 * MiB) == images.data[partial]
    assert m.stats()["fs"]["read_requests"] > before


def test_a_passthrough_file_reads_on_through_a_kill_and_keeps_its_bytes_under_cache_pressure(
        glance, mounts, images):
    sealed = images.add(8 * MiB, seed=93)
    other = images.add(8 * MiB, seed=94)
    m = mounts(glance.url, "--passthrough", "--cache-size", "12M")
    m.mount()
    assert thunderfs("warm", str(m.path), sealed, "--quiet").returncode == 0
    reader = DirectReader(m.image(sealed), images.data[sealed], seed=5)
    reader.start()
    try:
        reader.wait_reads(50)
        old = m.signal_server(signal.SIGKILL)
        reader.wait_reads(50)  # nobody serves the connection now: the kernel reads the file itself
        m.wait_new_server(old)
        # The new process keeps the sealed file whole: reading another image whole needs the
        # room its chunks take, and gets none of it.
        assert m.image(other).read_bytes() == images.data[other]
        assert m.stats()["fs"]["passthrough_inodes"] == 1
        reader.wait_reads(50)
    finally:
        reader.stop()
    assert (reader.errors, reader.wrong) == (0, 0), reader.failures[:5]
    assert m.stats()["fs"]["read_requests"] > 0  # the other image's
    # The reader closed: the new process let the previous one's backing file go.
    wait_for(lambda: m.stats()["fs"]["backing_closed"] == 1, what="backing file closed")
    assert m.stats()["fs"]["passthrough_inodes"] == 0
    assert_kernel_waits_on_nothing(m)
    cache = m.stats()["cache"]
    assert (cache["sealed_contents"], cache["pins"]) == (0, 0)  # no pin leaked across the kill
    assert _read_direct(m.image(sealed), 8 * MiB) == images.data[sealed]
