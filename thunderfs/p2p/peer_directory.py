"""Who holds what, as the tracker says: each image's manifest, and which peers hold which chunks.

A manifest is asked once at a time per image (a second asker waits for the first), at most once
a second while the tracker is still building it, and kept once it came and fits Glance's listing.
While the tracker seeds the image instead ("lazy"), the manifest is a ``LazyManifest`` made of the
pieces the node took (``add_piece``, ``digests``), asked again every ``LAZY_RECHECK`` seconds (every
``LAZY_RECHECK_WATCHED`` while the image's watch is live: it says when the manifest changes) for
the built one; a revocation (its proof checked) drops it and tells ``on_revoked``, once.
Who holds what comes first from the image's watch (``holder_watch``: the tracker pushes it); while
no watch is live, lookups are asked per window of ``lookup_window`` chunks, one at a time per window, and cached for
``lookup_ttl`` seconds, so the tracker hears from a node a few times per window, not once per read;
with the tracker down, the peers known from the last lookup are used.  Once a lookup or a claim
has timed out or failed, the tracker counts as down (``tracker_breaker``): lookups and claims are
not sent until a probe finds it back, so a hung tracker costs one timeout, not one per read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from thunderfs.cache.store import ImageData
from thunderfs.fetch.breaker import Breaker
from thunderfs.fetch.flights import FlightAbandoned, SingleFlight
from thunderfs.p2p.holder_watch import HolderWatches
from thunderfs.p2p.lazy_manifest import LazyManifest
from thunderfs_common.image import ImageMeta
from thunderfs_common.manifest_proof import Ed25519PublicKey, ManifestProof, signed_by
from thunderfs_tracker.client import TrackerClient, TrackerError
from thunderfs_common.tracker_protocol import (Manifest, PeerRecord, Piece, ProtocolError, Revocation, chunks_to_bits,
                                       encode_pieces)

log = logging.getLogger(__name__)

# How often a node using a lazy manifest asks whether the built one is there (or a revocation);
# while the image's watch is live, which says when either happens (on this replica), only this
# often: the asks of a crowd during a storm were a tenth of its tracker requests (issue 27).
LAZY_RECHECK = 10.0
LAZY_RECHECK_WATCHED = 60.0


class PeerDirectory:
    def __init__(self, tracker: TrackerClient, *, chunk_size: int, timeout: float = 2.0,
                 lookup_window: int = 1024, lookup_ttl: float = 2.0, min_rate: float = 2**20,
                 tracker_key: Ed25519PublicKey | None = None, secret: bytes | None = None,
                 location: tuple[str, ...] = (), on_revoked=None, on_manifest=None):
        """``tracker_key``: the tracker's public key; a manifest it did not sign is refused.
        ``secret``: the cluster's, which proves pieces without a key (a MAC, as the tracker's).
        ``on_revoked(meta, why)``: the tracker revoked an image's lazy manifest.
        ``on_manifest(meta, manifest)``: an image's whole manifest was accepted (checked), once."""
        self._tracker = tracker
        self._tracker_key = tracker_key
        self._mac = ManifestProof(secret=secret) if secret else None
        self._cs = chunk_size
        self.timeout = timeout
        self._window = lookup_window
        self._ttl = lookup_ttl
        self._min_rate = min_rate
        self._manifests: dict[bytes, Manifest | LazyManifest] = {}
        self._revoked: set[bytes] = set()
        self.on_revoked = on_revoked
        self.on_manifest = on_manifest
        self._manifest_asked: dict[bytes, float] = {}
        self._lookups: dict[tuple[str, int], tuple[float, list[PeerRecord]]] = {}  # -> (when, peers)
        self.tracker_breaker = Breaker("the tracker")
        self.watches = HolderWatches(tracker, tracker_down=lambda: self.tracker_breaker.is_open, location=location,
                                     on_manifest=self._manifest_news)
        self._asking = SingleFlight()  # manifest requests and lookups under way
        self._nursery: trio.Nursery | None = None
        self._stats = dict.fromkeys(("lookups", "lookup_failures", "lookups_skipped", "manifests_refused",
                                     "pieces", "pieces_refused", "piece_asks", "revocations"), 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.watches.run)
            task_status.started()
            while True:  # an idle node learns of a revocation too, and drops what it took
                await trio.sleep(LAZY_RECHECK)
                for m in [m for m in self._manifests.values() if isinstance(m, LazyManifest)]:
                    await self.manifest(m.meta)

    def _recheck(self, key: bytes) -> float:
        """Seconds between two asks for a lazy manifest of content ``key``."""
        return LAZY_RECHECK_WATCHED if self.watches.live(key.hex()) else LAZY_RECHECK

    def _manifest_news(self, content: str) -> None:
        """A watch says the image's manifest was built or revoked: ask for it now."""
        m = self._manifests.get(bytes.fromhex(content))
        if isinstance(m, LazyManifest) and self._nursery is not None:
            self._manifest_asked.pop(m.meta.content_key, None)
            self._nursery.start_soon(self.manifest, m.meta)

    @property
    def window(self) -> int:
        """Chunks per lookup window."""
        return self._window

    def prepare(self, meta: ImageMeta) -> None:
        """An image was opened: ask for its manifest and watch its holders now, so that both are
        there before peers are needed."""
        if self._nursery is not None:
            self._nursery.start_soon(self.manifest, meta)
            self.watches.start(meta.content_key.hex(), -(-meta.size // self._cs))

    # --- manifests -------------------------------------------------------------------------

    def manifest_nowait(self, meta: ImageMeta) -> Manifest | LazyManifest | None:
        """The image's manifest if it is here already (a lazy one while the tracker seeds it)."""
        return self._manifests.get(meta.content_key)

    async def manifest(self, meta: ImageMeta) -> Manifest | LazyManifest | None:
        """The image's manifest if the tracker has it (a lazy one while it seeds the image)."""
        m = self.manifest_nowait(meta)
        key = meta.content_key
        if m is not None and (not isinstance(m, LazyManifest)
                              or trio.current_time() - self._manifest_asked.get(key, -1e9) < self._recheck(key)):
            return m
        try:
            return await self._asking.run(("manifest", meta.content_key), lambda: self._ask_manifest(meta))
        except FlightAbandoned:
            return self.manifest_nowait(meta)

    async def wait_manifest(self, meta: ImageMeta, timeout: float = 10.0) -> bool:
        """Until the image's manifest is here (True), or for at most ``timeout`` seconds: what
        is fetched before it comes from Glance (peers' bytes cannot be checked), so a prefetch,
        which nobody waits for, waits for it first."""
        with trio.move_on_after(timeout):
            while await self.manifest(meta) is None:
                await trio.sleep(1.0)
            return True
        return False

    async def _ask_manifest(self, meta: ImageMeta) -> Manifest | LazyManifest | None:
        key = meta.content_key
        current = self.manifest_nowait(meta)
        if trio.current_time() - self._manifest_asked.get(key, -1e9) < 1.0:
            return current
        self._manifest_asked[key] = trio.current_time()
        m = None
        try:
            # A manifest is 44 bytes of JSON per chunk (1.4 MiB for 2 GiB): give it time by size.
            with trio.move_on_after(self.timeout + meta.size // self._cs * 44 / self._min_rate):
                m = await self._tracker.manifest_state(meta.id, self._cs)
        except (TrackerError, ProtocolError) as exc:  # an answer that does not parse is no answer
            log.debug("no manifest for %s: %s", meta.id, exc)
            return current
        if m == "lazy":
            if current is None:
                self._manifests[key] = current = LazyManifest(meta, self._cs)
                log.info("image %s: the tracker seeds it until its manifest is checked; peers trade it meanwhile",
                         meta.id)
            return current
        if isinstance(m, Revocation):
            self._revoke(meta, m)
            return None
        if not isinstance(m, Manifest):
            return current  # still building, or no answer in time
        if (m.os_hash_value, m.size, m.chunk_size) != (meta.os_hash_value, meta.size, self._cs):
            log.warning("the tracker's manifest of %s does not match Glance's listing; not using peers for it", meta.id)
            return None
        if self._tracker_key is not None and not signed_by(self._tracker_key, m.signed_bytes(), m.proof):
            self._stats["manifests_refused"] += 1
            log.warning("the manifest of %s is not signed by the tracker's key: refused; not using peers for it",
                        meta.id)
            return None
        self._manifests[key] = m
        if self.on_manifest is not None:
            self.on_manifest(meta, m)
        return m

    def _revoke(self, meta: ImageMeta, r: Revocation) -> None:
        key = meta.content_key
        if r.image_id != meta.id or r.chunk_size != self._cs or r.os_hash_value not in ("", meta.os_hash_value):
            return  # not this image's
        if self._tracker_key is not None and not signed_by(self._tracker_key, r.signed_bytes(), r.proof):
            self._stats["manifests_refused"] += 1
            log.warning("a revocation of %s is not signed by the tracker's key: ignored", meta.id)
            return
        if isinstance(self._manifests.get(key), Manifest):
            return  # a built manifest stands: the tracker checked the whole image
        self._manifests.pop(key, None)
        if key in self._revoked:
            return
        self._revoked.add(key)
        self._stats["revocations"] += 1
        log.error("the tracker revoked image %s (%s): dropping its cached chunks; reading it from Glance only",
                  meta.id, r.why)
        if self.on_revoked is not None:
            self.on_revoked(meta, r.why)

    # --- a lazy manifest's pieces ------------------------------------------------------------

    def _proven(self, piece: Piece, from_peer: bool) -> bool:
        """The tracker's proof of a piece: its key's signature, else a MAC under the secret.
        Without either, only a piece in the tracker's own (authenticated) answer is taken."""
        if self._tracker_key is not None:
            return signed_by(self._tracker_key, piece.signed_bytes(), piece.proof)
        if self._mac is not None:
            return self._mac.holds(piece.signed_bytes(), piece.proof)
        return not from_peer

    def add_piece(self, meta: ImageMeta, piece: Piece, *, from_peer: bool = False) -> bool:
        """A piece (from the tracker, or ``from_peer`` sent along with chunks), if it is this
        image's and carries the tracker's proof: its digests join the lazy manifest.  False:
        refused (or no lazy manifest to join)."""
        lazy = self.manifest_nowait(meta)
        if not isinstance(lazy, LazyManifest):
            return False
        if ((piece.image_id, piece.os_hash_value, piece.size, piece.chunk_size)
                != (meta.id, meta.os_hash_value, meta.size, self._cs) or not self._proven(piece, from_peer)):
            self._stats["pieces_refused"] += 1
            log.warning("a piece of %s (%s) does not match Glance's listing or lacks the tracker's proof: refused",
                        meta.id, "sent by a peer" if from_peer else "from the tracker")
            return False
        lazy.add(piece)
        self._stats["pieces"] += 1
        return True

    def pieces_header(self, content: bytes, first: int, count: int) -> str | None:
        """What the peer server sends along with chunks of an image that has only pieces: the
        pieces that cover them (None: a built manifest, or no pieces, or too many to send)."""
        m = self._manifests.get(content)
        return encode_pieces(m.pieces_for(first, count)) if isinstance(m, LazyManifest) else None

    async def digests(self, lazy: LazyManifest, first: int, count: int) -> bool:
        """Until the lazy manifest has digests for chunks ``first..first+count-1`` (asked of the
        tracker, one ask at a time per run); False if it could not get them."""
        unknown = lazy.unknown(first, count)
        if not unknown:
            return True
        if self.tracker_breaker.is_open:
            return False
        a, n = unknown[0], unknown[-1] - unknown[0] + 1

        async def ask() -> None:
            self._stats["piece_asks"] += 1
            try:
                with trio.fail_after(self.timeout * 2):
                    piece, _ = await self._tracker.seed(lazy.image_id, self._cs, a, n, data=False,
                                                        timeout=self.timeout * 2)
            except (TrackerError, trio.TooSlowError) as exc:
                log.debug("no piece of %s from the tracker: %r", lazy.image_id, exc)
                return
            if piece.first == a and piece.count == n:
                self.add_piece(lazy.meta, piece)

        try:
            await self._asking.run(("piece", lazy.image_id, a, n), ask)
        except FlightAbandoned:
            pass
        return not lazy.unknown(first, count)

    # --- lookups ---------------------------------------------------------------------------

    def members_nowait(self, img: ImageData, *, use: bool = True) -> dict[str, PeerRecord] | None:
        """Every holder of the image the tracker's watch named (None: no live watch); ``use``:
        as ``HolderWatches.members_nowait``."""
        return self.watches.members_nowait(img.content.hex(), use=use)

    def lazy_manifest(self, content: bytes) -> LazyManifest | None:
        """The image's lazy manifest, if it has one (the tracker seeds it)."""
        m = self._manifests.get(content)
        return m if isinstance(m, LazyManifest) else None

    def member(self, img: ImageData, node_id: str) -> PeerRecord | None:
        """A node the tracker named as a holder of the image (its watch), else None."""
        return self.watches.member(img.content.hex(), node_id)

    async def holders(self, img: ImageData, first: int, last: int,
                      max_age: float | None = None) -> list[tuple[PeerRecord, int]]:
        """Peers with any of chunks first..last, nearest first, with their chunks as absolute bits,
        from lookups at most ``max_age`` (default: the lookup TTL) seconds old."""
        content = img.content.hex()
        pushed = self.watches.holders_nowait(content, img.nchunks, first, last)
        if pushed is not None:
            return pushed
        merged: dict[str, tuple[PeerRecord, int]] = {}  # in the order the tracker ranked them
        now = trio.current_time()
        max_age = self._ttl if max_age is None else max_age
        for w in range(first // self._window, last // self._window + 1):
            wfirst = w * self._window
            wlast = min(img.nchunks, wfirst + self._window) - 1
            cached = self._lookups.get((content, w))
            if cached is None or now - cached[0] >= max_age:
                cached = await self._lookup(content, w, wfirst, wlast)
            for p in cached[1]:
                rec, bits = merged.get(p.node_id, (p, 0))
                merged[p.node_id] = (rec, bits | (p.chunks << wfirst))
        return list(merged.values())

    async def wait_holders(self, img: ImageData, also: trio.Event, poll: float, at_most: float | None = None,
                           *, chunks: Iterable[int] = ()) -> None:
        """Until a holder of the image gains one of ``chunks`` (any change, if none are given;
        its watch says so) or ``also`` is set, or ``at_most`` seconds; without a live watch, for
        ``poll`` seconds at most."""
        await self.watches.wait_changed(img.content.hex(), also, poll, at_most, chunks=chunks_to_bits(chunks) or -1)

    async def _lookup(self, content: str, w: int, wfirst: int, wlast: int) -> tuple[float, list[PeerRecord]]:
        """One tracker lookup of a window at a time: the flights and claim workers that want it
        while it is asked all take its answer (a crowd of waiters would otherwise multiply the
        tracker's load, and an overloaded tracker times out into fetches from Glance)."""
        key = (content, w)
        try:
            return await self._asking.run(("lookup", key), lambda: self._ask_lookup(key, wfirst, wlast))
        except FlightAbandoned:
            return self._lookups.get(key) or (trio.current_time(), [])

    async def _ask_lookup(self, key: tuple[str, int], wfirst: int, wlast: int) -> tuple[float, list[PeerRecord]]:
        now = trio.current_time()
        previous = self._lookups.get(key)
        if self.tracker_breaker.is_open:
            self._stats["lookups_skipped"] += 1
            return (now, previous[1]) if previous else (now, [])  # the peers we already knew
        self._stats["lookups"] += 1
        try:
            with trio.fail_after(self.timeout):
                found = await self._tracker.lookup(key[0], wfirst, wlast)
        except (TrackerError, trio.TooSlowError) as exc:
            self._stats["lookup_failures"] += 1
            log.debug("tracker lookup failed: %r", exc)
            self.tracker_down(exc)
            found = previous[1] if previous else []  # the peers we already knew
        else:
            self.tracker_breaker.close()
        self._lookups[key] = answer = (now, found)
        if len(self._lookups) > 4096:
            self._lookups = {k: v for k, v in self._lookups.items() if now - v[0] < self._ttl}
        return answer

    def tracker_down(self, exc: BaseException) -> None:
        """A lookup or claim failed: lookups and claims wait for a probe to find the tracker back."""
        why = "no answer within the peer timeout" if isinstance(exc, trio.TooSlowError) else str(exc)
        self.tracker_breaker.open(why, lambda: self._tracker.stats())

    def statistics(self) -> dict:
        lazy = sum(isinstance(m, LazyManifest) for m in self._manifests.values())
        return {**self._stats, **self.watches.statistics(), "manifests": len(self._manifests) - lazy,
                "lazy_manifests": lazy,
                "tracker_breaker": self.tracker_breaker.statistics()}
