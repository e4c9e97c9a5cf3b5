"""Plans: one claim for a batch of chunks about to be fetched (a prefetch batch, scattered over
many flights), so that its flights know whom to take each chunk from, or that it is theirs to
fetch from Glance, without a claim each.  A plan's entries are used up by the flights that take
them (``take``) and stand at most ``PLAN_TTL`` (the tracker keeps a claim for its own
``claim_seconds``, 30 by default, from the claim on)."""

from __future__ import annotations

import trio

from thunderfs.cache.store import ImageData
from thunderfs.p2p.claims import ClaimTaker
from thunderfs.p2p.peer_client import PeerClient
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs_common.image import ImageMeta
from thunderfs_common.tracker_protocol import PeerRecord

# How long a plan stands, at most.
PLAN_TTL = 15.0
# How often readahead and prefetch ask a slow tracker for a claim before fetching from Glance
# unclaimed (a reader waiting asks once: it had better have its bytes).
CLAIM_TRIES_BACKGROUND = 3


class Plans:
    def __init__(self, directory: PeerDirectory, client: PeerClient, claims: ClaimTaker):
        self._directory = directory
        self._client = client
        self._claims = claims
        # content -> chunk -> (who fetches it: None for this node, and whether it holds it already),
        # and until when that stands: the outcome of a prefetch batch's one claim.
        self._plans: dict[bytes, dict[int, tuple[PeerRecord | None, bool, float]]] = {}
        self._claiming: dict[bytes, set[int]] = {}  # content -> chunks a plan's claim asks for now
        self._stats = dict.fromkeys(("plans", "planned_chunks", "granted_chunks"), 0)

    async def plan(self, meta: ImageMeta, img: ImageData, chunks: list[int]) -> None:
        """One claim for a batch of chunks about to be fetched (a prefetch batch, scattered over
        many flights): its flights then know whom to take each chunk from, or that it is theirs
        to fetch from Glance, without a claim each.  Without a manifest, or with the tracker known
        down, nothing is planned (each flight claims as before)."""
        now = trio.current_time()
        for content, old in list(self._plans.items()):  # what no flight used is dropped in time
            for c in [c for c, (_, _, until) in old.items() if until <= now]:
                del old[c]
            if not old:
                del self._plans[content]
        plan = self._plans.setdefault(img.content, {})
        chunks = [c for c in chunks if c not in plan and not img.cached(c)]
        if not chunks or self._directory.manifest_nowait(meta) is None or self._directory.tracker_breaker.is_open:
            return
        claiming = self._claiming.setdefault(img.content, set())
        claiming.update(chunks)  # what the tracker may already name this node for, to others
        try:
            granted, others = await self._claims.claim(meta, img, chunks, tries=CLAIM_TRIES_BACKGROUND)
        finally:
            claiming.difference_update(chunks)
            if not claiming:
                self._claiming.pop(img.content, None)
        if self._directory.tracker_breaker.is_open:
            return  # the claim failed: nothing was granted, whatever it returned
        until = trio.current_time() + PLAN_TTL
        # Again: the flights of the batches before may have used up (and dropped) the image's plan
        # while the tracker answered; entries written into that one would be lost.
        plan = self._plans.setdefault(img.content, {})
        for c in granted:
            plan[c] = (None, False, until)
        for peer, cs, held in others:
            for c in cs:
                plan[c] = (peer, held, until)
        self._stats["plans"] += 1
        self._stats["planned_chunks"] += len(chunks)
        self._stats["granted_chunks"] += len(granted)

    def will_fetch(self, img: ImageData, chunk: int) -> bool:
        """Whether this node has claimed ``chunk`` for a flight that has not started yet (a
        prefetch batch's plan), or is claiming it now: the peer server keeps waiters for it."""
        if chunk in self._claiming.get(img.content, ()):
            return True
        peer, _, until = self._plans.get(img.content, {}).get(chunk, (True, False, 0.0))
        return peer is None and until > trio.current_time()

    def take(self, img: ImageData, chunks: list[int]) -> tuple[list[int], dict[str, tuple[PeerRecord, list[int], bool]], list[int]]:
        """(planned for this node, planned for other nodes by node id, not planned) of ``chunks``;
        the plan's entries for them are used up.  A node avoided since the plan (it failed or
        lied) is not waited for: its chunks count as not planned."""
        plan = self._plans.get(img.content)
        if not plan:
            return [], {}, chunks
        now = trio.current_time()
        mine: list[int] = []
        theirs: dict[str, tuple[PeerRecord, list[int], bool]] = {}
        rest: list[int] = []
        for c in chunks:
            peer, held, until = plan.pop(c, (None, False, 0.0))
            if until <= now or (peer is not None and self._client.avoided(peer.node_id)):
                rest.append(c)
            elif peer is None:
                mine.append(c)
            else:
                theirs.setdefault(peer.node_id, (peer, [], held))[1].append(c)
        if not plan:
            del self._plans[img.content]
        return mine, theirs, rest

    def drop(self, content: bytes) -> None:
        """Forget an image's plan (its manifest was revoked)."""
        self._plans.pop(content, None)

    def statistics(self) -> dict:
        return dict(self._stats)
