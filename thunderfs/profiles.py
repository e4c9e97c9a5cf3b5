"""Boot access profiles on a node: record what readers touch first, prefetch along the cluster's
profile, warm whole images.

*Recording.*  The first time an image is opened here with none of it cached (or on
``thunderfs profile record``), every chunk a reader touches for the first time is noted with its
time since the open, until ``window`` seconds have passed or reads have stopped for ``idle``
seconds (a boot has pauses of 10 s); the recording goes to the tracker, which merges it into the
image's profile.  Prefetch and warm jobs fetch chunks but do not read them: only readers count.

*Prefetch.*  When an image is opened (or on ``thunderfs prefetch``), its profile is asked for
and its chunks are fetched in the profile's order, those not cached yet, a few flights at a
time, with the lowest priority for Glance's slots.  Demand reads go first: no new prefetch batch
starts while a reader waits for a fetch.  An automatic prefetch stops once nobody has read the
image for ``prefetch_idle`` seconds.  A profile that does not fit the image (another content, a
chunk past the end) is ignored with a warning; without a tracker there is no prefetch.

*Counters*, per image: chunks prefetched, prefetched chunks later read (hits), prefetched
chunks never read (waste), demand reads that had to wait.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from thunderfs.chunk_store import ImageData
from thunderfs.fetcher import Fetcher
from thunderfs.image import ImageMeta
from thunderfs.reader import Reader
from thunderfs.slots import PREFETCH
from thunderfs_tracker.client import TrackerClient, TrackerError
from thunderfs_tracker.protocol import Profile, ProtocolError

log = logging.getLogger(__name__)

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

    def statistics(self) -> dict:
        s = self.stats
        return {"image_id": self.meta.id, "chunk_size": self.img.chunk_size, **s, "waste": s["prefetched"] - s["hits"],
                "recording": self.recording is not None, "profile_version": self.profile_version,
                "job": self.job, "job_done": self.job_done, "job_total": self.job_total,
                "cached_chunks": self.img.cached_count()}


class Profiles:
    """``wait_ready(meta)``: until the sources are ready for the image (the peer source has its
    manifest), so that a prefetch does not take from Glance what peers hold; False on timeout."""

    def __init__(self, fetcher: Fetcher, tracker: TrackerClient | None, *, chunk_size: int,
                 record_window: float = 60.0, record_idle: float = 20.0, prefetch_flights: int = 3,
                 prefetch_idle: float = 30.0, batch_chunks: int = 64,
                 wait_ready: Callable[[ImageMeta], Awaitable[bool]] | None = None):
        self._fetcher = fetcher
        self._tracker = tracker
        self._wait_ready = wait_ready
        self._cs = chunk_size
        self.record_window = record_window
        self.record_idle = record_idle
        self.prefetch_flights = prefetch_flights
        self.prefetch_idle = prefetch_idle
        self._batch = batch_chunks
        self._activity: dict[bytes, Activity] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def has_tracker(self) -> bool:
        return self._tracker is not None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def activity(self, meta: ImageMeta, img: ImageData) -> Activity:
        act = self._activity.get(img.content)
        if act is None or act.img is not img:
            act = self._activity[img.content] = Activity(meta, img)
        act.meta = meta
        return act

    # --- the FUSE side's hook ----------------------------------------------------------------

    def opened(self, reader: Reader) -> None:
        """An image was opened: watch its reads; record and prefetch as configured."""
        img = reader.img
        first_open = img.content not in self._activity
        act = self.activity(reader.meta, img)
        reader.watch(act.read)
        if self._nursery is None or self._tracker is None:
            return
        # The first open with nothing of it cached: opened on this node for the first time.
        if first_open and self.record_window > 0 and not img.cached_count():
            self.start_recording(act, self.record_window)
        if self.prefetch_flights > 0 and act.job is None:
            self._begin(act, "prefetch", stop_when_idle=True)

    # --- recording ---------------------------------------------------------------------------

    def start_recording(self, act: Activity, window: float) -> bool:
        if act.recording is not None or self._nursery is None:
            return False
        act.recording = Recording(act.img.nchunks, trio.current_time())
        self._nursery.start_soon(self._record, act, window)
        log.info("recording the first reads of %s for up to %.0fs", act.meta.id, window)
        return True

    async def _record(self, act: Activity, window: float) -> None:
        rec = act.recording
        assert rec is not None
        try:
            end = rec.started + window
            while True:
                now = trio.current_time()
                quiet_until = rec.last_read + self.record_idle
                if now >= end or (rec.touches and now >= quiet_until):
                    break
                await trio.sleep(min(end, quiet_until if rec.touches else now + self.record_idle) - now)
        finally:
            act.recording = None
        if not rec.touches:
            log.info("no reads of %s while recording: nothing to send", act.meta.id)
            return
        try:
            with trio.fail_after(10):
                version = await self._tracker.add_recording(act.img.content.hex(), self._cs, act.img.nchunks,
                                                            rec.touches)
        except (TrackerError, trio.TooSlowError) as exc:
            log.warning("could not send the recording of %s to the tracker: %s", act.meta.id, exc)
            return
        act.stats["recordings_sent"] += 1
        log.info("sent a recording of %d chunks of %s to the tracker: profile version %d",
                 len(rec.touches), act.meta.id, version)

    # --- prefetch and warm -------------------------------------------------------------------

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
        act = self.activity(meta, img)
        if self._nursery is not None and (act.job is None or (kind == "warm" and act.job == "prefetch")):
            self._begin(act, kind, stop_when_idle=False)
        return act

    def _begin(self, act: Activity, kind: str, stop_when_idle: bool) -> None:
        """The job is the image's from now on (a job it replaces is cancelled)."""
        if act.job_scope is not None:
            act.job_scope.cancel()
        act.job, act.job_done, act.job_total = kind, 0, 0
        act.job_scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._job, act, act.job_scope, kind, stop_when_idle)

    def cancel_job(self, meta: ImageMeta, img: ImageData) -> bool:
        act = self._activity.get(img.content)
        if act is None or act.job_scope is None:
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
                missing = sorted(c for c in part if not img.cached(c) and not fetcher.in_flight(img, c))
                if missing:
                    if mark:  # a read from now on is a hit
                        for c in missing:
                            act.marks[c] = PREFETCHED
                        act.stats["prefetched"] += len(missing)
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

    def statistics(self) -> dict:
        return {a.img.content.hex(): a.statistics() for a in self._activity.values()}
