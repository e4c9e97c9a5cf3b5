"""The trust chain end to end, with real processes: a machine in the middle between a node and the
tracker rewrites the manifest's digests and every peer's address to its own server, which serves
bytes that match the rewritten digests.  The node must read the image exactly as Glance has it and
never take a byte from the attacker: every answer from the tracker is authenticated (signed for
the request's nonce with the cluster's secret), and a rewritten one is refused."""

from __future__ import annotations

import pytest

from conftest import CHUNK, SECRET, wait_for
from harness.local_glance import free_port
from harness.mitm import EvilPeer, TrackerMitm
from harness.tracker import LocalTracker


@pytest.mark.parametrize("rewrite", [frozenset({"manifest", "lookup", "claim"}), frozenset({"lookup", "claim"})],
                         ids=["manifests-and-peers", "peers-only"])
def test_a_machine_in_the_middle_cannot_put_its_bytes_into_a_node(glance, images, mounts, tmp_path, rewrite):
    image_id = images.add(32 * CHUNK + 7, seed=400)
    data = images.data[image_id]
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    tracker = LocalTracker(tmp_path / "tracker", "--glance", glance.url, "--heartbeat", "1", "--node-ttl", "5",
                           secret=SECRET)
    tracker.start()
    evil = EvilPeer(CHUNK)
    mitm = TrackerMitm(tracker.url, evil, rewrite=rewrite)
    try:
        def node(name: str, tracker_url: str):
            m = mounts(glance.url, "--tracker", tracker_url, "--peer-listen", f"127.0.0.1:{free_port()}",
                       "--node-id", name, "--secret-file", str(secret), "--peer-timeout", "1", name=name)
            m.mount()
            return m

        honest = node("honest", tracker.url)
        assert honest.image(image_id).read_bytes() == data
        wait_for(lambda: (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists(), what="the manifest")
        wait_for(lambda: honest.stats()["announcer"]["in_sync"], what="the tracker to know what honest holds")

        victim = node("victim", mitm.url)  # every answer it gets from the tracker passes the attacker
        assert victim.image(image_id).read_bytes() == data
        # With the manifest refused a node asks for no peers; with it authentic, for lookups.
        first = "manifest" if "manifest" in rewrite else "lookup"
        wait_for(lambda: mitm.rewritten[first], what=f"the attacker to rewrite a {first}")
        s = victim.stats()
        assert evil.requests == 0, "the node asked the attacker's server for chunks"
        assert s["fetch"]["bytes_from_peers"] == 0 and s["fetch"]["bytes_from_origin"] == len(data)
        assert s["announcer"]["tracker_answers_refused"] > 0
        log = victim.log_tail(10**7)
        # One line when the announcer finds the tracker's answers forged, one when lookups stop
        # asking it (the tracker counts as down): not one per answer.
        assert log.count("failed authentication") <= 2
        assert victim.image(image_id).read_bytes() == data
    finally:
        mitm.stop()
        evil.stop()
        tracker.stop()
