"""The announcer's heartbeats against a fake tracker (trio's autojump clock): light ones while the
node is as last announced, a full announce when its load changes, every FULL_EVERY heartbeats, when
the tracker no longer knows it, and always with a tracker that has no light heartbeat."""

from __future__ import annotations

import trio
import trio.testing

from thunderfs.p2p.announcer import FULL_EVERY, Announcer
from thunderfs_tracker.client import TrackerRefused
from thunderfs_common.tracker_protocol import AnnounceReply, NodeInfo

HEARTBEAT = 10.0
NODE = NodeInfo("a", "http://10.0.0.1:7000", ("z",), instance="aaaaaaaa11111111")


class FakeStore:
    def drain_changes(self) -> dict:
        return {}

    def changes_pending(self) -> int:
        return 0

    def contents(self) -> list:
        return []


class FakeTracker:
    urls = ["http://tracker"]
    url = "http://tracker"
    failovers = refused_answers = 0

    def __init__(self, *, light: bool = True):
        self.light = light
        self.known: str | None = None  # the instance it holds a record of
        self.calls: list[str] = []

    async def announce(self, node: NodeInfo) -> AnnounceReply:
        self.calls.append(f"announce load={node.load}")
        self.known = node.instance
        return AnnounceReply("e1", HEARTBEAT)

    async def alive(self, instance: str) -> AnnounceReply:
        self.calls.append("alive")
        if not self.light:
            raise TrackerRefused(404, "not found")
        if self.known != instance:
            raise TrackerRefused(409, "announce first")
        return AnnounceReply("e1", HEARTBEAT)

    async def send_chunks(self, full: bool, updates: list) -> str:
        return "e1"


async def beats(tracker: FakeTracker, n: int, load=lambda: 0) -> list[str]:
    """The calls of the first ``n`` heartbeats."""
    announcer = Announcer(tracker, FakeStore(), NODE, load=load)
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        while len(tracker.calls) < n:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    return tracker.calls[:n]


async def test_heartbeats_are_light_between_full_announces(autojump_clock):
    calls = await beats(FakeTracker(), 2 * FULL_EVERY + 1)
    full = [i for i, c in enumerate(calls) if c.startswith("announce")]
    assert full == [0, FULL_EVERY, 2 * FULL_EVERY]
    assert calls.count("alive") == 2 * (FULL_EVERY - 1)


async def test_a_changed_load_is_announced_in_full_at_the_next_heartbeat(autojump_clock):
    load = iter([0, 0, 3, 3, 3])
    calls = await beats(FakeTracker(), 5, load=lambda: next(load, 3))
    assert calls == ["announce load=0", "alive", "announce load=3", "alive", "alive"]


async def test_a_node_the_tracker_forgot_announces_in_full_at_once(autojump_clock):
    tracker = FakeTracker()
    calls = await beats(tracker, 2)
    tracker.known = None  # expired at the tracker
    announcer = Announcer(tracker, FakeStore(), NODE)
    announcer._epoch, announcer._last = "e1", NODE
    reply = await announcer._heartbeat()
    assert reply.epoch == "e1" and tracker.calls[len(calls):] == ["alive", "announce load=0"]
    assert announcer.statistics()["failures"] == 0


async def test_a_tracker_without_light_heartbeats_gets_full_announces(autojump_clock):
    calls = await beats(FakeTracker(light=False), 5)
    assert calls == ["announce load=0", "alive", "announce load=0", "announce load=0", "announce load=0"]


class ChangingStore(FakeStore):
    """A chunk arrives every second (a booting node): every drain has a change."""

    def __init__(self):
        self.n = 0

    def drain_changes(self) -> dict:
        from types import SimpleNamespace
        self.n += 1
        return {bytes(32): (SimpleNamespace(nchunks=64), {self.n % 64}, set())}


class DeltaTracker(FakeTracker):
    """Answers deltas as a light heartbeat (``beats``), or, as an older tracker, with the epoch."""

    def __init__(self, *, beats: bool):
        super().__init__()
        self.beats = beats
        self.deltas = 0

    async def send_chunks(self, full: bool, updates: list) -> tuple[str, float | None]:
        self.deltas += not full
        return "e1", HEARTBEAT if self.beats else None


async def _a_minute_of_deltas(tracker: DeltaTracker) -> tuple[list[str], dict]:
    announcer = Announcer(tracker, ChangingStore(), NODE)
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        await trio.sleep(59)
        nursery.cancel_scope.cancel()
    return tracker.calls, announcer.statistics()


async def test_deltas_stand_in_for_the_light_heartbeats_a_tracker_that_takes_them_as_such(autojump_clock):
    calls, stats = await _a_minute_of_deltas(DeltaTracker(beats=True))
    # A heartbeat every 10 s for 59 s: the announce at start, the light ones all deltas, and
    # the full announce every FULL_EVERY heartbeats still sent (FULL_EVERY - 1 deltas stood in
    # before it, one after).
    assert calls == ["announce load=0", "announce load=0"] and stats["deltas_as_heartbeats"] == FULL_EVERY
    calls, stats = await _a_minute_of_deltas(DeltaTracker(beats=False))  # an older tracker
    # (heartbeats at 0, 10, 20, 30, 40, 50 s: the announcer wakes for a heartbeat due before the
    # next deltas; it looked only every delta interval before, and a tracker's heartbeat shorter
    # than that expired the node)
    assert calls == ["announce load=0"] + ["alive"] * 5 and stats["deltas_as_heartbeats"] == 0


class GainingStore(FakeStore):
    """A chunk arrives every second and waits in the feed until the announcer drains it."""

    def __init__(self):
        from types import SimpleNamespace
        self.img = SimpleNamespace(nchunks=64)
        self.added: set[int] = set()
        self.n = 0

    def gain(self) -> None:
        self.added.add(self.n % 64)
        self.n += 1

    def peek_changes(self) -> dict:
        return {bytes(32): (self.img, self.added, set())} if self.added else {}

    def changes_pending(self) -> int:
        return len(self.added)

    def drain_changes(self) -> dict:
        changes, self.added = self.peek_changes(), set()
        return changes


class SentTracker(DeltaTracker):
    def __init__(self):
        super().__init__(beats=True)
        self.sent: list[tuple[float, set[int]]] = []

    async def send_chunks(self, full: bool, updates: list):
        if not full:
            self.sent.append((trio.current_time(), {c for u in updates for c in range(64) if u.add >> c & 1}))
        return await super().send_chunks(full, updates)


async def _deltas_while_gaining(news_wanted, seconds: float, tracker: SentTracker | None = None,
                                load=lambda: 0) -> tuple[SentTracker, GainingStore, dict]:
    """What the announcer sent (to ``tracker``, a new ``SentTracker`` if None) while its node
    gained a chunk a second for ``seconds``."""
    tracker, store = tracker or SentTracker(), GainingStore()
    announcer = Announcer(tracker, store, NODE, load=load, news_wanted=news_wanted)
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        for _ in range(int(seconds)):
            store.gain()
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    return tracker, store, announcer.statistics()


async def test_deltas_nobody_wants_soon_wait_for_the_heartbeat_and_stand_in_for_it(autojump_clock):
    """Chunks peers would not miss (enough others hold them) are named with the heartbeat, in one
    delta that is the heartbeat: no request of their own, and every chunk named within it."""
    wanted, _, _ = await _deltas_while_gaining(lambda img, added: True, 59)
    held, store, stats = await _deltas_while_gaining(lambda img, added: False, 59)
    assert len(wanted.sent) >= 14  # every 4 s
    assert len(held.sent) <= 6 and stats["deltas_held"] >= 8  # one per heartbeat (10 s)
    assert held.calls == ["announce load=0"]  # the light heartbeats (10, 20, ... 50 s) were deltas
    named = set().union(*(chunks for _, chunks in held.sent)) | store.added
    assert named == set(range(59))  # nothing lost: named, or still waiting to be
    gaps = [b - a for (a, _), (b, _) in zip(held.sent, held.sent[1:])]
    assert max(gaps) <= HEARTBEAT


async def test_a_delta_with_news_peers_want_goes_at_the_interval(autojump_clock):
    """Once a chunk peers would miss is among the changes, the held ones go with it at once."""
    tracker, _, _ = await _deltas_while_gaining(lambda img, added: 30 in added, 40)
    carried = [(t, chunks) for t, chunks in tracker.sent if 30 in chunks]
    assert len(carried) == 1
    t, chunks = carried[0]
    assert t < 30 + 4 + 1 and len(chunks) > 1  # at the next round, with what waited


async def test_held_deltas_wait_one_heartbeat_at_most_when_it_cannot_be_them(autojump_clock):
    """A tracker that does not take deltas as heartbeats (an older one), or a heartbeat that must
    be a full announce (the load changes every time): held deltas go right after it."""
    class OlderTracker(SentTracker):
        async def send_chunks(self, full: bool, updates: list):
            await super().send_chunks(full, updates)
            return "e1", None

    for tracker, load in ((OlderTracker(), lambda: 0), (SentTracker(), iter(range(1000)).__next__)):
        await _deltas_while_gaining(lambda img, added: False, 59, tracker, load)
        assert len(tracker.sent) >= 5
        gaps = [b - a for (a, _), (b, _) in zip(tracker.sent, tracker.sent[1:])]
        assert max(gaps) <= HEARTBEAT + 0.5
