"""Glance as a source of chunks: asked last, within its own slots and bandwidth, with retries.

Adjacent chunks go in one Range request of at most ``max_chunks`` chunks.  Pieces are handed to
the sink (cached, and so offered to peers) every ``PLACE_STEP`` bytes as they arrive, not only
once a whole request (up to 16 MiB) is in, and a retry asks only for what is still missing.  A
request holds one of Glance's slots (demand before readahead before prefetch) and waits for its
bytes in the token bucket (``--origin-rate``).  It fails with ``SourceFailed`` (saying why: Glance
unavailable past the deadline after retries, or the image gone, at once).  Once a request has
given up on Glance after its deadline, the breaker (``breaker.py``) fails the next ones at once
until a probe finds Glance back.
"""

from __future__ import annotations

import functools

import trio

from thunderfs.errors import SourceFailed
from thunderfs.fetch.breaker import Breaker
from thunderfs.fetch.retry import with_retries
from thunderfs.fetch.slots import PrioritySlots
from thunderfs.fetch.source import Sink, Want, deadline_for
from thunderfs_common.chunk_runs import runs
from thunderfs.ratelimit import TokenBucket
from thunderfs_common.glance import GlanceClient, GlanceError, GlanceUnavailable, is_temp_failure

# Chunks fetched from Glance are cached (and so offered to peers) in pieces of this size as they
# arrive, not only once a whole request (up to 16 MiB) is in.
PLACE_STEP = 2**20


class RequestCost:
    """What a Glance request costs: a fixed time per request and a rate per byte, estimated from
    the requests made (moving averages), and their product, the bandwidth-delay product: a
    request may carry that many bytes more for about the price of one more request."""

    SMALL = 256 * 1024  # requests up to this size time the fixed cost
    LARGE = 2**20  # requests from this size time the rate
    WEIGHT = 0.2

    def __init__(self, default_bdp: int = 2**20):
        self.fixed: float | None = None  # seconds
        self.rate: float | None = None  # bytes/s
        self._default = default_bdp

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= self.SMALL:
            self.fixed = seconds if self.fixed is None else self.fixed + self.WEIGHT * (seconds - self.fixed)
        elif nbytes >= self.LARGE and self.fixed is not None and seconds > self.fixed:
            rate = nbytes / (seconds - self.fixed)
            self.rate = rate if self.rate is None else self.rate + self.WEIGHT * (rate - self.rate)

    def bdp(self) -> int:
        if self.fixed is None or self.rate is None:
            return self._default
        return int(self.fixed * self.rate)


class GlanceSource:
    name = "origin"

    def __init__(self, origin: GlanceClient, *, chunk_size: int, max_chunks: int, fetch_timeout: float,
                 concurrency: int, rate: float = 0):
        self._origin = origin
        self._cs = chunk_size
        self._max_chunks = max_chunks
        self._timeout = fetch_timeout
        self._slots = PrioritySlots(concurrency)
        self._bucket = TokenBucket(rate)
        self.breaker = Breaker("Glance")
        self.cost = RequestCost()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.breaker.run(task_status=task_status)

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        self.breaker.check()
        try:
            missing = await self._fetch(want, sink)
        except GlanceError as exc:
            if is_temp_failure(exc) and not self.breaker.is_open:
                self.breaker.open(str(exc).rsplit(": ", 1)[-1], functools.partial(self._probe, want.meta.id))
            raise SourceFailed(str(exc)) from exc
        self.breaker.close()
        return missing

    async def _fetch(self, want: Want, sink: Sink) -> list[int]:
        cs, step = self._cs, max(1, PLACE_STEP // self._cs)  # pieces of whole chunks
        meta, img = want.meta, want.img
        async with want.urgency.ticket(self._slots):
            for rfirst, rcount in runs(want.chunks, self._max_chunks):
                a, b = rfirst * cs, min(img.size, (rfirst + rcount) * cs)
                await self._bucket.wait_for(b - a, want.priority)
                placed = rfirst  # the first chunk not handed over yet

                def on_piece(offset: int, data: memoryview) -> None:
                    nonlocal placed
                    sink.put(offset // cs, data)
                    placed = -(-(offset + len(data)) // cs)

                async def attempt() -> None:
                    at = placed * cs
                    if at < b:
                        started = trio.current_time()
                        await self._origin.read_range(meta.id, at, b, on_piece, step * cs)
                        self.cost.observe(b - at, trio.current_time() - started)

                await with_retries(attempt, timeout=deadline_for(self._timeout, b - a),
                                   what=f"Glance read of {meta.id} chunks {rfirst}..{rfirst + rcount - 1}",
                                   give_up=self._known_down, sleep=self.breaker.sleep_unless_open)
        return []

    async def _probe(self, image_id: str) -> None:
        """Raises while Glance does not answer; any answer (the image gone included) is an answer."""
        try:
            await self._origin.image(image_id)
        except GlanceError as exc:
            if is_temp_failure(exc):
                raise

    def _known_down(self) -> GlanceUnavailable | None:
        return GlanceUnavailable("Glance is unreachable (another read gave up on it)") if self.breaker.is_open else None

    def statistics(self) -> dict:
        cost = self.cost
        return {"origin_slots": self._slots.statistics(), "origin_breaker": self.breaker.statistics(),
                "origin_request_ms": round(cost.fixed * 1000, 2) if cost.fixed is not None else None,
                "origin_mib_s": round(cost.rate / 2**20) if cost.rate is not None else None,
                "origin_bdp": cost.bdp()}
