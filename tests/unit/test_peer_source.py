"""PeerSource's choices with a fake tracker and peers behind an httpx MockTransport: verified
bytes from holders, lying, busy, slow and dead peers, claims, and one tracker request at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import httpx
import pytest
import trio

from fakes import CS, MockHTTP, meta_of, pattern
from thunderfs_common import chunk_digest
from thunderfs.p2p import peer_source as peers
from thunderfs.p2p.peer_directory import LAZY_RECHECK
from thunderfs.p2p.peer_source import PeerSource
from thunderfs.fetch.slots import DEMAND, PREFETCH, READAHEAD
from thunderfs.fetch.source import Urgency, Want
from thunderfs_common.manifest_proof import ManifestProof
from thunderfs_tracker.client import TrackerRefused, TrackerUnavailable
from thunderfs_common.tracker_protocol import (Alike, NOT_FETCHING_HEADER, PIECES_HEADER, TAKERS_HEADER, Manifest, PeerRecord, Piece, Revocation, WatchEvent, encode_pieces,
                                       parse_pieces)

DATA = pattern(32 * CS)
META = meta_of(DATA)


def manifest_of(data=DATA, meta=META) -> Manifest:
    digests = b"".join(chunk_digest.digest(data[i:i + CS]) for i in range(0, len(data), CS))
    return Manifest(meta.id, len(data), CS, "sha512", meta.os_hash_value, digests)


SECRET = b"peer-source-test-secret-0123456789"


def piece_of(first: int, count: int, data=DATA) -> Piece:
    """The tracker's piece of DATA's chunks, proven with a MAC under SECRET (no key given)."""
    digests = b"".join(chunk_digest.digest(data[c * CS:(c + 1) * CS]) for c in range(first, first + count))
    piece = Piece(META.id, len(DATA), CS, "sha512", META.os_hash_value, first, digests)
    return dataclasses.replace(piece, proof=ManifestProof(secret=SECRET).make(piece.signed_bytes()))


def peer(name: str, chunks) -> PeerRecord:
    return PeerRecord(name, f"http://{name}:7071", (), 0, sum(1 << c for c in chunks))


class FakeTracker:
    def __init__(self, manifest=None, holders=(), granted=None, claimed=()):
        self._manifest = manifest
        self.holders = list(holders)
        self.granted = granted  # None: everything asked
        self.claimed = list(claimed)
        self.calls = {"manifest": 0, "lookup": 0, "claim": 0, "stats": 0, "seed": 0, "watch": 0, "alike": 0}
        self.pushes = None  # a receive channel of WatchEvents: the tracker has watches (None: 404)
        self.read_glance: set[int] = set()  # lazy: the chunks the tracker read (its pieces cover)
        self.hung = False  # answers nothing (a stopped tracker)
        self.reports = []
        self.down = False
        self.gate: trio.Event | None = None
        self.holders_after_claim = None  # who holds what once the claim is made

    async def _call(self, what):
        self.calls[what] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.hung:
            await trio.sleep_forever()
        if self.down:
            raise TrackerUnavailable("tracker down")

    async def stats(self):
        await self._call("stats")
        return {}

    async def manifest(self, image_id, chunk_size):
        await self._call("manifest")
        return self._manifest

    async def manifest_state(self, image_id, chunk_size):
        m = await self.manifest(image_id, chunk_size)
        return "building" if m is None else m

    async def seed(self, image_id, chunk_size, first, count, *, data=True, timeout=None):
        """A seeding tracker: the bytes of DATA and their piece (what ``piece_of`` makes)."""
        await self._call("seed")
        self.read_glance.update(range(first, first + count))
        return piece_of(first, count), (DATA[first * CS:(first + count) * CS] if data else b"")

    async def lookup(self, content, first, last):
        await self._call("lookup")
        return self.holders

    async def watch(self, content, nchunks, on_event, *, silence=15.0):
        """Holders as they change: the first event names ``holders``; then what ``pushes`` says,
        until it closes (a watch that drops)."""
        await self._call("watch")
        if self.pushes is None:
            raise TrackerRefused(404, "no watches here")
        on_event(0, WatchEvent(nchunks, [(p, True) for p in self.holders]))
        seq = 1
        async for event in self.pushes:
            on_event(seq, event)
            seq += 1
        raise TrackerUnavailable("the watch dropped")

    async def claim(self, content, nchunks, chunks):
        await self._call("claim")
        if self.holders_after_claim is not None:
            self.holders = self.holders_after_claim
        granted = chunks if self.granted is None else [c for c in chunks if c in self.granted]
        return granted, self.claimed

    async def report(self, node_id, content, chunk, reason):
        self.reports.append((node_id, chunk))

    alikes = ()  # Alike entries: chunks another image has under the same digests (issue 31)

    async def alike(self, image_id, chunk_size, first, count):
        await self._call("alike")
        return list(self.alikes)


class Peers:
    """The peers' side: node name -> how it answers ("ok", "lie", "busy", "dead", "hang")."""

    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.asked: list[tuple[str, int, int]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        node = request.url.host
        first, count = map(int, re.search(r"/(\d+)/(\d+)$", request.url.path).groups())
        self.asked.append((node, first, count))
        how = self.behaviour.get(node, "ok")
        body = DATA[first * CS:(first + count) * CS]
        if how == "dead":
            raise httpx.ConnectError("refused", request=request)
        if how == "hang":
            await trio.sleep_forever()
        if how == "busy":
            return httpx.Response(503)
        if how == "not fetching":  # neither holds them nor fetches them: the claim is stale
            return httpx.Response(404, headers={NOT_FETCHING_HEADER: "1"})
        if how.startswith("busy, took:"):  # busy, and names the nodes that took them (all of them)
            names = how.removeprefix("busy, took:").split("+")
            return httpx.Response(503, headers={TAKERS_HEADER: ",".join(f"{n}:{(1 << count) - 1:x}" for n in names)})
        if how == "lie":
            body = bytes(len(body))
        if how in ("pieces", "forged-pieces"):  # the tracker's pieces sent along, as a node forwards them
            piece = piece_of(first, count)
            if how == "forged-pieces":  # other digests (those of what the forger sends), the proof kept
                piece = dataclasses.replace(piece, digests=bytes(len(piece.digests)))
            return httpx.Response(200, content=body, headers={PIECES_HEADER: encode_pieces([piece])})
        return httpx.Response(200, content=body)


class Sink:
    def __init__(self):
        self.got: dict[int, bytes] = {}
        self.passed: list[int] = []

    def put(self, first, data, buffer=None):
        for i in range(-(-len(data) // CS)):
            self.got[first + i] = bytes(data[i * CS:(i + 1) * CS])

    def pass_on(self, chunks):
        self.passed.extend(chunks)


def source_of(tracker, peers, **kw) -> PeerSource:
    return PeerSource(tracker, node_id="me", secret=kw.pop("secret", None), chunk_size=CS, timeout=kw.pop("timeout", 1.0),
                      claim_poll=kw.pop("claim_poll", 0.01), http=MockHTTP(peers), **kw)


def want(store, chunks, priority=DEMAND) -> Want:
    return Want(META, store.image(META.content_key, META.size), list(chunks), Urgency(priority))


def right(sink, chunks) -> bool:
    return all(sink.got[c] == DATA[c * CS:(c + 1) * CS] for c in chunks)


async def test_holders_bytes_are_verified_and_delivered(store):
    tracker = FakeTracker(manifest_of(), [peer("a", range(8))])
    src, sink = source_of(tracker, Peers()), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert right(sink, range(8)) and sink.passed == []
    assert src.statistics()["chunks"] == 8


async def test_without_a_manifest_nothing_comes_from_peers(store):
    peers = Peers()
    src, sink = source_of(FakeTracker(None, [peer("a", range(8))]), peers), Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert sink.got == {} and sink.passed == [0, 1, 2, 3] and peers.asked == []


async def test_a_manifest_that_does_not_fit_glances_listing_is_not_used(store):
    other = meta_of(DATA[:-1])
    peers = Peers()
    src, sink = source_of(FakeTracker(manifest_of(DATA[:-1], other), [peer("a", range(8))]), peers), Sink()
    await src.fetch(want(store, range(2)), sink)
    assert peers.asked == [] and sink.passed == [0, 1]


async def test_a_lying_peer_is_refused_reported_avoided_and_the_next_holder_used(store):
    tracker = FakeTracker(manifest_of(), [peer("liar", range(8)), peer("good", range(8))])
    peers = Peers(liar="lie")
    src, sink = source_of(tracker, peers), Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert right(sink, range(4))
    assert tracker.reports == [("liar", 0)]
    assert "liar" in src.statistics()["avoided_peers"]
    peers.asked.clear()
    await src.fetch(want(store, range(4, 8)), Sink())
    assert {n for n, _, _ in peers.asked} == {"good"}


async def test_a_peers_answer_memory_is_used_again_once_the_cache_is_done_with_it_and_a_liars_is_not(store):
    """What a peer's answer was received into comes back once the sink is done with it (this one
    copies and holds nothing), and the next answer of its size is received into it; a lying
    peer's answer is dropped, never used again."""
    from thunderfs.fetch.buffers import size_class
    tracker = FakeTracker(manifest_of(), [peer("liar", range(8)), peer("good", range(8))])
    src, sink = source_of(tracker, Peers(liar="lie")), Sink()
    assert await src.fetch(want(store, range(4)), sink) == [] and right(sink, range(4))
    assert src.statistics()["answer_memory"] == {"answers": 2, "reused": 0, "dropped": 0,
                                                 "free_bytes": size_class(4 * CS)}
    sink = Sink()
    assert await src.fetch(want(store, range(4, 8)), sink) == [] and right(sink, range(4, 8))
    assert src.statistics()["answer_memory"] == {"answers": 3, "reused": 1, "dropped": 0,
                                                 "free_bytes": size_class(4 * CS)}


@pytest.mark.parametrize("how", ["busy", "dead"])
async def test_a_busy_or_dead_peer_is_skipped_for_the_next(store, how):
    tracker = FakeTracker(manifest_of(), [peer("x", range(8)), peer("y", range(8))])
    src, sink = source_of(tracker, Peers(x=how)), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert right(sink, range(8))
    assert src.statistics()["busy" if how == "busy" else "failures"] == 1


async def test_a_hung_peer_costs_a_timeout_then_it_is_skipped_as_slow(store, autojump_clock):
    tracker = FakeTracker(manifest_of(), [peer("hung", range(8)), peer("ok", range(8))])
    src, sink = source_of(tracker, Peers(hung="hang")), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert right(sink, range(8)) and "hung" in src.statistics()["slow_peers"]


async def test_granted_chunks_go_on_at_once_and_claimed_ones_come_from_the_claimer(store):
    # Before the claim nobody holds anything; the claimer gets its chunks from Glance meanwhile.
    claimer = peer("claimer", range(4, 8))
    tracker = FakeTracker(manifest_of(), holders=[], granted={0, 1, 2, 3}, claimed=[(claimer, [4, 5, 6, 7], False)])
    tracker.holders_after_claim = [claimer]
    src, sink = source_of(tracker, Peers()), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert sink.passed == [0, 1, 2, 3] and right(sink, range(4, 8))
    assert src.statistics()["granted_chunks"] == 4


async def test_chunks_of_a_claimer_that_fails_are_returned_for_glance(store):
    claimer = peer("claimer", range(4))
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], True)])
    tracker.holders_after_claim = [claimer]
    src, sink = source_of(tracker, Peers(claimer="dead")), Sink()
    assert await src.fetch(want(store, range(4)), sink) == [0, 1, 2, 3]
    assert sink.got == {} and src.statistics()["claimed_chunks_late"] == 4


async def test_chunks_of_a_stale_claim_go_to_glance_at_once_not_after_the_wait(store, autojump_clock):
    """The tracker names a claimer whose fetch failed (its claim outlives it): the claimer says
    it is not fetching them, and the chunks go back for Glance at once."""
    claimer = peer("claimer", [])
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    src, sink = source_of(tracker, Peers(claimer="not fetching")), Sink()
    assert await src.fetch(want(store, range(4)), sink) == [0, 1, 2, 3]
    assert trio.current_time() < 1 and sink.got == {}
    assert src.statistics()["stale_claims"] >= 1


async def test_with_the_tracker_down_everything_goes_to_glance(store):
    tracker = FakeTracker(manifest_of())
    src = source_of(tracker, Peers())
    assert await src.directory.manifest(META) is not None  # known from before the outage
    tracker.down = True
    sink = Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert sink.passed == [0, 1, 2, 3]
    # The failed lookup marked the tracker down: the claim was not even sent.
    assert src.statistics()["lookup_failures"] == 1 and src.statistics()["claims_skipped"] == 1


async def test_a_hung_tracker_costs_one_timeout_not_one_per_read(store, autojump_clock):
    tracker = FakeTracker(manifest_of())
    src = source_of(tracker, Peers(), lookup_window=2)
    assert await src.directory.manifest(META) is not None
    tracker.hung = True
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        took = []
        for first in (0, 2, 4):  # three lookup windows: each would ask the tracker
            t = trio.current_time()
            assert await src.fetch(want(store, [first]), Sink()) == []
            took.append(trio.current_time() - t)
        assert took[0] == pytest.approx(src.timeout, abs=0.01)  # the first waits its timeout
        assert took[1:] == [0, 0]  # the next ones do not ask
        assert src.statistics()["lookups_skipped"] == 2 and src.statistics()["claims_skipped"] == 3
        tracker.hung = False  # back: the probe notices, and lookups go to it again
        await trio.sleep(10)
        assert not src.directory.tracker_breaker.is_open and tracker.calls["stats"] >= 1
        before = tracker.calls["lookup"]
        await src.fetch(want(store, [6]), Sink())
        assert tracker.calls["lookup"] == before + 1
        nursery.cancel_scope.cancel()


async def test_one_manifest_request_and_one_lookup_at_a_time(store):
    tracker = FakeTracker(manifest_of(), [peer("a", range(8))])
    tracker.gate = trio.Event()
    src = source_of(tracker, Peers())
    img = store.image(META.content_key, META.size)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(src.directory.manifest, META)
            nursery.start_soon(src.directory.holders, img, 0, 7)
        await trio.testing.wait_all_tasks_blocked()
        tracker.gate.set()
    assert (tracker.calls["manifest"], tracker.calls["lookup"]) == (1, 1)


@contextlib.asynccontextmanager
async def tracker_known_down(store):
    """(tracker, source, nursery): the tracker stopped answering and a demand fetch found out (its
    lookup failed); the source's probe runs in the nursery."""
    tracker = FakeTracker(manifest_of())
    src = source_of(tracker, Peers())
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None
        tracker.down = True
        sink = Sink()
        assert await src.fetch(want(store, [31]), sink) == [] and sink.passed == [31]
        assert src.directory.tracker_breaker.is_open
        yield tracker, src, nursery
        nursery.cancel_scope.cancel()


def in_background(nursery, src, w: Want, sink: Sink) -> trio.Event:
    """Start ``src.fetch(w, sink)``; the event is set when it returns."""
    done = trio.Event()

    async def fetch():
        await src.fetch(w, sink)
        done.set()

    nursery.start_soon(fetch)
    return done


async def test_a_background_fetch_waits_for_a_tracker_known_down_and_claims_once_it_is_back(store, autojump_clock):
    async with tracker_known_down(store) as (tracker, src, nursery):
        sink = Sink()
        done = in_background(nursery, src, want(store, range(4), PREFETCH), sink)
        await trio.sleep(3)
        # Waiting: nothing sent on to Glance, no claim asked of a tracker known down.
        assert not done.is_set() and sink.passed == [] and tracker.calls["claim"] == 0
        assert src.statistics()["claims_deferred"] == 1
        tracker.down = False  # back: the probe notices within its interval, the claim goes out
        await done.wait()
        assert tracker.calls["claim"] == 1 and sink.passed == [0, 1, 2, 3]
        assert trio.current_time() < peers.TRACKER_PATIENCE


async def test_a_reader_joining_a_waiting_background_fetch_sends_it_to_glance_at_once(store, autojump_clock):
    async with tracker_known_down(store) as (tracker, src, nursery):
        sink, w = Sink(), want(store, range(4), READAHEAD)
        done = in_background(nursery, src, w, sink)
        await trio.sleep(1)
        assert sink.passed == []
        joined = trio.current_time()
        w.urgency.promote(DEMAND)  # a reader needs one of its chunks now
        await done.wait()
        assert sink.passed == [0, 1, 2, 3] and trio.current_time() - joined <= src.claims.poll


async def test_a_background_fetch_waits_for_the_tracker_no_longer_than_its_patience(store, autojump_clock):
    async with tracker_known_down(store) as (tracker, src, nursery):
        started, sink = trio.current_time(), Sink()
        assert await src.fetch(want(store, range(4), PREFETCH), sink) == []
        assert sink.passed == [0, 1, 2, 3]
        assert peers.TRACKER_PATIENCE <= trio.current_time() - started <= peers.TRACKER_PATIENCE + src.claims.poll


class ArrivingAtClaimer(Peers):
    """The claimer gets its chunks at ``arrived``: a request with ``wait`` is answered then, one
    without is told 404 until then."""

    def __init__(self):
        super().__init__()
        self.arrived = trio.Event()
        self.waits = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.arrived.is_set():
            if "wait" not in request.url.params:
                return httpx.Response(404)
            self.waits += 1
            with trio.move_on_after(int(request.url.params["wait"]) / 1000):
                await self.arrived.wait()
            if not self.arrived.is_set():
                return httpx.Response(404)
        return await super().__call__(request)


class TakingHalfASecond(Peers):  # (less than the peer timeout, 1 s here: not slow)
    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await trio.sleep(0.5)
        return await super().__call__(request)


# A take that spins (a set event waited on again) never lets the autojump clock jump: then the
# asks never end and this test runs into its timeout (it did, with the first wake-up of them).
@pytest.mark.timeout(30)
async def test_takes_held_back_by_the_per_peer_cap_go_on_as_soon_as_an_ask_ends(store, autojump_clock, monkeypatch):
    """Many flights take from one holder, this node asking it at most PER_PEER pieces at once:
    a take held back goes on when any ask ends, not a poll later (64 readers of one holder once
    starved behind two asks until their reads failed)."""
    from thunderfs.p2p.claims import ClaimTaker

    monkeypatch.setattr(ClaimTaker, "PER_PEER", 1)
    holder = peer("holder", range(12))
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(holder, list(range(12)), True)])
    src = source_of(tracker, TakingHalfASecond(), claim_poll=30, max_request_chunks=2)  # two workers a take
    assert await src.directory.manifest(META) is not None
    sinks, done = [Sink(), Sink(), Sink()], []

    async def fetch(k):
        assert await src.fetch(want(store, range(4 * k, 4 * k + 4)), sinks[k]) == []
        done.append(trio.current_time())

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for k in (0, 1, 2):
            nursery.start_soon(fetch, k)
    assert right(sinks[0], range(4)) and right(sinks[1], range(4, 8)) and right(sinks[2], range(8, 12))
    # (The fake tracker names the holder for all 12 chunks to each claim: 3 takes of 6 asks.)
    assert max(done) - started == pytest.approx(9)  # 18 asks back to back, none a poll (30 s) apart


@pytest.mark.parametrize("priority", [DEMAND, PREFETCH])
async def test_a_readers_flight_leaves_glance_half_the_fetch_timeout(store, autojump_clock, priority):
    """A claimer that never delivers: a reader's flight gives its chunks back for Glance after
    half the fetch timeout, so that Glance can still serve the reader before its deadline;
    prefetch waits the whole of it."""
    claimer = peer("claimer", [])
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    src = source_of(tracker, Peers(claimer="busy"), fetch_timeout=20)
    assert await src.directory.manifest(META) is not None
    started = trio.current_time()
    assert await src.fetch(want(store, range(4), priority), Sink()) == [0, 1, 2, 3]
    assert trio.current_time() - started == pytest.approx(10 if priority == DEMAND else 20, abs=0.5)


async def test_a_reader_cut_short_by_a_slow_claimer_gets_its_chunks_from_a_slow_holder_before_glance(store, autojump_clock):
    """On a loaded host every peer is slow now and then: a reader whose claimer is slow waits for
    it only SLOW_HOLDER_PATIENCE timeouts, then asks a holder slow a moment ago once, before
    its chunks go to Glance (which the crowd holds)."""
    claimer, relay = peer("claimer", range(4)), peer("relay", range(4))
    peers_ = Peers(claimer="hang", relay="hang")
    tracker = FakeTracker(manifest_of(), holders=[claimer, relay], granted=set(), claimed=[(claimer, [0, 1, 2, 3], True)])
    src, sink = source_of(tracker, peers_), Sink()
    img = store.image(META.content_key, META.size)
    for who in (claimer, relay):  # each times out once: slow, for 5 s from now
        assert (await src.client.get(who, img, manifest_of(), 0, 4)).answer.value == "slow"
    peers_.behaviour["relay"] = "ok"
    started = trio.current_time()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert right(sink, range(4)) and trio.current_time() - started < 3.5  # the relay still counts as slow
    assert src.statistics()["late_rescued"] == 4 and src.statistics()["claimed_chunks_late"] == 0


async def test_a_waiter_is_told_by_the_claimer_when_its_chunks_arrive_not_by_asking_the_tracker(store, autojump_clock):
    claimer = peer("claimer", [])
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    peers = ArrivingAtClaimer()
    src, sink = source_of(tracker, peers, claim_poll=0.25), Sink()

    async def arrive_later():
        await trio.sleep(3)
        peers.arrived.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive_later)
        started = trio.current_time()
        assert await src.fetch(want(store, range(4)), sink) == []
        took = trio.current_time() - started
    assert right(sink, range(4)) and 3 <= took < 3.1  # at once when they arrived
    # Polling every 0.25 s for 3 s would have asked the tracker about 12 times.
    assert tracker.calls["lookup"] <= 2 and peers.waits >= 1
    assert src.statistics()["claim_pushes"] >= 1


async def _wait_on_claim_while_relay_gets_them(store, watches: bool):
    """A reader waits for chunks 0-3 that a busy claimer fetches; 2 s in, a relay holds them,
    which the tracker's watch (if it has ``watches``) says at once.  (seconds it took, lookups,
    the source)."""
    claimer, relay = peer("claimer", []), peer("relay", range(4))
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    sends, receives = trio.open_memory_channel(10)
    tracker.pushes = receives if watches else None
    src, sink = source_of(tracker, Peers(claimer="busy"), claim_poll=0.25), Sink()
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None

        async def relay_gets_them():
            await trio.sleep(2)
            tracker.holders = [relay]  # what a lookup says from now on
            await sends.send(WatchEvent(len(DATA) // CS, [(relay, True)]))

        nursery.start_soon(relay_gets_them)
        started = trio.current_time()
        assert await src.fetch(want(store, range(4)), sink) == []
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert right(sink, range(4))
    return took, tracker.calls["lookup"], src


async def test_a_waiter_learns_from_the_trackers_watch_that_a_relay_has_its_chunks(store, autojump_clock):
    took, lookups, src = await _wait_on_claim_while_relay_gets_them(store, watches=True)
    assert 2 <= took < 2.05  # at once when the watch said so
    assert lookups <= 1 and src.statistics()["watch_events"] == 2  # the one before the watch was live
    # Without watches, the same wait polls the tracker: what the watch saves.
    took, lookups, src = await _wait_on_claim_while_relay_gets_them(store, watches=False)
    assert 2 <= took < 2.3 and lookups >= 6 and src.statistics()["watch_events"] == 0


async def test_a_watch_that_drops_falls_back_to_lookups_and_no_waiter_is_stuck(store, autojump_clock):
    claimer, relay = peer("claimer", []), peer("relay", range(4))
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    sends, tracker.pushes = trio.open_memory_channel(10)
    src, sink = source_of(tracker, Peers(claimer="busy"), claim_poll=0.25), Sink()
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None

        async def drop_then_relay():
            await trio.sleep(1)
            await sends.aclose()  # the watch drops; a new one is refused (404) from now on
            tracker.pushes = None
            await trio.sleep(1)
            tracker.holders = [relay]  # only a lookup can tell now

        nursery.start_soon(drop_then_relay)
        started = trio.current_time()
        assert await src.fetch(want(store, range(4)), sink) == []
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert right(sink, range(4)) and 2 <= took < 2.3
    assert tracker.calls["watch"] >= 2  # asked again after it dropped
    assert src.statistics()["watch_failures"] == 1


async def test_a_prefetch_batch_is_claimed_once_and_its_flights_follow_the_plan(store, autojump_clock):
    claimer = peer("claimer", range(4, 8))
    tracker = FakeTracker(manifest_of(), holders=[], granted={0, 1, 2, 3}, claimed=[(claimer, [4, 5, 6, 7], False)])
    src = source_of(tracker, Peers())
    img = store.image(META.content_key, META.size)
    await src.directory.manifest(META)
    await src.plan(META, img, list(range(8)))
    assert tracker.calls["claim"] == 1
    # Its peer server keeps others' waiters for what this node claimed, before a flight starts.
    assert [src.will_fetch(img, c) for c in (0, 3, 4)] == [True, True, False]
    mine, theirs = Sink(), Sink()
    assert await src.fetch(want(store, range(4), PREFETCH), mine) == []
    assert not src.will_fetch(img, 0)  # the plan's entry used up: its flight says so now
    assert mine.passed == [0, 1, 2, 3]  # granted by the plan: to Glance, no claim of their own
    tracker.holders = [claimer]
    assert await src.fetch(want(store, range(4, 8), PREFETCH), theirs) == []
    assert right(theirs, range(4, 8))
    assert tracker.calls["claim"] == 1 and src.statistics()["planned_chunks"] == 8
    assert tracker.calls["lookup"] <= 1  # the plan said who; one look for relays while waiting
    # A plan is used up by its flights, and does not outlive PLAN_TTL: later flights claim anew.
    await src.plan(META, img, [8, 9])
    await trio.sleep(peers.PLAN_TTL + 1)
    assert not src.will_fetch(img, 8)
    tracker.holders = []
    await src.fetch(want(store, [8, 9], PREFETCH), Sink())
    assert tracker.calls["claim"] == 3


async def test_chunks_a_plan_gives_this_node_come_from_another_images_holders_before_glance(store):
    """Issue 31: a v2's profile prefetch after a storm on v1 is claimed as a batch, and the
    tracker grants the chunks nobody holds as v2's; those v1's holders have (a rack-mate that
    never read v2) are taken from them, checked against v2's manifest, and not sent to Glance."""
    v1 = Alike(b"\x01" * 32, len(DATA), [(c, c) for c in range(6)], [peer("old", range(4))])
    tracker = FakeTracker(dataclasses.replace(manifest_of(), alike=6), holders=[])
    tracker.alikes = [v1]
    peers_ = Peers()
    src, sink = source_of(tracker, peers_), Sink()
    img = store.image(META.content_key, META.size)
    await src.directory.manifest(META)
    await src.plan(META, img, list(range(6)))
    assert await src.fetch(want(store, range(6), PREFETCH), sink) == []
    assert right(sink, range(4)) and sink.passed == [4, 5]  # what "old" lacks: to Glance
    assert peers_.asked == [("old", 0, 4)] and tracker.calls["claim"] == 1
    assert src.statistics()["alike_chunks"] == 4
    # An image whose manifest shares nothing asks the tracker nothing more.
    single = FakeTracker(manifest_of(), holders=[])
    plain = source_of(single, Peers())
    await plain.directory.manifest(META)
    await plain.plan(META, img, [6, 7])
    assert await plain.fetch(want(store, [6, 7], PREFETCH), other := Sink()) == [] and other.passed == [6, 7]
    assert single.calls["alike"] == 0


async def test_a_plan_made_while_the_last_one_is_used_up_is_kept(store):
    """The flights of one batch may use up (and drop) the image's plan while the tracker answers
    the next batch's claim: that answer must not go into the dropped plan."""
    tracker = FakeTracker(manifest_of(), holders=[], granted=None)
    src = source_of(tracker, Peers())
    img = store.image(META.content_key, META.size)
    await src.directory.manifest(META)
    await src.plan(META, img, [0, 1])
    tracker.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(src.plan, META, img, [2, 3])
        while tracker.calls["claim"] < 2:
            await trio.sleep(0.001)
        assert src.plans.take(img, [0, 1])[0] == [0, 1]  # the first batch's flights use it all up
        tracker.gate.set()
    mine, theirs, rest = src.plans.take(img, [2, 3])
    assert (mine, theirs, rest) == ([2, 3], {}, [])


async def test_chunks_planned_from_a_node_that_failed_since_are_claimed_again_not_waited_for(store, autojump_clock):
    claimer = peer("claimer", [])
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    src = source_of(tracker, Peers(claimer="dead"))
    img = store.image(META.content_key, META.size)
    await src.directory.manifest(META)
    await src.plan(META, img, [0, 1, 2, 3])
    await src.fetch(want(store, [0, 1], PREFETCH), Sink())  # the claimer fails: avoided
    assert "claimer" in src.statistics()["avoided_peers"]
    tracker.claimed, tracker.granted = [], None
    started = trio.current_time()
    sink = Sink()
    assert await src.fetch(want(store, [2, 3], PREFETCH), sink) == []
    assert sink.passed == [2, 3] and trio.current_time() - started < 1  # claimed anew, granted


# --- a lazy manifest: the tracker seeds the image ------------------------------------------------


def seed_source(src):
    from thunderfs.p2p.seed_source import SeedSource
    return SeedSource(src._tracker, src.directory, chunk_size=CS, timeout=1.0)


async def test_while_the_tracker_seeds_an_image_peers_bytes_are_checked_against_its_pieces(store):
    tracker = FakeTracker("lazy", [peer("a", range(8))])
    src, sink = source_of(tracker, Peers()), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert right(sink, range(8)) and src.statistics()["chunks"] == 8
    assert tracker.calls["seed"] == 1 and src.statistics()["pieces"] == 1  # the digests alone, asked once
    assert src.directory.statistics()["lazy_manifests"] == 1


async def test_a_lying_peer_is_caught_by_the_trackers_pieces_too(store):
    tracker = FakeTracker("lazy", [peer("liar", range(4)), peer("good", range(4))])
    src, sink = source_of(tracker, Peers(liar="lie")), Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert right(sink, range(4)) and tracker.reports == [("liar", 0)]


async def test_peer_bytes_no_piece_can_check_are_not_used(store):
    tracker = FakeTracker("lazy", [peer("a", range(4))])

    async def no_piece(*args, **kw):
        raise TrackerUnavailable("no piece")

    tracker.seed = no_piece
    src, sink = source_of(tracker, Peers()), Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert sink.got == {} and sink.passed == [0, 1, 2, 3] and src.statistics()["unchecked_dropped"] == 1


async def test_granted_chunks_of_a_seeded_image_come_from_the_tracker_checked(store):
    tracker = FakeTracker("lazy", holders=[])
    src = source_of(tracker, Peers())
    seed, sink = seed_source(src), Sink()
    assert await src.directory.manifest(META) is not None
    assert await seed.fetch(want(store, range(3, 7)), sink) == []
    assert right(sink, range(3, 7)) and tracker.read_glance == {3, 4, 5, 6}
    assert src.directory.manifest_nowait(META).unknown(3, 4) == []  # they check peers' bytes later


async def test_a_seed_answer_that_does_not_match_its_piece_goes_to_glance(store):
    tracker = FakeTracker("lazy", holders=[])
    real = tracker.seed

    async def corrupt(*args, **kw):
        piece, data = await real(*args, **kw)
        return piece, bytes(len(data))

    tracker.seed = corrupt
    src = source_of(tracker, Peers())
    seed, sink = seed_source(src), Sink()
    await src.directory.manifest(META)
    assert await seed.fetch(want(store, range(2)), sink) == [0, 1] and sink.got == {}


async def test_a_piece_of_another_image_or_unproven_is_refused(store):
    tracker = FakeTracker("lazy", holders=[])
    src = source_of(tracker, Peers())
    await src.directory.manifest(META)
    other = Piece("another", len(DATA), CS, "sha512", META.os_hash_value, 0, bytes(32))
    assert not src.directory.add_piece(META, other)
    assert src.directory.manifest_nowait(META).unknown(0, 1) == [0]


async def test_without_a_lazy_manifest_the_seed_passes_everything_to_glance(store):
    tracker = FakeTracker(manifest_of(), holders=[])
    src = source_of(tracker, Peers())
    await src.directory.manifest(META)
    assert await seed_source(src).fetch(want(store, range(4)), Sink()) == [0, 1, 2, 3]
    assert tracker.calls["seed"] == 0


async def test_a_revocation_drops_the_lazy_manifest_and_is_told_once(store, autojump_clock):
    revoked = []
    tracker = FakeTracker("lazy", holders=[])
    src = PeerSource(tracker, node_id="me", secret=None, chunk_size=CS, timeout=1.0,
                     on_revoked=lambda meta, why: revoked.append((meta.id, why)),
                     http=MockHTTP(Peers()))
    assert await src.directory.manifest(META) is not None
    tracker._manifest = Revocation(META.id, CS, META.os_hash_value, "the whole image does not match")
    for _ in range(3):
        await trio.sleep(LAZY_RECHECK + 1)
        assert await src.directory.manifest(META) is None
    assert revoked == [(META.id, "the whole image does not match")]
    # A revocation of another image's bytes is not this one's.
    assert src.directory.statistics()["revocations"] == 1


async def test_a_live_watch_tells_of_a_revocation_and_the_lazy_manifest_is_asked_no_more_often(store, autojump_clock):
    """Issue 27: while the image's watch is live, a lazy manifest is asked for only when the watch
    says it changed (or every LAZY_RECHECK_WATCHED), not every LAZY_RECHECK."""
    from thunderfs.p2p.peer_directory import LAZY_RECHECK_WATCHED

    revoked = []
    tracker = FakeTracker("lazy", holders=[])
    sends, tracker.pushes = trio.open_memory_channel(10)
    src = source_of(tracker, Peers(), on_revoked=lambda meta, why: revoked.append(why))
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        src.prepare(META)  # an open: the manifest asked for, the watch started
        await trio.sleep(1)
        asked = tracker.calls["manifest"]
        assert asked == 1 and src.directory.watches.live(META.content_key.hex())
        for _ in range(3):  # the node reads the image meanwhile: its watch stays in use
            await trio.sleep(LAZY_RECHECK + 1)
            assert src.directory.watches.members_nowait(META.content_key.hex()) is not None
        assert tracker.calls["manifest"] == asked  # the live watch would have said
        tracker._manifest = Revocation(META.id, CS, META.os_hash_value, "the whole image does not match")
        await sends.send(WatchEvent(META.size // CS, [], manifest=True))
        await trio.sleep(0.5)
        assert revoked == ["the whole image does not match"] and tracker.calls["manifest"] == asked + 1
        assert src.statistics()["manifest_news"] == 1
        nursery.cancel_scope.cancel()
    assert LAZY_RECHECK_WATCHED > 3 * LAZY_RECHECK + 1


async def test_pieces_a_peer_sends_along_check_its_chunks_without_asking_the_tracker(store):
    tracker = FakeTracker("lazy", [peer("a", range(8))])
    src, sink = source_of(tracker, Peers(a="pieces"), secret=SECRET), Sink()
    assert await src.fetch(want(store, range(8)), sink) == []
    assert right(sink, range(8)) and tracker.calls["seed"] == 0
    # What this node took, it forwards: the pieces that cover chunks 2..5.
    header = src.directory.pieces_header(META.content_key, 2, 4)
    assert [(p.first, p.count) for p in parse_pieces(header)] == [(0, 8)]


@pytest.mark.parametrize("secret", [SECRET, None])
async def test_pieces_a_peer_forged_are_refused_and_the_trackers_own_decide(store, secret):
    """A piece without the tracker's proof (a peer, or a machine in the middle of a peer's answer,
    made it up to match its bytes) is refused, under the secret's MAC; with no secret at all,
    no piece a peer sends is taken.  The bytes are checked against the tracker's own piece."""
    tracker = FakeTracker("lazy", [peer("a", range(4))])
    src, sink = source_of(tracker, Peers(a="forged-pieces"), secret=secret), Sink()
    assert await src.fetch(want(store, range(4)), sink) == []
    assert right(sink, range(4)) and tracker.calls["seed"] == 1
    assert src.statistics()["pieces_refused"] == 1 and src.statistics()["bad_chunks"] == 0


async def test_a_manifest_answer_that_does_not_parse_is_no_answer(store, autojump_clock):
    """A tracker answer that passed authentication but does not parse (a tracker's bug) leaves the
    node as it was: no exception out of the directory, whose loop asks again later."""
    from thunderfs_common.tracker_protocol import ProtocolError

    tracker = FakeTracker("lazy", holders=[])
    src = source_of(tracker, Peers())
    lazy = await src.directory.manifest(META)

    async def broken(image_id, chunk_size):
        raise ProtocolError("malformed manifest")

    tracker.manifest_state = broken
    await trio.sleep(LAZY_RECHECK + 1)
    assert await src.directory.manifest(META) is lazy


async def test_a_watchs_holders_come_nearest_first_in_a_new_order_among_equals_each_time():
    """As the tracker's lookups: in the order the watch named them, every waiter of a crowd would
    ask the same first holder."""
    from thunderfs.p2p.holder_watch import HolderWatches

    near = [PeerRecord(f"n{i}", f"http://n{i}:7071", ("z1", "r1"), 0, 0b1) for i in range(4)]
    far = PeerRecord("far", "http://far:7071", ("z2",), 0, 0b1)
    tracker = FakeTracker(holders=[far, *near])
    _, tracker.pushes = trio.open_memory_channel(1)
    watches = HolderWatches(tracker, tracker_down=lambda: False, location=("z1", "r1", "me"))
    async with trio.open_nursery() as nursery:
        await nursery.start(watches.run)
        assert watches.holders_nowait("c", 32, 0, 0) is None  # the watch starts: not live yet
        await trio.testing.wait_all_tasks_blocked()
        firsts = set()
        for _ in range(50):
            found = watches.holders_nowait("c", 32, 0, 0)
            assert len(found) == 5 and found[-1][0].node_id == "far"
            firsts.add(found[0][0].node_id)
        assert len(firsts) > 1  # four equals: one first every time has odds of 4 in 4**50
        nursery.cancel_scope.cancel()



async def test_a_waiter_wakes_only_when_a_holder_gains_a_chunk_it_waits_for_or_the_watch_drops():
    """A crowd's watch events each woke every waiting take of a node (issue 27: 2,159 wakeups a
    node with 32 nodes, 413 with 8); now only those that wait for a chunk some holder gained."""
    from thunderfs.p2p.holder_watch import HolderWatches

    tracker = FakeTracker(holders=[peer("a", [1])])
    sends, tracker.pushes = trio.open_memory_channel(4)
    watches = HolderWatches(tracker, tracker_down=lambda: False)
    woken = []

    async def wait(name: str, chunks: int) -> None:
        await watches.wait_changed("c", trio.Event(), 1.0, chunks=chunks)
        woken.append(name)

    async with trio.open_nursery() as nursery:
        await nursery.start(watches.run)
        watches.start("c", 32)
        await trio.testing.wait_all_tasks_blocked()
        assert watches.holders_nowait("c", 32, 0, 31) is not None  # live
        nursery.start_soon(wait, "wants 5", 1 << 5)
        nursery.start_soon(wait, "wants any", -1)
        await trio.testing.wait_all_tasks_blocked()
        await sends.send(WatchEvent(32, [(peer("a", [1]), True)]))  # nothing new
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        await sends.send(WatchEvent(32, [(peer("b", [9]), False)]))  # b gained 9
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["wants any"]
        await sends.send(WatchEvent(32, [(peer("a", [5]), False)]))  # a gained 5
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["wants any", "wants 5"]
        nursery.start_soon(wait, "wants 7", 1 << 7)
        await trio.testing.wait_all_tasks_blocked()
        await sends.aclose()  # the watch drops: every waiter looks again (at lookups)
        await trio.testing.wait_all_tasks_blocked()
        assert woken[-1] == "wants 7"
        nursery.cancel_scope.cancel()

async def test_a_busy_claimer_sends_its_waiters_to_the_relays_that_took_their_chunks(store, autojump_clock):
    """The holder tells its waiters who took the chunks from it: a waiter asks those relays (of
    the nodes the tracker named) at once, before the watch says they hold them; a relay it does
    not know from the tracker is not asked."""
    claimer, relay = peer("claimer", []), peer("relay", [20])  # the watch knows relay, not that it has 0-3
    tracker = FakeTracker(manifest_of(), holders=[relay], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    _, tracker.pushes = trio.open_memory_channel(1)
    peers_ = Peers(claimer="busy, took:stranger+relay")
    src, sink = source_of(tracker, peers_, claim_poll=0.25), Sink()
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        assert await src.fetch(want(store, range(4)), sink) == []
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert right(sink, range(4)) and took < 0.5
    assert {node for node, _, _ in peers_.asked} == {"claimer", "relay"}
    assert src.statistics()["relays_named"] >= 1 and src.statistics()["claimed_chunks_late"] == 0


@pytest.mark.parametrize("value", ["relay", "relay:zz", "relay:0", "relay:10", "bad name:1", ",".join(["n:1"] * 9),
                                   "n:" + "f" * 500])
def test_a_takers_header_that_is_not_nodes_and_some_of_the_asked_chunks_is_refused(value):
    """For 4 chunks asked: bits past the fourth, none, a name that is not a node's, too many."""
    from thunderfs_common.tracker_protocol import ProtocolError, parse_takers

    assert parse_takers("a:1,b.c-d:f", 4) == [("a", 1), ("b.c-d", 15)]
    with pytest.raises(ProtocolError):
        parse_takers(value, 4)


@pytest.mark.parametrize("cuts", [[], [1, CS - 1, CS, 3 * CS + 5], [2 * CS - 3]])
async def test_a_peers_answer_is_hashed_chunk_by_chunk_as_it_lands_and_checked(store, cuts):
    """Each chunk's digest is taken once its last byte landed, however the receives cut the
    answer (the last chunk short); a chunk that does not match the manifest is the lie."""
    from thunderfs.p2p.peer_client import Answer, PeerClient, _Arriving
    data = pattern(4 * CS + 100)
    meta = meta_of(data)
    digests = b"".join(chunk_digest.digests(data, CS))
    manifest = Manifest(meta.id, len(data), CS, "sha512", meta.os_hash_value, digests)
    img = store.image(meta.content_key, meta.size)
    client = PeerClient(node_id="me", secret=None, chunk_size=CS)
    peer = PeerRecord("p1", "http://p1", (), 0, 0)

    def arrived(body: bytes) -> list[bytes]:
        buf = bytearray(len(body))
        arriving = _Arriving(buf, CS)
        for n in [*cuts, len(body)]:
            buf[:n] = body[:n]
            arriving.landed(n)
            assert len(arriving.digests) == n // CS + (n == len(body) and n % CS > 0)
        return arriving.done()

    assert arrived(data) == chunk_digest.digests(data, CS)
    assert client.check(peer, img, manifest, 0, data, arrived(data)).answer is Answer.OK
    bad = bytearray(data)
    bad[3 * CS + 7] ^= 1
    reply = client.check(peer, img, manifest, 0, bytes(bad), arrived(bytes(bad)))
    assert reply.answer is Answer.LIED and reply.bad_chunk == 3 and client.avoided("p1")


class FailingAfterHalfASecond(Peers):
    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await trio.sleep(0.5)
        raise httpx.ConnectError("reset", request=request)


@pytest.mark.timeout(30)
async def test_a_take_whose_claimer_another_take_found_dead_gives_up_at_once_not_after_its_wait(
        store, autojump_clock, monkeypatch):
    """Two readers wait on one claimer, this node asking it once at a time (PER_PEER 1): the
    first's ask fails, and the second, held back meanwhile, finds the claimer avoided.  With a
    live watch nothing else would wake it: its chunks went to Glance only after its wait (half
    the fetch timeout), and a read after a chaos run's faults failed so."""
    from thunderfs.p2p.claims import ClaimTaker

    monkeypatch.setattr(ClaimTaker, "PER_PEER", 1)
    claimer = peer("claimer", [])
    tracker = FakeTracker(manifest_of(), holders=[], granted=set(), claimed=[(claimer, list(range(8)), False)])
    _, tracker.pushes = trio.open_memory_channel(1)  # a live watch that says nothing more
    src = source_of(tracker, FailingAfterHalfASecond(), fetch_timeout=20, max_request_chunks=8)
    lefts, done = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()

        async def fetch(k):
            lefts.append(await src.fetch(want(store, range(4 * k, 4 * k + 4)), Sink()))
            done.append(trio.current_time() - started)

        async with trio.open_nursery() as readers:
            for k in (0, 1):
                readers.start_soon(fetch, k)
        nursery.cancel_scope.cancel()
    assert all(left == list(range(8)) for left in lefts)  # (the fake claim names all 8 for each)
    assert max(done) < 1.5  # not the 10 s wait


@pytest.mark.timeout(30)
async def test_a_take_whose_holder_is_slow_asks_it_again_when_the_mark_ends_not_after_its_wait(store, autojump_clock):
    """The chunks' only holder was slow a moment ago (skipped for 5 s) and the claimer is gone
    (avoided): with a live watch that says nothing more, the take asks the holder again once it
    counts as slow no longer, not when its wait ran out."""
    claimer, relay = peer("claimer", []), peer("relay", range(4))
    peers_ = Peers(relay="hang", claimer="dead")
    tracker = FakeTracker(manifest_of(), holders=[relay], granted=set(), claimed=[(claimer, [0, 1, 2, 3], False)])
    _, tracker.pushes = trio.open_memory_channel(1)
    src, sink = source_of(tracker, peers_, fetch_timeout=20), Sink()
    img = store.image(META.content_key, META.size)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None
        await trio.testing.wait_all_tasks_blocked()
        for who in (relay, claimer):  # slow for 5 s; avoided
            await src.client.get(who, img, manifest_of(), 0, 4)
        assert src.client.slow("relay") and src.client.avoided("claimer")
        peers_.behaviour["relay"] = "ok"
        started = trio.current_time()
        # (the claim itself names the avoided claimer as nobody: the take is asked directly)
        left = await src.claims.take(META, img, claimer, [0, 1, 2, 3], 10.0, sink.put)
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert left == [] and right(sink, range(4))
    assert 4.9 < took < 5.5  # the slow mark's end (5 s after it was set), not the wait (10 s)


async def test_readahead_still_asks_an_owner_found_slow(store):
    """A busy owner (it timed out once) is asked again by readahead, which can wait; claimed, its
    chunks would go to whoever claimed first (the 8-node run's concentration)."""
    peers_ = Peers()
    async with trio.open_nursery() as nursery:
        tracker, src = await _seeded_with_watch(store, nursery, [peer("a", [31])], peers_)
        src.client._slow["a"] = trio.current_time() + 0.5  # askable again within the wait
        sink = Sink()
        assert await src.fetch(want(store, range(4), READAHEAD), sink) == []
        nursery.cancel_scope.cancel()
    assert tracker.calls["claim"] == 0 and {n for n, _, _ in peers_.asked} == {"a"} and right(sink, range(4))


async def _seeded_with_watch(store, nursery, holders, peers_):
    """A PeerSource on a seeded image (lazy manifest) whose live watch names ``holders``."""
    tracker = FakeTracker("lazy", holders=holders)
    _, tracker.pushes = trio.open_memory_channel(1)
    src = source_of(tracker, peers_)
    await nursery.start(src.run)
    assert await src.directory.manifest(META) is not None
    src.directory.watches.start(META.content_key.hex(), len(DATA) // CS)
    await trio.testing.wait_all_tasks_blocked()
    assert src.directory.members_nowait(store.image(META.content_key, META.size)) is not None  # live
    return tracker, src


async def test_a_seeded_images_chunks_come_from_their_owners_without_a_claim(store, monkeypatch):
    """Nobody holds chunks 0-7 yet: each goes to its owner among the holders the watch names
    (each owns windows of two chunks here), which fetches it when asked; no claim is made."""
    from thunderfs.p2p import owners
    from thunderfs.p2p.owners import owner, window

    monkeypatch.setattr(owners, "WINDOW", 2 * CS)

    peers_ = Peers()
    async with trio.open_nursery() as nursery:
        tracker, src = await _seeded_with_watch(store, nursery, [peer("a", [31]), peer("b", [30])], peers_)
        sink = Sink()
        assert await src.fetch(want(store, range(8)), sink) == []
        nursery.cancel_scope.cancel()
    assert right(sink, range(8)) and sink.passed == []
    assert tracker.calls["claim"] == 0
    asked = {c: node for node, first, count in peers_.asked for c in range(first, first + count)}
    assert asked == {c: owner(META.content_key, window(c, CS), ["a", "b"]) for c in range(8)}
    assert set(asked.values()) == {"a", "b"}  # (both own some of eight)
    assert src.statistics()["owner_chunks"] == 8


async def test_a_node_that_holds_some_of_a_seeded_image_fetches_what_it_owns_and_what_it_is_asked_for(store, monkeypatch):
    from thunderfs.p2p import owners
    from thunderfs.p2p.owners import owner, window

    monkeypatch.setattr(owners, "WINDOW", 2 * CS)
    img = store.image(META.content_key, META.size)
    assert store.stage(img, 31, DATA[31 * CS:])  # this node holds some: it is an owner too
    peers_ = Peers()
    async with trio.open_nursery() as nursery:
        tracker, src = await _seeded_with_watch(store, nursery, [peer("a", [30])], peers_)
        mine = [c for c in range(16) if owner(META.content_key, window(c, CS), ["a", "me"]) == "me"]
        theirs = [c for c in range(16) if c not in mine]
        assert mine and theirs
        sink = Sink()
        assert await src.fetch(want(store, range(16)), sink) == []
        assert sink.passed == mine and right(sink, theirs)  # its own go on to the seed at once
        # A peer asks this node for chunks a owns (its view differs): fetched here, not sent on.
        assert src.fetch_for_peer(img, theirs[:1]) is not None
        sink = Sink()
        assert await src.fetch(want(store, theirs[:1]), sink) == []
        assert sink.passed == theirs[:1]
        nursery.cancel_scope.cancel()
    assert tracker.calls["claim"] == 0


@pytest.mark.parametrize("how", ["avoided", "slow"])
async def test_a_seeded_images_chunks_whose_owner_is_avoided_or_slow_are_claimed(store, how):
    """An owner that failed, or that timed out while a reader waits (a hung holder: the tracker
    still names it), is not waited for as the owner: the chunks are claimed, and the claim names
    whoever has them."""
    peers_ = Peers()
    async with trio.open_nursery() as nursery:
        tracker, src = await _seeded_with_watch(store, nursery, [peer("a", [31])], peers_)
        (src.client._avoid if how == "avoided" else src.client._slow)["a"] = trio.current_time() + 30
        sink = Sink()
        assert await src.fetch(want(store, range(4)), sink) == []
        nursery.cancel_scope.cancel()
    assert tracker.calls["claim"] == 1 and sink.passed == [0, 1, 2, 3] and peers_.asked == []


async def test_a_known_images_chunks_nobody_holds_come_from_their_owners_and_the_owners_own_are_claimed(store, monkeypatch):
    """A built manifest and a live watch: the chunks nobody holds go to their owners, asked with
    a wait (no claim for them); the ones this node owns are claimed, so that Glance sends each
    once whoever else claims (issue 27: granted to whoever claimed first, one node of 8 read the
    whole image from Glance and the other 7 took it from that one, 1.76-2.05 x one node alone)."""
    from thunderfs.p2p import owners
    from thunderfs.p2p.owners import owner, window

    monkeypatch.setattr(owners, "WINDOW", 2 * CS)
    img = store.image(META.content_key, META.size)
    assert store.stage(img, 31, DATA[31 * CS:])  # this node holds some: it is an owner too
    tracker = FakeTracker(manifest_of(), holders=[peer("a", [30])])
    _, tracker.pushes = trio.open_memory_channel(1)
    peers_ = Peers()
    src = source_of(tracker, peers_)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        assert await src.directory.manifest(META) is not None
        assert src.fetch_for_peer(img, [0]) is None  # never fetched here: not this node's to fetch
        src.directory.watches.start(META.content_key.hex(), len(DATA) // CS)
        await trio.testing.wait_all_tasks_blocked()
        mine = [c for c in range(16) if owner(META.content_key, window(c, CS), ["a", "me"]) == "me"]
        theirs = [c for c in range(16) if c not in mine]
        assert mine and theirs
        sink = Sink()
        assert await src.fetch(want(store, range(16)), sink) == []
        assert right(sink, theirs) and {n for n, _, _ in peers_.asked} == {"a"}
        assert sink.passed == mine and tracker.calls["claim"] == 1  # its own: claimed, granted
        # Asked as the owner of chunks a owns (its view differs): fetched here, claimed first.
        assert src.fetch_for_peer(img, theirs[:1]) == META
        sink = Sink()
        assert await src.fetch(want(store, theirs[:1]), sink) == []
        assert sink.passed == theirs[:1] and tracker.calls["claim"] == 2
        nursery.cancel_scope.cancel()


async def test_the_news_of_a_chunk_can_wait_while_owners_trade_the_image_or_enough_others_hold_it(store):
    """``news_wanted`` (the announcer holds deltas for which it says no): while owners trade the
    image (a manifest and a live watch), once the tracker names this node, no news is wanted soon
    (an asker finds a chunk nobody is named for through its owner); without owners, a chunk
    three other holders are named for can wait and one fewer cannot; without a live watch, or
    for a node's first chunks of the image, nothing tells: yes."""
    img = store.image(META.content_key, META.size)
    holders = [peer("a", [0, 1, 2, 3]), peer("b", [0, 1, 2]), peer("c", [0, 1]), peer("me", [0, 1, 2])]
    async with trio.open_nursery() as nursery:
        assert source_of(FakeTracker("lazy"), Peers()).news_wanted(img, {0})  # no watch: yes
        _, src = await _seeded_with_watch(store, nursery, holders, Peers())
        assert store.stage(img, 5, DATA[5 * CS:6 * CS])
        assert src.news_wanted(img, {5})  # its first: the tracker names this node from then on
        assert store.stage(img, 6, DATA[6 * CS:7 * CS])
        assert not src.news_wanted(img, {6})  # owners trade it
        src.directory._manifests.clear()  # (no manifest here now: not traded by owners)
        assert src._traded(img) is None
        for c in (0, 1, 2):
            assert store.stage(img, c, DATA[c * CS:(c + 1) * CS])
        assert not src.news_wanted(img, {0, 1})  # three others each ("me" is not counted)
        assert src.news_wanted(img, {0, 2})  # two others hold 2
        assert src.news_wanted(img, {6})  # nobody else
        # Asking does not keep the watch open: only those who act on its holders do.
        view = src.directory.watches._views[META.content_key.hex()]
        view.used = used = trio.current_time() - 5
        src.news_wanted(img, {6})
        assert view.used == used
        nursery.cancel_scope.cancel()
