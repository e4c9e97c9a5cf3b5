"""Telling the tracker who we are and what we hold.

Announces (the heartbeat) at the tracker's pace: in full at start, when its load changed and every
``FULL_EVERY`` heartbeats (its measured RTTs), else a light heartbeat that only keeps its record
alive (what 10,000 nodes cost a tracker is mostly heartbeats).  Sends the full chunk state at start and whenever
the tracker's epoch changes (it restarted and lost peer state) or a send failed; otherwise sends
the chunks that became servable or went away, batched every ``delta_interval`` seconds (4: a
delta is most of what a booting node costs the tracker, and a node waiting for a chunk asks the
node that fetches it meanwhile, which answers when it has it, and names the nodes that took it
from there), so that a chunk this node just fetched is named to the watches of others within a
few seconds.  With 3 s instead of 2 the paced storm's tracker requests per node went from 30.7
to 26.2 (kept runs), its slowest node and Glance's egress unchanged (1.01 x, 1.15 x), and the
8-node run on 100 Mbit/s links no slower (2.05 x against 2.07; benchmarks/README.md, issue 28).
With 4 s instead of 3, the storm on a new image: 28.9 requests per node against 31.5-33.2 (its
deltas 9.3 against 12.5-12.9), slowest 1.48 x against 1.52-1.56, Glance 1.34 x against 1.33
(issue 27, ninth session; one run against three).
A tracker that answers deltas with its heartbeat has kept the node alive with them: deltas sent
when a light heartbeat was about to be due stand in for it.  Deltas nobody needs soon wait until
a heartbeat is due and are it (or go right after it, when it must be a full announce or the
tracker does not take deltas as heartbeats): ``news_wanted(img, added)`` says whether peers would
miss the news of chunks this node gained (the peer source: not while owners trade the image, for
an asker finds a chunk nobody is named for through its owner; else while fewer than a few other
holders are named for one); deltas with such chunks, or with chunks gone, go at the interval.
The first storm on a new image spent a third of its tracker requests on deltas (issue 27); held,
they cost the tracker no request of their own and the crowd's watches fewer events.  The tracker
being down costs nothing but discovery: the node keeps reading from Glance and the peers it knew.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import trio

from thunderfs.cache.image_data import ImageData
from thunderfs.cache.store import ChunkStore
from thunderfs.reachability import Reachability
from thunderfs_tracker.client import TrackerClient, TrackerError, TrackerRefused
from thunderfs_common.tracker_protocol import AnnounceReply, ChunkUpdate, NodeInfo, chunks_to_bits

log = logging.getLogger(__name__)

# Heartbeats between two full announces while the node's load stays the same.
FULL_EVERY = 6

class Announcer:
    def __init__(self, tracker: TrackerClient, store: ChunkStore, node: NodeInfo, *,
                 load: Callable[[], int] = lambda: 0, rtt: Callable[[], dict[str, float]] = dict,
                 delta_interval: float = 4.0,
                 news_wanted: Callable[[ImageData, set[int]], bool] = lambda img, added: True):
        self._tracker = tracker
        self._store = store
        self._node = node
        self._load = load
        self._rtt = rtt
        self._interval = delta_interval
        self._news_wanted = news_wanted
        self._epoch: str | None = None
        self._reach = Reachability(f"tracker {','.join(tracker.urls)}")
        self._sending = 0  # changes drained and not yet acknowledged by the tracker
        self._refused = False  # the tracker refuses this node id (another node has it)
        self._last: NodeInfo | None = None  # as last announced in full
        self._light_beats = 0  # light heartbeats since then
        self._light = True  # False: the tracker has no light heartbeat (an older one)
        self._stats = dict.fromkeys(("announces", "light_heartbeats", "full_states", "deltas", "deltas_as_heartbeats",
                                     "deltas_held", "failures"), 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_announce = 0.0
        while True:
            try:
                if (self._epoch is not None and trio.current_time() >= next_announce
                        and self._store.changes_pending() and self._may_be_light()):
                    # A light heartbeat is due and changes wait (held, or new): the deltas are it,
                    # if the tracker takes them as one.
                    beat = await self._send_deltas()
                    if beat is not None:
                        next_announce = self._stood_in(beat)
                beat_sent = self._epoch is None or trio.current_time() >= next_announce
                if beat_sent:
                    reply = await self._heartbeat()
                    next_announce = trio.current_time() + reply.heartbeat
                    if reply.epoch != self._epoch:
                        await self._send_full()
                        self._epoch = reply.epoch
                # Held deltas wait one heartbeat at most: after one that they could not be (a full
                # announce, or a tracker that does not take deltas as heartbeats), they go.
                beat = await self._send_deltas(hold=not beat_sent)
                if beat is not None and trio.current_time() + self._interval >= next_announce and self._may_be_light():
                    # The tracker took the deltas as a light heartbeat, and one was due before the
                    # next deltas: they were it (a booting node's heartbeats were a fifth of what
                    # it cost the tracker, issue 27).
                    next_announce = self._stood_in(beat)
                self._reach.up()
                if self._refused:
                    log.warning("the tracker accepts this node's id again")
                    self._refused = False
            except TrackerRefused as exc:
                self._stats["failures"] += 1
                self._epoch = None
                next_announce = trio.current_time() + 5.0
                if exc.status == 409 and not self._refused:
                    # Another live daemon announces this node id: say so once, loudly, and go on
                    # trying (it may be this node's own record from a cache that was wiped).
                    log.error("the tracker refuses this node: %s", exc)
                self._refused = exc.status == 409
                if not self._refused:
                    self._reach.down(str(exc), "reading from Glance and the peers already known")
            except TrackerError as exc:
                self._stats["failures"] += 1
                self._epoch = None  # what we hold is resent in full once it answers again
                next_announce = trio.current_time() + 2.0
                self._reach.down(str(exc), "reading from Glance and the peers already known")
            # Deltas every interval, and the heartbeat when the tracker wants it, if that is
            # sooner (a tracker's heartbeat shorter than the interval must not expire the node).
            # (At least 0.1 s: a tracker that asked for a heartbeat every millisecond gets ten a second.)
            await trio.sleep(max(0.1, min(self._interval, next_announce - trio.current_time())))

    def _stood_in(self, beat: float) -> float:
        """Deltas the tracker took as a light heartbeat were this one: when the next is due."""
        self._light_beats += 1
        self._stats["deltas_as_heartbeats"] += 1
        return trio.current_time() + beat

    def _may_be_light(self, load: int | None = None) -> bool:
        """Whether the next heartbeat may be light: the tracker knows this node as it is now
        (its load unchanged) and a full announce is not due."""
        last = self._last
        return (self._light and self._epoch is not None and last is not None
                and last.load == (self._load() if load is None else load) and self._light_beats < FULL_EVERY - 1)

    async def _heartbeat(self) -> AnnounceReply:
        """A light heartbeat if the tracker knows this node as it is now, else an announce."""
        node = dataclasses.replace(self._node, load=self._load(), rtt_ms=self._rtt())
        if self._may_be_light(node.load):
            try:
                reply = await self._tracker.alive(node.instance)
            except TrackerRefused as exc:  # expired, or taken meanwhile (409): in full, now
                self._light = exc.status != 404  # 404: a tracker without light heartbeats
            else:
                self._light_beats += 1
                self._stats["light_heartbeats"] += 1
                return reply
        reply = await self._tracker.announce(node)
        self._last, self._light_beats = node, 0
        self._stats["announces"] += 1
        return reply

    async def _send_full(self) -> None:
        self._store.drain_changes()  # the full state includes them
        updates = []
        for img in self._store.contents():
            bits = img.held_bits()
            if bits:
                updates.append(ChunkUpdate(img.content.hex(), img.nchunks, add=bits, full=True))
        await self._tracker.send_chunks(True, updates)
        self._stats["full_states"] += 1

    def _news_due(self) -> bool:
        """Whether a change waiting to be sent is news peers want soon: a chunk gone, or one
        gained that they would miss (``news_wanted``)."""
        return any(removed or (added and self._news_wanted(img, added))
                   for img, added, removed in self._store.peek_changes().values())

    async def _send_deltas(self, hold: bool = False) -> float | None:
        """The chunks that changed since the last send (``hold``: unless none of them is news
        peers want soon); the tracker's heartbeat if it took them as a light heartbeat (None:
        nothing sent, or not taken as one)."""
        if hold and self._store.changes_pending() and not self._news_due():
            self._stats["deltas_held"] += 1
            return None
        changes = self._store.drain_changes()
        if not changes:
            return None
        updates = [ChunkUpdate(content.hex(), img.nchunks, add=chunks_to_bits(added), remove=chunks_to_bits(removed))
                   for content, (img, added, removed) in changes.items()]
        self._sending = sum(len(added) + len(removed) for _, added, removed in changes.values())
        try:
            epoch, beat = await self._tracker.send_chunks(False, updates)
        finally:
            self._sending = 0
        self._stats["deltas"] += 1
        if epoch != self._epoch:
            self._epoch = None
            return None
        return beat

    def statistics(self) -> dict:
        unsent = self._store.changes_pending() + self._sending
        return {**self._stats, "unannounced_changes": unsent,
                "in_sync": self._epoch is not None and not unsent,  # the tracker knows what this node holds
                "tracker_ok": self._reach.ok, "tracker": self._tracker.url, "node_id_refused": self._refused,
                "tracker_failovers": self._tracker.failovers,
                "tracker_answers_refused": self._tracker.refused_answers}
