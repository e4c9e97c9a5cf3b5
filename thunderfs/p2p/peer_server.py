"""Serving cached chunks to other members of the cluster over HTTP (h11 on trio).

    GET /v1/chunks/<content-key>/<first>/<count>[?wait=<ms>]
                       -> the bytes of those chunks, all cached, or 404; with ``wait``, chunks
                          that are not all here yet (this node is fetching them) are waited
                          for up to that long (at most MAX_WAIT), without an upload slot: a
                          node waiting on a claim learns at once that they arrived
                          (``X-Thunderfs-Pieces``: while the image has no manifest, the
                          tracker's proven pieces that cover them, which the asker checks them
                          against instead of asking the tracker).  Every answer names, in
                          ``X-Thunderfs-Takers``, nodes that took some of those chunks from here
                          (relays); a request that waited for chunks a relay took whole, while
                          every upload slot is busy, is sent there (503 with the relays) rather
                          than queued: the crowd's copies spread from the relays, not all from here;
                          a wait for chunks this node is not fetching (any more) ends at once, 404
                          with ``X-Thunderfs-Not-Fetching``: the claim the waiter waits on is stale;
                          unless this node fetches them when asked, as their owner (chunks
                          nobody holds yet, ``fetch.owners``), once per request
    GET /healthz

Only members' signed requests are answered (401 otherwise).  Uploads are capped in number (503
when every slot is busy: the asker moves on to another source; a request that waits for its
chunks queues for a slot instead, within its wait) and in bandwidth (token bucket).
A chunk is served only after its checksum was checked in this process (the store's rule 5):
a corrupt cached chunk is dropped, never relayed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable

import h11
import trio

from thunderfs.cache.store import ChunkStore, FileSpan, ImageData
from thunderfs.errors import ChunkCorrupt, ChunkNotCached
from thunderfs.ratelimit import TokenBucket
from thunderfs.p2p.takers import Takers
from thunderfs_common.signing import NonceCacheFull, Verifier
from thunderfs_common.tracker_protocol import NOT_FETCHING_HEADER, PIECES_HEADER, TAKERS_HEADER, encode_takers

log = logging.getLogger(__name__)

_CHUNKS = re.compile(r"^/v1/chunks/([0-9a-f]{32})/(\d{1,9})/(\d{1,6})(?:\?wait=(\d{1,6}))?$")
MAX_REQUEST_CHUNKS = 1024
IDLE_TIMEOUT = 30.0  # seconds a connection may take no request, or take none of an answer's bytes
MAX_WAIT = 10.0  # seconds a request may wait for chunks to arrive
MAX_WAITERS = 256  # requests waiting at once; more are told 503 (busy)
# An answer is read from the cache and sent a piece of this size at a time: memory per answer is
# one piece whatever its length, and a read fits the reading thread's kept buffer (a 10 MiB answer
# read whole took a fresh buffer, and its faults, every time: a quarter of the holder's CPU).
SEND_PIECE = 2**20
# An answer at least this long is checked where it lies and sent by the kernel from the page cache
# (``ChunkStore.sendable``, ``os.sendfile``): no copy through this process, one hop to a worker
# thread for the check.  A shorter one is read and checked in the event loop (the hop would cost
# more than the copy saves).
SENDFILE_MIN = 256 * 1024


class _CutShort(Exception):
    """A piece after the first could not be read (dropped as corrupt, or evicted): the answer
    ends short and the connection with it; the asker takes the chunks from elsewhere."""


class _Chunks:
    """A 200 answer's body: chunks ``[start, end)`` of an image, pinned (the store's rule 4) until
    ``close``.  ``parts``: checked spans of the data file, which the kernel sends, and ranges read
    from the cache a piece at a time as they are sent (``ChunkStore.sendable``)."""

    def __init__(self, store: ChunkStore, img: ImageData, start: int, end: int,
                 parts: list[bytes | FileSpan | tuple[int, int]], token: int):
        self._store, self._img, self._token = store, img, token
        self.start, self.end, self._parts = start, end, parts

    def __len__(self) -> int:
        return self.end - self.start

    async def pieces(self):
        parts, self._parts = self._parts, []
        for part in parts:
            if not isinstance(part, tuple):
                yield part
                continue
            at, end = part[0], part[0] + part[1]
            while at < end:
                n = min(SEND_PIECE, end - at)
                try:
                    yield await self._store.read(self._img, at, n)
                except (ChunkCorrupt, ChunkNotCached) as exc:
                    raise _CutShort(f"chunk at {at} went away: {exc!r}") from None
                at += n

    def close(self) -> None:
        if self._token is not None:
            self._store.unpin(self._img, self._token)
            self._token = None


class PeerServer:
    def __init__(self, store: ChunkStore, *, secret: bytes | None, max_uploads: int = 8, rate: float = 0):
        self._store = store
        self._verifier = Verifier(secret) if secret else None
        self._slots = max_uploads
        self._busy = 0
        self._bucket = TokenBucket(rate)
        self._waiting = 0
        self._stats = dict.fromkeys(("requests", "served_chunks", "served_bytes", "not_held", "busy",
                                     "refused", "bad_requests", "waits", "waits_served", "slot_waits",
                                     "redirects", "not_fetching", "cut_short", "fetches_for_peers",
                                     "sent_from_file"), 0)
        self._slot_freed = trio.lowlevel.ParkingLot()
        self._takers = Takers()  # who took what from here lately
        # Wired by the daemon: (content, first, count) -> the header that carries the tracker's
        # pieces of those chunks, while the image has only those (None: none to send).
        self.pieces: Callable[[bytes, int, int], str | None] = lambda content, first, count: None
        # Wired by the daemon: whether this node is fetching a chunk of an image now.
        self.fetching: Callable[[ImageData, int], bool] = lambda img, chunk: True
        # Wired by the daemon: start fetching chunks a waiter asked for that this node neither
        # holds nor fetches, as their owner (``fetch.owners``); False: not fetched here.
        self.fetch_for_peer: Callable[[ImageData, list[int]], bool] = lambda img, chunks: False

    @property
    def uploads(self) -> int:
        return self._busy

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind now (before the mount is made, so that a busy port is a clean start-up error)."""
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        return self._listeners[0].socket.getsockname()[:2]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.serve_listeners(self._connection, self._listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            async with stream:
                while True:
                    request = await self._next_request(conn, stream)
                    if request is None:
                        return
                    status, body, slot, extra, took = await self._answer(request)
                    try:
                        await self._send(conn, stream, status, body, head=request.method == b"HEAD", extra=extra)
                    except _CutShort as exc:
                        self._stats["cut_short"] += 1
                        log.info("peer answer cut short: %s", exc)
                        return
                    finally:
                        if isinstance(body, _Chunks):
                            body.close()
                        if slot:
                            self._free_slot()  # taken in _answer, held until the bytes are sent
                    if took:  # sent: the asker has them now (a relay for whoever asks next)
                        self._takers.took(*took)
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return  # a client that broke the protocol, hung up, or idled past IDLE_TIMEOUT (asking or taking)
        except Exception:
            # The boundary of one connection: whatever went wrong is logged and ends it, never
            # the daemon (serve_listeners would let it take the whole nursery down).
            log.exception("peer connection failed")
            self._stats["bad_requests"] += 1

    async def _next_request(self, conn: h11.Connection, stream) -> h11.Request | None:
        request = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                continue  # bodies are not used; a GET has none
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(self, conn: h11.Connection, stream, status: int, body: "bytes | _Chunks", head: bool = False,
                    extra: list[tuple[str, str]] = ()) -> None:
        headers = [("Content-Length", str(len(body))), ("Content-Type", "application/octet-stream"), *extra]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if len(body) and not head:  # an answer to HEAD has the length of the body it would have, not the body
            if isinstance(body, _Chunks):
                # Chunks take upload bandwidth (the whole answer at once: one larger than the
                # bucket's burst goes into debt); a refusal goes at once, not behind them.
                await self._bucket.wait_for(len(body))
                async with contextlib.aclosing(body.pieces()) as pieces:  # closed here, even when cut
                    async for piece in pieces:
                        await self._send_data(conn, stream, piece)
            else:
                await self._send_data(conn, stream, body)
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _send_data(self, conn: h11.Connection, stream, data: bytes | FileSpan) -> None:
        # Passed through, not joined into one more copy of the bytes (h11's send() would).
        for part in conn.send_with_data_passthrough(h11.Data(data=data)):
            if isinstance(part, FileSpan):
                await self._send_file(stream, part)
            else:
                with trio.fail_after(IDLE_TIMEOUT):  # an asker that stopped taking frees its slot
                    await stream.send_all(part)

    async def _send_file(self, stream: trio.SocketStream, span: FileSpan) -> None:
        """The kernel sends ``span`` from the page cache to the socket (``os.sendfile``)."""
        sock = stream.socket
        offset, left = span.offset, span.count
        while left:
            try:
                n = os.sendfile(sock.fileno(), span.fileno(), offset, left)
            except BlockingIOError:
                with trio.fail_after(IDLE_TIMEOUT):  # an asker that stopped taking frees its slot
                    await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise trio.BrokenResourceError(exc) from None
                raise _CutShort(f"sending from the cache file failed: {exc!r}") from None
            if not n:
                raise _CutShort("the cache file ended before the span")
            offset += n
            left -= n
            self._stats["sent_from_file"] += n
            await trio.lowlevel.checkpoint()

    async def _answer(self, request: h11.Request) -> tuple[int, "bytes | _Chunks", bool, list[tuple[str, str]],
                                                           tuple | None]:
        """Status, body, whether an upload slot was taken (the caller frees it once sent),
        headers beyond the usual, and (content, asker, first, count) of chunks served to a
        member (remembered once sent)."""
        extra: list[tuple[str, str]] = []
        took: list[tuple] = []
        return (*await self._chunks(request, extra, took), extra, took[0] if took else None)

    async def _chunks(self, request: h11.Request, extra: list[tuple[str, str]],
                      took: list[tuple]) -> tuple[int, "bytes | _Chunks", bool]:
        """What ``_answer`` answers, but its headers, which go into ``extra``, and what a member
        is sent, into ``took``."""
        self._stats["requests"] += 1
        target = request.target.decode("ascii", "replace")
        if request.method != b"GET":
            self._stats["bad_requests"] += 1
            return 405, b"only GET\n", False
        if target == "/healthz":
            return 200, b"ok\n", False
        asker = ""
        if self._verifier is not None:
            headers = {k.decode("latin-1").title(): v.decode("latin-1") for k, v in request.headers}
            try:
                asker, _ = self._verifier.verify("GET", target, headers, b"")
            except NonceCacheFull as exc:
                self._stats["busy"] += 1
                return 503, f"too many signed requests to remember: {exc}\n".encode(), False
            except ValueError as exc:
                self._stats["refused"] += 1
                return 401, f"not a member: {exc}\n".encode(), False
        m = _CHUNKS.match(target)
        if not m:
            self._stats["bad_requests"] += 1
            return 400, b"GET /v1/chunks/<content-key>/<first>/<count>\n", False
        content, first, count = bytes.fromhex(m.group(1)), int(m.group(2)), int(m.group(3))
        wait = min(MAX_WAIT, int(m.group(4)) / 1000) if m.group(4) else 0.0
        if not 1 <= count <= MAX_REQUEST_CHUNKS:
            self._stats["bad_requests"] += 1
            return 400, f"count must be from 1 to {MAX_REQUEST_CHUNKS}\n".encode(), False
        img = self._store.find(content)
        last = first + count - 1
        if img is None or last >= img.nchunks:
            self._stats["not_held"] += 1
            return 404, b"not held\n", False
        takers = self._takers.of(content, first, count, asker)
        if takers:
            extra.append((TAKERS_HEADER, encode_takers(takers)))
        if wait and (img.missing(first, last) or self._busy >= self._slots):
            refused = await self._wait_for(img, content, first, count, asker, wait, extra)
            if refused is not None:
                return refused
        if self._busy >= self._slots:
            self._stats["busy"] += 1
            return 503, b"upload slots full\n", False
        if img.missing(first, last):
            self._stats["not_held"] += 1
            return 404, b"not held\n", False
        if wait:
            self._stats["waits_served"] += 1
        return await self._serve_chunks(img, content, first, count, asker, extra, took)

    async def _wait_for(self, img: ImageData, content: bytes, first: int, count: int, asker: str, wait: float,
                        extra: list[tuple[str, str]]) -> tuple[int, bytes, bool] | None:
        """A request that may wait (``wait`` seconds) for chunks still arriving here, or for an
        upload slot: None once it may be served, else the refusal to answer."""
        last = first + count - 1
        give_up = trio.current_time() + wait
        if self._waiting >= MAX_WAITERS:
            self._stats["busy"] += 1
            return 503, b"too many waiting\n", False
        self._stats["waits"] += 1
        self._waiting += 1
        try:
            asked_to_fetch = False
            with trio.move_on_at(give_up):
                while missing := img.missing(first, last):
                    if not all(self.fetching(img, c) for c in missing):
                        # Asked as the chunks' owner: fetched here, once.
                        if not asked_to_fetch and self.fetch_for_peer(img, missing):
                            asked_to_fetch = True
                            self._stats["fetches_for_peers"] += 1
                            continue
                        self._stats["not_fetching"] += 1
                        extra.append((NOT_FETCHING_HEADER, "1"))
                        return 404, b"not held, and not being fetched here\n", False
                    await img.wait_arrival()
                # The crowd that waited for these chunks wants them at once: a waiter queues
                # for an upload slot (the slots turn over in milliseconds) rather than be
                # told 503 and come back a poll later; unless a relay took them all from
                # here meanwhile, where it is sent.
                while self._busy >= self._slots:
                    takers = self._takers.of(content, first, count, asker)
                    if takers and takers[0][1] == (1 << count) - 1:
                        self._stats["redirects"] += 1
                        extra[:] = [(TAKERS_HEADER, encode_takers(takers))]
                        return 503, b"upload slots full: ask the relays named\n", False
                    self._stats["slot_waits"] += 1
                    await self._slot_freed.park()
        finally:
            self._waiting -= 1
        return None

    async def _serve_chunks(self, img: ImageData, content: bytes, first: int, count: int, asker: str,
                            extra: list[tuple[str, str]], took: list[tuple]) -> tuple[int, "bytes | _Chunks", bool]:
        """The answer to a request whose chunks are all here: an upload slot and the chunks
        pinned from the first read until the answer is sent (``_Chunks.close``)."""
        last = first + count - 1
        cs = self._store.chunk_size
        start, end = first * cs, min(img.size, (last + 1) * cs)
        # The slot is held from here: the read may wait for the disk in a worker thread.  The
        # chunks stay pinned until the answer is sent (``_Chunks.close``).
        self._busy += 1
        token = self._store.pin(img, first, last)
        try:
            if end - start >= SENDFILE_MIN:
                parts = await self._store.sendable(img, start, end - start)
            else:
                parts = [await self._store.read(img, start, end - start)]
        except BaseException as exc:
            self._store.unpin(img, token)
            self._free_slot()
            if isinstance(exc, (ChunkCorrupt, ChunkNotCached)):
                self._stats["not_held"] += 1
                return 404, b"not held\n", False
            raise
        self._stats["served_chunks"] += count
        self._stats["served_bytes"] += end - start
        if asker:
            took.append((content, asker, first, count))
        if pieces := self.pieces(content, first, count):
            extra.append((PIECES_HEADER, pieces))
        return 200, _Chunks(self._store, img, start, end, parts, token), True

    def _free_slot(self) -> None:
        self._busy -= 1
        self._slot_freed.unpark()

    def statistics(self) -> dict:
        return {**self._stats, "uploads_in_progress": self._busy, "upload_slots": self._slots,
                "waiting": self._waiting}
