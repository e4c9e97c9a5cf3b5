"""Holder watches: who holds which chunks of an image, as the tracker pushes it (``watch`` of the
tracker client), so that a node waiting for chunks learns at once that a peer has them, without
asking the tracker again and again.

A watch starts when an image's holders are first wanted and ends when nobody has wanted them for
``WATCH_IDLE`` seconds.  While it is live, ``holders_nowait`` answers from it; while it is not
(starting, failed, the tracker down or without watches), it answers None and the directory asks
the tracker as before: a watch that drops costs lookups, never a wakeup, for every waiter is woken
when it drops.  A failed watch is asked again after 1 s, then up to ``RETRY_MAX`` s; a tracker
without watches (404) is asked again after ``RETRY_MAX`` s.
The daemon starts an image's watch when the image is opened (``start``), so that it is live by the
time peers are wanted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from thunderfs_tracker.client import TrackerClient, TrackerError, TrackerRefused
from thunderfs_common.tracker_protocol import PeerRecord, WatchEvent, shared_prefix

log = logging.getLogger(__name__)

# A watch nobody consulted for this long ends.
WATCH_IDLE = 20.0
# The longest wait before a failed watch is asked again.
RETRY_MAX = 10.0
# Seconds without an event (the tracker writes one at least every 5 s) before a watch counts as dead.
SILENCE = 15.0


class _View:
    def __init__(self, nchunks: int):
        self.nchunks = nchunks
        self.peers: dict[str, PeerRecord] = {}  # in the order the tracker named them: nearest first
        self.live = False
        # Who waits for which chunks (as bits; -1: any): woken only when a holder gains one of
        # them.  Waking every waiter at every event made a crowd's waits cost each node work in
        # proportion to the crowd (issue 27: 2,159 wakeups per node as 32 nodes booted as fast as
        # they go, 413 with 8, most of them for chunks the waiter did not want).
        self.waiters: dict[object, tuple[int, trio.Event]] = {}
        self.used = trio.current_time()

    def wake(self, gained: int = -1) -> None:
        """Wake the waiters for any chunk in ``gained`` (bits; -1: every waiter)."""
        for wanted, event in self.waiters.values():
            if wanted & gained:
                event.set()


class HolderWatches:
    def __init__(self, tracker: TrackerClient, *, tracker_down: Callable[[], bool], location: tuple[str, ...] = (),
                 on_manifest: Callable[[str], None] = lambda content: None):
        """``tracker_down()``: whether the tracker is known down (no watch is asked meanwhile).
        ``location``: this node's, for the order holders are given in.  ``on_manifest(content)``:
        a watch said the image's manifest was built or revoked."""
        self._tracker = tracker
        self._down = tracker_down
        self._location = location
        self.on_manifest = on_manifest
        self._views: dict[str, _View] = {}
        self._nursery: trio.Nursery | None = None
        self._stats = dict.fromkeys(("watches", "watch_events", "watch_news", "watch_failures", "manifest_news"), 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, content: str, nchunks: int) -> _View | None:
        """The image's watch, started if there is none (None: not running yet)."""
        view = self._views.get(content)
        if view is None:
            if self._nursery is None:
                return None
            view = self._views[content] = _View(nchunks)
            self._nursery.start_soon(self._run, content, view)
        view.used = trio.current_time()
        return view

    def holders_nowait(self, content: str, nchunks: int, first: int, last: int) -> list[tuple[PeerRecord, int]] | None:
        """Peers with any of chunks first..last (absolute bits) from the image's live watch,
        which is started here if there is none; None while it is not live.  Nearest first (the
        longest location prefix shared with this node), in a new random order among equals at
        every call, as the tracker's lookups: in the order the watch named them, every waiter
        of a crowd would ask the first holder (issue 27: its uploads slowed, and chunks claimed
        from it came late and went to Glance)."""
        view = self.start(content, nchunks)
        if view is None or not view.live:
            return None
        mask = ((1 << (last - first + 1)) - 1) << first
        found = [(p, bits) for p in view.peers.values() if (bits := p.chunks & mask)]
        random.shuffle(found)
        found.sort(key=lambda held: -shared_prefix(self._location, held[0].location))  # stable: ties stay shuffled
        return found

    def members_nowait(self, content: str, *, use: bool = True) -> dict[str, PeerRecord] | None:
        """Every holder of the image its live watch named, by node id (None: no live watch).
        ``use``: the caller acts on them, so the watch stays open ``WATCH_IDLE`` longer; False
        for a look that should not keep it open (the announcer's)."""
        view = self._views.get(content)
        if view is None or not view.live:
            return None
        if use:
            view.used = trio.current_time()
        return view.peers

    def live(self, content: str) -> bool:
        """Whether the image's watch is live (it would say when its manifest changes)."""
        view = self._views.get(content)
        return view is not None and view.live

    def member(self, content: str, node_id: str) -> PeerRecord | None:
        """The record of a node the image's watch named (None: it named no such node)."""
        view = self._views.get(content)
        return view.peers.get(node_id) if view is not None else None

    async def wait_changed(self, content: str, also: trio.Event, poll: float, at_most: float | None = None,
                           *, chunks: int = -1) -> None:
        """Until a holder of the image gains one of ``chunks`` (bits; -1: any change), the
        watch ends or starts again, or ``also`` is set, or ``at_most`` seconds; with no live
        watch (nothing would say they changed), for at most ``poll`` seconds (the caller asks
        the tracker then)."""
        view = self._views.get(content)
        live = view is not None and view.live
        key, changed = object(), trio.Event()
        if live:
            view.waiters[key] = (chunks, changed)
        try:
            with trio.move_on_after(min(poll, at_most or poll) if not live else at_most or SILENCE):
                async with trio.open_nursery() as nursery:
                    async def wake_on(event: trio.Event) -> None:
                        await event.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(wake_on, also)
                    if live:
                        nursery.start_soon(wake_on, changed)
        finally:
            if live:
                del view.waiters[key]

    async def _run(self, content: str, view: _View) -> None:
        retry = 1.0
        try:
            while trio.current_time() - view.used < WATCH_IDLE:
                if self._down():
                    await trio.sleep(1.0)
                    continue
                failed = await self._watch(content, view)
                view.live = False
                view.wake()  # the waiters look again, at the tracker's lookups until the next is live
                if failed is None:  # a tracker without watches
                    await trio.sleep(RETRY_MAX)
                elif failed:
                    await trio.sleep(retry)
                    retry = min(retry * 2, RETRY_MAX)
                else:
                    retry = 1.0
        finally:
            view.live = False
            view.wake()
            if self._views.get(content) is view:
                del self._views[content]

    async def _watch(self, content: str, view: _View) -> bool | None:
        """One watch, until the tracker ends it (False), it fails (True), or nobody wants it;
        None: the tracker has no watches (404)."""
        self._stats["watches"] += 1

        def on_event(seq: int, event: WatchEvent) -> None:
            if seq == 0:
                view.peers.clear()
                view.live = True
            gained = 0  # chunks some holder has now that it did not before
            for rec, whole in event.peers:
                old = view.peers.get(rec.node_id)
                gained |= rec.chunks if old is None else rec.chunks & ~old.chunks
                if not whole and old is not None:
                    rec = PeerRecord(rec.node_id, rec.peer_url, rec.location, rec.load, old.chunks | rec.chunks)
                view.peers[rec.node_id] = rec
            self._stats["watch_events"] += 1
            if event.manifest:
                self._stats["manifest_news"] += 1
                self.on_manifest(content)
            if event.peers:
                self._stats["watch_news"] += 1
            if seq == 0:
                view.wake()  # a new watch: everybody looks again
            elif gained:
                view.wake(gained)

        async with trio.open_nursery() as nursery:
            async def idle_ends_it() -> None:
                while trio.current_time() - view.used < WATCH_IDLE:
                    await trio.sleep(WATCH_IDLE / 4)
                nursery.cancel_scope.cancel()

            nursery.start_soon(idle_ends_it)
            try:
                await self._tracker.watch(content, view.nchunks, on_event, silence=SILENCE)
            except TrackerRefused as exc:
                if exc.status == 404:
                    return None
                log.info("the tracker refused a watch of %s: %s", content, exc)
                return True
            except TrackerError as exc:
                self._stats["watch_failures"] += 1
                log.debug("a watch of %s failed: %s", content, exc)
                return True
            finally:
                nursery.cancel_scope.cancel()
        return False

    def statistics(self) -> dict:
        return {**self._stats, "watching": sum(v.live for v in self._views.values())}
