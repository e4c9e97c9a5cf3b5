"""Boot access profiles on a node: one image's activity per content, a recorder and a prefetcher,
and the hook the daemon calls on every open (``opened``).  How recording works: ``recorder``;
prefetch and warm: ``prefetcher``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from thunderfs.cache.store import ImageData
from thunderfs.fetch.fetcher import Fetcher
from thunderfs.fetch.reader import Reader
from thunderfs_common.image import ImageMeta
from thunderfs.profiles.activity import Activity
from thunderfs.profiles.prefetcher import Prefetcher
from thunderfs.profiles.recorder import Recorder
from thunderfs_tracker.client import TrackerClient
from thunderfs_common.tracker_protocol import Profile


class Profiles:
    def __init__(self, fetcher: Fetcher, tracker: TrackerClient | None, *, chunk_size: int,
                 record_window: float = 60.0, record_idle: float = 20.0, prefetch_flights: int = 3,
                 prefetch_idle: float = 30.0, batch_chunks: int = 64,
                 wait_ready: Callable[[ImageMeta], Awaitable[bool]] | None = None,
                 plan: Callable[[ImageMeta, ImageData, list[int]], Awaitable[None]] | None = None):
        self._tracker = tracker
        self.record_window = record_window
        self._activity: dict[bytes, Activity] = {}
        self.recorder = Recorder(tracker, chunk_size=chunk_size, record_idle=record_idle) if tracker else None
        self.prefetcher = Prefetcher(fetcher, tracker, self.activity, chunk_size=chunk_size,
                                     prefetch_flights=prefetch_flights, prefetch_idle=prefetch_idle,
                                     batch_chunks=batch_chunks, wait_ready=wait_ready, plan=plan)
        self._running = False

    @property
    def has_tracker(self) -> bool:
        return self._tracker is not None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.prefetcher.nursery = nursery
            if self.recorder is not None:
                self.recorder.nursery = nursery
            self._running = True
            task_status.started()
            await trio.sleep_forever()

    def activity(self, meta: ImageMeta, img: ImageData) -> Activity:
        act = self._activity.get(img.content)
        if act is None or act.img is not img:
            act = self._activity[img.content] = Activity(meta, img)
        act.meta = meta
        return act

    def opened(self, reader: Reader) -> None:
        """An image was opened: watch its reads; record and prefetch as configured."""
        img = reader.img
        first_open = img.content not in self._activity
        act = self.activity(reader.meta, img)
        reader.watch(act.read)
        reader.expect(act.expected)
        if not self._running or self.recorder is None:
            return
        # The first open with nothing of it cached: opened on this node for the first time.
        if first_open and self.record_window > 0 and not img.cached_count():
            self.recorder.start_recording(act, self.record_window)
        if self.prefetcher.prefetch_flights > 0 and act.job is None:
            self.prefetcher.begin(act, "prefetch", stop_when_idle=True)

    def start_recording(self, meta: ImageMeta, img: ImageData, seconds: float) -> bool:
        """Record the image's first reads now; False if a recording runs already."""
        return self.recorder is not None and self.recorder.start_recording(self.activity(meta, img), seconds)

    async def profile(self, meta: ImageMeta, img: ImageData) -> Profile | None:
        return await self.prefetcher.profile(meta, img)

    def start_job(self, meta: ImageMeta, img: ImageData, kind: str) -> Activity:
        return self.prefetcher.start_job(meta, img, kind)

    def cancel_job(self, meta: ImageMeta, img: ImageData) -> bool:
        act = self._activity.get(img.content)
        return act is not None and self.prefetcher.cancel_job(act)

    def statistics(self) -> dict:
        return {a.img.content.hex(): a.statistics() for a in self._activity.values()}
