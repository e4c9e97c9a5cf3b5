"""The tracker as a source of chunks (``source.Source``), for images it seeds: between peers and Glance.

While an image's manifest is lazy (``lazy_manifest``), the chunks the tracker granted this node
(nobody else holds or fetches them) are read through the tracker, which reads each chunk from
Glance once for every node and answers with the bytes and their ``Piece``.  The piece is checked
(``PeerDirectory.add_piece``: this image's, the tracker's proof) and every chunk against it before
the bytes are used; its digests then check the same chunks when peers send them.  For an image
with a built manifest, or none, or with the tracker down, everything goes on to Glance at once;
a run the tracker fails to give goes on to Glance too, and a failure that looks like the
tracker's (no answer, a timeout) opens the tracker breaker, so an outage costs one timeout.
"""

from __future__ import annotations

import logging

import trio

from thunderfs.p2p.lazy_manifest import LazyManifest
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs.fetch.source import Sink, Want, deadline_for
from thunderfs_common import chunk_digest
from thunderfs_common.chunk_runs import runs
from thunderfs_tracker.client import TrackerClient, TrackerError, TrackerRefused
from thunderfs_common.tracker_protocol import MAX_PIECE_CHUNKS

log = logging.getLogger(__name__)

# Glance's silence the tracker may add to a run's wait, beyond the peer timeout.
TRACKER_READ = 5.0


class SeedSource:
    name = "seed"
    # Runs of a flight asked at once: the tracker answers a run once it has all of it from Glance,
    # so a 16 MiB readahead flight goes as 1 MiB runs, four at a time, and a reader waiting on its
    # first chunks does not wait for the tracker to read the rest.
    CONCURRENT = 4

    def __init__(self, tracker: TrackerClient, directory: PeerDirectory, *, chunk_size: int, timeout: float = 2.0,
                 max_chunks: int = 16):
        self._tracker = tracker
        self._directory = directory
        self._cs = chunk_size
        self.timeout = timeout
        self._max = max(1, min(max_chunks, MAX_PIECE_CHUNKS))
        self._stats = dict.fromkeys(("seed_requests", "seed_chunks", "seed_bytes", "seed_failures",
                                     "seed_refused"), 0)

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        meta, img = want.meta, want.img
        lazy = self._directory.manifest_nowait(meta)
        if not isinstance(lazy, LazyManifest) or self._directory.tracker_breaker.is_open:
            return want.chunks
        left: list[int] = []
        todo = runs([c for c in want.chunks if not img.cached(c)], self._max)
        queue = iter(todo)  # taken in order: the flight's first chunks (a reader's, often) first

        async def worker() -> None:
            for first, count in queue:
                nbytes = min(img.size, (first + count) * self._cs) - first * self._cs
                if self._directory.tracker_breaker.is_open or not await self._one(want, lazy, first, count,
                                                                                   nbytes, sink):
                    left.extend(range(first, first + count))

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.CONCURRENT, len(todo))):
                nursery.start_soon(worker)
        return sorted(left)

    async def _one(self, want: Want, lazy: LazyManifest, first: int, count: int, nbytes: int, sink: Sink) -> bool:
        meta = want.meta
        self._stats["seed_requests"] += 1
        wait = self.timeout + TRACKER_READ
        try:
            with trio.fail_after(deadline_for(wait, nbytes)):
                piece, data = await self._tracker.seed(meta.id, self._cs, first, count, timeout=wait)
        except TrackerRefused as exc:
            self._stats["seed_refused"] += 1
            log.debug("the tracker does not seed %s chunks %d+%d: %s", meta.id, first, count, exc)
            return False
        except (TrackerError, trio.TooSlowError) as exc:
            self._stats["seed_failures"] += 1
            log.info("the tracker did not seed %s chunks %d+%d (%r): reading them from Glance", meta.id, first,
                     count, exc)
            self._directory.tracker_down(exc)
            return False
        if (piece.first, piece.count) != (first, count) or not self._directory.add_piece(meta, piece):
            self._stats["seed_refused"] += 1
            return False
        if len(data) != nbytes:
            log.warning("the tracker sent %d bytes for %d chunks of %s at %d: not used", len(data), count, meta.id,
                        first)
            self._stats["seed_refused"] += 1
            return False
        view, cs = memoryview(data), self._cs
        for i in range(count):
            if chunk_digest.digest(view[i * cs:(i + 1) * cs]) != piece.digest(first + i):
                log.warning("the tracker's chunk %d of %s does not match its own piece: not used", first + i, meta.id)
                self._stats["seed_refused"] += 1
                return False
        sink.put(first, data)
        self._stats["seed_chunks"] += count
        self._stats["seed_bytes"] += len(data)
        return True

    def statistics(self) -> dict:
        return dict(self._stats)
