"""Two versions of an image on one node (issue 31): the second costs Glance only the chunks that
changed, is stored once, and its zero chunks are never fetched.  Real daemons, a real tracker (the
manifests), a real Glance behind a counting proxy."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from conftest import wait_for

CHUNK = 64 * 1024
MiB = 2**20


def two_versions() -> tuple[bytes, bytes, set[int]]:
    """v1: 6 MiB of data, then 4 MiB of zeros, then 2 MiB of data; v2: v1 with chunks 3, 40 and
    170 rewritten (the kind of change a package update makes)."""
    rng = random.Random(31)
    v1 = rng.randbytes(6 * MiB) + bytes(4 * MiB) + rng.randbytes(2 * MiB)
    changed = {3, 40, 170}
    v2 = bytearray(v1)
    for c in changed:
        v2[c * CHUNK:(c + 1) * CHUNK] = rng.randbytes(CHUNK)
    return v1, bytes(v2), changed


def manifest_built(tracker, image_id):
    return (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists()


def test_a_second_version_costs_glance_only_what_changed_and_is_stored_once(make_cluster, glance):
    proxy, tracker, node = make_cluster()
    v1, v2, changed = two_versions()
    zero_chunks = 4 * MiB // CHUNK
    id1, id2 = glance.upload("v1", v1)["id"], glance.upload("v2", v2)["id"]
    # Someone else's first reads: the tracker builds both manifests from Glance.
    a = node("a", "z1/r1/a")
    for image_id in (id1, id2):
        with open(a.image(image_id), "rb") as f:
            f.read(4096)
        wait_for(lambda: manifest_built(tracker, image_id), 60, "the manifest")
    a.umount()  # no peer: what b does not hold, Glance sends
    # What the tracker says the two share, from its state dir, with no tracker asked.
    shown = subprocess.run([sys.executable, "-m", "thunderfs_tracker", "--shared", id1, id2, "--state-dir",
                            str(tracker.dir), "--secret-file", str(tracker.dir / "secret")],
                           capture_output=True, text=True, check=True).stdout
    report = json.loads(shown)
    assert report["shared_chunks"] == len(v2) // CHUNK - len(changed)
    assert report["zero_chunks_b"] == zero_chunks and report["b_not_in_a_bytes"] == len(changed) * CHUNK

    b = node("b", "z1/r1/b")
    before = proxy.range_bytes
    with open(b.image(id1), "rb") as f:
        wait_for(lambda: b.stats()["cache"]["zero_chunks"] >= zero_chunks, 20, "v1's manifest on b")
        assert f.read() == v1
    v1_fetched = proxy.range_bytes - before
    assert v1_fetched <= len(v1) - zero_chunks * CHUNK  # its zero chunks were never fetched

    before = proxy.range_bytes
    with open(b.image(id2), "rb") as f:
        wait_for(lambda: b.stats()["cache"]["zero_chunks"] >= 2 * zero_chunks, 20, "v2's manifest on b")
        assert f.read() == v2
    assert proxy.range_bytes - before <= len(changed) * CHUNK  # measured at Glance
    s = b.stats()["cache"]
    assert s["used"] == len(v1) - zero_chunks * CHUNK + len(changed) * CHUNK  # stored once
    assert s["chunks_shared"] == len(v2) // CHUNK - zero_chunks - len(changed)

    # A crash once all is durable: the shares come back from the index, and v2 reads whole with
    # Glance sending nothing.
    wait_for(lambda: b.stats()["cache"]["uncommitted"] == 0, 20, "the index to be up to date")
    b.kill9()
    b.mount()
    before = proxy.range_bytes
    with open(b.image(id2), "rb") as f:
        assert f.read() == v2
    assert proxy.range_bytes == before
    status = {i["id"]: i for i in b.stats()["per_image"]}
    assert status[id2]["shared_bytes"] == s["chunks_shared"] * CHUNK
    assert status[id2]["zero_bytes"] == zero_chunks * CHUNK


def test_a_complete_image_with_shared_chunks_is_sealed_for_passthrough_whole(make_cluster, glance):
    """With --passthrough, the kernel reads a complete image's cache file itself: an image that is
    complete through chunks another image holds gets them copied into its file first, so that
    the kernel reads v2's bytes, not holes."""
    proxy, tracker, node = make_cluster()
    v1, v2, changed = two_versions()
    id1, id2 = glance.upload("v1", v1)["id"], glance.upload("v2", v2)["id"]
    a = node("a", "z1/r1/a", "--record-window", "0")
    for image_id in (id1, id2):
        with open(a.image(image_id), "rb") as f:
            f.read(4096)
        wait_for(lambda: manifest_built(tracker, image_id), 60, "the manifest")
    a.umount()
    b = node("b", "z1/r1/b", "--passthrough")
    for image_id, data, zeros in ((id1, v1, 64), (id2, v2, 128)):
        with open(b.image(image_id), "rb") as f:
            wait_for(lambda: b.stats()["cache"]["zero_chunks"] >= zeros, 20, "the manifest on b")
            assert f.read() == data
    assert b.stats()["cache"]["chunks_shared"] > 0

    def passthrough_open() -> bool:
        """An open of v2, complete now: the kernel reads its file itself (once the kernel has
        released the cached opens before: one kind of open at a time per inode)."""
        with open(b.image(id2), "rb", buffering=0) as f:
            if not b.stats()["fs"]["passthrough_inodes"]:
                return False
            before = b.stats()["fs"]["read_requests"]
            assert f.read() == v2
            return b.stats()["fs"]["read_requests"] == before

    wait_for(passthrough_open, 20, "a passthrough open of v2")
    assert b.stats()["cache"]["shared_chunks"] < b.stats()["cache"]["chunks_shared"]  # copied in


def test_a_node_that_never_read_v1_takes_v1s_chunks_for_v2_from_a_peer(make_cluster, glance):
    """Issue 31, lookups by digest: node a holds v1 only; node b, with an empty cache, reads v2.
    The tracker names a's chunks of v1 that have v2's digests, b takes them from a, checked
    against v2's manifest, and Glance sends b only the chunks v2 changed."""
    proxy, tracker, node = make_cluster()
    v1, v2, changed = two_versions()
    zero_chunks = 4 * MiB // CHUNK
    id1, id2 = glance.upload("v1", v1)["id"], glance.upload("v2", v2)["id"]
    a = node("a", "z1/r1/a", "--record-window", "0")
    with open(a.image(id2), "rb") as f:  # the tracker builds v2's manifest (a holds one chunk of v2)
        f.read(4096)
    wait_for(lambda: manifest_built(tracker, id2), 60, "v2's manifest")
    with open(a.image(id1), "rb") as f:
        assert f.read(4096) == v1[:4096]
        wait_for(lambda: manifest_built(tracker, id1), 60, "v1's manifest")
        wait_for(lambda: a.stats()["cache"]["zero_chunks"] >= zero_chunks, 20, "v1's manifest on a")
        assert f.read() == v1[4096:]
    wait_for(lambda: a.stats()["announcer"]["in_sync"], 20, "a to tell the tracker what it holds")

    b = node("b", "z1/r1/b", "--record-window", "0")
    before = proxy.range_bytes
    with open(b.image(id2), "rb") as f:
        wait_for(lambda: b.stats()["cache"]["zero_chunks"] >= zero_chunks, 20, "v2's manifest on b")
        assert f.read() == v2
    s = b.stats()
    nonzero_shared = len(v2) // CHUNK - zero_chunks - len(changed)
    held_as_v2 = next(i for i in a.stats()["per_image"] if i["id"] == id2)["cached_chunks"]
    assert s["peers"]["alike_chunks"] >= nonzero_shared - held_as_v2  # the rest, a's chunks of v2
    assert s["fetch"]["chunks_from_peers"] >= nonzero_shared
    assert proxy.range_bytes - before <= len(changed) * CHUNK
    assert s["peers"]["bad_chunks"] == 0
