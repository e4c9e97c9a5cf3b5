"""What the fast layer's tests share: images of known bytes, an in-memory source, and a running
fetcher.  No mounts, no subprocesses, no network."""

from __future__ import annotations

import contextlib
import hashlib
import re

import httpx

import trio

from thunderfs.fetch.fetcher import Fetcher
from thunderfs.fetch.slots import PrioritySlots
from thunderfs.fetch.source import Sink, Want
from thunderfs_common.chunk_runs import runs
from thunderfs_common.image import ImageMeta

CS = 4096


def meta_of(data: bytes, image_id: str = "11111111-2222-3333-4444-555555555555", name: str = "img") -> ImageMeta:
    return ImageMeta(image_id, name, len(data), "active", "sha512", hashlib.sha512(data).hexdigest(), None,
                     "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ from chunk to chunk (a chunk served in another's place shows)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


class MemorySource:
    """A source that serves ``data`` from memory: the chunks in ``has`` (all if None).  It can be
    held at a ``gate``, fail with ``error``, pass chunks on early, and take a slot of ``slots``."""

    def __init__(self, name: str, data: bytes, *, has=None, gate: trio.Event | None = None, error=None,
                 pass_on=(), slots: PrioritySlots | None = None):
        self.name = name
        self.data = data
        self.has = None if has is None else set(has)
        self.gate = gate
        self.error = error
        self.early = set(pass_on)
        self.slots = slots
        self.asks: list[list[int]] = []  # every call, as it came
        self.served: list[tuple[list[int], int]] = []  # (chunks, priority) once it had its slot

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        self.asks.append(list(want.chunks))
        early = [c for c in want.chunks if c in self.early]
        if early:
            sink.pass_on(early)
        async with contextlib.AsyncExitStack() as stack:
            if self.slots is not None:
                await stack.enter_async_context(want.urgency.ticket(self.slots))
            self.served.append((list(want.chunks), want.priority))
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            give = [c for c in want.chunks if c not in self.early and (self.has is None or c in self.has)]
            for first, count in runs(give, 1 << 30):
                sink.put(first, self.data[first * CS:(first + count) * CS])
        return [c for c in want.chunks if c not in give and c not in early]


@contextlib.asynccontextmanager
async def running(*services):
    """Each of ``services`` (anything with ``run(task_status=)``) running until the block ends."""
    async with trio.open_nursery() as nursery:
        for s in services:
            await nursery.start(s.run)
        yield
        nursery.cancel_scope.cancel()


def fetcher_of(store, *sources, **kwargs) -> Fetcher:
    return Fetcher(store, list(sources), max_request=kwargs.pop("max_request", 16 * CS), **kwargs)


# --- Glance, through an httpx MockTransport ---------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A response body that arrives in pieces, as from a socket."""

    def __init__(self, data: bytes, step: int = 64 * 1024):
        self.data, self.step = data, step

    async def __aiter__(self):
        for i in range(0, len(self.data), self.step):
            yield self.data[i:i + self.step]


def ranged(status, data, headers=None) -> httpx.Response:
    return httpx.Response(status, stream=Body(data), headers=headers or {})


class FakeGlance:
    """Serves one image's data with Range, and a listing in pages; ``faults`` are answered first."""

    def __init__(self, data: bytes, records=None, hidden=None, page=2):
        self.data = data
        self.records = records if records is not None else []
        self.hidden = hidden or []
        self.page = page
        self.faults: list = []  # callables (request) -> Response, used up in order
        self.ranges: list[tuple[int, int]] = []
        self.listings = 0
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/file") and "Range" not in request.headers:
            return ranged(200, self.data)
        if request.url.path.endswith("/file"):
            m = re.match(r"bytes=(\d+)-(\d+)", request.headers["Range"])
            a, b = int(m.group(1)), int(m.group(2)) + 1
            self.ranges.append((a, b))
            if self.faults:
                return self.faults.pop(0)(request, a, b)
            return ranged(206, self.data[a:b], headers={"Content-Range": f"bytes {a}-{b - 1}/{len(self.data)}"})
        if request.url.path == "/v2/images":
            self.listings += 1
            pool = self.hidden if request.url.params.get("os_hidden") else self.records
            start = int(request.url.params.get("marker") or 0)
            body = {"images": pool[start:start + self.page]}
            if start + self.page < len(pool):
                body["next"] = f"/v2/images?status=active&marker={start + self.page}" + (
                    "&os_hidden=true" if request.url.params.get("os_hidden") else "")
            return httpx.Response(200, json=body)
        image_id = request.url.path.rsplit("/", 1)[1]
        for r in self.records:
            if r["id"] == image_id:
                return httpx.Response(200, json=r)
        return httpx.Response(404)
