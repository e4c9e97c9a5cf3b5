"""Getting chunks that are not cached: single flight, coalescing, priorities.

``Fetcher.ensure`` makes a set of chunks available: each missing chunk belongs to exactly one
*flight* (a run of adjacent missing chunks, at most ``max_request`` bytes) however many readers
wait for it.  Flights run in the fetcher's own nursery, so a reader that gives up (timeout,
interrupt) does not cancel the fetch others share.  A flight asks its sources in order (peers,
then Glance: ``source.Source``); what one does not deliver goes to the next.  Every verified run
a source delivers is cached at once; what the cache cannot take is kept in the flight, so that a
reader is served even when the cache has no room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from thunderfs.cache.store import ChunkStore, ImageData
from thunderfs.errors import FetchFailed, ThunderfsError
from thunderfs.fetch.flights import Flight, SingleFlight
from thunderfs_common.image import ImageMeta
from thunderfs.fetch.slots import DEMAND
from thunderfs.fetch.source import Source, Urgency, Want, deadline_for
from thunderfs_common.chunk_runs import runs

log = logging.getLogger(__name__)


class _Run:
    """What one flight holds: its chunks, its priority, and the verified bytes the cache could not
    take (kept for its readers; what the cache took, they read from there)."""

    __slots__ = ("meta", "img", "first", "count", "urgency", "ahead", "kept", "filled", "nbytes", "flight")

    def __init__(self, meta: ImageMeta, img: ImageData, first: int, count: int, urgency: Urgency):
        self.meta, self.img, self.first, self.count, self.urgency = meta, img, first, count, urgency
        # Started ahead of any reader (readahead, prefetch): counted so even when a reader's
        # demand later promotes it (a slow origin lets the reader catch up with its window).
        self.ahead = urgency.priority != DEMAND
        self.kept: dict[int, bytes] = {}  # chunk -> its verified bytes, where the cache had no room
        self.filled: set[int] = set()  # chunks delivered (cached, or kept)
        self.nbytes = 0
        self.flight: Flight | None = None

    def holds(self, chunks) -> bool:
        """Every one of ``chunks`` arrived and is still there: cached, or kept.  One cached and
        then dropped (found rotten, evicted) while the flight goes on is not: its reader waits
        for the flight's end and asks again, when a new flight can fetch it."""
        img, kept = self.img, self.kept
        return all(c in kept or (c in self.filled and img.cached(c)) for c in chunks)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _Sink:
    """A flight's sink for one source: caches what arrives, keeps it, counts it by source."""

    def __init__(self, fetcher: "Fetcher", run: _Run, source: str, pass_on: Callable[[list[int]], None]):
        self._fetcher, self._run, self._source, self.pass_on = fetcher, run, source, pass_on
        self._started = trio.current_time()

    def put(self, first: int, data, buffer=None) -> None:
        run, cs = self._run, self._run.img.chunk_size
        n = -(-len(data) // cs)
        run.filled.update(range(first, first + n))
        run.nbytes += len(data)
        if not self._fetcher._store.stage(run.img, first, data, buffer):
            # Copied only here: a copy of every fetched byte into a fresh buffer cost the cold
            # read a tenth of its time (page faults and zeroing), for the rare run not cached.
            view = memoryview(data)
            for i in range(n):
                run.kept[first + i] = bytes(view[i * cs:(i + 1) * cs])
        self._fetcher._count(run.img, self._source, n, len(data), self._started)
        if run.flight is not None:
            run.flight.progress()  # readers whose chunks these were go on now


class Fetcher:
    def __init__(self, store: ChunkStore, sources: Sequence[Source], *, fetch_timeout: float = 20.0,
                 max_request: int = 16 * 2**20, observe: Callable[[str, float], None] | None = None,
                 bdp: Callable[[], int] | None = None):
        if not sources:
            raise ValueError("a fetcher needs at least one source")
        self._store = store
        self._sources = list(sources)
        self.fetch_timeout = fetch_timeout
        self.chunk_size = self._cs = store.chunk_size
        self.max_chunks = max(1, max_request // self._cs)
        self._flights = SingleFlight()
        self._demand_waiting = 0  # readers waiting in ensure()
        self._demand_idle = trio.Event()
        self._demand_idle.set()
        self._nursery: trio.Nursery | None = None
        # Called with (source, seconds) for every run of chunks a source delivered (metrics).
        self._observe = observe
        self._bdp = bdp  # the origin's bandwidth-delay product (bytes), if it measures one
        self._stats = dict.fromkeys(("chunks_fetched", "bytes_fetched", "flights", "demand_waits",
                                     "readahead_chunks", "failures"), 0)
        for s in self._sources:
            self._stats.update({f"chunks_from_{s.name}": 0, f"bytes_from_{s.name}": 0})

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, meta: ImageMeta, img: ImageData, chunks: list[int], priority: int) -> list[Flight]:
        """Make sure a flight covers each of ``chunks`` (missing ones); return those flights."""
        flights: list[Flight] = []
        to_start: list[int] = []
        for c in chunks:
            f = self._flights.get((img.content, c))
            if f is not None:
                if not flights or flights[-1] is not f:
                    f.state.urgency.promote(priority)
                    flights.append(f)
            elif not img.cached(c):
                to_start.append(c)
        assert self._nursery is not None, "Fetcher.run() is not running"
        # Chunks another cached image holds under the same digest are not fetched (issue 31).
        to_start = self._store.share(img, to_start) if to_start else to_start
        for first, count in runs(to_start, self.max_chunks):
            run = _Run(meta, img, first, count, Urgency(priority))
            keys = [(img.content, c) for c in range(first, first + count)]
            run.flight = self._flights.launch(self._nursery, keys, self._fly, state=run)
            flights.append(run.flight)
        return flights

    def bdp(self) -> int:
        """How many bytes more a request may carry for about the price of one more request."""
        return self._bdp() if self._bdp is not None else self.max_chunks * self._cs

    def in_flight(self, img: ImageData, chunk: int) -> bool:
        return (img.content, chunk) in self._flights

    async def wait_demand_idle(self) -> None:
        """Until no reader waits for a fetch (prefetch yields to demand)."""
        while self._demand_waiting:
            await self._demand_idle.wait()

    async def fetch(self, meta: ImageMeta, img: ImageData, chunks: list[int], priority: int) -> None:
        """Fetch the missing ones of ``chunks`` at ``priority`` and wait until their flights end,
        however they end (prefetch: what failed is simply not cached)."""
        for f in self.start(meta, img, chunks, priority):
            await f.wait_done()

    async def ensure(self, meta: ImageMeta, img: ImageData, chunks: list[int],
                     along: list[int] = ()) -> dict[int, bytes]:
        """Wait until ``chunks`` are cached; returns the bytes of any that could not be cached.
        ``along``: chunks fetched in the same requests, which the reader neither waits for nor
        is bounded by (a miss's extension: its reader must not wait longer for them)."""
        flights = self.start(meta, img, list(chunks) + list(along), DEMAND)
        self._stats["demand_waits"] += 1
        # The reader's own bound, whatever the flights it waits on still try (a flight's sources
        # are tried in turn, each with its own deadline; it goes on for the cache after this).
        limit = deadline_for(self.fetch_timeout, len(chunks) * self._cs) + 1
        if not self._demand_waiting:
            self._demand_idle = trio.Event()
        self._demand_waiting += 1
        need = set(chunks)
        mine = [need.intersection(range(f.state.first, f.state.first + f.state.count)) for f in flights]
        flights, mine = [f for f, w in zip(flights, mine) if w], [w for w in mine if w]
        try:
            with trio.move_on_after(limit) as scope:
                # Until each flight has delivered this reader's chunks (the pieces of a long
                # request are cached as they arrive), not until it has ended.
                for f, want in zip(flights, mine):
                    while not f.done and not f.state.holds(want):
                        await f.wait_progress()
        finally:
            self._demand_waiting -= 1
            if not self._demand_waiting:
                self._demand_idle.set()
        if scope.cancelled_caught:
            raise FetchFailed(meta.id, chunks[0], f"no source delivered it within {limit:g}s")
        extra: dict[int, bytes] = {}
        for f, want in zip(flights, mine):
            run: _Run = f.state
            if f.error is not None and not run.holds(want):
                raise FetchFailed(meta.id, run.first, f.error)
            # Pieces the cache could not take are served from memory; the rest from the cache.
            extra.update(run.kept)
        return extra

    async def _fly(self, flight: Flight) -> None:
        run: _Run = flight.state
        try:
            await self._through(0, list(range(run.first, run.first + run.count)), run)
        except Exception as exc:
            # A flight is a boundary: whatever went wrong fails its readers (EIO), never the daemon.
            self._stats["failures"] += 1
            if isinstance(exc, ExceptionGroup):
                other = exc.split(ThunderfsError)[1]
            else:
                other = None if isinstance(exc, ThunderfsError) else exc
            if other is not None:  # a source's failure is ours (SourceFailed); anything else, a bug: logged whole
                log.error("fetching chunks %d..%d of %s failed", run.first, run.first + run.count - 1,
                          run.meta.id, exc_info=exc)
            raise _first_leaf(exc) from None
        finally:
            # Peers waiting here for these chunks look again: they do not wait for what this
            # node no longer fetches (they see it once the flight is gone, which is before
            # they run again).
            run.img.wake_waiters()
        self._stats["flights"] += 1
        self._stats["chunks_fetched"] += run.count
        self._stats["bytes_fetched"] += run.nbytes
        if run.ahead:
            self._stats["readahead_chunks"] += run.count

    async def _through(self, i: int, chunks: list[int], run: _Run) -> None:
        """Ask source ``i`` for ``chunks``; what it passes on or leaves goes to source ``i + 1``,
        at once, while source ``i`` goes on with the rest."""
        source = self._sources[i]
        unserved: list[int] = []

        async with trio.open_nursery() as nursery:
            def pass_on(more: list[int]) -> None:
                more = [c for c in more if c not in run.filled and not run.img.cached(c)]
                if not more:
                    return
                if i + 1 < len(self._sources):
                    nursery.start_soon(self._through, i + 1, more, run)
                else:
                    unserved.extend(more)

            sink = _Sink(self, run, source.name, pass_on)
            pass_on(await source.fetch(Want(run.meta, run.img, chunks, run.urgency), sink))
        if unserved:
            raise FetchFailed(run.meta.id, min(unserved), f"no source has chunks {min(unserved)}..{max(unserved)}")

    def _count(self, img: ImageData, source: str, chunks: int, nbytes: int, started: float) -> None:
        """Chunks that arrived from ``source`` ("peers", "seed", "origin"), asked for since ``started``."""
        self._stats[f"chunks_from_{source}"] += chunks
        self._stats[f"bytes_from_{source}"] += nbytes
        img.counters[f"bytes_from_{source}"] += nbytes
        if self._observe is not None:
            self._observe(source, trio.current_time() - started)

    def statistics(self) -> dict:
        return {**self._stats, "in_flight": self._flights.statistics()["flights"]}
