"""Peers as a source of chunks (``source.Source``): first what peers hold, then claims.

A peer's bytes are trusted only if every chunk's digest matches the image's manifest, which the
tracker built from Glance's bytes and bound to Glance's ``os_hash_value`` (checked again against
the listing's, ``peer_directory``).  Until a manifest exists, nothing comes from peers.  A peer
that times out, fails or answers 503 is skipped for this fetch (and avoided a while if it failed,
``peer_client``); one that sends a wrong chunk is reported to the tracker and avoided for a long
while.  Then the rest is claimed at the tracker (``claims``): what this node is granted goes on
to Glance at once, what other nodes are fetching is taken from them as it appears.  Chunks nobody
holds have an owner (``owners``), which stands in for the claim: this node fetches what it owns
(from the seed while the tracker seeds the image, unclaimed; from Glance once it has a manifest,
claimed), and asks the owner for the rest, which fetches it when asked.  Every error
stays inside: ``fetch`` returns what it did not deliver and the fetcher asks Glance for it.
"""

from __future__ import annotations

import functools
import logging

import trio

from thunderfs.cache.fresh import Buffer
from thunderfs.cache.store import ImageData
from thunderfs.p2p.alike import Alikes
from thunderfs.p2p.asking import Asker
from thunderfs.p2p.claims import ClaimTaker
from thunderfs.p2p import owners
from thunderfs.p2p.peer_client import Answer, PeerClient
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs.p2p.plans import CLAIM_TRIES_BACKGROUND, PLAN_TTL, Plans  # noqa: F401 (PLAN_TTL: tests)
from thunderfs.fetch.range_http import HTTPClient
from thunderfs.fetch.slots import DEMAND
from thunderfs.fetch.source import MIN_RATE, Sink, Want, deadline_for
from thunderfs.fetch.zero_chunks import ZeroChunks
from thunderfs_common.chunk_runs import runs
from thunderfs_common.image import ImageMeta
from thunderfs_common.manifest_proof import Ed25519PublicKey
from thunderfs_tracker.client import TrackerClient
from thunderfs_common.tracker_protocol import Manifest, PeerRecord, chunks_to_bits

log = logging.getLogger(__name__)

# The longest a flight waits for chunks another node claimed before fetching them from Glance itself.
CLAIM_WAIT_MAX = 60.0
# The share of the fetch timeout a reader's own flight waits for them: the rest is Glance's, so
# that a reader gets its bytes, from Glance if need be, before its own deadline (a wait of the
# whole timeout failed reads while Glance was up: 64 readers of one holder, issue 28).
CLAIM_WAIT_DEMAND = 0.5
# How long readahead and prefetch wait for a tracker known down (a lookup or claim of this node's
# failed) before fetching from Glance unclaimed.  In a boot storm the tracker is slow for the
# first seconds, and every unclaimed background fetch sends Glance what the crowd is fetching too;
# a reader that joins the flight (it becomes a demand fetch) ends the wait.
TRACKER_PATIENCE = 10.0
# Holders other than this node that the image's watch names, from which the news that this node
# gained a chunk can wait (``news_wanted``): askers find those and the relays they name.
NEWS_ENOUGH = 3


def _put(sink: Sink, on_free, first: int, data) -> None:
    """A peer's checked answer to the cache, which may hold it (its memory is this answer's
    alone: ``peer_client`` receives each into memory of its own) and serve from it; the memory
    goes back to ``on_free`` once the cache is done with it (at once where it was not held)."""
    if not (isinstance(data, memoryview) and not data.readonly):
        sink.put(first, data)
        return
    buffer = Buffer.wrap(data, on_free)
    try:
        sink.put(first, data, buffer)
    finally:
        buffer.drop()  # this source's reference: read nowhere after this


class PeerSource:
    name = "peers"

    def __init__(self, tracker: TrackerClient, *, node_id: str, secret: bytes | None, chunk_size: int,
                 timeout: float = 2.0, fetch_timeout: float = 20.0, lookup_window: int = 1024,
                 lookup_ttl: float = 2.0, max_request_chunks: int = 256, claim_poll: float = 0.25,
                 min_rate: float = 2**20, tracker_key: Ed25519PublicKey | None = None,
                 location: tuple[str, ...] = (), on_revoked=None, on_manifest=None,
                 http: HTTPClient | None = None):
        """``location``: this node's (zone, rack, host), which orders the holders a watch names.
        ``on_revoked(meta, why)``: the tracker revoked an image's lazy manifest (the daemon
        drops the image's cached chunks).  ``on_manifest(meta, manifest)``: an image's whole
        manifest was accepted (the daemon gives the cache its digests)."""
        self._tracker = tracker
        self._on_revoked = on_revoked
        self._cs = chunk_size
        self.timeout = timeout
        self._fetch_timeout = fetch_timeout
        self._max = max_request_chunks
        self.client = PeerClient(node_id=node_id, secret=secret, chunk_size=chunk_size, timeout=timeout,
                                 min_rate=min_rate, http=http)  # tests: fakes.MockHTTP
        self.directory = PeerDirectory(tracker, chunk_size=chunk_size, timeout=timeout, lookup_window=lookup_window,
                                       lookup_ttl=lookup_ttl, min_rate=min_rate, tracker_key=tracker_key,
                                       secret=secret, location=location, on_revoked=self._revoked,
                                       on_manifest=on_manifest)
        self.asker = Asker(tracker, self.directory, self.client, timeout=timeout)
        self.claims = ClaimTaker(tracker, self.directory, self.client, self.asker, chunk_size=chunk_size,
                                 timeout=timeout, max_request_chunks=max_request_chunks, poll=claim_poll)
        self.plans = Plans(self.directory, self.client, self.claims)
        self.alikes = Alikes(tracker, self.directory, self.client, self.asker, chunk_size=chunk_size,
                             timeout=timeout, max_request_chunks=max_request_chunks)
        self._node_id = node_id
        # content -> chunks peers asked this node for as their owner (``fetch_for_peer``): its
        # flights fetch them without a claim and without asking another owner.
        self._asked: dict[bytes, set[int]] = {}
        self._metas: dict[bytes, ImageMeta] = {}  # content -> the image, of those fetched lately
        self._zeros: dict[bytes, ZeroChunks] = {}  # content -> its zero chunks, of images sought lately
        self._stats = dict.fromkeys(("no_manifest", "granted_chunks", "claimed_chunks_late", "claims_deferred",
                                     "owned_chunks",
                                     "owner_chunks", "fetched_for_peers"), 0)

    # --- what the daemon wires -------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.directory.tracker_breaker.run)
            await self.directory.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.client.aclose()

    def prepare(self, meta: ImageMeta) -> None:
        self.directory.prepare(meta)

    async def wait_manifest(self, meta: ImageMeta, timeout: float = 10.0) -> bool:
        return await self.directory.wait_manifest(meta, timeout)

    # How long an lseek waits for the manifest it answers from (asked for at the open already).
    ZEROS_WAIT = 3.0
    ZEROS_KEPT = 16

    async def zero_chunks(self, meta: ImageMeta) -> ZeroChunks | None:
        """The chunks the image's whole manifest says are zeros (``Readers``' ``zeros``); None
        while there is none (no tracker, or one that has not checked the whole image yet)."""
        key = meta.content_key
        zeros = self._zeros.pop(key, None)
        if zeros is None:
            with trio.move_on_after(self.ZEROS_WAIT):
                manifest = await self.directory.manifest(meta)
                if isinstance(manifest, Manifest):
                    zeros = ZeroChunks.of(manifest)
            if zeros is None:
                return None
        self._zeros[key] = zeros  # the latest last
        while len(self._zeros) > self.ZEROS_KEPT:
            del self._zeros[next(iter(self._zeros))]
        return zeros

    def _revoked(self, meta: ImageMeta, why: str) -> None:
        self.plans.drop(meta.content_key)
        if self._on_revoked is not None:
            self._on_revoked(meta, why)

    def rtt_ms(self) -> dict[str, float]:
        return self.client.rtt_ms()

    def sources_of(self, content: bytes) -> dict[str, int]:
        return self.client.sources_of(content)

    async def plan(self, meta: ImageMeta, img: ImageData, chunks: list[int]) -> None:
        """One claim for a batch of chunks about to be fetched (``plans``)."""
        await self.plans.plan(meta, img, chunks)

    def will_fetch(self, img: ImageData, chunk: int) -> bool:
        """Whether this node has claimed ``chunk`` for a flight that has not started yet (a
        prefetch batch's plan), or is claiming it now: the peer server keeps waiters for it."""
        return self.plans.will_fetch(img, chunk)

    def fetch_for_peer(self, img: ImageData, chunks: list[int]) -> ImageMeta | None:
        """A peer asked this node, as their owner (``owners``), for ``chunks`` it neither holds
        nor fetches: the image's meta if they are to be fetched here (the image has a manifest;
        the daemon starts the flight), else None (the peer is told so)."""
        meta = self._traded(img)
        if meta is None:
            return None
        self._asked.setdefault(img.content, set()).update(chunks)
        self._stats["fetched_for_peers"] += len(chunks)
        return meta

    def _traded(self, img: ImageData) -> ImageMeta | None:
        """The image, if its chunks are traded by owners: it has a manifest here (lazy while the
        tracker seeds it, or built) and this node fetched some of it lately."""
        lazy = self.directory.lazy_manifest(img.content)
        if lazy is not None:
            return lazy.meta
        meta = self._metas.get(img.content)
        return meta if meta is not None and self.directory.manifest_nowait(meta) is not None else None

    def news_wanted(self, img: ImageData, added: set[int]) -> bool:
        """Whether peers would miss the news that this node gained ``added`` until the next
        heartbeat.  Not while the image's chunks are traded by owners and the tracker names this
        node among its holders (it was told some before): an asker finds a chunk nobody is named
        for through its owner, which holds it, fetches it, or names who took it from there.
        Otherwise: whether fewer than ``NEWS_ENOUGH`` other holders are named for some of them
        (without a live watch nothing tells: yes).  A look that does not keep the watch open."""
        members = self.directory.members_nowait(img, use=False)
        if members is None or img.cached_count() <= len(added):
            return True  # nothing tells; or the first news of it: the tracker names this node from then on
        if self._traded(img) is not None:
            return False
        wanted = chunks_to_bits(added)
        more_than = [0] * NEWS_ENOUGH  # [k]: the chunks more than k others hold (bit-sliced counts)
        for node, rec in members.items():
            if node != self._node_id and (held := rec.chunks & wanted):
                for k in range(NEWS_ENOUGH - 1, 0, -1):
                    more_than[k] |= more_than[k - 1] & held
                more_than[0] |= held
        return bool(wanted & ~more_than[-1])

    def _take_asked(self, img: ImageData, chunks: list[int]) -> set[int]:
        """Which of ``chunks`` peers asked this node for (``fetch_for_peer``), now no longer."""
        asked = self._asked.get(img.content)
        if not asked:
            return set()
        mine = asked.intersection(chunks)
        asked.difference_update(mine)
        if not asked:
            del self._asked[img.content]
        return mine

    def _owned(self, img: ImageData, chunks: list[int], asked: set[int],
               urgent: bool = False) -> tuple[list[int], dict[str, tuple[PeerRecord, list[int], bool]], list[int]]:
        """While the image has a manifest and a live watch: (chunks this node owns or was
        ``asked`` for, {node: (owner, the chunks it owns, False)}, chunks to claim: every one of
        them otherwise, and those whose owner this node avoids, or, for a reader waiting
        (``urgent``), found slow: a hung holder must not keep a reader waiting as their owner,
        where a claim names whoever else has them; readahead waits for a busy owner).  This node
        is among the owners once it holds some of the image, as the tracker then names it."""
        if self._traded(img) is None:
            return [], {}, chunks
        members = self.directory.members_nowait(img)
        if not members:
            return [c for c in chunks if c in asked], {}, [c for c in chunks if c not in asked]
        names = list(members) + ([self._node_id] if img.cached_count() else [])
        mine: list[int] = []
        theirs: dict[str, tuple[PeerRecord, list[int], bool]] = {}
        rest: list[int] = []
        by_window: dict[int, str] = {}  # a flight's chunks share a few windows: each hashed once
        for c in chunks:
            if c in asked:
                node = self._node_id
            else:
                w = owners.window(c, self._cs)
                if w not in by_window:
                    by_window[w] = owners.owner(img.content, w, names)
                node = by_window[w]
            if node == self._node_id:
                mine.append(c)
            elif self.client.avoided(node) or (urgent and self.client.slow(node)):
                rest.append(c)  # claimed: the tracker names who else holds or fetches them
            else:
                theirs.setdefault(node, (members[node], [], False))[1].append(c)
        self._stats["owned_chunks"] += len(mine)
        self._stats["owner_chunks"] += len(chunks) - len(mine) - len(rest)
        return mine, theirs, rest

    # --- the source ------------------------------------------------------------------------

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        """What the batch's plan covers as it says; the rest first from what peers hold (verified).
        What nobody holds as this image's, and what the plan gives this node to fetch, first
        from peers holding it as another image's chunk of the same digest (``alike``); then,
        while the tracker seeds the image, from their owners (``owners``), else claimed at the
        tracker.  The chunks this node is granted go on to Glance at once
        (``sink.pass_on``), while those other nodes hold or are fetching are taken from them as
        they appear.  Returns what did not come in time."""
        meta, img, cs = want.meta, want.img, self._cs
        self._metas.pop(img.content, None)
        self._metas[img.content] = meta  # the latest last
        while len(self._metas) > 64:
            del self._metas[next(iter(self._metas))]
        asked = self._take_asked(img, want.chunks)
        # What the batch's plan covers needs no lookup and no claim: who holds or fetches each.
        mine, theirs, unplanned = self.plans.take(img, [c for c in want.chunks if not img.cached(c)])
        got: set[int] = set()
        if unplanned:
            with trio.move_on_after(self.timeout * 3 + want.nbytes() / MIN_RATE):
                got = self._deliver(sink, await self._from_holders(meta, img, unplanned))
        # Held by nobody as this image's: as another image's chunks of the same digest?  Those the
        # plan gave this node to fetch from Glance too (a v2's profile prefetch after v1's storm).
        missing = [c for c in unplanned if c not in got and not img.cached(c)]
        if mine or missing:
            alike = await self._from_alikes(meta, img, sorted(mine + missing), sink)
            mine = [c for c in mine if c not in alike]
            missing = [c for c in missing if c not in alike and not img.cached(c)]
        if missing:  # nobody holds them: each from its owner, this node's own from the origin
            owned, by_owner, missing = self._owned(img, missing, asked, urgent=want.priority == DEMAND)
            if self.directory.lazy_manifest(img.content) is None:
                missing = sorted(owned + missing)  # from Glance: claimed, as any node's
            else:
                mine += owned  # from the seed, which reads Glance once for all: no claim
            for node, (peer, its, held) in by_owner.items():
                theirs.setdefault(node, (peer, [], held))[1].extend(its)
        others = list(theirs.values())
        granted: list[int] = []
        if missing:
            granted, more = await self._claim(want, missing)
            self._stats["granted_chunks"] += len(granted)
            others += more
        sink.pass_on(sorted(mine + granted))
        late: list[int] = []

        async def from_claimer(peer: PeerRecord, chunks: list[int], held: bool) -> None:
            # Not shorter: in a loaded storm, takes that give up at once send their chunks to
            # Glance all together, and Glance, slower, makes more of them give up (issue 27: with
            # half of this, such a flood began 10 s into the paced storm; Glance sent 26 x).
            wait = min(CLAIM_WAIT_MAX, deadline_for(self._fetch_timeout, len(chunks) * cs))
            if want.priority == DEMAND:
                wait = min(wait, CLAIM_WAIT_DEMAND * self._fetch_timeout)
            left = await self.claims.take(meta, img, peer, chunks, wait, functools.partial(_put, sink, self.client.memory.give_back),
                                          held=held, urgent=want.priority == DEMAND)
            late.extend(left)
            self._stats["claimed_chunks_late"] += len(left)

        async with trio.open_nursery() as nursery:
            for peer, chunks, held in others:
                nursery.start_soon(from_claimer, peer, chunks, held)
        return sorted(late)

    async def _claim(self, want: Want, missing: list[int]) -> tuple[list[int], list[tuple[PeerRecord, list[int], bool]]]:
        """The claim of ``missing``: a demand fetch asks once, whatever the tracker's state; a
        background one, while the tracker is known down, waits for it (``TRACKER_PATIENCE``, or
        until a reader joins the flight) and asks again for what is still missing then."""
        meta, img = want.meta, want.img
        give_up = trio.current_time() + TRACKER_PATIENCE
        deferred = False
        while want.priority != DEMAND and trio.current_time() < give_up:
            if not self.directory.tracker_breaker.is_open:
                answer = await self.claims.claim(meta, img, missing, tries=CLAIM_TRIES_BACKGROUND)
                if not self.directory.tracker_breaker.is_open:
                    return answer  # the tracker answered
            if not deferred:
                deferred = True
                self._stats["claims_deferred"] += 1
            await trio.sleep(self.claims.poll)
            missing = [c for c in missing if not img.cached(c)]
            if not missing:
                return [], []
        return await self.claims.claim(meta, img, missing, tries=1)

    async def _from_alikes(self, meta: ImageMeta, img: ImageData, chunks: list[int], sink: Sink) -> set[int]:
        """Which of ``chunks`` came, verified, from peers holding them as another image's chunks
        with the same digests (``alike``), now in ``sink``."""
        with trio.move_on_after(self.timeout * 3 + len(chunks) * self._cs / MIN_RATE):
            return self._deliver(sink, await self.alikes.take(meta, chunks))
        return set()

    def _deliver(self, sink: Sink, pieces: list[tuple[int, bytes]]) -> set[int]:
        """Verified runs ``(first chunk, bytes)`` to the sink; the chunks they hold."""
        got: set[int] = set()
        for rfirst, piece in pieces:
            _put(sink, self.client.memory.give_back, rfirst, piece)
            got.update(range(rfirst, rfirst + -(-len(piece) // self._cs)))
        return got

    async def _from_holders(self, meta: ImageMeta, img: ImageData, chunks: list[int]) -> list[tuple[int, bytes]]:
        """Verified runs ``(first chunk, bytes)`` of ``chunks`` from peers that hold them: as many
        as they could give."""
        manifest = await self.directory.manifest(meta)
        if manifest is None:
            self._stats["no_manifest"] += 1
            return []
        want = set(chunks)
        got: list[tuple[int, bytes]] = []
        for peer, bits in await self.directory.holders(img, min(chunks), max(chunks)):
            if self.client.avoided(peer.node_id) or self.client.slow(peer.node_id):
                continue
            has = sorted(c for c in want if bits >> c & 1)
            for rfirst, rcount in runs(has, self._max):
                reply = await self.asker.ask(peer, img, manifest, rfirst, rcount)
                if reply.answer is not Answer.OK:
                    break  # this peer failed: the next one
                got.append((rfirst, reply.data))
                want.difference_update(range(rfirst, rfirst + rcount))
            if not want:
                break
        return got

    def statistics(self) -> dict:
        plans = self.plans.statistics()
        return {**self.client.statistics(), **self.directory.statistics(), **self.claims.statistics(),
                **self.asker.statistics(), **plans, **self.alikes.statistics(), **self._stats,
                "granted_chunks": self._stats["granted_chunks"] + plans["granted_chunks"]}
