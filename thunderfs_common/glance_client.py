"""The one Glance client, for the daemon (on trio) and the tracker (on asyncio): image listing,
image records, byte ranges of image data, and a whole image's data as a stream.

One attempt per call; it raises ``GlanceUnavailable``/``GlanceProtocolError`` (worth retrying) or
``ImageGone``/``GlanceError`` (final).  Retrying is the caller's business.  Keystone tokens come in
as an ``httpx.Auth`` of the caller's event loop.
"""

from __future__ import annotations

import contextlib
import re

import httpx

from thunderfs_common.image import ImageMeta


class GlanceError(Exception):
    """Glance did not give us what we asked for."""


class GlanceUnavailable(GlanceError):
    """Glance cannot be reached, timed out, or answered 5xx: worth retrying."""


class GlanceProtocolError(GlanceError):
    """Glance answered, but wrongly (short body, wrong Content-Range): worth retrying."""


class ImageGone(GlanceError):
    """Glance says the image does not exist (any more) or has no data: final."""


def is_temp_failure(exc: BaseException) -> bool:
    return isinstance(exc, (GlanceUnavailable, GlanceProtocolError))


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class GlanceClient:
    def __init__(self, url: str, *, connect_timeout: float = 3.0, request_timeout: float = 10.0,
                 concurrency: int = 8, headers: dict[str, str] | None = None, page_size: int = 200,
                 auth: httpx.Auth | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self._page_size = page_size
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4),
            headers=headers or {},
            auth=auth,
            transport=transport,  # tests: an httpx.MockTransport
        )
        self._stats = {"requests": 0, "range_requests": 0, "bytes": 0, "errors": 0}

    async def __aenter__(self) -> "GlanceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @contextlib.contextmanager
    def _transport(self, what: str):
        """Transport failures become GlanceUnavailable (worth retrying); every failure is counted."""
        try:
            yield
        except httpx.TimeoutException as exc:
            self._stats["errors"] += 1
            raise GlanceUnavailable(f"Glance timed out on {what}") from exc
        except httpx.HTTPError as exc:
            self._stats["errors"] += 1
            raise GlanceUnavailable(f"Glance at {self.url} failed on {what}: {_reason(exc)}") from exc
        except GlanceError:
            self._stats["errors"] += 1
            raise

    async def _get(self, path: str) -> httpx.Response:
        self._stats["requests"] += 1
        with self._transport(path):
            resp = await self._client.get(path)
            raise_for_status(resp.status_code, path)
        return resp

    async def list_images(self) -> list[ImageMeta]:
        """Every active image, following Glance's pages.  Hidden ones too (``os_hidden``: left out of
        Glance's listings unless asked for, yet instances boot from them, and operators hide old
        images that instances still run from), which takes a second listing."""
        out: list[ImageMeta] = []
        for hidden in ("", "&os_hidden=true"):
            path: str | None = f"/v2/images?status=active{hidden}&limit={self._page_size}"
            while path:
                page = (await self._get(path)).json()
                out.extend(ImageMeta.from_glance(r) for r in page.get("images", ()) if r.get("status") == "active")
                path = page.get("next")
        return list({m.id: m for m in out}.values())

    async def image(self, image_id: str) -> ImageMeta:
        return ImageMeta.from_glance((await self._get(f"/v2/images/{image_id}")).json())

    async def read_range(self, image_id: str, start: int, end: int) -> bytearray:
        """Bytes ``[start, end)`` of an image's data, exactly, or an exception (the tracker's seed;
        the daemon receives its ranges with its own lean client, ``thunderfs.fetch.range_http``)."""
        want = end - start
        path = f"/v2/images/{image_id}/file"
        self._stats["requests"] += 1
        self._stats["range_requests"] += 1
        buf = bytearray(want)
        got = 0
        with self._transport(f"{image_id} [{start}, {end})"):
            async with self._client.stream("GET", path, headers={"Range": f"bytes={start}-{end - 1}"}) as resp:
                raise_for_status(resp.status_code, path)
                check_range(resp.status_code, resp.headers.get("Content-Range"), resp.headers.get("Content-Length"),
                            start, end)
                async for data in resp.aiter_raw():
                    n = len(data)
                    if got + n > want:
                        raise GlanceProtocolError(f"Glance sent more than the {want} bytes asked for")
                    buf[got:got + n] = data
                    got += n
        if got != want:
            self._stats["errors"] += 1
            raise GlanceProtocolError(f"Glance sent {got} of {want} bytes of {image_id} at {start}")
        self._stats["bytes"] += got
        return buf

    async def stream(self, image_id: str, piece: int = 2**20):
        """The image's whole data, in pieces of up to ``piece`` bytes as they arrive."""
        path = f"/v2/images/{image_id}/file"
        self._stats["requests"] += 1
        with self._transport(f"{image_id} data"):
            async with self._client.stream("GET", path) as resp:
                raise_for_status(resp.status_code, path)
                async for data in resp.aiter_bytes(piece):
                    self._stats["bytes"] += len(data)
                    yield data

    def statistics(self) -> dict:
        return dict(self._stats)


def _reason(exc: BaseException | None) -> str:
    """The first message along an exception's causes (httpx's ConnectError over a refused TLS
    certificate says nothing itself; its cause says why)."""
    while exc is not None:
        if str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return "no reason given"


def raise_for_status(code: int, path: str) -> None:
    if code < 300:
        return
    if code in (404, 410):
        raise ImageGone(f"Glance has no {path} ({code})")
    if code == 416:
        raise ImageGone(f"Glance refused the range of {path} (416): the image is shorter than listed")
    if code in (408, 429) or code >= 500:
        raise GlanceUnavailable(f"Glance answered {code} for {path}")
    raise GlanceError(f"Glance answered {code} for {path}")


def check_range(code: int, content_range: str | None, content_length: str | None, start: int, end: int) -> None:
    """An answer to ``Range: bytes=start-(end-1)`` is exactly those bytes: 206 with that
    Content-Range (and, where given, that length), or 200 with the whole image when asked for it."""
    if code == 200:
        # A server may answer a range that covers the whole image with the whole image.
        if start == 0 and content_length == str(end):
            return
        raise GlanceProtocolError(f"Glance ignored the range request ({start}-{end - 1})")
    if code != 206:
        raise GlanceProtocolError(f"Glance answered {code} to a range request")
    m = _CONTENT_RANGE.match(content_range or "")
    if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
        raise GlanceProtocolError(f"Glance sent Content-Range {content_range!r} for bytes {start}-{end - 1}")
    if content_length is not None and content_length != str(end - start):
        raise GlanceProtocolError(f"Glance promised {content_length} bytes for the {end - start} of "
                                  f"Content-Range {content_range!r}")
