"""Recording what readers touch first.

The first time an image is opened here with none of it cached (or on ``thunderfs profile
record``), every chunk a reader touches for the first time is noted with its time since the open,
until ``window`` seconds have passed or reads have stopped for ``idle`` seconds (a boot has pauses
of 10 s); the recording goes to the tracker, which merges it into the image's profile.  Prefetch
and warm jobs fetch chunks but do not read them: only readers count.
"""

from __future__ import annotations

import logging

import trio

from thunderfs.profiles.activity import Activity, Recording
from thunderfs_tracker.client import TrackerClient, TrackerError

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self, tracker: TrackerClient, *, chunk_size: int, record_idle: float = 20.0):
        self._tracker = tracker
        self._cs = chunk_size
        self.record_idle = record_idle
        self.nursery: trio.Nursery | None = None  # the profiles' own, once they run

    def start_recording(self, act: Activity, window: float) -> bool:
        if act.recording is not None or self.nursery is None:
            return False
        act.recording = Recording(act.img.nchunks, trio.current_time())
        self.nursery.start_soon(self._record, act, window)
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
