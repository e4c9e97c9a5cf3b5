"""Getting chunks from other nodes: who has them (tracker lookups, cached), fetching, verifying.

A peer's bytes are trusted only if every chunk's sha256 matches the image's manifest, which the
tracker built from Glance's bytes and bound to Glance's ``os_hash_value`` (checked again here
against the listing's).  Until a manifest exists, nothing comes from peers.  A peer that times
out, fails or answers 503 is skipped for this fetch (and avoided a while if it failed); one that
sends a wrong chunk is reported to the tracker and avoided for a long while.

Lookups are asked per window of ``lookup_window`` chunks and cached for ``lookup_ttl`` seconds,
so the tracker hears from a node a few times per window, not once per read.  As a source
(``sources.Source``) it takes first what peers hold, then claims the rest at the tracker: what
this node is granted goes on to Glance at once, what other nodes are fetching is taken from them
as it appears.  Every error stays inside: ``fetch`` returns what it did not deliver and the
fetcher asks Glance for it.
"""

from __future__ import annotations

import hashlib
import logging
import random

import httpx
import trio

from thunderfs.chunk_store import ImageData
from thunderfs.flights import FlightAbandoned, SingleFlight
from thunderfs.image import ImageMeta
from thunderfs.slots import DEMAND
from thunderfs.sources import MIN_RATE, Sink, Want, deadline_for, runs
from thunderfs_tracker.client import TrackerClient, TrackerError
from thunderfs_tracker.protocol import Manifest, PeerRecord
from thunderfs_tracker.signing import sign

log = logging.getLogger(__name__)


# The longest a flight waits for chunks another node claimed before fetching them from Glance itself.
CLAIM_WAIT_MAX = 60.0
# How often readahead and prefetch ask a slow tracker for a claim before fetching from Glance
# unclaimed (a reader waiting asks once: it had better have its bytes).
CLAIM_TRIES_BACKGROUND = 3


class PeerSource:
    name = "peers"

    # How often a node waiting for chunks another node is fetching from Glance looks again.
    CLAIM_POLL = 0.25
    # The size of a request for chunks that are still arriving at the node that fetches them.
    CLAIM_PIECE = 2**20
    # How many such pieces one waiting flight asks for at once, from different peers.
    CLAIM_WORKERS = 6
    # How many of those requests this node has outstanding at one peer: a crowd of waiters all
    # asking the first holder at once would bury it (it times out, and everybody goes to Glance).
    CLAIM_PER_PEER = 2
    # How long a reader waits for chunks a slow peer already holds (times the peer timeout) while
    # other holders appear, before Glance: a hung sole holder costs a reader this, no more.
    SLOW_HOLDER_PATIENCE = 2

    def __init__(self, tracker: TrackerClient, *, node_id: str, secret: bytes | None, chunk_size: int,
                 timeout: float = 2.0, fetch_timeout: float = 20.0, lookup_window: int = 1024, lookup_ttl: float = 2.0,
                 max_request_chunks: int = 256, avoid_failed: float = 30.0, avoid_slow: float = 5.0,
                 avoid_lying: float = 3600.0, min_rate: float = 2**20,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._tracker = tracker
        self._node_id = node_id
        self._secret = secret
        self._cs = chunk_size
        self.timeout = timeout
        self._fetch_timeout = fetch_timeout
        self._window = lookup_window
        self._ttl = lookup_ttl
        self._max = max_request_chunks
        self._piece = max(1, min(max_request_chunks, self.CLAIM_PIECE // chunk_size))
        self._avoid_failed, self._avoid_slow, self._avoid_lying = avoid_failed, avoid_slow, avoid_lying
        self._min_rate = min_rate
        # Per socket operation: connect, and silence between reads.  The whole transfer is bounded
        # separately, by its size (_from_peer).
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)),
                                       limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                                       transport=transport)  # tests: an httpx.MockTransport
        self._manifests: dict[bytes, Manifest] = {}
        self._manifest_asked: dict[bytes, float] = {}
        self._lookups: dict[tuple[str, int], tuple[float, list[PeerRecord]]] = {}  # -> (when, peers)
        self._asking_tracker = SingleFlight()  # manifest requests and lookups under way
        self._nursery: trio.Nursery | None = None
        self._avoid: dict[str, float] = {}  # failed or lied: until when
        self._slow: dict[str, float] = {}   # slow (busy serving others, perhaps): until when
        self._rtt: dict[str, float] = {}
        self._asking: dict[str, int] = {}  # claim pieces outstanding per peer
        self._served: dict[bytes, dict[str, int]] = {}  # content -> peer -> bytes it sent us
        self._stats = dict.fromkeys(("chunks", "bytes", "requests", "failures", "slow", "busy", "bad_chunks",
                                     "lookups", "lookup_failures", "no_manifest", "claims", "claim_failures",
                                     "claim_retries", "claim_waits", "granted_chunks",
                                     "claimed_chunks_late"), 0)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def prepare(self, meta: ImageMeta) -> None:
        """An image was opened: ask for its manifest now, so that it is there (or being built)
        before peers are needed."""
        if self._nursery is not None:
            self._nursery.start_soon(self.manifest, meta)

    async def wait_manifest(self, meta: ImageMeta, timeout: float = 10.0) -> bool:
        """Until the image's manifest is here (True), or for at most ``timeout`` seconds: what
        is fetched before it comes from Glance (peers' bytes cannot be checked), so a prefetch,
        which nobody waits for, waits for it first."""
        with trio.move_on_after(timeout):
            while await self.manifest(meta) is None:
                await trio.sleep(1.0)
            return True
        return False

    # --- manifests -------------------------------------------------------------------------

    async def manifest(self, meta: ImageMeta) -> Manifest | None:
        """The image's manifest if the tracker has it; one request at a time per image (a second
        asker waits for the first), and at most one a second while the tracker is building it."""
        key = meta.content_key
        if (m := self._manifests.get(key)) is not None:
            return m
        try:
            return await self._asking_tracker.run(("manifest", key), lambda: self._ask_manifest(meta))
        except FlightAbandoned:
            return None

    async def _ask_manifest(self, meta: ImageMeta) -> Manifest | None:
        key = meta.content_key
        if trio.current_time() - self._manifest_asked.get(key, -1e9) < 1.0:
            return None
        self._manifest_asked[key] = trio.current_time()
        m = None
        try:
            # A manifest is 44 bytes of JSON per chunk (1.4 MiB for 2 GiB): give it time by size.
            with trio.move_on_after(self.timeout + meta.size // self._cs * 44 / self._min_rate):
                m = await self._tracker.manifest(meta.id, self._cs)
        except TrackerError as exc:
            log.debug("no manifest for %s: %s", meta.id, exc)
            return None
        if m is None:
            return None
        if (m.os_hash_value, m.size, m.chunk_size) != (meta.os_hash_value, meta.size, self._cs):
            log.warning("the tracker's manifest of %s does not match Glance's listing; not using peers for it", meta.id)
            return None
        self._manifests[key] = m
        return m

    # --- lookups ---------------------------------------------------------------------------

    async def _holders(self, img: ImageData, first: int, last: int,
                       max_age: float | None = None) -> list[tuple[PeerRecord, int]]:
        """Peers with any of chunks first..last, nearest first, with their chunks as absolute bits,
        from lookups at most ``max_age`` (default: the lookup TTL) seconds old."""
        content = img.content.hex()
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

    async def _lookup(self, content: str, w: int, wfirst: int, wlast: int) -> tuple[float, list[PeerRecord]]:
        """One tracker lookup of a window at a time: the flights and claim workers that want it
        while it is asked all take its answer (a crowd of waiters would otherwise multiply the
        tracker's load, and an overloaded tracker times out into fetches from Glance)."""
        key = (content, w)
        try:
            return await self._asking_tracker.run(("lookup", key), lambda: self._ask_lookup(key, wfirst, wlast))
        except FlightAbandoned:
            return self._lookups.get(key) or (trio.current_time(), [])

    async def _ask_lookup(self, key: tuple[str, int], wfirst: int, wlast: int) -> tuple[float, list[PeerRecord]]:
        now = trio.current_time()
        self._stats["lookups"] += 1
        previous = self._lookups.get(key)
        try:
            with trio.fail_after(self.timeout):
                found = await self._tracker.lookup(key[0], wfirst, wlast)
        except (TrackerError, trio.TooSlowError) as exc:
            self._stats["lookup_failures"] += 1
            log.debug("tracker lookup failed: %s", exc)
            found = previous[1] if previous else []  # the peers we already knew
        self._lookups[key] = answer = (now, found)
        if len(self._lookups) > 4096:
            self._lookups = {k: v for k, v in self._lookups.items() if now - v[0] < self._ttl}
        return answer

    # --- fetching --------------------------------------------------------------------------

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        """First what peers hold (verified); then, for the rest, a claim at the tracker: the chunks
        this node is granted go on to Glance at once (``sink.pass_on``), while those other nodes
        are fetching are taken from them as they appear.  Returns what did not come in time."""
        meta, img, cs = want.meta, want.img, self._cs
        got: set[int] = set()
        with trio.move_on_after(self.timeout * 3 + want.nbytes() / MIN_RATE):
            for rfirst, piece in await self._from_holders(meta, img, want.chunks):
                sink.put(rfirst, piece)
                got.update(range(rfirst, rfirst + -(-len(piece) // cs)))
        missing = [c for c in want.chunks if c not in got and not img.cached(c)]
        if not missing:
            return []
        tries = 1 if want.priority == DEMAND else CLAIM_TRIES_BACKGROUND
        granted, others = await self.claim(meta, img, missing, tries=tries)
        self._stats["granted_chunks"] += len(granted)
        sink.pass_on(granted)
        late: list[int] = []

        async def from_claimer(peer: PeerRecord, chunks: list[int], held: bool) -> None:
            wait = min(CLAIM_WAIT_MAX, deadline_for(self._fetch_timeout, len(chunks) * cs))
            left = await self.take_claimed(meta, img, peer, chunks, wait, sink.put, held=held,
                                           urgent=want.priority == DEMAND)
            late.extend(left)
            self._stats["claimed_chunks_late"] += len(left)

        async with trio.open_nursery() as nursery:
            for peer, chunks, held in others:
                nursery.start_soon(from_claimer, peer, chunks, held)
        return sorted(late)

    async def _from_holders(self, meta: ImageMeta, img: ImageData, chunks: list[int]) -> list[tuple[int, bytes]]:
        """Verified runs ``(first chunk, bytes)`` of ``chunks`` from peers that hold them: as many
        as they could give."""
        manifest = await self.manifest(meta)
        if manifest is None:
            self._stats["no_manifest"] += 1
            return []
        want = set(chunks)
        got: list[tuple[int, bytes]] = []
        now = trio.current_time()
        for peer, bits in await self._holders(img, min(chunks), max(chunks)):
            if max(self._avoid.get(peer.node_id, 0), self._slow.get(peer.node_id, 0)) > now:
                continue
            has = sorted(c for c in want if bits >> c & 1)
            for rfirst, rcount in runs(has, self._max):
                status, data = await self._from_peer(peer, img, manifest, rfirst, rcount)
                if data is None:
                    break  # this peer failed: the next one
                got.append((rfirst, data))
                want.difference_update(range(rfirst, rfirst + rcount))
            if not want:
                break
        return got

    async def _from_peer(self, peer: PeerRecord, img: ImageData, manifest: Manifest, first: int,
                         count: int) -> tuple[str, bytes | None]:
        """("ok", the run's bytes, every chunk checked), or ("not_held" | "busy" | "slow" | "failed" |
        "lied", None)."""
        path = f"/v1/chunks/{img.content.hex()}/{first}/{count}"
        headers = sign(self._secret, self._node_id, "GET", path) if self._secret else {}
        self._stats["requests"] += 1
        started = trio.current_time()
        expected = min(img.size, (first + count) * self._cs) - first * self._cs
        try:
            with trio.fail_after(self.timeout + expected / self._min_rate):
                async with self._http.stream("GET", peer.peer_url.rstrip("/") + path, headers=headers) as resp:
                    self._note_rtt(peer.node_id, trio.current_time() - started)
                    status = resp.status_code
                    body = await resp.aread() if status == 200 else b""
        except (httpx.TimeoutException, trio.TooSlowError) as exc:
            # Slow, not dead: skip it for a moment (it may just be busy serving others).
            self._stats["slow"] += 1
            now = trio.current_time()
            if self._slow.get(peer.node_id, 0) <= now:  # one line when it turns slow, not per request
                log.info("peer %s too slow (%s); skipping it for %.0fs", peer.node_id, type(exc).__name__,
                         self._avoid_slow)
            self._slow[peer.node_id] = now + self._avoid_slow
            return "slow", None
        except httpx.HTTPError as exc:
            self._stats["failures"] += 1
            now = trio.current_time()
            if self._avoid.get(peer.node_id, 0) <= now:
                log.info("peer %s failed (%s); avoiding it for %.0fs", peer.node_id, type(exc).__name__,
                         self._avoid_failed)
            self._avoid[peer.node_id] = now + self._avoid_failed
            return "failed", None
        if status != 200:
            if status == 404:
                return "not_held", None
            self._stats["busy" if status == 503 else "failures"] += 1
            return ("busy" if status == 503 else "failed"), None
        if len(body) != expected:
            return await self._lied(peer, img, first, f"sent {len(body)} bytes for {expected}")
        view, cs = memoryview(body), self._cs
        for i in range(count):
            if hashlib.sha256(view[i * cs:(i + 1) * cs]).digest() != manifest.digest(first + i):
                return await self._lied(peer, img, first + i, "chunk does not match the manifest")
        self._stats["chunks"] += count
        self._stats["bytes"] += len(body)
        served = self._served.setdefault(img.content, {})
        served[peer.node_id] = served.get(peer.node_id, 0) + len(body)
        return "ok", body

    async def claim(self, meta: ImageMeta, img: ImageData, chunks: list[int],
                    *, tries: int = 1) -> tuple[list[int], list]:
        """Before fetching ``chunks`` from Glance: (chunks this node may fetch, [(peer, chunks it
        is fetching or holds, whether it holds them)]).  Without a manifest, or with the tracker
        down, everything is granted.  A tracker that is slow (not down) is asked up to ``tries``
        times: a background fetch had better wait than fetch from Glance what a crowd of other
        nodes is fetching too."""
        if meta.content_key not in self._manifests:
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
                return chunks, []
        self._stats["claims"] += 1
        # A peer that has failed or lied is not waited for.  One that was slow a moment ago is:
        # on a loaded host every peer is slow now and then, and skipping them sends the whole
        # crowd to Glance (take_claimed bounds the wait for a slow holder).
        now = trio.current_time()
        others = [(p, cs, held) for p, cs, held in others if self._avoid.get(p.node_id, 0) <= now]
        granted = sorted(set(chunks) - {c for _, cs, _ in others for c in cs})
        return granted, others

    async def take_claimed(self, meta: ImageMeta, img: ImageData, claimer: PeerRecord, chunks: list[int],
                           wait: float, place, *, held: bool = False, urgent: bool = True) -> list[int]:
        """Take ``chunks``, which ``claimer`` is fetching from Glance, as they appear, for at most
        ``wait`` seconds: from whichever peers hold them by then, nodes that already took them
        from the claimer before the claimer itself (so that its uplink is not the only one that
        carries them), a few pieces at once from different peers.  ``place(first, bytes)``
        receives each verified run.  Returns the chunks not delivered (the caller fetches them
        from Glance), at once if the claimer fails (a slow claimer is waited for; if it already
        ``held`` them and a reader waits (``urgent``), only for SLOW_HOLDER_PATIENCE timeouts)."""
        manifest = self._manifests.get(meta.content_key)
        pending = set(chunks)
        if manifest is None:
            return sorted(pending)
        if urgent and held and self._slow.get(claimer.node_id, 0) > trio.current_time():
            wait = min(wait, self.SLOW_HOLDER_PATIENCE * self.timeout)
        taking: set[int] = set()
        resting: dict[str, float] = {}  # peers that were busy or slow: not asked again until then
        claimer_failed = False

        async def worker() -> None:
            nonlocal claimer_failed
            while pending and not claimer_failed:
                holders = await self._holders(img, min(pending), max(pending), max_age=self.CLAIM_POLL)
                choice = self._pick(holders, pending - taking, claimer, resting)
                if choice is None:
                    self._stats["claim_waits"] += 1
                    await trio.sleep(self.CLAIM_POLL)
                    continue
                peer, rfirst, rcount = choice
                piece = range(rfirst, rfirst + rcount)
                taking.update(piece)
                self._asking[peer.node_id] = self._asking.get(peer.node_id, 0) + 1
                try:
                    status, data = await self._from_peer(peer, img, manifest, rfirst, rcount)
                finally:
                    taking.difference_update(piece)
                    if (left := self._asking.pop(peer.node_id) - 1) > 0:
                        self._asking[peer.node_id] = left
                if status == "ok":
                    place(rfirst, data)
                    pending.difference_update(piece)
                elif status in ("failed", "lied") and peer.node_id == claimer.node_id:
                    claimer_failed = True
                elif status in ("busy", "slow", "not_held"):
                    resting[peer.node_id] = trio.current_time() + self.CLAIM_POLL

        with trio.move_on_after(wait):
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.CLAIM_WORKERS, -(-len(pending) // self._piece))):
                    nursery.start_soon(worker)
        return sorted(pending)

    def _pick(self, holders: list[tuple[PeerRecord, int]], wanted: set[int], claimer: PeerRecord,
              resting: dict[str, float]) -> tuple[PeerRecord, int, int] | None:
        """The best-ranked peer that can be asked for some of ``wanted`` (the claimer last), and a
        random piece of what it holds: waiters for the same new chunks take different ones from
        the claimer, then trade them among themselves."""
        now = trio.current_time()
        ranked = sorted(holders, key=lambda held: held[0].node_id == claimer.node_id)
        for peer, bits in ranked:
            node = peer.node_id
            if (resting.get(node, 0) > now or self._avoid.get(node, 0) > now
                    or self._asking.get(node, 0) >= self.CLAIM_PER_PEER):
                continue
            if node != claimer.node_id and self._slow.get(node, 0) > now:
                continue
            pieces = runs(sorted(c for c in wanted if bits >> c & 1), self._piece)
            if pieces:
                return (peer, *random.choice(pieces))
        return None

    def _note_rtt(self, node_id: str, seconds: float) -> None:
        """Time to first byte, smoothed: what the tracker ranks peers by after location."""
        ms = seconds * 1000
        old = self._rtt.pop(node_id, None)
        self._rtt[node_id] = ms if old is None else 0.8 * old + 0.2 * ms
        while len(self._rtt) > 256:
            self._rtt.pop(next(iter(self._rtt)))

    def sources_of(self, content: bytes) -> dict[str, int]:
        """The peers that sent chunks of ``content``, with the bytes each sent, most first."""
        return dict(sorted(self._served.get(content, {}).items(), key=lambda kv: -kv[1]))

    def rtt_ms(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._rtt.items()}

    async def _lied(self, peer: PeerRecord, img: ImageData, chunk: int, why: str) -> tuple[str, None]:
        self._stats["bad_chunks"] += 1
        self._avoid[peer.node_id] = trio.current_time() + self._avoid_lying
        log.warning("peer %s sent a bad chunk %d of %s (%s): discarded, peer avoided and reported",
                    peer.node_id, chunk, img.content.hex(), why)
        try:
            with trio.move_on_after(self.timeout):
                await self._tracker.report(peer.node_id, img.content.hex(), chunk, why)
        except TrackerError as exc:
            log.info("could not report peer %s to the tracker: %s", peer.node_id, exc)
        return "lied", None

    def statistics(self) -> dict:
        now = trio.current_time()
        return {**self._stats, "avoided_peers": sorted(n for n, t in self._avoid.items() if t > now),
                "slow_peers": sorted(n for n, t in self._slow.items() if t > now),
                "manifests": len(self._manifests), "rtt_ms": self.rtt_ms()}

