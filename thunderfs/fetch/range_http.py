"""The bytes' HTTP client: GETs over HTTP/1.1 keep-alive, each body received straight into the
caller's buffer.

httpx hands a body over in fresh ``bytes`` of 64 KiB, each built, copied and freed in Python; on
this path that cost 6-7 x the CPU of ``recv_into`` a buffer that is reused (issue 28,
``../shared/tools/receive_bench.py``).  Here h11 (under httpx too) builds the request and parses
the answer's head, and the body of a known length goes from the socket into the caller's memory
with ``recv_into``: no ``bytes`` per piece, no copy in between.  Over TLS the bytes come
decrypted from ``trio.SSLStream`` and are copied once into the caller's buffer.

A connection is kept for the next request to the same host only when its answer was read to the
exact end of its ``Content-Length`` and nothing else is waiting on it (checked before reuse: a
server that sent more than it promised, or closed an idle connection, costs a new connection, not
a wrong byte).  A reused connection that fails before its answer starts is replaced once.

Every failure is ``HTTPFailed`` (``HTTPTimeout``: nothing moved within the timeout), and the
connection it happened on is closed, never reused.  Statuses are the caller's business.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import h11
import trio

HEAD_LIMIT = 64 * 1024  # an answer's head larger than this is refused
SMALL_BODY = 1 << 20  # read(): bodies above this are refused


class HTTPFailed(Exception):
    """The exchange failed: no connection, reset, closed early, or an answer that is not HTTP."""


class HTTPTimeout(HTTPFailed):
    """Nothing moved within the timeout (connecting, sending, or between two receives)."""


class _Conn:
    """One connection: plain (``recv_into`` on the socket) or TLS (decrypted pieces copied)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.spare = b""  # bytes received past the answer's head: the body's first

    async def recv_into(self, view: memoryview) -> int:
        """Bytes received into ``view`` (0: the server closed); HTTPFailed if the connection broke."""
        if self.spare:
            n = min(len(self.spare), len(view))
            view[:n] = self.spare[:n]
            self.spare = self.spare[n:]
            return n
        try:
            if self._sock is not None:
                return await self._sock.recv_into(view)
            data = await self.stream.receive_some(len(view))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HTTPFailed(f"connection failed: {_why(exc)}") from None
        view[:len(data)] = data
        return len(data)

    def idle_clean(self) -> bool:
        """Nothing arrived since the last answer ended (no EOF, no extra bytes)."""
        if self.spare:
            return False
        if self._sock is None:
            return True  # TLS: cannot look below the record layer; a stale one fails at once
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return not poller.poll(0)  # readable while idle: extra bytes, or the server closed it

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(self.stream)


class Response:
    """An answer's head, and its body read into the caller's buffers (``read_into``) or whole
    (``read``, for small bodies: refusals and errors)."""

    def __init__(self, conn: _Conn, head: h11.Response, h: h11.Connection, timeout: float):
        self.status = head.status_code
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}  # names lowercased
        self._conn, self._h, self._timeout = conn, h, timeout
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        cl = self.headers.get("content-length")
        try:
            self.length: int | None = None if chunked or cl is None else int(cl)
        except ValueError:
            raise HTTPFailed(f"answer with a bad Content-Length {cl!r}") from None
        self._left = self.length
        self._keep = head.http_version == b"1.1" and "close" not in self.headers.get("connection", "").lower()
        self.done = False  # the body read to its end

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    async def read_into(self, view: memoryview, landed=None) -> None:
        """Exactly ``len(view)`` more bytes of a body of known length into ``view``.
        ``landed(n)``: called as the first ``n`` bytes of ``view`` are in (after every receive)."""
        if self._left is None:
            raise HTTPFailed("the answer's body has no Content-Length (chunked or unframed) where one was expected")
        n = len(view)
        if n > self._left:
            raise HTTPFailed(f"asked for {n} bytes of a body with {self._left} left")
        got = 0
        while got < n:
            with trio.move_on_after(self._timeout) as scope:
                k = await self._conn.recv_into(view[got:])
            if scope.cancelled_caught:
                raise HTTPTimeout(f"no byte within {self._timeout:g}s ({self.length - self._left + got} "
                                  f"of {self.length} received)")
            if k == 0:
                raise HTTPFailed(f"connection closed after {self.length - self._left + got} of {self.length} bytes")
            got += k
            if landed is not None:
                landed(got)
        self._left -= n
        self.done = self._left == 0

    async def read(self, limit: int = SMALL_BODY) -> bytes:
        """The whole body (any framing h11 knows), at most ``limit`` bytes."""
        if self.length is not None:
            if self.length > limit:
                raise HTTPFailed(f"a body of {self.length} bytes where at most {limit} were expected")
            buf = bytearray(self._left)
            await self.read_into(memoryview(buf))
            return bytes(buf)
        h, out = self._h, bytearray()
        if self._conn.spare:
            h.receive_data(self._conn.spare)
            self._conn.spare = b""
        chunk = bytearray(64 * 1024)
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise HTTPFailed(f"bad answer body: {exc}") from None
            if event is h11.NEED_DATA:
                with trio.move_on_after(self._timeout) as scope:
                    k = await self._conn.recv_into(memoryview(chunk))
                if scope.cancelled_caught:
                    raise HTTPTimeout(f"no byte of the body within {self._timeout:g}s")
                h.receive_data(bytes(chunk[:k]) if k else b"")
            elif isinstance(event, h11.Data):
                out += event.data
                if len(out) > limit:
                    raise HTTPFailed(f"a body of more than {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
                self._keep = self._keep and h.their_state is h11.DONE
                return bytes(out)
            else:
                raise HTTPFailed(f"unexpected {type(event).__name__} in the answer")

    def reusable(self) -> bool:
        return self.done and self._keep


class HTTPClient:
    """GETs to any number of hosts (``http``/``https`` URLs), at most ``max_idle`` idle
    connections kept per host.  ``timeout``: connecting, sending, and the longest silence while
    receiving; the whole exchange's bound is the caller's."""

    def __init__(self, *, timeout: float, connect_timeout: float | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_idle: int = 16):
        self.timeout = timeout
        self._connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._idle: dict[tuple, list[_Conn]] = defaultdict(list)
        self._stats = dict.fromkeys(("requests", "connections", "reused", "retried", "failures"), 0)

    @contextlib.asynccontextmanager
    async def get(self, url: str, headers: dict[str, str], *, timeout: float | None = None) -> AsyncIterator[Response]:
        """``async with client.get(url, headers) as resp``: the answer's head; read its body
        inside.  A connection goes back to the pool only if the body was read to its end.
        ``timeout``: this request's, if not the client's (an answer the server holds back)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPFailed(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        self._stats["requests"] += 1
        resp = None
        for attempt in (0, 1):
            conn, reused = await self._connection(key)
            try:
                resp = await self._exchange(conn, host, target, headers, self.timeout if timeout is None else timeout)
                break
            except HTTPFailed as exc:
                await conn.aclose()
                if reused and attempt == 0 and getattr(exc, "before_answer", False):
                    self._stats["retried"] += 1  # an idle connection the server had closed
                    continue
                self._stats["failures"] += 1
                raise
            except BaseException:
                await conn.aclose()
                raise
        assert resp is not None
        try:
            yield resp
        except BaseException as exc:
            if isinstance(exc, HTTPFailed):
                self._stats["failures"] += 1
            await conn.aclose()  # the body was left unread: the connection cannot serve another
            raise
        if resp.reusable() and len(self._idle[key]) < self._max_idle:
            self._idle[key].append(conn)
        else:
            await conn.aclose()

    async def _connection(self, key: tuple) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.idle_clean():
                self._stats["reused"] += 1
                return conn, True
            await conn.aclose()
        scheme, host, port = key
        try:
            with trio.fail_after(self._connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if scheme == "https":
                    ctx = self._ssl or ssl.create_default_context()
                    stream = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
                    await stream.do_handshake()
        except trio.TooSlowError:
            self._stats["failures"] += 1
            raise HTTPTimeout(f"no connection to {host}:{port} within {self._connect_timeout:g}s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            self._stats["failures"] += 1
            raise HTTPFailed(f"cannot connect to {host}:{port}: {_why(exc)}") from None
        self._stats["connections"] += 1
        return _Conn(stream), False

    async def _exchange(self, conn: _Conn, host: str, target: str, headers: dict[str, str],
                        timeout: float) -> Response:
        h = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target,
                              headers=[("Host", host), ("User-Agent", "thunderfs"), *headers.items()])
        data = h.send(request) + h.send(h11.EndOfMessage())
        try:
            with trio.fail_after(timeout):
                await conn.stream.send_all(data)
        except trio.TooSlowError:
            raise HTTPTimeout(f"could not send a request within {timeout:g}s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _before_answer(HTTPFailed(f"connection failed sending: {_why(exc)}")) from None
        buf, head = bytearray(16 * 1024), bytearray()
        while True:
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                # h11 gets the head alone; what came after it is the body's start, read here.
                h.receive_data(bytes(head[:end + 4]))
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as exc:
                    raise HTTPFailed(f"not an HTTP answer: {exc}") from None
                if isinstance(event, h11.Response):
                    conn.spare = bytes(head[end + 4:])
                    return Response(conn, event, h, timeout)
                if not isinstance(event, h11.InformationalResponse):
                    raise HTTPFailed(f"unexpected {type(event).__name__} before the answer's head")
                del head[:end + 4]
                continue
            try:
                with trio.fail_after(timeout):
                    k = await conn.recv_into(memoryview(buf))
            except trio.TooSlowError:
                raise HTTPTimeout(f"no answer within {timeout:g}s") from None
            except HTTPFailed as err:
                raise (_before_answer(err) if not head else err) from None
            if k == 0:
                raise (_before_answer(HTTPFailed("connection closed before the answer")) if not head
                       else HTTPFailed("connection closed within the answer's head"))
            head += buf[:k]
            if len(head) > HEAD_LIMIT:
                raise HTTPFailed(f"an answer's head longer than {HEAD_LIMIT} bytes")

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                await c.aclose()
        self._idle.clear()

    def statistics(self) -> dict:
        return {**self._stats, "idle": sum(len(v) for v in self._idle.values())}


def _before_answer(exc: HTTPFailed) -> HTTPFailed:
    exc.before_answer = True  # type: ignore[attr-defined]
    return exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__
