"""What readers, recordings and prefetch jobs have done with one image content on this node.

Counters per image: chunks prefetched, prefetched chunks later read (hits), prefetched chunks
never read (waste), demand reads that had to wait.
"""

from __future__ import annotations

import trio

from thunderfs.cache.store import ImageData
from thunderfs_common.image import ImageMeta

NOT_PREFETCHED, PREFETCHED, HIT = 0, 1, 2


class Recording:
    """First touches of one image's chunks, in ms since ``started``."""

    def __init__(self, nchunks: int, started: float):
        self.started = started
        self.last_read = started
        self._seen = bytearray(nchunks)
        self.touches: list[tuple[int, int]] = []

    def touch(self, first: int, last: int, now: float) -> None:
        self.last_read = now
        seen = self._seen
        for c in range(first, last + 1):
            if not seen[c]:
                seen[c] = 1
                self.touches.append((c, int((now - self.started) * 1000)))


class Activity:
    """What readers and prefetch have done with one image content on this node."""

    def __init__(self, meta: ImageMeta, img: ImageData):
        self.meta = meta
        self.img = img
        self.last_read = trio.current_time()
        self.marks = bytearray(img.nchunks)  # NOT_PREFETCHED / PREFETCHED / HIT
        self.recording: Recording | None = None
        self.job: str | None = None  # "prefetch" or "warm" while one runs
        self.job_scope: trio.CancelScope | None = None  # the running job's: which job it is
        self.job_total = self.job_done = 0
        self.profile_version = 0
        self.profile_chunks: frozenset[int] | None = None  # the chunks of the profile prefetched, once one is
        self.stats = dict.fromkeys(("prefetched", "hits", "demand_waits", "reads", "recordings_sent"), 0)

    def read(self, first: int, last: int, waited: bool) -> None:
        """Reader hook: every read of chunks first..last (``waited``: it had to fetch)."""
        now = self.last_read = trio.current_time()
        stats = self.stats
        stats["reads"] += 1
        if waited:
            stats["demand_waits"] += 1
        if self.recording is not None:
            self.recording.touch(first, last, now)
        if stats["prefetched"] > stats["hits"]:
            marks = self.marks
            for c in range(first, last + 1):
                if marks[c] == PREFETCHED:
                    marks[c] = HIT
                    stats["hits"] += 1

    def expected(self, chunk: int) -> bool:
        """Reader hook: whether a read may be extended to ``chunk``: once a profile is being
        prefetched, only to the chunks it lists (a boot reads those; fetching others on a guess
        only costs Glance: issue 27, each node of a storm extended its misses to chunks of its
        own, and Glance sent 80-210 chunks beyond the profile's 613)."""
        return self.profile_chunks is None or chunk in self.profile_chunks

    def statistics(self) -> dict:
        s = self.stats
        return {"image_id": self.meta.id, "chunk_size": self.img.chunk_size, **s, "waste": s["prefetched"] - s["hits"],
                "recording": self.recording is not None, "profile_version": self.profile_version,
                "job": self.job, "job_done": self.job_done, "job_total": self.job_total,
                "cached_chunks": self.img.cached_count()}
