"""The tracker: a real process, driven by the client the daemon uses, and by hostile requests."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import trio

from harness.local_redis import LocalRedis
from harness.tracker import LocalTracker
from thunderfs_common import chunk_digest
from thunderfs_tracker.client import TrackerClient, TrackerRefused, TrackerUnavailable
from thunderfs_tracker.peer_store import MemoryPeerStore
from thunderfs_tracker.redis_conn import RedisConnection
from thunderfs_tracker.redis_store import RedisPeerStore
from thunderfs_common.tracker_protocol import ChunkUpdate, NodeInfo, bits_to_ranges, ranges_to_bits
from thunderfs_common.signing import sign

SECRET = b"a-cluster-secret-of-some-length"
IMG = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["memory", "redis"])
def store_url(request, tmp_path):
    """Every store behind the interface: the tests run against each."""
    if request.param == "memory":
        yield "memory"
        return
    with LocalRedis(tmp_path / "redis") as r:
        yield r.url


@pytest.fixture
def tracker(tmp_path, store_url):
    t = LocalTracker(tmp_path / "tracker", "--node-ttl", "3", "--heartbeat", "1", "--store", store_url,
                     secret=SECRET)
    t.start()
    yield t
    t.stop()
    assert "Traceback" not in t.log()


def open_store(store_url: str):
    return MemoryPeerStore() if store_url == "memory" else RedisPeerStore(RedisConnection(store_url), node_ttl=30)


def drive(store_url: str, body) -> None:
    """Run ``await body(store)`` on a fresh store (asyncio, as in the tracker)."""
    async def main():
        s = open_store(store_url)
        try:
            await body(s)
        finally:
            await s.close()
    asyncio.run(main())


def node(name: str, location: str, load: int = 0, rtt=None) -> NodeInfo:
    return NodeInfo(name, f"http://10.0.0.{abs(hash(name)) % 200 + 1}:7000", tuple(location.split("/")), load, rtt or {})


def client(tracker, name: str, secret: bytes | None = SECRET) -> TrackerClient:
    return TrackerClient(tracker.url, name, secret=secret)


# --- policy and store, alone -----------------------------------------------------------------


def test_batches_queued_at_once_share_round_trips_and_fail_alone(tmp_path):
    """What a replica's requests send to Redis within one turn goes in one pipeline; each batch
    gets its own replies, a command that fails fails its batch only, and a Redis that is gone
    fails every batch with StoreUnavailable."""
    from thunderfs_tracker.peer_store import StoreUnavailable

    async def main(redis):
        conn = RedisConnection(redis.url)
        try:
            await conn.one("set", "tf:test:list", "not a list")
            before = dict(conn.stats)

            async def one(i: int):
                b = conn.batch()
                b.set(f"tf:test:{i}", i)
                b.get(f"tf:test:{i}")
                if i == 7:
                    b.lpush("tf:test:list", "x")  # WRONGTYPE: this batch fails, no other
                if i == 9:
                    b.set("tf:test:x", 1, ex=1, px=1)  # refused by redis-py as written: likewise
                return await conn.run(b)

            results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
            assert conn.stats["redis_batches"] - before["redis_batches"] == 49
            assert conn.stats["redis_round_trips"] - before["redis_round_trips"] == 1
            for i, r in enumerate(results):
                if i == 7:
                    assert isinstance(r, StoreUnavailable) and "WRONGTYPE" in str(r)
                elif i == 9:
                    assert "mutually exclusive" in str(r)
                else:
                    assert r == [True, str(i).encode()]
            redis.stop()
            results = await asyncio.gather(*(conn.one("get", "tf:test:1") for _ in range(3)), return_exceptions=True)
            assert all(isinstance(r, StoreUnavailable) and "unavailable" in str(r) for r in results)
        finally:
            await conn.close()

    with LocalRedis(tmp_path / "redis") as redis:
        asyncio.run(main(redis))






def test_batches_queued_while_a_write_is_out_go_in_the_next_one(tmp_path):
    """One write is out at a time: batches queued in later turns while Redis has not answered
    (here: stopped) all go in one more write once it has, each with its own replies."""
    import os
    import signal

    async def main(redis):
        conn = RedisConnection(redis.url)
        try:
            await conn.one("set", "tf:test:k", "v")
            before = conn.stats["redis_round_trips"]
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                first = asyncio.ensure_future(conn.one("get", "tf:test:k"))
                later = []
                for i in range(10):
                    await asyncio.sleep(0)  # a turn each: without the rule, a write each
                    later.append(asyncio.ensure_future(conn.one("incr", f"tf:test:n{i}")))
                await asyncio.sleep(0.05)
                assert conn.stats["redis_round_trips"] - before == 1
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            assert await first == b"v"
            assert await asyncio.gather(*later) == [1] * 10
            assert conn.stats["redis_round_trips"] - before == 2
        finally:
            await conn.close()

    with LocalRedis(tmp_path / "redis") as redis:
        asyncio.run(main(redis))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_one_connection_logs_in_and_a_redis_that_hangs_or_restarts_costs_one_timeout(tmp_path, tls):
    """The hot path's one connection to Redis logs in with the URL's password, uses its
    database (TLS too, as operators run it), gives up on a Redis that stops answering within
    its timeout (every batch waiting fails, none hangs), and opens a new connection for the
    next batch once Redis is back: restarted, empty."""
    import os
    import signal
    from thunderfs_tracker.peer_store import StoreUnavailable

    async def main(redis):
        conn = RedisConnection(redis.url.replace("/0", "/3"), timeout=1.0)
        try:
            await conn.one("set", "tf:test:db", "three")
            assert await conn.one("get", "tf:test:db") == b"three"
            assert await conn.call(conn.redis.get("tf:test:db")) == b"three"  # redis-py's pool: the same db
            db0 = RedisConnection(redis.url)
            try:
                assert await db0.one("get", "tf:test:db") is None
            finally:
                await db0.close()
            assert await conn.one("set", "tf:test:nx", 1, nx=True) is True  # redis-py's reading of the reply
            assert await conn.one("set", "tf:test:nx", 2, nx=True) is None
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                results = await asyncio.gather(*(conn.one("get", "tf:test:db") for _ in range(5)),
                                               return_exceptions=True)
                waited = loop.time() - started
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            assert all(isinstance(r, StoreUnavailable) and "no reply within 1 s" in str(r) for r in results), results
            assert waited < 5, waited
            assert await conn.one("get", "tf:test:db") == b"three"  # a new connection, the same Redis
            redis.stop()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await conn.one("get", "tf:test:db")
            redis.start()
            assert await conn.one("get", "tf:test:db") is None  # back, empty
            assert conn.stats["redis_connects"] == 3
        finally:
            await conn.close()
        with pytest.raises(StoreUnavailable, match="stopping"):
            await conn.one("get", "tf:test:db")

    async def refused(redis):
        conn = RedisConnection(redis.url.replace(":secret-pw@", ":wrong@"))
        try:
            with pytest.raises(StoreUnavailable, match="WRONGPASS|invalid"):
                await conn.one("get", "x")
        finally:
            await conn.close()

    with LocalRedis(tmp_path / "redis", password="secret-pw", tls=tls) as redis:
        asyncio.run(main(redis))
        asyncio.run(refused(redis))




def test_store_full_state_replaces_and_deltas_apply(store_url):
    async def body(s):
        await s.put_node(node("a", "z"), 0)
        await s.update_chunks("a", True, [ChunkUpdate(IMG, 64, add=0b1111, full=True)], 0)
        await s.update_chunks("a", False, [ChunkUpdate(IMG, 64, add=1 << 10, remove=0b11)], 0)
        ((n, bits),) = await s.holders(IMG, 0, 15)
        assert bits == (1 << 10) | 0b1100 and n.node_id == "a"
        await s.update_chunks("a", True, [], 0)
        assert await s.holders(IMG, 0, 63) == []
        assert (await s.statistics())["nodes"] == 1
        with pytest.raises(KeyError):
            await s.update_chunks("nobody", False, [], 0)
    drive(store_url, body)


# --- the service -----------------------------------------------------------------------------


async def test_holders_are_found_ranked_and_the_asker_left_out(tracker):
    async with client(tracker, "a") as a, client(tracker, "b") as b, client(tracker, "c") as c:
        await a.announce(node("a", "z1/r1/h1"))
        await b.announce(node("b", "z1/r2/h2"))
        await c.announce(node("c", "z1/r1/h3"))
        await a.send_chunks(True, [ChunkUpdate(IMG, 100, add=ranges_to_bits([[0, 49]], 100), full=True)])
        await b.send_chunks(True, [ChunkUpdate(IMG, 100, add=ranges_to_bits([[40, 99]], 100), full=True)])
        peers = await c.lookup(IMG, 40, 59)
        assert [p.node_id for p in peers] == ["a", "b"]  # a shares c's rack
        assert bits_to_ranges(peers[0].chunks) == [[0, 9]]     # chunks 40..49
        assert bits_to_ranges(peers[1].chunks) == [[0, 19]]    # chunks 40..59
        assert [p.node_id for p in await a.lookup(IMG, 40, 59)] == ["b"]
        # A delta: a dropped 40..49 and gained 60..69.
        await a.send_chunks(False, [ChunkUpdate(IMG, 100, add=ranges_to_bits([[60, 69]], 100),
                                                remove=ranges_to_bits([[40, 49]], 100))])
        peers = {p.node_id: bits_to_ranges(p.chunks) for p in await c.lookup(IMG, 40, 69)}
        assert peers == {"a": [[20, 29]], "b": [[0, 29]]}


async def test_silent_nodes_expire(tracker):
    async with client(tracker, "a") as a, client(tracker, "b") as b:
        await a.announce(node("a", "z"))
        await a.send_chunks(True, [ChunkUpdate(IMG, 10, add=1, full=True)])
        await b.announce(node("b", "z"))
        assert len(await b.lookup(IMG, 0, 0)) == 1
        deadline = trio.current_time() + 10
        while await b.lookup(IMG, 0, 0):
            await b.announce(node("b", "z"))  # b keeps its heartbeat; a does not
            assert trio.current_time() < deadline, "a never expired"
            await trio.sleep(0.5)
        while "expired" not in tracker.log():  # the sweep runs every node_ttl / 3
            assert trio.current_time() < deadline + 5, "a's expiry was not logged"
            await trio.sleep(0.2)


async def test_chunk_states_keep_a_node_alive_as_light_heartbeats_do_and_say_so(tracker):
    """node_ttl 3 s: a node that sends deltas and no heartbeat stays a holder; the tracker answers
    each with its heartbeat (the node then skips the one it would have sent)."""
    async with client(tracker, "a") as a, client(tracker, "b") as b:
        await a.announce(node("a", "z"))
        assert await a.send_chunks(True, [ChunkUpdate(IMG, 10, add=1, full=True)]) == (
            (await a.alive(node("a", "z").instance)).epoch, 1.0)
        await b.announce(node("b", "z"))
        outlived = trio.current_time() + 4.5  # longer than node_ttl
        c = 1
        while trio.current_time() < outlived:
            c += 1
            await a.send_chunks(False, [ChunkUpdate(IMG, 10, add=1 << c % 10)])
            await b.announce(node("b", "z"))
            await trio.sleep(0.5)
        assert [p.node_id for p in await b.lookup(IMG, 0, 9)] == ["a"]


async def test_light_heartbeats_keep_a_node_as_announced_and_a_gone_or_taken_one_must_announce(tracker):
    """node_ttl 3 s: a node that only sends light heartbeats stays a holder, with its record as
    announced; an expired node, or a daemon whose id another daemon holds, is told to announce."""
    me = NodeInfo("a", "http://10.0.0.1:7000", ("z", "r1"), instance="aaaaaaaa11111111")
    async with client(tracker, "a") as a, client(tracker, "b") as b:
        with pytest.raises(TrackerRefused) as exc:
            await a.alive(me.instance)  # never announced
        assert exc.value.status == 409
        await a.announce(me)
        await a.send_chunks(True, [ChunkUpdate(IMG, 10, add=1, full=True)])
        await b.announce(node("b", "z"))
        outlived = trio.current_time() + 4.5  # longer than node_ttl
        while trio.current_time() < outlived:
            assert (await a.alive(me.instance)).heartbeat == 1.0
            await b.announce(node("b", "z"))
            await trio.sleep(0.5)
        (held,) = await b.lookup(IMG, 0, 0)
        assert (held.node_id, held.peer_url, held.location) == ("a", me.peer_url, me.location)
        with pytest.raises(TrackerRefused) as exc:
            await a.alive("bbbbbbbb22222222")  # another daemon under a's id
        assert exc.value.status == 409
        while await b.lookup(IMG, 0, 0):  # a goes silent: it expires, and must announce again
            await b.announce(node("b", "z"))
            await trio.sleep(0.5)
        with pytest.raises(TrackerRefused) as exc:
            await a.alive(me.instance)
        assert exc.value.status == 409


async def test_unknown_image_and_unannounced_node(tracker):
    async with client(tracker, "x") as x:
        assert await x.lookup("f" * 32, 0, 3) == []
        with pytest.raises(TrackerRefused) as exc:
            await x.send_chunks(True, [ChunkUpdate(IMG, 10, add=1, full=True)])
        assert exc.value.status == 409


async def test_non_members_are_refused(tracker):
    async with client(tracker, "a", secret=None) as unsigned, client(tracker, "a", secret=b"w" * 32) as wrong:
        with pytest.raises(TrackerRefused) as exc:
            await unsigned.announce(node("a", "z"))
        assert exc.value.status == 401
        # The tracker refuses the other secret's request (401, below) and signs its answer with the
        # cluster's secret, which that client cannot check: to it the answer is not the tracker's.
        with pytest.raises(TrackerUnavailable, match="failed authentication"):
            await wrong.announce(node("a", "z"))
    async with httpx.AsyncClient(base_url=tracker.url) as h:
        path, body = "/v1/nodes/a/announce", json.dumps(node("a", "z").to_json()).encode()
        r = await h.post(path, content=body, headers=sign(b"w" * 32, "a", "POST", path, body))
        assert r.status_code == 401 and "bad signature" in r.text
    # A member cannot speak for another node, nor replay a request.
    body = json.dumps(node("b", "z").to_json()).encode()
    path = "/v1/nodes/b/announce"
    async with httpx.AsyncClient(base_url=tracker.url) as h:
        r = await h.post(path, content=body, headers=sign(SECRET, "a", "POST", path, body))
        assert r.status_code == 403
        headers = sign(SECRET, "b", "POST", path, body)
        assert (await h.post(path, content=body, headers=headers)).status_code == 200
        assert (await h.post(path, content=body, headers=headers)).status_code == 401
        assert "replayed" in (await h.post(path, content=body, headers=headers)).text
        # Health checks stay open.
        assert (await h.get("/healthz")).status_code == 200


@pytest.mark.parametrize("path,body,words", [
    ("/v1/nodes/a/announce", b"{not json", "not JSON"),
    ("/v1/nodes/a/announce", b'{"peer_url": "ftp://x"}', "peer_url"),
    ("/v1/nodes/a/announce", b'{"peer_url": "http://h:1", "location": "../../etc"}', "location"),
    ("/v1/nodes/a/announce", b'{"peer_url": "http://h:1", "load": -1}', "load"),
    ("/v1/nodes/a/chunks", b'{"full": true, "images": [{"content": "../x", "nchunks": 1, "bitmap": "AQ=="}]}', "content key"),
    ("/v1/nodes/a/chunks", b'{"full": true, "images": [{"content": "%s", "nchunks": 99999999999, "bitmap": "AQ=="}]}' % IMG.encode(), "nchunks"),
    ("/v1/nodes/a/chunks", b'{"full": true, "images": [{"content": "%s", "nchunks": 4, "bitmap": "//////8="}]}' % IMG.encode(), "bits past"),
    ("/v1/nodes/a/chunks", b'{"full": false, "images": [{"content": "%s", "nchunks": 4, "add": [[-1, 2]]}]}' % IMG.encode(), "outside"),
    ("/v1/nodes/a/chunks", b'{"full": false, "images": [{"content": "%s", "nchunks": 4, "add": [[3, 2]]}]}' % IMG.encode(), "outside"),
    ("/v1/nodes/a/chunks", b'{"full": "yes"}', "full"),
])
async def test_malformed_requests_get_a_4xx_with_a_message(tracker, path, body, words):
    async with client(tracker, "a") as a:
        await a.announce(node("a", "z"))
    async with httpx.AsyncClient(base_url=tracker.url) as h:
        r = await h.post(path, content=body, headers=sign(SECRET, "a", "POST", path, body))
    assert 400 <= r.status_code < 500, r.text
    assert words in r.json()["error"]


async def test_bad_lookups_get_a_4xx(tracker):
    async with client(tracker, "a") as a:
        await a.announce(node("a", "z"))
        await a.send_chunks(True, [ChunkUpdate(IMG, 10, add=1, full=True)])
    async with httpx.AsyncClient(base_url=tracker.url) as h:
        for q in ("first=-1&last=2", "first=5&last=2", "first=0&last=10", "first=x&last=1", "first=0&last=99999999999",
                  "first=0&last=1&limit=0"):
            path = f"/v1/images/{IMG}/peers?{q}"
            r = await h.get(path, headers=sign(SECRET, "a", "GET", path))
            assert 400 <= r.status_code < 500, (q, r.text)
        path = "/v1/images/..%2F..%2Fetc/peers?first=0&last=1"
        r = await h.get(path, headers=sign(SECRET, "a", "GET", path))
        assert 400 <= r.status_code < 500


def test_tracker_refuses_to_start_without_a_readable_secret(tmp_path):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "thunderfs_tracker", "--listen", "127.0.0.1:1", "--state-dir",
                          str(tmp_path), "--secret-file", str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 1 and "secret file" in res.stderr


async def test_lookups_among_1000_nodes_return_the_nearest_twenty(tracker):
    """How fast lookups are is measured in benchmarks/tracker_bench.py; this checks what they
    answer when there are many holders: the nearest ``max_peers``, never the asker."""
    async with httpx.AsyncClient(base_url=tracker.url) as h:
        for i in range(1000):
            name = f"n{i}"
            for path, body in ((f"/v1/nodes/{name}/announce", node(name, f"z{i % 4}/r{i % 20}/h{i}").to_json()),
                               (f"/v1/nodes/{name}/chunks", {"full": True, "images": [
                                   ChunkUpdate(IMG, 4096, add=random.Random(i).getrandbits(4096), full=True).to_json()]})):
                data = json.dumps(body).encode()
                assert (await h.post(path, content=data, headers=sign(SECRET, name, "POST", path, data))).status_code == 200
        # n0 announces again (the fixture's node TTL is 3 s, less than the setup took): the lookups
        # are ranked from where it is.
        path = "/v1/nodes/n0/announce"
        data = json.dumps(node("n0", "z0/r0/h0").to_json()).encode()
        assert (await h.post(path, content=data, headers=sign(SECRET, "n0", "POST", path, data))).status_code == 200
        for i in range(50):
            path = f"/v1/images/{IMG}/peers?first={i * 16}&last={i * 16 + 15}&node=n0"
            r = await h.get(path, headers=sign(SECRET, "n0", "GET", path))
            assert r.status_code == 200 and len(r.json()["peers"]) == 20
            zones = [p["location"].split("/")[0] for p in r.json()["peers"]]
            assert "n0" not in {p["node_id"] for p in r.json()["peers"]}
            assert zones == sorted(zones, key=lambda z: z != "z0")  # n0's zone first


# --- manifests ---------------------------------------------------------------------------------


@pytest.fixture
def tracker_with_glance(tmp_path, glance):
    t = LocalTracker(tmp_path / "tracker", "--glance", glance.url, secret=SECRET)
    t.start()
    yield t
    t.stop()
    assert "Traceback" not in t.log()


async def _wait_manifest(c, image_id, chunk_size):
    deadline = trio.current_time() + 30
    while (m := await c.manifest(image_id, chunk_size)) is None:
        assert trio.current_time() < deadline, "manifest never built"
        await trio.sleep(0.1)
    return m


async def test_manifest_is_built_from_glance_and_bound_to_its_hash(tracker_with_glance, glance, images):
    image_id = images.add(5 * 65536 + 100, seed=90)
    data = images.data[image_id]
    async with client(tracker_with_glance, "a") as a:
        m = await _wait_manifest(a, image_id, 65536)
        assert m.nchunks == 6
        assert m.os_hash_value == glance.image(image_id)["os_hash_value"]
        for c in range(6):
            assert m.digest(c) == chunk_digest.digest(data[c * 65536:(c + 1) * 65536])
        stats = await a.stats()
        assert stats["manifests"]["built"] == 1
    # It survives a tracker restart without reading Glance again.
    tracker_with_glance.stop()
    tracker_with_glance.start()
    async with client(tracker_with_glance, "a") as a:
        assert await a.manifest(image_id, 65536) == m
        assert (await a.stats())["manifests"]["bytes_read"] == 0


async def test_no_manifest_for_unknown_images_or_bad_chunk_sizes(tracker_with_glance):
    async with client(tracker_with_glance, "a") as a:
        # Glance is asked for the image before anything is seeded or built: 404 at once.
        with pytest.raises(TrackerRefused) as exc:
            await a.manifest("6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b21", 65536)
        assert exc.value.status == 404 and "Glance has no image" in str(exc.value)
        for bad in (1000, 3 * 65536, 1 << 30):
            with pytest.raises(TrackerRefused) as exc:
                await a.manifest("6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b21", bad)
            assert exc.value.status == 400


async def test_a_manifest_whose_bytes_do_not_match_glances_hash_is_not_published(tmp_path, glance, images):
    """Glance's bytes altered in transit (fault proxy): the tracker must refuse to publish."""
    from harness.fault_proxy import FaultProxy
    image_id = images.add(3 * 65536, seed=91)
    proxy = FaultProxy(glance.url).start()
    proxy.corrupt_whole = True
    t = LocalTracker(tmp_path / "tracker", "--glance", proxy.url, secret=SECRET)
    t.start()
    try:
        async with client(t, "a") as a:
            deadline = trio.current_time() + 20
            while True:
                try:
                    assert await a.manifest(image_id, 65536) is None
                except TrackerRefused as exc:
                    assert "does not match Glance's os_hash_value" in str(exc)
                    break
                assert trio.current_time() < deadline
                await trio.sleep(0.1)
        assert not list((tmp_path / "tracker" / "manifests").glob("*.json"))
    finally:
        t.stop()
        proxy.stop()


def test_claims_grant_each_chunk_to_one_node_and_name_it_to_the_others(store_url):
    async def body(s):
        for n in ("a", "b"):
            await s.put_node(node(n, "z"), 0)
        granted, others = await s.claim(IMG, "a", 100, ranges_to_bits([[0, 49]], 100), now=0, ttl=1)
        assert bits_to_ranges(granted) == [[0, 49]] and others == []
        granted, others = await s.claim(IMG, "b", 100, ranges_to_bits([[40, 59]], 100), now=0.1, ttl=1)
        assert bits_to_ranges(granted) == [[50, 59]]
        assert [(n.node_id, bits_to_ranges(b), held) for n, b, held in others] == [("a", [[40, 49]], False)]
        # Once a holds them they are held, and still not granted to another node (whose lookup
        # may be a moment old); claims expire.
        await s.update_chunks("a", False, [ChunkUpdate(IMG, 100, add=ranges_to_bits([[0, 44]], 100))], 0.2)
        granted, others = await s.claim(IMG, "b", 100, ranges_to_bits([[0, 9], [60, 61]], 100), now=0.2, ttl=1)
        assert bits_to_ranges(granted) == [[60, 61]]
        assert [(n.node_id, bits_to_ranges(b), held) for n, b, held in others] == [("a", [[0, 9]], True)]
        await asyncio.sleep(1.2)
        granted, others = await s.claim(IMG, "a", 100, ranges_to_bits([[50, 59]], 100), now=1.5, ttl=1)
        assert bits_to_ranges(granted) == [[50, 59]] and others == []  # b's claim expired
    drive(store_url, body)


async def test_a_client_of_two_replicas_fails_over_and_rests_the_dead_one(tracker):
    from harness.local_glance import free_port
    import zlib

    from thunderfs_tracker.client import TrackerUnavailable
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    name = next(f"n{i}" for i in range(100) if zlib.crc32(f"n{i}".encode()) % 2 == 0)  # picks the first
    async with TrackerClient([dead, tracker.url], name, secret=SECRET) as c:
        assert c.url == dead
        await c.announce(node(name, "z"))  # the dead one first (its id picks it), then the live one
        assert c.failovers == 1 and c.url == tracker.url  # the dead one rests
        await c.announce(node(name, "z"))
        assert c.failovers == 1  # straight to the live one while the dead one rests
    async with TrackerClient([dead], name, secret=SECRET) as c:
        with pytest.raises(TrackerUnavailable) as exc:
            await c.announce(node(name, "z"))
        assert "unreachable" in str(exc.value) and exc.value.__cause__ is not None
