"""Claims: before a node fetches chunks from Glance it tells the tracker, which grants it the
chunks nobody else has or is fetching and names the nodes that do for the rest.  Those chunks are
then taken from peers as they appear at the claimer, so that a crowd of nodes booting one image
makes Glance send each chunk about once.

Waiters for the same new chunks take different pieces from the claimer, then trade them among
themselves; a claimer that fails hands its chunks back to the caller at once, one that is slow is
waited for (bounded), and a reader waiting on a slow claimer that already holds its chunks waits
only ``SLOW_HOLDER_PATIENCE`` peer timeouts.  While nobody holds them yet, a waiter asks the
claimer itself to answer when they arrive (``wait``: the holder tells its waiters) instead of
asking the tracker again and again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import httpx
import trio

from thunderfs.cache.store import ImageData
from thunderfs.p2p.asking import Asker
from thunderfs.p2p.peer_client import Answer, PeerClient
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs_common.chunk_runs import runs
from thunderfs_common.image import ImageMeta
from thunderfs_tracker.client import TrackerClient, TrackerError
from thunderfs_common.tracker_protocol import PeerRecord

log = logging.getLogger(__name__)

class ClaimTaker:
    # The size of a request for chunks that are still arriving at the node that fetches them.
    PIECE = 2**20
    # How many such pieces one waiting flight asks for at once, from different peers.
    WORKERS = 6
    # How many of those requests this node has outstanding at one peer: a crowd of waiters all
    # asking the first holder at once would bury it (it times out, and everybody goes to Glance).
    PER_PEER = 2
    # How long a reader waits for chunks a slow peer already holds (times the peer timeout) while
    # other holders appear, before Glance: a hung sole holder costs a reader this, no more.
    SLOW_HOLDER_PATIENCE = 2
    # How long one request waits at the claimer for chunks it is fetching (its server answers as
    # they arrive); then the waiter looks at the holders again.
    PUSH_WAIT = 5.0
    # How many polls apart a waiter asks the tracker for holders while a request waits at the
    # claimer (the claimer's answer, not the tracker, says when its chunks are there).
    PUSHING_LOOKUP_SLOWER = 4
    # How long a relay that a peer named (it took the chunks from that peer a moment ago) is
    # asked to wait for them: it may still be checking them.
    HINT_WAIT = 1.0

    def __init__(self, tracker: TrackerClient, directory: PeerDirectory, client: PeerClient, asker: Asker, *,
                 chunk_size: int, timeout: float = 2.0, max_request_chunks: int = 256, poll: float = 0.25):
        self._tracker = tracker
        self._directory = directory
        self._client = client
        self._asker = asker
        self.timeout = timeout
        # How often a node waiting for chunks another node is fetching from Glance looks again.
        self.poll = poll
        self._piece = max(1, min(max_request_chunks, self.PIECE // chunk_size))
        self._asking: dict[str, int] = {}  # pieces outstanding per peer
        # Peer -> the events of takes held back by PER_PEER there: set when an ask of it ends.
        # (one entry per waiting worker, in the order they began to wait: its take's ``changed``)
        self._capped: dict[str, dict[object, list[trio.Event]]] = {}
        self._stats = dict.fromkeys(("claims", "claim_failures", "claim_retries", "claim_waits", "claim_pushes",
                                     "claims_skipped", "relays_named", "late_rescued", "stale_claims"), 0)

    async def claim(self, meta: ImageMeta, img: ImageData, chunks: list[int],
                    *, tries: int = 1) -> tuple[list[int], list[tuple[PeerRecord, list[int], bool]]]:
        """Before fetching ``chunks`` from Glance: (chunks this node may fetch, [(peer, chunks it
        is fetching or holds, whether it holds them)]).  Without a manifest, or with the tracker
        down, everything is granted.  A tracker that is slow (not down) is asked up to ``tries``
        times: a background fetch had better wait than fetch from Glance what a crowd of other
        nodes is fetching too."""
        if self._directory.manifest_nowait(meta) is None:
            return chunks, []
        if self._directory.tracker_breaker.is_open:
            self._stats["claims_skipped"] += 1
            return chunks, []
        for attempt in range(1, tries + 1):
            try:
                with trio.fail_after(self.timeout):
                    granted, others = await self._tracker.claim(img.content.hex(), img.nchunks, chunks)
                break
            except (TrackerError, trio.TooSlowError) as exc:
                slow = isinstance(exc, trio.TooSlowError) or isinstance(exc.__cause__, httpx.TimeoutException)
                if slow and attempt < tries:
                    self._stats["claim_retries"] += 1
                    continue
                self._stats["claim_failures"] += 1
                log.debug("claim failed: %r", exc)
                self._directory.tracker_down(exc)
                return chunks, []
        self._directory.tracker_breaker.close()
        self._stats["claims"] += 1
        # A peer that has failed or lied is not waited for.  One that was slow a moment ago is:
        # on a loaded host every peer is slow now and then, and skipping them sends the whole
        # crowd to Glance (take bounds the wait for a slow holder).
        others = [(p, cs, held) for p, cs, held in others if not self._client.avoided(p.node_id)]
        granted = sorted(set(chunks) - {c for _, cs, _ in others for c in cs})
        return granted, others

    async def take(self, meta: ImageMeta, img: ImageData, claimer: PeerRecord, chunks: list[int], wait: float,
                   put: Callable[[int, bytes], None], *, held: bool = False, urgent: bool = True) -> list[int]:
        """Take ``chunks``, which ``claimer`` is fetching from Glance, as they appear, for at most
        ``wait`` seconds: from whichever peers hold them by then, nodes that already took them
        from the claimer before the claimer itself (so that its uplink is not the only one that
        carries them), a few pieces at once from different peers.  ``put(first, bytes)``
        receives each verified run.  Returns the chunks not delivered (the caller fetches them
        from Glance), at once if the claimer fails (a slow claimer is waited for; if it already
        ``held`` them and a reader waits (``urgent``), only for SLOW_HOLDER_PATIENCE timeouts)."""
        manifest = self._directory.manifest_nowait(meta)
        if manifest is None:
            return sorted(chunks)
        capped = urgent and held and self._client.slow(claimer.node_id)
        if capped:
            wait = min(wait, self.SLOW_HOLDER_PATIENCE * self.timeout)
        take = _Take(self, img, manifest, claimer, set(chunks), put, trio.current_time() + wait)
        with trio.move_on_after(wait):
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.WORKERS, -(-len(take.pending) // self._piece))):
                    nursery.start_soon(take.worker)
        if take.pending and capped and not take.claimer_failed:
            await self._last_chance(img, manifest, take.pending, claimer, put)
        return sorted(take.pending)

    @staticmethod
    def _changed(changed: list[trio.Event]) -> None:
        """Wake a take's workers: its event is set, and a fresh one is theirs to wait on next
        (a set event left in place would make every later wait return at once: a busy loop)."""
        changed[0].set()
        changed[0] = trio.Event()

    def _wake_capped(self, node: str) -> None:
        """As many takes held back at ``node`` as it has asks free now (one, as a rule): waking
        them all made the takes of a crowd all run at every ask's end."""
        waiting = self._capped.get(node)
        free = self.PER_PEER - self._asking.get(node, 0)
        while waiting and free > 0:
            self._changed(waiting.pop(next(iter(waiting))))
            free -= 1
        if waiting is not None and not waiting:
            del self._capped[node]

    def _pick(self, holders: list[tuple[PeerRecord, int]], wanted: set[int], claimer: PeerRecord,
              resting: dict[str, float], capped: set[str], later: dict[str, float]) -> tuple[PeerRecord, int, int] | None:
        """The best-ranked peer that can be asked for some of ``wanted`` (the claimer last), and a
        random piece of what it holds (bits -1: of any of them).  A peer slow a moment ago is
        skipped (the claimer excepted): asking it too made a loaded crowd collapse (issue 27:
        with 128-chunk batches, peers delivered nothing for 12 s and Glance sent 14-21 x a boot).
        Peers that have some but that this node already asks PER_PEER times go into ``capped``,
        and when those skipped for now (resting, slow, avoided) may be asked again into ``later``."""
        now = trio.current_time()
        ranked = sorted(holders, key=lambda held: held[0].node_id == claimer.node_id)
        for peer, bits in ranked:
            node = peer.node_id
            pieces = runs(sorted(c for c in wanted if bits >> c & 1), self._piece)
            if not pieces:
                continue
            if resting.get(node, 0) > now or self._client.avoided(node):
                later[node] = max(resting.get(node, 0), self._client.askable_at(node))
                continue
            if node != claimer.node_id and self._client.slow(node):
                later[node] = self._client.askable_at(node)
                continue
            if self._asking.get(node, 0) >= self.PER_PEER:
                capped.add(node)
                continue
            return (peer, *random.choice(pieces))
        return None

    async def _last_chance(self, img: ImageData, manifest, pending: set[int], claimer: PeerRecord,
                           put: Callable[[int, bytes], None]) -> None:
        """Once, within one peer timeout: each piece of ``pending`` from one holder the view
        names, slow or not (the claimer last), before it goes to Glance.  Only a reader's take
        cut short by a slow claimer comes here: on a loaded host every peer is slow now and
        then, and its chunks went to Glance although the crowd held them (issue 27: the paced
        storm's duplicate Glance bytes were exactly such late chunks)."""
        with trio.move_on_after(self.timeout):  # the holders too: without a live watch, a lookup
            holders = await self._directory.holders(img, min(pending), max(pending))
            holders = [h for h in holders if not self._client.avoided(h[0].node_id)]
            holders.sort(key=lambda held: (held[0].node_id == claimer.node_id, self._client.slow(held[0].node_id)))
            async with trio.open_nursery() as nursery:
                for rfirst, rcount in runs(sorted(pending), self._piece):
                    whole = ((1 << rcount) - 1) << rfirst
                    peer = next((p for p, bits in holders if bits & whole == whole), None)
                    if peer is not None:
                        nursery.start_soon(self._rescue, peer, img, manifest, rfirst, rcount, pending, put)

    async def _rescue(self, peer: PeerRecord, img: ImageData, manifest, first: int, count: int, pending: set[int],
                      put: Callable[[int, bytes], None]) -> None:
        reply = await self._asker.ask(peer, img, manifest, first, count)
        if reply.answer is Answer.OK:
            put(first, reply.data)
            pending.difference_update(range(first, first + count))
            self._stats["late_rescued"] += count

    def statistics(self) -> dict:
        return dict(self._stats)


class _Take:
    """One ``ClaimTaker.take``: its workers share what is still wanted (``pending``), what is
    being asked for (``taking``), the peers resting after a busy or slow answer, and the relays
    peers named; the taker's counts of asks per peer are every take's."""

    def __init__(self, taker: ClaimTaker, img: ImageData, manifest, claimer: PeerRecord, pending: set[int],
                 put: Callable[[int, bytes], None], give_up: float):
        self.taker = taker
        self.img = img
        self.manifest = manifest
        self.claimer = claimer
        self.pending = pending
        self.put = put
        self.give_up = give_up
        self.taking: set[int] = set()
        self.resting: dict[str, float] = {}  # peers that were busy or slow: not asked again until then
        # Relays the peers asked named (nodes that took some of these chunks from them), of those
        # the tracker's watch named: node -> (record, chunks as bits).
        self.hinted: dict[str, tuple[PeerRecord, int]] = {}
        self.claimer_failed = False
        self.changed = [trio.Event()]  # set whenever an ask of this take ends, or frees a capped peer

    async def worker(self) -> None:
        taker = self.taker
        while self.pending and not self.claimer_failed:
            # While the claimer is asked to answer when it has them, the tracker is asked
            # less often: it only finds nodes that took them from the claimer meanwhile.
            pushing = taker._asking.get(self.claimer.node_id, 0) > 0
            age = taker.poll * taker.PUSHING_LOOKUP_SLOWER if pushing else taker.poll
            holders, known = await self._holders(age)
            capped: set[str] = set()  # peers skipped because this node asks them PER_PEER times
            later: dict[str, float] = {}  # peers skipped for now (resting, slow, avoided): until when
            choice = taker._pick(holders, self.pending - self.taking, self.claimer, self.resting, capped, later)
            push = 0.0
            if choice is None:  # nobody has them yet: the claimer answers when it has
                if (taker._client.avoided(self.claimer.node_id) and not later.keys() - {self.claimer.node_id}
                        and not capped):
                    # It failed since the claim (another take found out), and nobody else
                    # holds any of them: waiting would only wait out ``wait``.
                    self.claimer_failed = True
                    break
                choice = taker._pick([(self.claimer, -1)], self.pending - self.taking, self.claimer, self.resting,
                                     capped, later)
                push = min(taker.PUSH_WAIT, self.give_up - trio.current_time())
                if choice is None or push <= 0:
                    taker._stats["claim_waits"] += 1
                    await self._wait_for_news(age, capped, later)
                    continue
                taker._stats["claim_pushes"] += 1
            peer = choice[0]
            if peer.node_id in self.hinted and peer.node_id not in known:
                push = taker.HINT_WAIT
            await self._ask(*choice, push)

    async def _holders(self, age: float) -> tuple[list[tuple[PeerRecord, int]], set[str]]:
        """The holders the directory knows (no older than ``age``), with the relays peers named
        merged in; and the nodes the directory named."""
        holders = await self.taker._directory.holders(self.img, min(self.pending), max(self.pending), max_age=age)
        known = {peer.node_id for peer, _ in holders}
        hinted = self.hinted
        holders = [(peer, bits | hinted[peer.node_id][1] if peer.node_id in hinted else bits)
                   for peer, bits in holders] + [h for node, h in hinted.items() if node not in known]
        return holders, known

    async def _wait_for_news(self, age: float, capped: set[str], later: dict[str, float]) -> None:
        """Until an ask ends, the image's watch names a holder of one of them, or a peer skipped
        for now may be asked again; without a watch, a poll (a second while the claimer is asked:
        a longer wait left relays idle when links, not the tracker, bound a crowd reading whole
        images: 2.39 x one node alone against 2.07).  Waking only for news made a take whose
        holders were slow sleep until its wait ran out (the chaos run's final read failed so
        once, Glance up)."""
        taker = self.taker
        now = trio.current_time()
        rest = min((t - now for t in later.values() if t > now), default=None)
        # A take held back by other takes' asks (PER_PEER counts them all) goes on when one of
        # them ends: it slept until a poll, and 64 readers of one holder starved behind two asks
        # until their reads failed.  Only those takes are woken, not every take of the node.
        me = object()
        for node in capped:
            taker._capped.setdefault(node, {})[me] = self.changed
        try:
            await taker._directory.wait_holders(self.img, self.changed[0], age, rest, chunks=self.pending)
        finally:
            for node in capped:
                if (waiting := taker._capped.get(node)) is not None:
                    waiting.pop(me, None)
                    if not waiting:
                        del taker._capped[node]

    async def _ask(self, peer: PeerRecord, rfirst: int, rcount: int, push: float) -> None:
        """One piece asked of ``peer`` (``push``: waiting there that long for it), and what the
        answer says done."""
        taker = self.taker
        piece = range(rfirst, rfirst + rcount)
        self.taking.update(piece)
        taker._asking[peer.node_id] = taker._asking.get(peer.node_id, 0) + 1
        try:
            reply = await taker._asker.ask(peer, self.img, self.manifest, rfirst, rcount, wait=push)
        finally:
            self.taking.difference_update(piece)
            if (left := taker._asking.pop(peer.node_id) - 1) > 0:
                taker._asking[peer.node_id] = left
            taker._changed(self.changed)
            taker._wake_capped(peer.node_id)
        for node, bits in reply.takers:
            rec, had = self.hinted.get(node) or (taker._directory.member(self.img, node), 0)
            if rec is not None:
                self.hinted[node] = (rec, had | bits)
                taker._stats["relays_named"] += 1
        if reply.answer is Answer.OK:
            self.put(rfirst, reply.data)
            self.pending.difference_update(piece)
        elif (reply.answer in (Answer.FAILED, Answer.LIED, Answer.NOT_FETCHING)
              and peer.node_id == self.claimer.node_id):
            # NOT_FETCHING: the claim is stale (its fetch failed, as in a Glance outage, or
            # ended): the chunks are not coming from there.
            taker._stats["stale_claims"] += reply.answer is Answer.NOT_FETCHING
            self.claimer_failed = True
        elif reply.answer in (Answer.BUSY, Answer.SLOW, Answer.NOT_HELD, Answer.NOT_FETCHING):
            self.resting[peer.node_id] = trio.current_time() + taker.poll
