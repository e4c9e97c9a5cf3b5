"""A mostly-zero image through the mount, with tools nobody here wrote: ``qemu-img map`` sees its
holes and ``qemu-img convert`` copies it reading only its data, by the zero chunks its manifest
knows (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``); Glance sends no zero chunk for them.  Real
daemons, a real tracker (the manifest), a real Glance behind a counting proxy."""

from __future__ import annotations

import json
import os
import random
import subprocess

from conftest import wait_for

CHUNK = 64 * 1024
MiB = 2**20


def test_qemu_img_maps_and_converts_a_mostly_zero_image_reading_no_zero_chunk(make_cluster, glance, tmp_path):
    proxy, tracker, node = make_cluster()
    size = 24 * MiB + 5000
    data = bytearray(size)
    rng = random.Random(7)
    extents = [(0, MiB), (10 * MiB + 3 * CHUNK, 2 * CHUNK), (24 * MiB, 5000)]  # the rest is zeros
    for start, length in extents:
        data[start:start + length] = rng.randbytes(length)
    image_id = glance.upload("sparse", bytes(data))["id"]
    a = node("a", "z1/r1/a")
    with open(a.image(image_id), "rb") as f:  # a's first read: the tracker reads the image for its manifest
        assert f.read(4096) == data[:4096]
    wait_for(lambda: (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists(), 60, "the manifest")
    b = node("b", "z1/r1/b")
    path = str(b.image(image_id))
    before = proxy.range_bytes

    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", path],
                                       capture_output=True, text=True, check=True).stdout)
    data_extents = [(e["start"], e["length"]) for e in mapped if e["data"]]
    assert data_extents == [(0, MiB), (10 * MiB + 3 * CHUNK, 2 * CHUNK), (24 * MiB, 5000)], mapped

    out = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", path, str(out)], check=True)
    got = out.read_bytes()
    diff = next((i for i in range(min(len(got), size)) if got[i] != data[i]), None)
    assert got[:size] == bytes(data) and not got[size:].strip(b"\0"), (len(got), size, diff)
    assert os.stat(out).st_blocks * 512 < 4 * MiB  # written sparse: the holes stayed holes

    s = b.stats()
    fetched = s["fetch"]["bytes_fetched"]
    data_bytes = sum(length for _, length in extents)
    chunks_with_data = -(-MiB // CHUNK) + 2 + 1
    assert fetched <= chunks_with_data * CHUNK, (fetched, s["fetch"])
    assert proxy.range_bytes - before <= chunks_with_data * CHUNK  # measured at Glance
    assert data_bytes <= chunks_with_data * CHUNK
