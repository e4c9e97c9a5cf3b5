"""What the fast layer's tests share: images of known bytes, an in-memory source, and a running
fetcher.  No mounts, no subprocesses, no network."""

from __future__ import annotations

import contextlib
import inspect
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


def ranged(status, data, headers=None, length=None) -> httpx.Response:
    """An answer with ``data`` as its body; ``length``: the Content-Length it promises, if not
    ``len(data)`` (a body cut short)."""
    promised = {"Content-Length": str(len(data) if length is None else length)}
    return httpx.Response(status, stream=Body(data), headers={**promised, **(headers or {})})


class MockHTTP:
    """The daemon's lean HTTP client (``range_http.HTTPClient``) answered by an httpx
    MockTransport's handler: one ``handler(request) -> httpx.Response`` fakes both clients."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = 0

    @contextlib.asynccontextmanager
    async def get(self, url: str, headers: dict, timeout: float | None = None):
        from thunderfs.fetch.range_http import HTTPFailed
        self.requests += 1
        request = httpx.Request("GET", url, headers=headers)
        try:
            resp = self.handler(request)
            if inspect.isawaitable(resp):
                resp = await resp
        except httpx.TransportError as exc:
            raise HTTPFailed(f"cannot connect: {exc}") from None
        yield MockResponse(resp)

    async def aclose(self) -> None:
        pass

    def statistics(self) -> dict:
        return {"requests": self.requests}


class MockResponse:
    def __init__(self, resp: httpx.Response):
        self.status = resp.status_code
        self.headers = {k.lower(): v for k, v in resp.headers.items()}
        cl = self.headers.get("content-length")
        self.length = int(cl) if cl is not None else None
        self._left = self.length
        self._stream = resp.stream.__aiter__()
        self._spare = b""

    def header(self, name: str):
        return self.headers.get(name.lower())

    async def _more(self) -> bytes:
        from thunderfs.fetch.range_http import HTTPFailed
        if self._spare:
            data, self._spare = self._spare, b""
            return data
        try:
            return bytes(await self._stream.__anext__())
        except StopAsyncIteration:
            raise HTTPFailed("connection closed mid-body") from None

    async def read_into(self, view, landed=None) -> None:
        from thunderfs.fetch.range_http import HTTPFailed
        if self._left is None:
            raise HTTPFailed("no Content-Length")
        got = 0
        while got < len(view):
            data = await self._more()
            k = min(len(data), len(view) - got)
            view[got:got + k] = data[:k]
            self._spare = data[k:]
            got += k
            if landed is not None:
                landed(got)
        self._left -= got

    async def read(self, limit: int = 1 << 20) -> bytes:
        from thunderfs.fetch.range_http import HTTPFailed
        out = b""
        while True:
            try:
                out += await self._more()
            except HTTPFailed:  # the body's end
                return out


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
