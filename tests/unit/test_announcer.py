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
