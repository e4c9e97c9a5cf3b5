"""Getting chunks that are not cached: single flight, coalescing, priorities, readahead.

``Fetcher.ensure`` makes a set of chunks available: each missing chunk belongs to exactly one
*flight* (a run of adjacent missing chunks fetched with one Range request, at most
``max_request`` bytes) however many readers wait for it.  Flights run in the fetcher's own
nursery, so a reader that gives up (timeout, interrupt) does not cancel the fetch others share.
A flight holds one of the origin's slots, demand reads before readahead.

``Reader`` is one open file: it pins the chunks it reads (so eviction spares them), fetches what
is missing, reads from the store, and on sequential access fetches ahead of itself.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from typing import TYPE_CHECKING

from thunderfs.chunk_store import ABSENT, ChunkStore, ImageData
from thunderfs.errors import ChunkCorrupt, ChunkNotCached, FetchFailed, ThunderfsError
from thunderfs.image import ImageMeta
from thunderfs.origin import GlanceOrigin
from thunderfs.ratelimit import TokenBucket
from thunderfs.retry import with_retries
from thunderfs.slots import DEMAND, READAHEAD, PrioritySlots, Ticket

if TYPE_CHECKING:
    from thunderfs.peers import PeerSource

log = logging.getLogger(__name__)


class _Flight:
    __slots__ = ("first", "count", "ticket", "done", "data", "filled", "stored", "error")

    def __init__(self, first: int, count: int, ticket: Ticket):
        self.first = first
        self.count = count
        self.ticket = ticket
        self.done = trio.Event()
        self.data: bytearray | None = None
        self.filled: set[int] = set()  # chunks whose verified bytes are in ``data``
        self.stored = False
        self.error: BaseException | None = None


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def runs(chunks: list[int], max_len: int) -> list[tuple[int, int]]:
    """Sorted chunk numbers -> (first, count) runs of adjacent chunks, none longer than max_len."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c and out[-1][1] < max_len:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


# A transfer may take its base timeout plus its size at this rate: a 16 MiB readahead request that
# shares a slow link with 60 others is slow, not hung.  A silent source is cut sooner, by the
# clients' inactivity timeouts (--fetch-timeout, --peer-timeout).
MIN_RATE = 64 * 2**10


# Chunks fetched from Glance are cached (and so offered to peers) in pieces of this size as they
# arrive, not only once a whole request (up to 16 MiB) is in.
PLACE_STEP = 2**20


# The longest a flight waits for chunks another node claimed before fetching them from Glance itself.
CLAIM_WAIT_MAX = 60.0
# How often readahead and prefetch ask a slow tracker for a claim before fetching from Glance
# unclaimed (a reader waiting asks once: it had better have its bytes).
CLAIM_TRIES_BACKGROUND = 3


def deadline_for(timeout: float, nbytes: int) -> float:
    """Up to 1 MiB (every demand read the kernel sends) gets exactly the configured timeout."""
    return timeout + max(0, nbytes - 2**20) / MIN_RATE


class Fetcher:
    def __init__(self, store: ChunkStore, origin: GlanceOrigin, *, fetch_timeout: float = 20.0,
                 max_request: int = 16 * 2**20, origin_concurrency: int = 8, readahead: int = 64 * 2**20,
                 peers: "PeerSource | None" = None, origin_rate: float = 0):
        self._store = store
        self._origin = origin
        self._peers = peers
        self._origin_bucket = TokenBucket(origin_rate)
        self.fetch_timeout = fetch_timeout
        self.chunk_size = self._cs = store.chunk_size
        self.max_chunks = self._max_chunks = max(1, max_request // self._cs)
        self.readahead = readahead
        self._slots = PrioritySlots(origin_concurrency)
        self._flights: dict[tuple[bytes, int], _Flight] = {}
        self._demand_waiting = 0  # readers waiting in ensure()
        self._demand_idle = trio.Event()
        self._demand_idle.set()
        self._nursery: trio.Nursery | None = None
        # Called with (source, seconds) for every run of chunks fetched (metrics' histograms).
        self.observe: Callable[[str, float], None] | None = None
        self._stats = dict.fromkeys(("chunks_fetched", "bytes_fetched", "flights", "demand_waits",
                                     "readahead_chunks", "failures", "chunks_from_peers", "bytes_from_peers",
                                     "chunks_from_origin", "bytes_from_origin", "granted_chunks",
                                     "claimed_chunks_late"), 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def open(self, meta: ImageMeta) -> "Reader":
        if self._peers is not None and self._nursery is not None:
            # Ask for the manifest now, so that it is there (or being built) before peers are needed.
            self._nursery.start_soon(self._peers.manifest, meta)
        return Reader(self, meta, self._store.image(meta.content_key, meta.size))

    async def wait_manifest(self, meta: ImageMeta, timeout: float = 10.0) -> bool:
        """Until the image's manifest is here (True), or for at most ``timeout`` seconds: what
        is fetched before it comes from Glance (peers' bytes cannot be checked), so a prefetch,
        which nobody waits for, waits for it first."""
        if self._peers is None:
            return False
        with trio.move_on_after(timeout):
            while await self._peers.manifest(meta) is None:
                await trio.sleep(1.0)
            return True
        return False

    def start(self, meta: ImageMeta, img: ImageData, chunks: list[int], priority: int) -> list[_Flight]:
        """Make sure a flight covers each of ``chunks`` (missing ones); return those flights."""
        flights: list[_Flight] = []
        to_start: list[int] = []
        for c in chunks:
            f = self._flights.get((img.content, c))
            if f is not None:
                if not flights or flights[-1] is not f:
                    f.ticket.promote(priority)
                    flights.append(f)
            elif img.state[c] == ABSENT:
                to_start.append(c)
        for first, count in runs(to_start, self._max_chunks):
            f = _Flight(first, count, self._slots.ticket(priority))
            for c in range(first, first + count):
                self._flights[(img.content, c)] = f
            assert self._nursery is not None, "Fetcher.run() is not running"
            self._nursery.start_soon(self._fly, meta, img, f)
            flights.append(f)
        return flights

    def in_flight(self, img: ImageData, chunk: int) -> bool:
        return (img.content, chunk) in self._flights

    async def wait_demand_idle(self) -> None:
        """Until no reader waits for a fetch (prefetch yields to demand)."""
        while self._demand_waiting:
            await self._demand_idle.wait()

    async def ensure(self, meta: ImageMeta, img: ImageData, chunks: list[int]) -> dict[int, bytes]:
        """Wait until ``chunks`` are cached; returns the bytes of any that could not be cached."""
        flights = self.start(meta, img, chunks, DEMAND)
        self._stats["demand_waits"] += 1
        # The reader's own bound, whatever the flights it waits on still try (a flight's sources
        # are tried in turn, each with its own deadline; it goes on for the cache after this).
        limit = deadline_for(self.fetch_timeout, len(chunks) * self._cs) + 1
        if not self._demand_waiting:
            self._demand_idle = trio.Event()
        self._demand_waiting += 1
        try:
            with trio.move_on_after(limit) as scope:
                for f in flights:
                    await f.done.wait()
        finally:
            self._demand_waiting -= 1
            if not self._demand_waiting:
                self._demand_idle.set()
        if scope.cancelled_caught:
            raise FetchFailed(meta.id, chunks[0], f"no source delivered it within {limit:g}s")
        extra: dict[int, bytes] = {}
        cs = self._cs
        for f in flights:
            if f.error is not None:
                raise FetchFailed(meta.id, f.first, f.error)
            if not f.stored:
                # Some pieces could not be cached: serve what the flight holds from memory.  Only
                # chunks it filled: others were cached meanwhile by another fetch (its buffer has
                # zeros there); the store reads them from disk, or says they are gone.
                for c in f.filled:
                    i = c - f.first
                    extra[c] = bytes(f.data[i * cs:(i + 1) * cs])
        return extra

    async def _fly(self, meta: ImageMeta, img: ImageData, f: _Flight) -> None:
        start = f.first * self._cs
        end = min(img.size, (f.first + f.count) * self._cs)
        try:
            f.stored = await self._get(meta, img, f)
            self._stats["flights"] += 1
            self._stats["chunks_fetched"] += f.count
            self._stats["bytes_fetched"] += end - start
            if f.ticket.priority != DEMAND:
                self._stats["readahead_chunks"] += f.count
        except ThunderfsError as exc:
            f.error = exc
            self._stats["failures"] += 1
        except Exception as exc:
            # A flight is a boundary: whatever went wrong fails its readers (EIO), never the daemon.
            log.exception("fetching chunks %d..%d of %s failed", f.first, f.first + f.count - 1, meta.id)
            f.error = _first_leaf(exc)
            self._stats["failures"] += 1
        finally:
            for c in range(f.first, f.first + f.count):
                if self._flights.get((img.content, c)) is f:
                    del self._flights[(img.content, c)]
            f.done.set()

    async def _get(self, meta: ImageMeta, img: ImageData, f: _Flight) -> bool:
        """Fill ``f.data``: first what peers hold (verified), then, for the rest, what this node
        may fetch from Glance (claimed at the tracker) while taking what other nodes are fetching
        from them.  Every piece is cached the moment it arrives, so that others can take it at once
        (two nodes waiting for each other's claims never deadlock).  True if all was cached."""
        cs, start = self._cs, f.first * self._cs
        end = min(img.size, (f.first + f.count) * cs)
        f.data = data = bytearray(end - start)
        stored = True

        def place(first: int, piece: bytes | bytearray) -> None:
            nonlocal stored
            data[(first - f.first) * cs:(first - f.first) * cs + len(piece)] = piece
            f.filled.update(range(first, first + -(-len(piece) // cs)))
            stored = self._store.stage(img, first, piece) and stored

        missing = list(range(f.first, f.first + f.count))
        peers = self._peers
        if peers is not None:
            got: set[int] = set()
            started = trio.current_time()
            with trio.move_on_after(peers.timeout * 3 + (end - start) / MIN_RATE):
                for rfirst, piece in await peers.fetch(meta, img, f.first, f.count):
                    place(rfirst, piece)
                    got.update(range(rfirst, rfirst + -(-len(piece) // cs)))
                    self._count(img, "peers", -(-len(piece) // cs), len(piece), started)
            missing = [c for c in missing if img.state[c] == ABSENT and c not in got]
        if not missing:
            return stored
        if peers is not None:
            tries = 1 if f.ticket.priority == DEMAND else CLAIM_TRIES_BACKGROUND
            granted, others = await peers.claim(meta, img, missing, tries=tries)
        else:
            granted, others = missing, []
        late: list[int] = []
        self._stats["granted_chunks"] += len(granted)

        async def from_claimer(peer, chunks, held):
            before, started = len(chunks), trio.current_time()
            wait = min(CLAIM_WAIT_MAX, deadline_for(self.fetch_timeout, before * cs))
            left = await peers.take_claimed(meta, img, peer, chunks, wait, place, held=held,
                                            urgent=f.ticket.priority == DEMAND)
            if before > len(left):
                self._count(img, "peers", before - len(left), (before - len(left)) * cs, started)
            late.extend(left)
            self._stats["claimed_chunks_late"] += len(left)

        try:
            async with trio.open_nursery() as nursery:
                for peer, chunks, held in others:
                    nursery.start_soon(from_claimer, peer, chunks, held)
                if granted:
                    await self._from_origin(meta, img, granted, f.ticket, place)
        except BaseExceptionGroup as group:
            ours, other = group.split(ThunderfsError)
            if other is None:
                raise _first_leaf(ours) from None  # e.g. Glance unavailable: the readers' EIO
            raise
        if late:
            await self._from_origin(meta, img, sorted(late), self._slots.ticket(f.ticket.priority), place)
        return stored

    async def _from_origin(self, meta: ImageMeta, img: ImageData, chunks: list[int], ticket: Ticket,
                           place) -> None:
        """Glance, asked last, within its own slots and bandwidth."""
        cs, step = self._cs, max(1, PLACE_STEP // self._cs)
        async with ticket:
            for rfirst, rcount in runs(chunks, self._max_chunks):
                a, b = rfirst * cs, min(img.size, (rfirst + rcount) * cs)
                started = trio.current_time()
                await self._origin_bucket.wait_for(b - a, ticket.priority)
                # Pieces are placed (cached, and so offered to peers) as they arrive, and a retry
                # asks only for what is still missing.
                placed = rfirst  # the first chunk not placed yet
                at = a  # where the attempt under way started

                def on_data(buf: bytearray, got: int) -> None:
                    nonlocal placed
                    ready = (at + got) // cs if at + got < b else rfirst + rcount
                    if ready - placed >= step or ready == rfirst + rcount:
                        place(placed, memoryview(buf)[placed * cs - at:min(b, ready * cs) - at])
                        placed = ready

                async def attempt() -> None:
                    nonlocal at
                    at = placed * cs
                    if at < b:
                        await self._origin.read_range(meta.id, at, b, on_data)

                await with_retries(attempt, timeout=deadline_for(self.fetch_timeout, b - a),
                                   what=f"Glance read of {meta.id} chunks {rfirst}..{rfirst + rcount - 1}")
                self._count(img, "origin", rcount, b - a, started)

    def _count(self, img: ImageData, source: str, chunks: int, nbytes: int, started: float) -> None:
        """Chunks that arrived from ``source`` ("peers", "origin"), fetched since ``started``."""
        self._stats[f"chunks_from_{source}"] += chunks
        self._stats[f"bytes_from_{source}"] += nbytes
        img.counters[f"bytes_from_{source}"] += nbytes
        if self.observe is not None:
            self.observe(source, trio.current_time() - started)

    def statistics(self) -> dict:
        return {**self._stats, "in_flight": len({id(f) for f in self._flights.values()}),
                "origin_slots": self._slots.statistics()}


class Reader:
    """One open image file.

    Readahead starts only once the reader has gone ``SEQUENTIAL_TRIGGER`` bytes in order: a boot's
    reads are mostly scattered (the recorded Debian boot never reads more than 1 MiB in order),
    and fetching ahead of scattered reads only wastes Glance's bandwidth.  Then a window of
    chunks, doubling up to ``readahead``, is kept in flight ahead of the reader.
    """

    SEQUENTIAL_TRIGGER = 2 * 2**20
    INITIAL_WINDOW = 8 * 2**20

    def __init__(self, fetcher: Fetcher, meta: ImageMeta, img: ImageData):
        self._fetcher = fetcher
        self._store = fetcher._store
        self.meta = meta
        self.img = img
        self._recent: deque[tuple[int, int]] = deque(maxlen=8)
        self._run_bytes = 0
        self._window = 0
        self._ahead_until = -1
        # Called with (first chunk, last chunk, had to fetch) after every read (profiles.Activity).
        self.watcher = None

    async def read(self, offset: int, size: int) -> bytes:
        img = self.img
        if offset >= img.size or size <= 0:
            return b""
        size = min(size, img.size - offset)
        first, last = img.chunk_range(offset, size)
        store = self._store
        token = store.pin(img, first, last)
        try:
            waited = False
            for _ in range(3):
                missing = store.missing(img, first, last)
                self._read_ahead(offset, size, last)
                if missing:
                    waited = True
                    extra = await self._fetcher.ensure(self.meta, img, missing)
                else:
                    extra = None
                try:
                    data = store.read(img, offset, size, extra)
                except (ChunkCorrupt, ChunkNotCached):
                    continue
                if self.watcher is not None:
                    self.watcher(first, last, waited)
                img.counters["bytes_read"] += len(data)
                return data
            raise FetchFailed(self.meta.id, first, "cached copy keeps failing its checksum or going away")
        finally:
            store.unpin(img, token)

    def _read_ahead(self, offset: int, size: int, last: int) -> None:
        limit = self._fetcher.readahead
        # The kernel sends a sequential reader's requests concurrently, so they may arrive a little
        # out of order: "in order" means adjacent to one of the last few reads.
        if any(offset == end or offset + size == start for start, end in self._recent):
            self._run_bytes += size
        else:
            self._run_bytes = size
            self._window = 0
            self._ahead_until = last
        self._recent.append((offset, offset + size))
        if not limit or self._run_bytes < self.SEQUENTIAL_TRIGGER:
            return
        # Keep the whole window in flight, issued in pieces as large as one request may be, so
        # that several large requests overlap instead of the reader waiting on one at a time.
        self._window = min(limit, max(self.INITIAL_WINDOW, self._window * 2))
        fetcher, img = self._fetcher, self.img
        target = min(img.nchunks - 1, last + max(1, self._window // fetcher.chunk_size))
        ra_first = max(last + 1, self._ahead_until + 1)
        piece = min(fetcher.max_chunks, max(1, self._window // fetcher.chunk_size // 4))
        if target - ra_first + 1 < piece and target < img.nchunks - 1:
            return
        self._ahead_until = target
        missing = self._store.missing(img, ra_first, target)
        if missing:
            fetcher.start(self.meta, img, missing, READAHEAD)
