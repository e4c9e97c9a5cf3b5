"""Glance as a source of chunks: asked last, within its own slots and bandwidth, with retries.

Adjacent chunks go in one Range request of at most ``max_chunks`` chunks.  Pieces are handed to
the sink (cached, and so offered to peers) every ``PLACE_STEP`` bytes as they arrive, not only
once a whole request (up to 16 MiB) is in, and a retry asks only for what is still missing.  A
request holds one of Glance's slots (demand before readahead before prefetch) and waits for its
bytes in the token bucket (``--origin-rate``).  It fails with ``SourceFailed`` (saying why: Glance
unavailable past the deadline after retries, or the image gone, at once).  Once a request has
given up on Glance after its deadline, the breaker (``breaker.py``) fails the next ones at once
until a probe finds Glance back.

The bytes come through the lean client (``range_http``): received with ``recv_into`` straight
into a pooled buffer of ``PLACE_STEP`` bytes (``cache/fresh.py``), a fresh one for each piece,
which the cache holds on to: it serves the piece's chunks from it and writes them to the cache
file behind (the one copy between the socket and the cache).  Glance's JSON API (listing,
records, the probe) stays on the shared httpx client.
"""

from __future__ import annotations

import functools
from typing import Protocol

import trio

from thunderfs.errors import SourceFailed
from thunderfs.fetch.breaker import Breaker
from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.fetch.range_http import HTTPClient, HTTPFailed, HTTPTimeout
from thunderfs.fetch.retry import with_retries
from thunderfs.fetch.slots import PrioritySlots
from thunderfs.fetch.source import Sink, Want, deadline_for
from thunderfs_common.chunk_runs import runs
from thunderfs.ratelimit import TokenBucket
from thunderfs_common.glance_client import (GlanceClient, GlanceError, GlanceProtocolError, GlanceUnavailable,
                                     check_range, is_temp_failure, raise_for_status)

# Chunks fetched from Glance are cached (and so offered to peers) in pieces of this size as they
# arrive, not only once a whole request (up to 16 MiB) is in.
PLACE_STEP = 2**20


def piece_bytes(chunk_size: int) -> int:
    """A piece: ``PLACE_STEP`` in whole chunks (one chunk at least): the size of a receive buffer."""
    return max(1, PLACE_STEP // chunk_size) * chunk_size


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


class Tokens(Protocol):
    """Keystone tokens for Glance (``thunderfs.glance.auth.KeystoneAuth``)."""

    async def token(self) -> str: ...

    def drop(self, token: str) -> None: ...


class GlanceSource:
    name = "origin"

    def __init__(self, origin: GlanceClient, *, chunk_size: int, max_chunks: int, fetch_timeout: float,
                 concurrency: int, rate: float = 0, connect_timeout: float = 3.0, tokens: Tokens | None = None,
                 ssl_context=None, http: HTTPClient | None = None, buffers: ReceiveBuffers | None = None):
        self._origin = origin
        self._url = origin.url
        self._tokens = tokens
        self._http = http or HTTPClient(timeout=fetch_timeout, connect_timeout=connect_timeout,
                                        ssl_context=ssl_context, max_idle=concurrency)  # tests: fakes.MockHTTP
        # The cache's pool (the daemon's wiring), whose buffers it holds; else one of its own.
        self._buffers = buffers or ReceiveBuffers(piece_bytes(chunk_size), concurrency)
        self._stats = dict.fromkeys(("requests", "range_requests", "bytes", "errors"), 0)
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
        cs = self._cs
        meta, img = want.meta, want.img
        async with want.urgency.ticket(self._slots):
            for rfirst, rcount in runs(want.chunks, self._max_chunks):
                a, b = rfirst * cs, min(img.size, (rfirst + rcount) * cs)
                await self._bucket.wait_for(b - a, want.priority)
                placed = rfirst  # the first chunk not handed over yet

                def on_piece(offset: int, data: memoryview, buffer) -> None:
                    nonlocal placed
                    sink.put(offset // cs, data, buffer)
                    placed = -(-(offset + len(data)) // cs)

                async def attempt() -> None:
                    at = placed * cs
                    if at < b:
                        started = trio.current_time()
                        await self.read_range(meta.id, at, b, on_piece)
                        self.cost.observe(b - at, trio.current_time() - started)

                await with_retries(attempt, timeout=deadline_for(self._timeout, b - a),
                                   what=f"Glance read of {meta.id} chunks {rfirst}..{rfirst + rcount - 1}",
                                   give_up=self._known_down, sleep=self.breaker.sleep_unless_open)
        return []

    async def read_range(self, image_id: str, start: int, end: int, on_piece) -> None:
        """Bytes ``[start, end)`` of an image, exactly, handed to ``on_piece(offset, view,
        buffer)`` in pieces of ``PLACE_STEP`` bytes as they arrive (``view`` is valid during the
        call only; ``view`` starts ``buffer``, which the cache may hold), or a ``GlanceError``.
        A token Glance refuses (401) is renewed once."""
        path = f"/v2/images/{image_id}/file"
        what = f"{image_id} [{start}, {end})"
        self._stats["requests"] += 1
        self._stats["range_requests"] += 1
        headers = {"Range": f"bytes={start}-{end - 1}"}
        try:
            for attempt in (0, 1):
                token = None
                if self._tokens is not None:
                    token = headers["X-Auth-Token"] = await self._tokens.token()
                async with self._http.get(self._url + path, headers) as resp:
                    if resp.status == 401 and token is not None and attempt == 0:
                        self._tokens.drop(token)
                        continue
                    raise_for_status(resp.status, path)
                    check_range(resp.status, resp.header("Content-Range"), resp.header("Content-Length"), start, end)
                    if resp.length is None:
                        raise GlanceProtocolError(f"Glance sent {what} without a Content-Length")
                    await self._receive(resp, start, end, on_piece)
                    return
        except HTTPTimeout as exc:
            self._stats["errors"] += 1
            raise GlanceUnavailable(f"Glance timed out on {what}: {exc}") from None
        except HTTPFailed as exc:
            self._stats["errors"] += 1
            raise GlanceUnavailable(f"Glance at {self._url} failed on {what}: {exc}") from None
        except GlanceError:
            self._stats["errors"] += 1
            raise

    async def _receive(self, resp, start: int, end: int, on_piece) -> None:
        at = start
        while at < end:
            async with self._buffers.take() as (buffer, view):
                n = min(len(view), end - at)
                piece = view[:n]
                await resp.read_into(piece)
                self._stats["bytes"] += n
                on_piece(at, piece, buffer)
                piece.release()
                at += n

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _probe(self, image_id: str) -> None:
        """Raises while Glance does not answer; any answer (the image gone included) is an answer."""
        try:
            await self._origin.image(image_id)
        except GlanceError as exc:
            if is_temp_failure(exc):
                raise

    def _known_down(self) -> GlanceUnavailable | None:
        return GlanceUnavailable("Glance is unreachable (another read gave up on it)") if self.breaker.is_open else None

    def transfer_statistics(self) -> dict:
        """Glance's ranges, as the JSON client counts its own requests (``GlanceClient.statistics``)."""
        return dict(self._stats)

    def statistics(self) -> dict:
        cost = self.cost
        return {"origin_slots": self._slots.statistics(), "origin_breaker": self.breaker.statistics(),
                "origin_buffers": self._buffers.statistics(), "origin_connections": self._http.statistics(),
                "origin_request_ms": round(cost.fixed * 1000, 2) if cost.fixed is not None else None,
                "origin_mib_s": round(cost.rate / 2**20) if cost.rate is not None else None,
                "origin_bdp": cost.bdp()}
