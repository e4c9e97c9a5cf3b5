"""A new image, before its manifest: the tracker seeds it, peers trade it, the check binds it.

Real daemons, a real tracker and a real Glance.  The tracker reads Glance through the counting
proxy too, so what Glance sends is measured at Glance, the tracker's reads included.  The
Glance that changes an image's bytes under the same id is real too: the file in Glance's own
store is altered while the image is lazy.
"""

from __future__ import annotations

import json

from conftest import wait_for

CHUNK = 64 * 1024


def a_then_b(make_cluster, images, check_quiet: str, size: int, seed: int):
    """A new image, read whole by a, then by b (once the tracker knows what a holds)."""
    proxy, tracker, node = make_cluster(tracker_args=("--check-quiet", check_quiet))
    image_id = images.add(size, seed=seed)
    data = images.data[image_id]
    a = node("a", "z1/r1/a")
    b = node("b", "z1/r1/b")
    assert a.image(image_id).read_bytes() == data
    wait_for(lambda: a.stats()["announcer"]["in_sync"], what="the tracker to know what a holds")
    assert b.image(image_id).read_bytes() == data
    return proxy, tracker, image_id, data, a, b


def test_a_new_image_is_traded_from_the_first_read_and_glance_sends_each_chunk_once(make_cluster, images):
    # The whole-image check waits for a quiet 10 minutes: the test is over long before.
    proxy, tracker, image_id, data, a, b = a_then_b(make_cluster, images, "600", 40 * CHUNK + 123, 140)
    sa, sb = a.stats(), b.stats()
    # a took every chunk through the tracker, which read each from Glance once; b took them from a.
    assert sa["fetch"]["chunks_from_seed"] == 41 and sa["fetch"]["bytes_from_origin"] == 0
    assert sb["fetch"]["chunks_from_peers"] == 41 and sb["fetch"]["bytes_from_origin"] == 0
    assert proxy.range_bytes == len(data) and proxy.whole_bytes == 0  # measured at Glance
    # No manifest yet: every chunk b took from a was checked against the tracker's pieces.
    assert not list((tracker.dir / "manifests").glob("*.json"))
    assert sb["peers"]["lazy_manifests"] == 1 and sb["peers"]["pieces"] >= 1 and sb["peers"]["bad_chunks"] == 0


def test_an_image_whose_bytes_change_under_its_id_is_revoked_and_every_node_drops_what_it_took(
        make_cluster, images, glance):
    proxy, tracker, image_id, data, a, b = a_then_b(make_cluster, images, "2", 24 * CHUNK, 141)
    assert b.stats()["fetch"]["chunks_from_peers"] == 24
    # Glance's stored file changes under the same id (chunk 7), before the tracker's check.
    stored = glance.dir / "images" / image_id
    with open(stored, "r+b") as f:
        f.seek(7 * CHUNK)
        f.write(b"\xff" * 100)
    changed = stored.read_bytes()
    # The check (2 s after the last seed read) finds it: the image is revoked, and both nodes,
    # idle now, hear of it and drop every chunk of it.
    revoked = tracker.dir / "manifests" / f"{image_id}-{CHUNK}.revoked"
    wait_for(revoked.exists, timeout=30, what="the revocation")
    assert "does not match Glance's os_hash_value" in json.loads(revoked.read_text())["why"]
    for m in (a, b):
        wait_for(lambda m=m: m.stats()["peers"]["revocations"] == 1, timeout=30, what=f"{m.path.name} to hear it")
        wait_for(lambda m=m: next(i for i in m.stats()["per_image"] if i["id"] == image_id)["cached_chunks"] == 0,
                 what=f"{m.path.name} to drop the image's chunks")
    assert "revoked image" in a.log_tail(200_000)
    # Read again, the image comes from Glance alone, as Glance serves it now: no peer, no seed.
    before = b.stats()["fetch"]
    assert b.image(image_id).read_bytes() == changed
    after = b.stats()["fetch"]
    assert after["bytes_from_origin"] - before["bytes_from_origin"] == len(data)
    assert after["chunks_from_peers"] == before["chunks_from_peers"]
    assert after["chunks_from_seed"] == before["chunks_from_seed"]
