"""The announcer's heartbeats against a fake tracker (trio's autojump clock): light ones while the
node is as last announced, a full announce when its load changes, every FULL_EVERY heartbeats, when
the tracker no longer knows it, and always with a tracker that has no light heartbeat."""

from __future__ import annotations

import trio
import trio.testing

from thunderfs.cluster.announcer import FULL_EVERY, Announcer
from thunderfs_tracker.client import TrackerRefused
from thunderfs_tracker.protocol import AnnounceReply, NodeInfo

HEARTBEAT = 10.0


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
    node = NodeInfo("a", "http://10.0.0.1:7000", ("z",), instance="aaaaaaaa11111111")
    announcer = Announcer(tracker, FakeStore(), node, load=load)
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
    node = NodeInfo("a", "http://10.0.0.1:7000", ("z",), instance="aaaaaaaa11111111")
    announcer = Announcer(tracker, FakeStore(), node)
    announcer._epoch, announcer._last = "e1", node
    reply = await announcer._heartbeat()
    assert reply.epoch == "e1" and tracker.calls[len(calls):] == ["alive", "announce load=0"]
    assert announcer.statistics()["failures"] == 0


async def test_a_tracker_without_light_heartbeats_gets_full_announces(autojump_clock):
    calls = await beats(FakeTracker(light=False), 5)
    assert calls == ["announce load=0", "alive", "announce load=0", "announce load=0", "announce load=0"]


class ChangingStore(FakeStore):
    """A store whose ``add`` makes chunks of one image servable."""

    class Img:
        nchunks = 64
        content = b"\x01" * 32

    def __init__(self):
        self.changes: dict = {}

    def add(self, *chunks: int) -> None:
        entry = self.changes.setdefault(self.Img.content, (self.Img, set(), set()))
        entry[1].update(chunks)

    def drain_changes(self) -> dict:
        changes, self.changes = self.changes, {}
        return changes


async def test_deltas_are_batched_but_a_rare_copy_goes_at_once(autojump_clock):
    """Changes go every delta_interval; one ``rare`` says others still wait for goes within a
    quarter of it, along with whatever is held back."""
    sent: list[tuple[float, set[int]]] = []

    class Recording(FakeTracker):
        async def send_chunks(self, full, updates):
            if not full:
                sent.append((trio.current_time(), {c for u in updates for c in range(64) if u.add >> c & 1}))
            return "e1"

    store = ChangingStore()
    node = NodeInfo("a", "http://10.0.0.1:7000", ("z",), instance="aaaaaaaa11111111")
    announcer = Announcer(Recording(), store, node, delta_interval=2.0, rare=lambda content, chunks: 9 in chunks)
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        await trio.sleep(2.1)  # the first batch is due now
        start = trio.current_time()
        store.add(1)
        await trio.sleep(0.6)
        assert [(round(t - start, 1), cs) for t, cs in sent] == [(0.4, {1})]  # at the next tick: due
        store.add(2)  # held back: a batch went 0.4 s after start
        await trio.sleep(0.7)
        assert announcer.statistics()["unannounced_changes"] == 1 and len(sent) == 1
        store.add(9)  # rare: at the next tick (1.4 s), with 2, not when due (2.4 s)
        await trio.sleep(0.4)
        assert [(round(t - start, 1), cs) for t, cs in sent[1:]] == [(1.4, {2, 9})]
        store.add(3)
        await trio.sleep(2.0)
        assert [(round(t - start, 1), cs) for t, cs in sent[2:]] == [(3.4, {3})]  # 2 s after the last
        nursery.cancel_scope.cancel()
