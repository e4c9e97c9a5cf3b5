"""The tracker's handlers through aiohttp's test client (in-process, its own asyncio loop; the
rest of this layer runs on trio): membership, announce and lookup, claims, profiles, bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import random

import httpx
import trio

import pytest

from aiohttp.test_utils import TestClient, TestServer

from thunderfs_common import chunk_digest
from thunderfs_tracker.app import create_app
from thunderfs_tracker.config import TrackerConfig
from thunderfs_tracker.profiles import FileProfileStore, merge
from thunderfs_common.tracker_protocol import (ChunkUpdate, Manifest, NodeInfo, Piece, ProtocolError, Revocation,
                                       bits_to_ranges, ranges_to_bits)
from thunderfs_tracker.selection import rank
from thunderfs_common.signing import H_NODE, H_NONCE, H_SIG, H_TIME, reply_is_signed, sign

SECRET = b"a-cluster-secret-of-some-length"
CHUNK = 64 * 1024
IMG = "0123456789abcdef0123456789abcdef"


def with_client(tmp_path, body, secret=SECRET):
    """``await body(call)`` against a tracker app; ``call(node, method, path, obj)`` signs as ``node``."""
    async def main():
        app = create_app(TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=secret))
        async with TestClient(TestServer(app)) as client:
            async def call(node, method, path, obj=None):
                data = json.dumps(obj).encode() if obj is not None else b""
                headers = {"Content-Type": "application/json"}
                if node is not None:
                    headers.update(sign(SECRET, node, method, path, data))
                resp = await client.request(method, path, data=data, headers=headers)
                return resp.status, await resp.json()
            await body(call)
    asyncio.run(main())


def node_json(name, location="z1/r1"):
    return NodeInfo(name, f"http://{name}:7071", tuple(location.split("/"))).to_json()


async def announce(call, name, chunks, location="z1/r1", nchunks=64):
    assert (await call(name, "POST", f"/v1/nodes/{name}/announce", node_json(name, location)))[0] == 200
    update = ChunkUpdate(IMG, nchunks, add=sum(1 << c for c in chunks), full=True)
    assert (await call(name, "POST", f"/v1/nodes/{name}/chunks", {"full": True, "images": [update.to_json()]}))[0] == 200


def test_holders_are_found_nearest_first_and_the_asker_is_left_out(tmp_path):
    async def body(call):
        await announce(call, "far", [1, 2], "z2/r9")
        await announce(call, "near", [2, 3], "z1/r1")
        await announce(call, "me", [0], "z1/r1")
        status, r = await call("me", "GET", f"/v1/images/{IMG}/peers?first=0&last=63&node=me")
        assert status == 200
        assert [p["node_id"] for p in r["peers"]] == ["near", "far"]
    with_client(tmp_path, body)


def test_unsigned_and_wrongly_signed_requests_are_refused_and_health_stays_open(tmp_path):
    async def body(call):
        assert (await call(None, "GET", "/v1/stats"))[0] == 401
        assert (await call("a", "POST", "/v1/nodes/b/announce", node_json("b")))[0] == 403  # not for another
        assert (await call(None, "GET", "/healthz"))[0] == 200
    with_client(tmp_path, body)


def test_a_second_live_node_under_a_taken_id_is_refused_with_a_clear_error(tmp_path):
    async def body(call):
        first = {**node_json("a"), "instance": "aaaaaaaa11111111"}
        assert (await call("a", "POST", "/v1/nodes/a/announce", first))[0] == 200
        other = {**node_json("a"), "peer_url": "http://10.0.0.9:7071", "instance": "bbbbbbbb22222222"}
        status, r = await call("a", "POST", "/v1/nodes/a/announce", other)
        assert status == 409
        assert "node id a is taken by another live node" in r["error"] and "--node-id" in r["error"]
        assert (await call("a", "POST", "/v1/nodes/a/announce", first))[0] == 200  # the first goes on
        assert (await call("a", "POST", "/v1/nodes/a/announce", {**first, "instance": "xyz"}))[0] == 400

    with_client(tmp_path, body)


def test_malformed_bodies_get_a_400_that_says_why(tmp_path):
    async def body(call):
        status, r = await call("a", "POST", "/v1/nodes/a/announce", {"peer_url": "ftp://x"})
        assert status == 400 and "peer_url" in r["error"]
        status, r = await call("a", "GET", "/v1/images/NOTHEX/peers?first=0&last=1")
        assert status == 400 and "content" in r["error"]
    with_client(tmp_path, body)


def test_a_claim_grants_each_chunk_once_and_names_the_claimer_to_the_others(tmp_path):
    async def body(call):
        await announce(call, "a", [])
        await announce(call, "b", [])
        ranges = bits_to_ranges(0b1111)
        status, r = await call("a", "POST", f"/v1/images/{IMG}/claims", {"node_id": "a", "nchunks": 64, "chunks": ranges})
        assert status == 200 and r["granted"] == [[0, 3]]
        status, r = await call("b", "POST", f"/v1/images/{IMG}/claims", {"node_id": "b", "nchunks": 64, "chunks": ranges})
        assert r["granted"] == [] and [o["node_id"] for o in r["claimed"]] == ["a"]
    with_client(tmp_path, body)


def test_recordings_merge_into_a_profile(tmp_path):
    async def body(call):
        assert (await call("a", "GET", f"/v1/profiles/{IMG}?chunk_size=65536"))[0] == 404
        for node, chunks in (("a", [[5, 0], [9, 100]]), ("b", [[5, 10], [9, 300], [7, 400]])):
            status, r = await call(node, "POST", f"/v1/profiles/{IMG}?chunk_size=65536",
                                   {"node_id": node, "nchunks": 64, "chunks": chunks})
            assert status == 200
        status, r = await call("a", "GET", f"/v1/profiles/{IMG}?chunk_size=65536")
        assert status == 200 and r["version"] == 2 and [c for c, _ in r["chunks"]][:2] == [5, 9]
        status, r = await call("a", "POST", f"/v1/profiles/{IMG}?chunk_size=65536",
                               {"node_id": "a", "nchunks": 64, "chunks": [[99, 0]]})
        assert status == 400
    with_client(tmp_path, body)


# --- the selection policy, the wire format and the profile store, alone ---------------------


def node(name: str, location: str, load: int = 0, rtt=None) -> NodeInfo:
    return NodeInfo(name, f"http://10.0.0.{abs(hash(name)) % 200 + 1}:7000", tuple(location.split("/")), load, rtt or {})


def test_rank_prefers_shared_location_then_rtt_then_load():
    me = node("me", "z1/r1/h1", rtt={"b": 5.0, "c": 1.0})
    cands = [(node("far", "z2/r9/h9"), 1), (node("zone", "z1/r2/h2"), 1),
             (node("b", "z1/r1/h2"), 1), (node("c", "z1/r1/h3"), 1), (node("busy", "z1/r1/h4", load=5), 1)]
    order = [n.node_id for n, _ in rank(me, cands)]
    assert order[:2] == ["c", "b"]           # same rack, measured rtt
    assert order[2] == "busy"                # same rack, no rtt known
    assert order[3:] == ["zone", "far"]


def test_rank_shuffles_peers_that_tie():
    me = node("me", "z/r/h")
    cands = [(node(f"p{i}", "z/r/x"), 1) for i in range(6)]
    firsts = {rank(me, cands, random.Random(seed))[0][0].node_id for seed in range(40)}
    assert len(firsts) > 3


def test_ranges_and_bits_round_trip():
    bits = ranges_to_bits([[0, 0], [3, 7], [100, 130]], 200)
    assert bits_to_ranges(bits) == [[0, 0], [3, 7], [100, 130]]


def test_merge_keeps_what_half_the_recordings_touched_in_median_order():
    boot1 = [(5, 0), (9, 100), (2, 300)]
    boot2 = [(5, 10), (2, 150), (9, 400), (7, 500)]
    assert merge([boot1]) == boot1
    # Two recordings: either one's chunks count; 2 at median 225 ms comes before 9 at 250 ms.
    assert merge([boot1, boot2]) == [(5, 5), (2, 225), (9, 250), (7, 500)]
    # A third recording that read everything does not drag every chunk in: only chunks two of
    # the three touched stay (7 does: boot2 and dd), at their median time.
    dd = [(c, c) for c in range(100)]
    assert merge([boot1, boot2, dd]) == [(5, 5), (9, 100), (2, 150), (7, 253)]


async def test_a_nodes_new_recording_replaces_its_old_one_and_profiles_survive_a_restart(tmp_path):
    store = FileProfileStore(tmp_path)
    content = "ab" * 16
    assert await store.get(content, CHUNK) is None
    await store.add(content, CHUNK, 10, "n1", [(1, 0), (2, 5)])
    p = await store.add(content, CHUNK, 10, "n1", [(3, 0)])
    assert (p.version, p.recordings, p.touches) == (2, 1, [(3, 0)])
    with pytest.raises(ProtocolError):
        await store.add(content, CHUNK, 11, "n2", [(3, 0)])  # another content under this key
    again = await FileProfileStore(tmp_path).get(content, CHUNK)
    assert (again.version, again.touches) == (2, [(3, 0)])


async def test_a_corrupt_profile_file_is_ignored(tmp_path, caplog):
    store = FileProfileStore(tmp_path)
    content = "cd" * 16
    await store.add(content, CHUNK, 10, "n1", [(1, 0)])
    (tmp_path / "profiles" / f"{content}-{CHUNK}.json").write_text('{"nchunks": 10, "recordings": {"n1": [[99, 0]]}')
    assert await FileProfileStore(tmp_path).get(content, CHUNK) is None
    assert "unreadable" in caplog.text


def test_the_daemons_client_signs_what_the_tracker_verifies_and_parses_its_replies(tmp_path):
    """TrackerClient (httpx, signing with SignedRequests) against the app, on asyncio: announce,
    a full state, a lookup with a query string, a claim and its reply, through the real signatures."""
    from thunderfs_tracker.client import TrackerClient, TrackerUnavailable

    async def main():
        app = create_app(TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=SECRET))
        async with TestClient(TestServer(app)) as http:
            url = str(http.make_url("")).rstrip("/")
            async with TrackerClient(url, "a", secret=SECRET) as a, TrackerClient(url, "b", secret=SECRET) as b, \
                    TrackerClient(url, "c", secret=b"not-the-cluster-secret!") as stranger:
                reply = await a.announce(NodeInfo("a", "http://a:7071", ("z1", "r1")))
                assert reply.heartbeat == 10.0 and reply.epoch
                await b.announce(NodeInfo("b", "http://b:7071", ("z1", "r2")))
                await a.send_chunks(True, [ChunkUpdate(IMG, 64, add=0b1010, full=True)])
                found = await b.lookup(IMG, 0, 63)
                assert [(p.node_id, p.chunks) for p in found] == [("a", 0b1010)]
                granted, others = await b.claim(IMG, 64, [1, 2, 3])
                assert granted == [2] and [(p.node_id, cs, held) for p, cs, held in others] == [("a", [1, 3], True)]
                # The tracker refuses it (401), signed with the cluster's secret, which the stranger
                # cannot check: to it, the answer is not the tracker's.
                with pytest.raises(TrackerUnavailable, match="failed authentication"):
                    await stranger.lookup(IMG, 0, 1)
    asyncio.run(main())


def test_a_watch_names_the_holders_then_what_changed_signed_event_by_event(tmp_path):
    """The daemon's client watches an image, before anybody holds it: the first event names every
    holder (none yet; never the asker), the next ones what each gained, or all it holds once it
    lost some; a suspect is never named; an event that fails authentication, or comes out of
    order, ends the watch; a watcher that says another chunk count is refused."""
    from thunderfs_tracker.client import TrackerClient, TrackerRefused, TrackerUnavailable

    async def main():
        cfg = TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=SECRET, watch_interval=0.01)
        async with TestClient(TestServer(create_app(cfg))) as http:
            url = str(http.make_url("")).rstrip("/")
            async with TrackerClient(url, "a", secret=SECRET) as a, TrackerClient(url, "b", secret=SECRET) as b, \
                    TrackerClient(url, "c", secret=SECRET) as c:
                for node in (a, b, c):
                    await node.announce(NodeInfo(node.node_id, f"http://{node.node_id}:7071", ("z1",)))
                events: asyncio.Queue = asyncio.Queue()
                watching = asyncio.ensure_future(
                    b.watch(IMG, 64, lambda seq, ev: events.put_nowait((seq, {p.node_id: (p.chunks, whole)
                                                                            for p, whole in ev.peers}))))

                async def next_named():
                    while True:
                        seq, named = await asyncio.wait_for(events.get(), 10)
                        if named:
                            return seq, named

                # Nobody holds the image yet: the watch is live, and names holders as they come.
                assert await asyncio.wait_for(events.get(), 10) == (0, {})
                await a.send_chunks(True, [ChunkUpdate(IMG, 64, add=0b1010, full=True)])
                await b.send_chunks(True, [ChunkUpdate(IMG, 64, add=0b1, full=True)])
                assert (await next_named())[1] == {"a": (0b1010, True)}  # not b itself
                with pytest.raises(TrackerRefused, match="64 chunks, not 65"):
                    await b.watch(IMG, 65, lambda seq, ev: None)
                await a.send_chunks(False, [ChunkUpdate(IMG, 64, add=0b100000)])
                await c.send_chunks(True, [ChunkUpdate(IMG, 64, add=0b11, full=True)])
                named = {}
                while len(named) < 2:
                    named.update((await next_named())[1])
                assert named == {"a": (0b100000, False), "c": (0b11, True)}
                await a.send_chunks(False, [ChunkUpdate(IMG, 64, remove=0b10)])  # lost one: all it holds
                assert (await next_named())[1] == {"a": (0b101000, True)}
                await b.report("c", IMG, 0, "chunk does not match the manifest")
                await c.send_chunks(False, [ChunkUpdate(IMG, 64, add=0b100)])
                await a.send_chunks(False, [ChunkUpdate(IMG, 64, add=0b1000000)])
                assert (await next_named())[1] == {"a": (0b1000000, False)}  # c, now suspect, is not
                watching.cancel()
                # An event that fails authentication (or is replayed as another one) is refused.
                nonce = "ab" * 12
                with pytest.raises(TrackerUnavailable, match="authentication"):
                    b._event(url, "0" * 64 + ' {"nchunks": 64, "peers": []}', nonce, 0, 64)
                body = '{"nchunks":64,"peers":[]}'
                from thunderfs_common.signing import sign_event
                assert b._event(url, sign_event(SECRET, nonce, 0, body.encode()) + " " + body, nonce, 0, 64).peers == []
                with pytest.raises(TrackerUnavailable, match="authentication"):
                    b._event(url, sign_event(SECRET, nonce, 0, body.encode()) + " " + body, nonce, 1, 64)
    asyncio.run(main())


def test_a_manifest_is_built_from_glance_through_the_one_glance_client_and_bound_to_its_hash(tmp_path):
    from fakes import FakeGlance, pattern
    from thunderfs_common.glance_client import GlanceClient
    from thunderfs_tracker.manifests import ManifestStore, ManifestUnavailable

    data = pattern(5 * CHUNK + 10)
    image_id = "6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b21"
    good = {"id": image_id, "status": "active", "size": len(data), "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest()}

    async def build(record):
        glance = FakeGlance(data, records=[record])
        store = ManifestStore(tmp_path / record["os_hash_value"][:8], GlanceClient(
            "http://glance", transport=httpx.MockTransport(glance)))
        try:
            assert await store.get(image_id, CHUNK) == "building"
            while (m := await store.get(image_id, CHUNK)) == "building":
                await asyncio.sleep(0.01)
            return m
        except ManifestUnavailable as exc:
            return str(exc)
        finally:
            await store.close()

    m = asyncio.run(build(good))
    assert m.nchunks == 6 and m.os_hash_value == good["os_hash_value"]
    assert all(m.digest(i) == chunk_digest.digest(data[i * CHUNK:(i + 1) * CHUNK]) for i in range(6))
    lied = asyncio.run(build({**good, "os_hash_value": "0" * 128}))
    assert "does not match Glance's os_hash_value" in lied


def test_a_failed_manifest_build_is_tried_again_with_backoff(tmp_path):
    """Glance down during a build: asks get the reason until the backoff passes, then the next
    ask builds it again; the wait doubles with each failure."""
    from fakes import FakeGlance, pattern
    from thunderfs_common.glance_client import GlanceClient
    from thunderfs_tracker.manifests import RETRY_FIRST, ManifestStore, ManifestUnavailable

    data = pattern(3 * CHUNK)
    image_id = "6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b22"
    record = {"id": image_id, "status": "active", "size": len(data), "os_hash_algo": "sha512",
              "os_hash_value": hashlib.sha512(data).hexdigest()}
    glance = FakeGlance(data, records=[record])
    now = [0.0]

    async def settle(store):
        while (m := await store.get(image_id, CHUNK)) == "building":
            await asyncio.sleep(0.01)
        return m

    async def scenario():
        store = ManifestStore(tmp_path, GlanceClient("http://glance", transport=httpx.MockTransport(glance),
                                                     request_timeout=1), clock=lambda: now[0])
        try:
            glance.down = True
            with pytest.raises(ManifestUnavailable, match="tried again in 10s"):
                await settle(store)
            now[0] += RETRY_FIRST - 1
            with pytest.raises(ManifestUnavailable, match="tried again in 1s"):
                await store.get(image_id, CHUNK)
            now[0] += 1  # the backoff has passed: the next ask builds again, and fails again
            with pytest.raises(ManifestUnavailable, match="tried again in 20s"):
                await settle(store)
            glance.down = False
            now[0] += 2 * RETRY_FIRST
            m = await settle(store)
            assert m.nchunks == 3 and store.stats["failed"] == 2 and store.stats["built"] == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def test_every_message_both_sides_exchange_reads_back_as_written():
    from thunderfs_common.tracker_protocol import (AnnounceReply, ChunkState, Claim, Claimed, ClaimReply, LookupReply,
                                            PeerRecord, Recording, Report, parse_epoch)

    peer = PeerRecord("a", "http://a:7071", ("z1", "r1"), 3, 0b101)
    assert AnnounceReply.parse(AnnounceReply("e1", 10.0).to_json()) == AnnounceReply("e1", 10.0)
    state = ChunkState(True, [ChunkUpdate(IMG, 64, add=0b1011, full=True)])
    assert ChunkState.parse(state.to_json()) == state
    assert parse_epoch({"epoch": "e2"}) == "e2"
    assert LookupReply.parse(LookupReply(8, 10, [peer]).to_json(), 8, 10).peers == [peer]
    with pytest.raises(ProtocolError, match="not 0..2"):
        LookupReply.parse(LookupReply(8, 10, [peer]).to_json(), 0, 2)  # an answer to another question
    assert Claim.parse(Claim("a", 64, 0b110).to_json()) == Claim("a", 64, 0b110)
    assert Claim.parse(Claim("a", 64, 0b110).to_json(), signer="b").node_id == "b"  # the signer speaks
    reply = ClaimReply([1, 2], [Claimed(PeerRecord("b", "http://b:7071", (), 0, 0), [5, 9], True)])
    assert ClaimReply.parse(reply.to_json(), 64) == reply
    assert Recording.parse(Recording("a", 10, [(3, 0), (1, 5)]).to_json()) == Recording("a", 10, [(3, 0), (1, 5)])
    assert Report.parse(Report("liar", IMG, 4, "bad").to_json()) == Report("liar", IMG, 4, "bad")
    for bad, words in ((["x"], "claim must be"), ({"node_id": "a", "nchunks": 0}, "nchunks")):
        with pytest.raises(ProtocolError, match=words):
            Claim.parse(bad)


def test_a_suspect_is_never_named_as_the_holder_of_claimed_chunks(tmp_path):
    """Left out of lookups after a report, a lying node must not be named in claim replies either:
    nobody could take its chunks, and a reader would wait for them in vain."""
    async def body(call):
        await announce(call, "liar", [0, 1, 2, 3])
        await announce(call, "good", [])
        await announce(call, "me", [])
        ranges = bits_to_ranges(0b1111)
        status, r = await call("me", "POST", f"/v1/images/{IMG}/claims", {"node_id": "me", "nchunks": 64, "chunks": ranges})
        assert [o["node_id"] for o in r["claimed"]] == ["liar"] and r["granted"] == []  # before the report
        status, _ = await call("good", "POST", "/v1/reports", {"node_id": "liar", "content": IMG, "chunk": 0,
                                                                "reason": "chunk does not match the manifest"})
        assert status == 200
        status, r = await call("me", "POST", f"/v1/images/{IMG}/claims", {"node_id": "me", "nchunks": 64, "chunks": ranges})
        assert r["claimed"] == [] and r["granted"] == [[0, 3]]  # what only the liar holds, this node fetches
    with_client(tmp_path, body)


# --- membership: odd headers, replays, full nonce caches, signed answers ----------------------


def test_odd_signature_headers_get_a_401_that_says_which(tmp_path):
    async def body(raw):
        good = sign(SECRET, "a", "GET", "/v1/stats")
        for name, value, words in ((H_SIG, "é" * 64, "malformed X-Thunderfs-Signature"),
                                   (H_SIG, "ab", "malformed X-Thunderfs-Signature"),
                                   (H_NONCE, "zz" * 12, "malformed X-Thunderfs-Nonce"),
                                   (H_TIME, "soon", "malformed X-Thunderfs-Time"),
                                   (H_NODE, "a/b", "malformed X-Thunderfs-Node")):
            status, r = await raw("GET", "/v1/stats", {**good, name: value})
            assert status == 401 and words in r["error"], (name, value, r)
    with_raw_client(tmp_path, body)


def test_a_replayed_request_is_refused(tmp_path):
    async def body(raw):
        headers = sign(SECRET, "a", "GET", "/v1/stats")
        assert (await raw("GET", "/v1/stats", headers))[0] == 200
        status, r = await raw("GET", "/v1/stats", headers)
        assert status == 401 and "replayed" in r["error"]
    with_raw_client(tmp_path, body)


def test_a_full_nonce_cache_refuses_new_requests_rather_than_forget_live_ones():
    from thunderfs_common.signing import NonceCache, NonceCacheFull

    cache = NonceCache(max_nonces=2)
    assert cache.remember("a" * 24, 0.0) and cache.remember("b" * 24, 1.0)
    assert not cache.remember("a" * 24, 2.0)  # a replay, still inside the window
    with pytest.raises(NonceCacheFull):
        cache.remember("c" * 24, 3.0)
    assert cache.remember("c" * 24, 200.0)  # the old ones left the window


def test_every_answer_to_a_signed_request_is_signed_for_its_nonce(tmp_path):
    async def body(raw):
        headers = sign(SECRET, "a", "GET", "/v1/stats")
        status, _, resp_headers, content = await raw("GET", "/v1/stats", headers, full=True)
        assert reply_is_signed(SECRET, headers[H_NONCE], status, content, resp_headers)
        assert not reply_is_signed(SECRET, "0" * 24, status, content, resp_headers)  # another request's
        assert not reply_is_signed(SECRET, headers[H_NONCE], status, content + b" ", resp_headers)  # altered
        bad = sign(SECRET, "a", "GET", "/v1/images/NOTHEX/peers?first=0&last=1")
        status, _, resp_headers, content = await raw("GET", "/v1/images/NOTHEX/peers?first=0&last=1", bad, full=True)
        assert status == 400 and reply_is_signed(SECRET, bad[H_NONCE], status, content, resp_headers)
    with_raw_client(tmp_path, body)


def test_the_daemons_client_refuses_answers_that_fail_authentication(caplog):
    from thunderfs_tracker.client import TrackerClient, TrackerUnavailable

    def forger(request):  # a machine in the middle: a fine answer, but not signed with the secret
        if request.url.path.endswith("/watch"):
            return httpx.Response(404, json={"error": "no such route"})
        return httpx.Response(200, json={"epoch": "e", "heartbeat": 1.0})

    async def main():
        async with TrackerClient("http://t:7070", "a", secret=SECRET, transport=httpx.MockTransport(forger)) as c:
            for _ in range(3):
                with pytest.raises(TrackerUnavailable, match="failed authentication"):
                    await c.announce(NodeInfo("a", "http://a:7071"))
            assert c.refused_answers == 3
            # A forged 404 to a watch would pass the node for a tracker without watches (lookups
            # for 10 s): it is refused as any unsigned answer, not taken for a refusal.
            with pytest.raises(TrackerUnavailable, match="failed authentication"):
                await c.watch("ab" * 32, 4, lambda seq, event: None)
            assert c.refused_answers == 4
    asyncio.run(main())
    assert len([r for r in caplog.records if "failed authentication" in r.getMessage()]) == 1  # logged once


def with_raw_client(tmp_path, body):
    """``await body(raw)``; ``raw(method, path, headers)`` sends exactly those headers."""
    async def main():
        app = create_app(TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=SECRET))
        async with TestClient(TestServer(app)) as client:
            async def raw(method, path, headers, full=False):
                resp = await client.request(method, path, headers=headers, skip_auto_headers=("Content-Type",))
                content = await resp.read()
                obj = json.loads(content) if content.startswith(b"{") else {}
                return (resp.status, obj, resp.headers, content) if full else (resp.status, obj)

            await body(raw)
    asyncio.run(main())


def test_manifests_carry_their_proof_and_a_stored_one_that_fails_it_is_built_again(tmp_path):
    """Signed with the tracker's key when it builds them; loaded from its disk only if the
    signature holds (whoever can write there cannot poison one)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fakes import FakeGlance, pattern
    from thunderfs_common.glance_client import GlanceClient
    from thunderfs_common.manifest_proof import ManifestProof, signed_by
    from thunderfs_tracker.manifests import ManifestStore

    data = pattern(3 * CHUNK)
    image_id = "6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b21"
    record = {"id": image_id, "status": "active", "size": len(data), "os_hash_algo": "sha512",
              "os_hash_value": hashlib.sha512(data).hexdigest()}
    key = Ed25519PrivateKey.generate()

    def store():
        return ManifestStore(tmp_path, GlanceClient("http://glance", transport=httpx.MockTransport(
            FakeGlance(data, records=[record]))), proof=ManifestProof(key))

    async def get(s):
        while (m := await s.get(image_id, CHUNK)) == "building":
            await asyncio.sleep(0.01)
        return m

    async def main():
        s = store()
        m = await get(s)
        await s.close()
        assert signed_by(key.public_key(), m.signed_bytes(), m.proof)
        assert Manifest.parse(m.to_json()).proof == m.proof
        # Someone who can write the tracker's disk swaps a digest, keeping the proof.
        path = tmp_path / "manifests" / f"{image_id}-{CHUNK}.json"
        doc = json.loads(path.read_text())
        forged = Manifest.parse(doc)
        doc["blake3"] = base64.b64encode(chunk_digest.digest(b"evil") + forged.digests[32:]).decode()
        path.write_text(json.dumps(doc))
        s = store()
        assert await s.get(image_id, CHUNK) == "building"  # not taken: built again from Glance
        assert s.stats["proof_failures"] == 1
        again = await get(s)
        await s.close()
        assert again.digests == m.digests
        # One stored by a tracker before the digest was BLAKE3 (its digests under "sha256"):
        # unreadable now, so built again, never served in the old form.
        doc = json.loads(path.read_text())
        doc["sha256"] = doc.pop("blake3")
        path.write_text(json.dumps(doc))
        s = store()
        assert await s.get(image_id, CHUNK) == "building"
        again = await get(s)
        await s.close()
        assert again.digests == m.digests and "blake3" in json.loads(path.read_text())
    asyncio.run(main())


def test_a_node_with_the_trackers_key_refuses_a_manifest_the_key_did_not_sign(caplog):
    """Not even a member on the path (who can sign answers with the shared secret) can forge one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fakes import meta_of, pattern
    from thunderfs.p2p.peer_directory import PeerDirectory

    data = pattern(2 * CHUNK)
    meta = meta_of(data)
    tracker_key, member_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    digests = b"".join(chunk_digest.digest(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK))
    bare = Manifest(meta.id, len(data), CHUNK, "sha512", meta.os_hash_value, digests)

    class Tracker:
        manifest_now = bare

        async def manifest_state(self, image_id, chunk_size):
            return self.manifest_now

    async def main():
        tracker = Tracker()
        for signer in (None, member_key):
            tracker.manifest_now = bare if signer is None else dataclasses.replace(
                bare, proof=signer.sign(bare.signed_bytes()))
            d = PeerDirectory(tracker, chunk_size=CHUNK, tracker_key=tracker_key.public_key())
            assert await d.manifest(meta) is None
            assert d.statistics()["manifests_refused"] == 1
        tracker.manifest_now = dataclasses.replace(bare, proof=tracker_key.sign(bare.signed_bytes()))
        d = PeerDirectory(tracker, chunk_size=CHUNK, tracker_key=tracker_key.public_key())
        assert await d.manifest(meta) == tracker.manifest_now
        # While the tracker seeds the image: only pieces and revocations the key signed count.
        revoked = []
        tracker.manifest_now = "lazy"
        d = PeerDirectory(tracker, chunk_size=CHUNK, tracker_key=tracker_key.public_key(),
                          on_revoked=lambda m, why: revoked.append(why))
        lazy = await d.manifest(meta)
        piece = Piece(meta.id, len(data), CHUNK, "sha512", meta.os_hash_value, 0, digests)
        assert not d.add_piece(meta, dataclasses.replace(piece, proof=member_key.sign(piece.signed_bytes())))
        assert lazy.unknown(0, 2) == [0, 1]
        # A manifest's proof does not pass for a piece's, nor the other way round.
        assert not d.add_piece(meta, dataclasses.replace(piece, proof=tracker_key.sign(bare.signed_bytes())))
        assert d.add_piece(meta, dataclasses.replace(piece, proof=tracker_key.sign(piece.signed_bytes())))
        assert lazy.unknown(0, 2) == [] and lazy.digest(1) == digests[32:]
        r = Revocation(meta.id, CHUNK, meta.os_hash_value, "forged")
        d._revoke(meta, dataclasses.replace(r, proof=member_key.sign(r.signed_bytes())))
        assert revoked == [] and d.manifest_nowait(meta) is lazy
        d._revoke(meta, dataclasses.replace(r, proof=tracker_key.sign(r.signed_bytes())))
        assert revoked == ["forged"] and d.manifest_nowait(meta) is None
    trio.run(main)
    assert "not signed by the tracker's key" in caplog.text


def test_a_request_passed_off_as_another_nodes_fails_its_signature(tmp_path):
    """The signature covers the node id: a machine in the middle changing X-Thunderfs-Node makes
    the request a forgery (401), not another node's (which a 403 would have shown)."""
    async def body(raw):
        path = "/v1/nodes/a/announce"
        headers = sign(SECRET, "a", "POST", path)
        status, r = await raw("POST", path, {**headers, H_NODE: "b"})
        assert status == 401 and "bad signature" in r["error"]
    with_raw_client(tmp_path, body)


def test_stats_count_each_routes_requests_and_a_light_heartbeat_keeps_an_announced_node(tmp_path):
    async def body(call):
        first = {**node_json("a"), "instance": "aaaaaaaa11111111"}
        assert (await call("a", "POST", "/v1/nodes/b/alive", {"instance": ""}))[0] == 403  # not for another
        assert (await call("a", "POST", "/v1/nodes/a/alive", {"instance": "aaaaaaaa11111111"}))[0] == 409
        assert (await call("a", "POST", "/v1/nodes/a/announce", first))[0] == 200
        status, r = await call("a", "POST", "/v1/nodes/a/alive", {"instance": "aaaaaaaa11111111"})
        assert status == 200 and r["heartbeat"] > 0
        assert (await call("a", "POST", "/v1/nodes/a/alive", {"instance": "bbbbbbbb22222222"}))[0] == 409
        assert (await call("a", "POST", "/v1/nodes/a/alive", {"instance": "xyz"}))[0] == 400
        status, r = await call("a", "GET", "/v1/stats")
        assert r["requests"]["/v1/nodes/{node}/alive"] == 4  # the one refused before its handler: not
        assert r["requests"]["/v1/nodes/{node}/announce"] == 1
    with_client(tmp_path, body)


def test_a_new_image_is_seeded_from_one_read_of_glance_then_checked_whole_or_revoked(tmp_path, monkeypatch):
    """The seed reads each chunk from Glance once however many ask at once, vouches for it with a
    proven piece, and serves later askers from memory; the whole-image check waits for quiet, then
    publishes the manifest, or revokes the image when Glance's bytes changed under its id."""
    from fakes import FakeGlance, pattern
    from thunderfs_common.glance_client import GlanceClient
    from thunderfs_common.manifest_proof import ManifestProof
    from thunderfs_tracker import manifests
    from thunderfs_tracker.manifests import ManifestStore
    from thunderfs_tracker.seed import Seed, SeedUnavailable

    monkeypatch.setattr(manifests, "CHECK_POLL", 0.01)

    data = pattern(6 * CHUNK + 10)
    image_id = "6b0c1f44-0000-4d1e-9a57-1e3f0c5a9b23"
    record = {"id": image_id, "status": "active", "size": len(data), "os_hash_algo": "sha512",
              "os_hash_value": hashlib.sha512(data).hexdigest()}
    proof = ManifestProof(secret=b"s" * 32)

    def digest(c, d=data):
        return chunk_digest.digest(d[c * CHUNK:(c + 1) * CHUNK])

    async def scenario(change_glance: bool):
        glance = FakeGlance(data, records=[record])
        now = [0.0]

        async def slow(request):  # Glance takes its time: the asks of a crowd interleave
            await asyncio.sleep(0.01)
            return glance(request)

        seed = Seed(GlanceClient("http://glance", transport=httpx.MockTransport(slow)), proof,
                    clock=lambda: now[0])
        store = ManifestStore(tmp_path / str(change_glance), GlanceClient(
            "http://glance", transport=httpx.MockTransport(glance)), proof=proof, seed=seed, check_quiet=5,
            clock=lambda: now[0])
        try:
            # A crowd asks at once: one check will read the image, not one per ask.
            assert await asyncio.gather(*(store.get(image_id, CHUNK) for _ in range(5))) == ["lazy"] * 5
            # Three nodes ask for overlapping runs at once: Glance is read once per chunk.
            got = await asyncio.gather(seed.read(image_id, CHUNK, 0, 4, data=True),
                                       seed.read(image_id, CHUNK, 2, 4, data=True),
                                       seed.read(image_id, CHUNK, 2, 2, data=False))
            assert sorted(glance.ranges) == [(0, 4 * CHUNK), (4 * CHUNK, 6 * CHUNK)]
            (p0, b0), (p2, b2), (p3, none) = got
            assert b0 == data[:4 * CHUNK] and b2 == data[2 * CHUNK:6 * CHUNK] and none is None
            assert p2.first == 2 and [p2.digest(c) for c in range(2, 6)] == [digest(c) for c in range(2, 6)]
            assert proof.holds(p3.signed_bytes(), p3.proof) and not proof.holds(p3.signed_bytes(), b"x" * 32)
            assert (await seed.read(image_id, CHUNK, 0, 2, data=True))[1] == data[:2 * CHUNK]
            assert len(glance.ranges) == 2 and seed.stats["cache_hits"] >= 2  # from memory
            with pytest.raises(ValueError):
                await seed.read(image_id, CHUNK, 5, 3, data=True)  # past the image's end
            with pytest.raises(SeedUnavailable):
                await seed.read("6b0c1f44-0000-4d1e-9a57-000000000000", CHUNK, 0, 1, data=True)
            if change_glance:  # the same id now serves other bytes
                glance.data = bytes(len(data))
            await asyncio.sleep(0.05)
            assert await store.get(image_id, CHUNK) == "lazy"  # not quiet yet: no check
            assert store.stats["bytes_read"] == 0
            now[0] += 6
            for _ in range(300):
                m = await store.get(image_id, CHUNK)
                if m != "lazy":
                    return m, store
                await asyncio.sleep(0.01)
            raise AssertionError("the check never ended")
        finally:
            await store.close()

    m, store = asyncio.run(scenario(False))
    assert isinstance(m, Manifest) and m.digest(5) == digest(5) and store.stats["bytes_read"] == len(data)
    r, store = asyncio.run(scenario(True))
    assert isinstance(r, Revocation) and r.image_id == image_id and proof.holds(r.signed_bytes(), r.proof)
    assert "does not match Glance's os_hash_value" in r.why and store.stats["revoked"] == 1
    # The revocation is kept across a restart (the state dir), its proof checked.
    assert ManifestStore(tmp_path / "True", None, proof=proof).revoked(image_id, CHUNK) == r


def test_a_watch_says_once_when_the_images_manifest_was_built_or_revoked(tmp_path):
    """Issue 27: nodes reading a lazy image learn of its built manifest or its revocation from
    their watch (signed like any event), instead of asking for it every few seconds."""
    from thunderfs_tracker.app import MANIFESTS
    from thunderfs_tracker.client import TrackerClient

    async def main():
        cfg = TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=SECRET, watch_interval=0.01)
        app = create_app(cfg)
        async with TestClient(TestServer(app)) as http:
            url = str(http.make_url("")).rstrip("/")
            async with TrackerClient(url, "b", secret=SECRET) as b:
                await b.announce(NodeInfo("b", "http://b:7071", ("z1",)))
                events: asyncio.Queue = asyncio.Queue()
                watching = asyncio.ensure_future(b.watch(IMG, 64, lambda seq, ev: events.put_nowait((seq, ev.manifest))))
                assert await asyncio.wait_for(events.get(), 10) == (0, False)
                app[MANIFESTS].on_changed(bytes.fromhex(IMG))
                assert await asyncio.wait_for(events.get(), 10) == (1, True)
                app[MANIFESTS].on_changed(bytes.fromhex("cd" * 16))  # another image's: not this watch's
                with pytest.raises(TimeoutError):
                    while True:
                        seq, manifest = await asyncio.wait_for(events.get(), 1)
                        assert not manifest
                watching.cancel()

    asyncio.run(main())


def test_alike_names_the_chunks_another_image_has_and_who_holds_them(tmp_path):
    """Issue 31: v2's manifest says how many of its chunks another image has, and an alike ask for
    a window of v2 names v1's chunks with the same digests that some node holds (never the asker,
    never a zero chunk), with the holders."""
    from thunderfs_common.image import content_key
    from thunderfs_common.manifest_proof import ManifestProof
    from thunderfs_tracker.client import TrackerClient

    rng = random.Random(31)
    v1 = rng.randbytes(6 * CHUNK) + bytes(2 * CHUNK)
    v2 = v1[4 * CHUNK:6 * CHUNK] + rng.randbytes(CHUNK) + v1[:2 * CHUNK] + bytes(CHUNK)  # v1's 4, 5, x, 0, 1, zero
    proof = ManifestProof(secret=SECRET)
    (tmp_path / "manifests").mkdir()
    for image_id, data in (("v1", v1), ("v2", v2)):
        m = Manifest(image_id, len(data), CHUNK, "sha512", image_id * 8, b"".join(chunk_digest.digests(data, CHUNK)))
        m = dataclasses.replace(m, proof=proof.make(m.signed_bytes()))
        (tmp_path / "manifests" / f"{image_id}-{CHUNK}.json").write_text(json.dumps(m.to_json()))
    c1 = content_key("sha512", "v1" * 8, len(v1)).hex()

    async def main():
        cfg = TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=SECRET)
        async with TestClient(TestServer(create_app(cfg))) as http:
            url = str(http.make_url("")).rstrip("/")
            async with TrackerClient(url, "a", secret=SECRET) as a, TrackerClient(url, "b", secret=SECRET) as b:
                for node in (a, b):
                    await node.announce(NodeInfo(node.node_id, f"http://{node.node_id}:7071", ("z1",)))
                await a.manifest("v1", CHUNK)
                assert (await b.manifest("v2", CHUNK)).alike == 4
                assert await b.alike("v2", CHUNK, 0, 6) == []  # nobody holds v1 yet
                await a.send_chunks(True, [ChunkUpdate(c1, 8, add=0b110001, full=True)])  # v1's 0, 4, 5
                await b.send_chunks(True, [ChunkUpdate(c1, 8, add=0b10, full=True)])  # and b its 1
                (found,) = await b.alike("v2", CHUNK, 0, 6)
                assert found.content.hex() == c1 and found.size == len(v1)
                assert found.pairs == [(0, 4), (1, 5), (3, 0)]  # v2's 4 is v1's 1: only b holds it
                assert [(p.node_id, p.chunks) for p in found.peers] == [("a", 0b110001)]
                assert await b.alike("v2", CHUNK, 2, 1) == []  # v2's own chunk

    asyncio.run(main())


def test_a_replicas_watches_write_at_most_so_many_events_a_second_in_all():
    """The interval between two events of a watch grows with the watchers of every image, an
    image replaced meanwhile included, and comes back as they end."""
    from thunderfs_tracker.peer_store import MemoryPeerStore
    from thunderfs_tracker.watch import Watches

    async def main():
        watches = Watches(MemoryPeerStore(), interval=0.5, events_per_second=4)
        async with contextlib.AsyncExitStack() as stack:
            for content, nchunks in [("a", 8), ("a", 8), ("b", 4), ("b", 4)]:
                await stack.enter_async_context(watches._watching(content, nchunks))
            assert watches.interval() == 1.0 and watches.statistics()["watchers"] == 4
            await stack.enter_async_context(watches._watching("a", 16))  # "a" is another image now
            assert watches.interval() == 1.25
        assert watches.interval() == 0.5 and watches.statistics()["watchers"] == 0
    asyncio.run(main())


@pytest.mark.parametrize("secret", [SECRET, None])
def test_a_client_that_goes_away_mid_body_is_no_traceback(tmp_path, caplog, secret):
    """A node killed or stopped while it sends a request: the tracker logged aiohttp's traceback
    ("Error handling request", ConnectionResetError) in a chaos run; now only a debug line.  (The
    app runs as ``run_app`` runs it: handlers are not cancelled when their client goes away.)"""
    from aiohttp import web

    async def main():
        app = create_app(TrackerConfig(listen=("127.0.0.1", 7070), state_dir=tmp_path, secret=secret))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            path = "/v1/nodes/a/announce"
            headers = sign(SECRET, "a", "POST", path, b"{}" * 50) if secret else {}
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n{head}\r\n{{\"node".encode())
            await writer.drain()
            await asyncio.sleep(0.1)  # the handler waits for the rest of the body
            writer.close()  # and the client is gone
            await asyncio.sleep(0.2)
            # The tracker goes on answering.
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        finally:
            await runner.cleanup()
    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
