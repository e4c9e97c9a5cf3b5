"""Prefetching along the cluster's profile, and warming whole images.

When an image is opened (or on ``thunderfs prefetch``), its profile is asked for and its chunks
are fetched in the profile's order, those not cached yet, a few flights at a time, with the lowest
priority for Glance's slots.  Demand reads go first: no new prefetch batch starts while a reader
waits for a fetch.  An automatic prefetch stops once nobody has read the image for
``prefetch_idle`` seconds.  A profile that does not fit the image (another content, a chunk past
the end) is ignored with a warning; without a tracker there is no prefetch.  ``warm`` fetches the
profile's chunks first, then the rest of the image in the largest requests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from thunderfs.cache.store import ImageData
from thunderfs.fetch.fetcher import Fetcher
from thunderfs.fetch.slots import PREFETCH
from thunderfs_common.image import ImageMeta
from thunderfs.profiles.activity import NOT_PREFETCHED, PREFETCHED, Activity
from thunderfs_tracker.client import TrackerClient, TrackerError
from thunderfs_common.tracker_protocol import Profile, ProtocolError

log = logging.getLogger(__name__)


class Prefetcher:
    """``wait_ready(meta)``: until the sources are ready for the image (the peer source has its
    manifest), so that a prefetch does not take from Glance what peers hold; False on timeout.
    ``plan(meta, img, chunks)``: told each batch before it is fetched (the peer source claims it
    in one request, not one per flight).  ``activity(meta, img)``: the image's record, kept by
    the profiles."""

    def __init__(self, fetcher: Fetcher, tracker: TrackerClient | None, activity: Callable[[ImageMeta, ImageData], Activity],
                 *, chunk_size: int, prefetch_flights: int = 3, prefetch_idle: float = 30.0, batch_chunks: int = 64,
                 wait_ready: Callable[[ImageMeta], Awaitable[bool]] | None = None,
                 plan: Callable[[ImageMeta, ImageData, list[int]], Awaitable[None]] | None = None):
        self._fetcher = fetcher
        self._tracker = tracker
        self._activity = activity
        self._cs = chunk_size
        self.prefetch_flights = prefetch_flights
        self.prefetch_idle = prefetch_idle
        self._batch = batch_chunks
        self._wait_ready = wait_ready
        self._plan = plan
        self.nursery: trio.Nursery | None = None  # the profiles' own, once they run

    async def profile(self, meta: ImageMeta, img: ImageData) -> Profile | None:
        """The tracker's profile of the image if it fits it; None (with a warning) if not."""
        if self._tracker is None:
            return None
        try:
            with trio.fail_after(10):
                profile = await self._tracker.profile(img.content.hex(), self._cs)
        except (TrackerError, ProtocolError, trio.TooSlowError) as exc:
            log.warning("no profile of %s: %s", meta.id, exc)
            return None
        if profile is None:
            return None
        if (profile.content, profile.nchunks) != (img.content.hex(), img.nchunks):
            log.warning("the tracker's profile of %s is for another content (%s, %d chunks): ignored",
                        meta.id, profile.content, profile.nchunks)
            return None
        return profile

    def start_job(self, meta: ImageMeta, img: ImageData, kind: str) -> Activity:
        """Start a prefetch or warm job unless one runs (warm replaces a running prefetch: it
        fetches the same chunks first, then the rest); the image's activity."""
        act = self._activity(meta, img)
        if self.nursery is not None and (act.job is None or (kind == "warm" and act.job == "prefetch")):
            self.begin(act, kind, stop_when_idle=False)
        return act

    def begin(self, act: Activity, kind: str, stop_when_idle: bool) -> None:
        """The job is the image's from now on (a job it replaces is cancelled)."""
        if act.job_scope is not None:
            act.job_scope.cancel()
        act.job, act.job_done, act.job_total = kind, 0, 0
        act.job_scope = trio.CancelScope()
        assert self.nursery is not None
        self.nursery.start_soon(self._job, act, act.job_scope, kind, stop_when_idle)

    def cancel_job(self, act: Activity) -> bool:
        if act.job_scope is None:
            return False
        act.job_scope.cancel()
        return True

    async def _job(self, act: Activity, scope: trio.CancelScope, kind: str, stop_when_idle: bool) -> None:
        try:
            with scope:
                profile = await self.profile(act.meta, act.img)
                order = [c for c, _ in profile.touches] if profile else []
                if profile:
                    act.profile_version = profile.version
                    act.profile_chunks = frozenset(order)
                rest: list[int] = []
                if kind == "warm":
                    listed = set(order)
                    rest = [c for c in range(act.img.nchunks) if c not in listed]
                if not order and not rest:
                    return
                act.job_total = len(order) + len(rest)
                log.info("%s of %s: %d chunks%s", kind, act.meta.id, act.job_total,
                         f" (profile version {profile.version})" if profile else "")
                mark = kind == "prefetch"  # warm's chunks are not counted as prefetched (hits, waste)
                if self._wait_ready is not None and not await self._wait_ready(act.meta):
                    log.info("%s of %s goes ahead without the manifest: from Glance only", kind, act.meta.id)
                await self._fetch_in_order(act, order, self._batch, mark, stop_when_idle)
                # Then, for warm, the rest in the largest requests: the profile's chunks first.
                await self._fetch_in_order(act, rest, self._fetcher.max_chunks, mark, stop_when_idle)
                log.info("%s of %s done: %d chunks", kind, act.meta.id, act.job_done)
        finally:
            if act.job_scope is scope:  # not replaced by another job meanwhile
                act.job, act.job_scope = None, None

    async def _fetch_in_order(self, act: Activity, order: list[int], batch: int, mark: bool,
                              stop_when_idle: bool) -> None:
        """Fetch the missing ones of ``order``, ``batch`` chunks at a time, in that order, a few
        batches at once; ``mark``: count them as prefetched."""
        img, meta, fetcher = act.img, act.meta, self._fetcher
        pos = 0
        started = trio.current_time()
        stopped = False

        async def worker() -> None:
            nonlocal pos, stopped
            while pos < len(order) and not stopped:
                if stop_when_idle and trio.current_time() - max(act.last_read, started) > self.prefetch_idle:
                    log.info("prefetch of %s stopped: nobody has read it for %.0fs", meta.id, self.prefetch_idle)
                    stopped = True
                    return
                await fetcher.wait_demand_idle()
                part = order[pos:pos + batch]
                pos += len(part)
                # A prefetch leaves chunks in flight to their flights (a reader's, most likely:
                # not its hits); warm joins them, so that it ends with every chunk there.
                missing = sorted(c for c in part if not img.cached(c) and not (mark and fetcher.in_flight(img, c)))
                if missing:
                    if mark:  # a read from now on is a hit
                        for c in missing:
                            act.marks[c] = PREFETCHED
                        act.stats["prefetched"] += len(missing)
                    if self._plan is not None:
                        await self._plan(meta, img, missing)
                    await fetcher.fetch(meta, img, missing, PREFETCH)
                    if mark:  # what could not be fetched was not prefetched
                        for c in missing:
                            if not img.cached(c) and act.marks[c] == PREFETCHED:
                                act.marks[c] = NOT_PREFETCHED
                                act.stats["prefetched"] -= 1
                act.job_done += len(part)

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, self.prefetch_flights)):
                nursery.start_soon(worker)
