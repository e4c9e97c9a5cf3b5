"""Chunk exchange between real daemons (separate processes), a real tracker and a real Glance.

What Glance sends is counted at a pass-through proxy in front of it (the daemons' own counters
are not trusted for that).  The lying peer is a real daemon whose cache file was altered on disk
after it had checked its chunks: it serves wrong bytes with a straight face.
"""

from __future__ import annotations

import os
import random
import signal
import time
import urllib.error
import urllib.request

import pytest

from conftest import SECRET, wait_for
from harness.liar import alter

CHUNK = 64 * 1024


@pytest.fixture(params=["loopback", "netns"])
def cluster(request, make_cluster):
    """Nodes as daemons on loopback, or each in its own network namespace on a bridge with a
    200 Mbit/s link; Glance's proxy and the tracker in the root namespace."""
    return make_cluster(netns=request.param == "netns")


def warm(m, tracker, image_id, data):
    """Read the whole image on m, then wait until the tracker has its manifest and m's chunks."""
    assert m.image(image_id).read_bytes() == data
    wait_for(lambda: (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists(), what="manifest")
    wait_for(lambda: m.stats()["announcer"]["in_sync"], what="the tracker to know what m holds")


def test_b_reads_what_a_cached_and_glance_sends_each_chunk_once(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(40 * CHUNK + 123, seed=100)
    data = images.data[image_id]
    a = node("a", "z1/r1/a")
    b = node("b", "z1/r1/b")
    warm(a, tracker, image_id, data)
    sent = proxy.range_bytes
    assert sent >= len(data)
    assert b.image(image_id).read_bytes() == data
    s = b.stats()
    assert s["fetch"]["chunks_from_peers"] == 41
    assert s["fetch"]["bytes_from_origin"] == 0
    assert proxy.range_bytes == sent            # measured at Glance: nothing more for b
    assert a.stats()["peer_server"]["served_chunks"] == 41


def test_a_node_learns_what_a_peer_fetched_since_from_its_watch_not_from_lookups(make_cluster, images):
    """b watches the image from its first read; a then reads the rest, and b's watch names a as
    its holder: b reads it all from a with no lookup of its own, and Glance sends nothing more.
    (On loopback: in namespaces a's whole read outlasted b's idle watch once, issue 27.)"""
    proxy, tracker, node = make_cluster()
    image_id = images.add(64 * CHUNK, seed=107)
    data = images.data[image_id]
    # No readahead at a: its first half's read must not bring the second half before b watches.
    a = node("a", "z1/r1/a", "--readahead", "0")
    b = node("b", "z1/r1/b")
    half = 32 * CHUNK
    with open(a.image(image_id), "rb") as f:
        assert f.read(half) == data[:half]
    wait_for(lambda: (tracker.dir / "manifests" / f"{image_id}-{CHUNK}.json").exists(), what="manifest")
    wait_for(lambda: a.stats()["announcer"]["in_sync"], what="the tracker to know what a holds")
    with open(b.image(image_id), "rb") as f:
        assert f.read(CHUNK) == data[:CHUNK]
    wait_for(lambda: b.stats()["peers"]["watching"] == 1, what="b's watch of the image")
    before = b.stats()["peers"]
    assert a.image(image_id).read_bytes() == data
    wait_for(lambda: a.stats()["announcer"]["in_sync"], what="the tracker to know what a holds")
    wait_for(lambda: b.stats()["peers"]["watch_news"] > before["watch_news"], what="b's watch to name a's chunks")
    sent = proxy.range_bytes
    assert b.image(image_id).read_bytes() == data
    s = b.stats()
    assert s["peers"]["lookups"] == before["lookups"]  # the watch named the holder
    assert s["fetch"]["bytes_from_origin"] == 0 and proxy.range_bytes == sent


def test_the_nearer_of_two_peers_is_chosen(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(32 * CHUNK, seed=101)
    data = images.data[image_id]
    near = node("near", "z1/r1/h1")
    far = node("far", "z2/r9/h9")
    warm(near, tracker, image_id, data)
    warm(far, tracker, image_id, data)  # (far may take it from near: both hold it now)
    served = {m: m.stats()["peer_server"]["served_chunks"] for m in (near, far)}
    reader = node("reader", "z1/r1/h2")
    assert reader.image(image_id).read_bytes() == data
    assert near.stats()["peer_server"]["served_chunks"] - served[near] == 32
    assert far.stats()["peer_server"]["served_chunks"] - served[far] == 0


def test_a_lying_peer_is_caught_reported_and_the_bytes_stay_right(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(16 * CHUNK, seed=102)
    data = images.data[image_id]
    liar = node("liar", "z1/r1/l")
    warm(liar, tracker, image_id, data)
    # Its cache made wrong and consistent (data and index agree): its own checks pass, it lies.
    key = os.getxattr(liar.image(image_id), "user.thunderfs.content_key").decode()
    assert liar.umount().returncode == 0
    alter(liar.cache_dir, key, random.Random(5), chunks=[5])
    liar.mount()
    wait_for(lambda: liar.stats()["announcer"]["in_sync"], what="the tracker to know what the liar holds")
    victim = node("victim", "z1/r1/v")
    assert victim.image(image_id).read_bytes() == data
    s = victim.stats()
    assert s["peers"]["bad_chunks"] >= 1
    assert "liar" in s["peers"]["avoided_peers"]
    assert "served a bad chunk" in tracker.log()
    # The tracker leaves the liar out of lookups from now on, for everybody.
    third = node("third", "z1/r1/t")
    assert third.image(image_id).read_bytes() == data
    assert third.stats()["peers"]["bad_chunks"] == 0


def test_a_hung_peer_and_a_dead_peer_cost_a_timeout_not_wrong_bytes(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(16 * CHUNK, seed=103)
    data = images.data[image_id]
    a = node("a", "z1/r1/a")
    warm(a, tracker, image_id, data)
    b = node("b", "z1/r1/b", "--readahead", "0")
    os.kill(a.pid, signal.SIGSTOP)  # hangs: the tracker still lists it
    try:
        t = time.monotonic()
        with open(b.image(image_id), "rb", buffering=0) as f:
            assert f.read(4 * CHUNK) == data[:4 * CHUNK]
        assert time.monotonic() - t < 1 + 5
        assert "a" in b.stats()["peers"]["slow_peers"]  # timed out: skipped for a while
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.kill9()
    c = node("c", "z1/r1/c")
    assert c.image(image_id).read_bytes() == data


def test_non_members_are_refused_by_peers(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(4 * CHUNK, seed=104)
    a = node("a", "z1/r1/a")
    warm(a, tracker, image_id, images.data[image_id])
    key = os.getxattr(a.image(image_id), "user.thunderfs.content_key").decode()
    peer_url = a.peer_address
    from thunderfs_common.signing import sign
    for headers in ({}, sign(b"not-the-secret-xxxxxxxx", "evil", "GET", f"/v1/chunks/{key}/0/1")):
        req = urllib.request.Request(f"http://{peer_url}/v1/chunks/{key}/0/1", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 401
    ok = urllib.request.Request(f"http://{peer_url}/v1/chunks/{key}/0/1",
                                headers=sign(SECRET, "friend", "GET", f"/v1/chunks/{key}/0/1"))
    assert urllib.request.urlopen(ok, timeout=5).read() == images.data[image_id][:CHUNK]
    with pytest.raises(urllib.error.HTTPError) as exc:  # the same signed request again: a replay
        urllib.request.urlopen(ok, timeout=5)
    assert exc.value.code == 401 and b"replayed" in exc.value.read()


def test_tracker_down_means_glance_and_known_peers(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(8 * CHUNK, seed=105)
    data = images.data[image_id]
    a = node("a", "z1/r1/a")
    warm(a, tracker, image_id, data)
    tracker.stop()
    b = node("b", "z1/r1/b")
    assert b.image(image_id).read_bytes() == data
    assert "unavailable" in b.log_tail() and "reading from Glance and the peers already known" in b.log_tail()


@pytest.mark.parametrize("cluster", ["netns"], indirect=True)  # needs a slow link to die in the middle of
def test_a_peer_killed_mid_transfer_leaves_the_read_correct(cluster, images):
    proxy, tracker, node = cluster
    import threading
    image_id = images.add(8 * 2**20, seed=106)
    data = images.data[image_id]
    a = node("a", "z1/r1/a")
    warm(a, tracker, image_id, data)
    node.lan.limit(a.lan_node, "16mbit")  # 8 MiB now takes about 4 s to leave a
    # Requests of 4 MiB (readahead on): each takes ~2 s over the 16 Mbit/s link, long enough to be
    # seen in progress (a 128 KiB request fits in tbf's burst and is over at once).
    b = node("b", "z1/r1/b", "--max-request", "4M")
    result = {}

    def read():
        t = time.monotonic()
        result["bytes"] = b.image(image_id).read_bytes()
        result["secs"] = time.monotonic() - t

    th = threading.Thread(target=read)
    th.start()
    try:
        wait_for(lambda: a.stats()["peer_server"]["uploads_in_progress"] > 0, timeout=10, what="an upload")
    except AssertionError:
        th.join(30)
        raise AssertionError(f"no upload from a; b: {b.stats()['fetch']} {b.stats()['peers']}") from None
    a.kill9()
    th.join(60)
    assert result["bytes"] == data
    s = b.stats()
    assert s["peers"]["failures"] >= 1
    assert s["fetch"]["bytes_from_origin"] > 0


def test_nodes_measure_and_report_rtt_to_the_peers_they_use(cluster, images):
    proxy, tracker, node = cluster
    image_id = images.add(8 * CHUNK, seed=107)
    a = node("a", "z1/r1/a")
    warm(a, tracker, image_id, images.data[image_id])
    b = node("b", "z1/r1/b")
    assert b.image(image_id).read_bytes() == images.data[image_id]
    s = b.stats()
    assert s["announcer"]["announces"] >= 1 and s["announcer"]["tracker_ok"]
    # b timed its requests to a (time to first byte, smoothed); announces carry these figures.
    assert 0 < s["peers"]["rtt_ms"]["a"] < 1000


def test_an_idle_peer_connection_is_closed_and_the_daemon_lives_on(cluster, images):
    """A keep-alive connection left idle past the server's timeout must close, not crash anything."""
    import socket
    from thunderfs.p2p import peer_server
    proxy, tracker, node = cluster
    a = node("a", "z1/r1/a")
    host, port = a.peer_address.rsplit(":", 1)
    idle = socket.create_connection((host, int(port)))
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b"ok\n"):
        reply += idle.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200")
    idle.settimeout(peer_server.IDLE_TIMEOUT + 15)
    assert idle.recv(4096) == b""  # the server closed it after its idle timeout
    idle.close()
    assert a.alive() and a.is_mounted()
    assert a.stats()["peer_server"]["requests"] >= 1


def test_a_second_node_under_a_taken_id_is_refused_on_both_sides(make_cluster, images):
    """Two hosts with one name (the default node id is the host name) must not merge into one
    node at the tracker: the second is refused, and both the tracker and that node say why."""
    image_id = images.add(300_000, seed=86)
    _, tracker, node = make_cluster()
    a = node("a", "z1/r1")
    b = node("b", "z1/r1", "--node-id", "a")
    wait_for(lambda: b.stats()["announcer"]["node_id_refused"], 30, "the tracker refusing the second 'a'")
    assert "the tracker refuses this node" in b.log_tail() and "taken by another live node" in b.log_tail()
    assert "refused an announce: node id a is taken" in tracker.log()
    assert a.stats()["announcer"]["node_id_refused"] is False
    # The refused node still serves its reads (from Glance).
    assert b.image(image_id).read_bytes() == images.data[image_id]
