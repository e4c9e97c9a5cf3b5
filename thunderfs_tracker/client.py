"""The tracker client that the daemon imports: same wire types as the server, signed requests.

Runs on trio (httpx).  Raises ``TrackerUnavailable`` when no tracker can be reached or all are
overloaded (the daemon goes on with Glance and the peers it knows) and ``TrackerRefused`` when one
says the request is wrong or not a member's.

Replicas: given several URLs (replicas on one shared store), a node talks to one of them, chosen
by its node id so that nodes spread evenly; when that one fails (unreachable, 502-504), the same
request goes at once to the next, and the failed one is left alone for ``REPLICA_REST`` seconds.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

import httpx

from thunderfs_common.signing import H_NONCE, SignedRequests, event_is_signed, reply_is_signed
from thunderfs_common.tracker_protocol import (
    API,
    MAX_IMAGES_PER_MESSAGE,
    Alike,
    AnnounceReply,
    ChunkState,
    ChunkUpdate,
    Claim,
    ClaimReply,
    LookupReply,
    Manifest,
    NodeInfo,
    PeerRecord,
    Piece,
    Profile,
    ProtocolError,
    Recording,
    Report,
    Revocation,
    WatchEvent,
    chunks_to_bits,
    parse_epoch,
)

log = logging.getLogger(__name__)


class TrackerError(Exception):
    pass


class TrackerUnavailable(TrackerError):
    pass


class TrackerRefused(TrackerError):
    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"tracker refused ({status}): {message}")
        self.status = status
        self.body = body or {}  # the answer's JSON, as far as it was JSON


def split_urls(urls: str | list[str]) -> list[str]:
    """``"http://a:7070,http://b:7070"`` or a list: the replicas' URLs, without trailing slashes."""
    items = urls.split(",") if isinstance(urls, str) else urls
    return [u.strip().rstrip("/") for u in items if u.strip()]


class TrackerClient:
    REPLICA_REST = 10.0

    def __init__(self, urls: str | list[str], node_id: str, *, secret: bytes | None = None,
                 timeout: float = 2.0, transport: httpx.AsyncBaseTransport | None = None):
        self.urls = split_urls(urls)
        if not self.urls:
            raise ValueError("no tracker URL")
        self.node_id = node_id
        self._secret = secret
        self.refused_answers = 0  # answers that failed authentication
        self._refused_logged: set[str] = set()  # replicas whose refused answers were logged (once each)
        # Signed per attempt (a nonce is accepted once): a failover resends a new signature.
        self._client = httpx.AsyncClient(timeout=timeout, auth=SignedRequests(secret, node_id) if secret else None,
                                         transport=transport)  # tests: an httpx.MockTransport
        self._first = zlib.crc32(node_id.encode()) % len(self.urls)  # this node's replica
        self._resting: dict[str, float] = {}
        self.failovers = 0

    @property
    def url(self) -> str:
        """The replica in use (for messages): this node's own unless it is resting."""
        return self._order()[0]

    def _order(self) -> list[str]:
        n, now = len(self.urls), time.monotonic()
        ring = [self.urls[(self._first + i) % n] for i in range(n)]
        awake = [u for u in ring if self._resting.get(u, 0) <= now]
        return awake + [u for u in ring if u not in awake]

    async def __aenter__(self) -> "TrackerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict | None = None, *, raw: bool = False,
                    timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        failures: list[TrackerUnavailable] = []
        for i, url in enumerate(self._order()):
            try:
                result = await self._call_one(url, method, path, data, body is not None, raw, timeout)
            except TrackerUnavailable as exc:
                failures.append(exc)
                if self._resting.get(url, 0) <= time.monotonic() and len(self.urls) > 1:
                    log.warning("%s; using another tracker replica for %.0fs", exc, self.REPLICA_REST)
                self._resting[url] = time.monotonic() + self.REPLICA_REST
                continue
            if i:
                self.failovers += 1
            return result
        # Chained to the last failure's cause: callers tell a slow tracker (a timeout) from a dead one.
        raise TrackerUnavailable("; ".join(map(str, failures))) from failures[-1].__cause__

    async def _call_one(self, url: str, method: str, path: str, data: bytes, is_json: bool, raw: bool = False,
                        timeout: float | None = None):
        """The answer's JSON (``raw``: its bytes), once its signature checks."""
        headers = {"Content-Type": "application/json"} if is_json else {}
        try:
            extra = {"timeout": timeout} if timeout is not None else {}
            resp = await self._client.request(method, url + path, content=data, headers=headers, **extra)
        except httpx.HTTPError as exc:
            raise TrackerUnavailable(f"tracker {url} unreachable: {exc}") from exc
        self._check(url, resp, resp.content)
        if raw:
            return resp.content
        try:
            return resp.json()
        except ValueError:
            raise TrackerUnavailable(f"tracker {url} answered something that is not JSON") from None

    def _check(self, url: str, resp: httpx.Response, body: bytes) -> None:
        """An answer's signature, then its status: ``TrackerUnavailable`` (unsigned, or 502-504)
        or ``TrackerRefused`` (another error, with its JSON) unless it is a success."""
        if self._secret is not None and not reply_is_signed(self._secret, resp.request.headers.get(H_NONCE, ""),
                                                            resp.status_code, body, resp.headers):
            # Altered on the way, an old answer replayed, or not the tracker: never acted on.
            self.refused_answers += 1
            if url not in self._refused_logged:  # once per replica; then counted only
                self._refused_logged.add(url)
                log.warning("an answer from tracker %s failed authentication: refused (it is altered, replayed "
                            "or not the tracker's; going on with Glance and the peers already known)", url)
            raise TrackerUnavailable(f"tracker {url}: its answer failed authentication")
        if resp.status_code < 400:
            return
        text = body.decode(errors="replace")  # an error's body only (a seed's answer is bytes)
        if resp.status_code in (502, 503, 504):
            raise TrackerUnavailable(f"tracker {url} answered {resp.status_code}: {text[:200]}")
        if resp.status_code >= 400:
            try:
                answer = json.loads(body)
                message = str(answer.get("error", text))
            except (ValueError, AttributeError):
                answer, message = {}, text
            raise TrackerRefused(resp.status_code, message[:500], answer if isinstance(answer, dict) else {})

    async def announce(self, node: NodeInfo) -> AnnounceReply:
        r = await self._call("POST", f"{API}/nodes/{self.node_id}/announce", node.to_json())
        return AnnounceReply.parse(r)

    async def alive(self, instance: str) -> AnnounceReply:
        """A light heartbeat (``TrackerRefused`` 409: announce in full; 404: a tracker without it)."""
        r = await self._call("POST", f"{API}/nodes/{self.node_id}/alive", {"instance": instance})
        return AnnounceReply.parse(r)

    async def send_chunks(self, full: bool, updates: list[ChunkUpdate]) -> tuple[str, float | None]:
        """(the tracker's epoch, its heartbeat if it counted the state as a light heartbeat; None
        from a tracker that does not)."""
        r = await self._call("POST", f"{API}/nodes/{self.node_id}/chunks", ChunkState(full, updates).to_json())
        if isinstance(r, dict) and "heartbeat" in r:
            reply = AnnounceReply.parse(r)
            return reply.epoch, reply.heartbeat
        return parse_epoch(r), None

    async def lookup(self, content: str, first: int, last: int, limit: int | None = None) -> list[PeerRecord]:
        q = f"first={first}&last={last}&node={self.node_id}" + (f"&limit={limit}" if limit else "")
        try:
            r = await self._call("GET", f"{API}/images/{content}/peers?{q}")
        except TrackerRefused as exc:
            if exc.status == 404:
                return []
            raise
        return LookupReply.parse(r, first, last).peers

    async def watch(self, content: str, nchunks: int, on_event, *, silence: float = 15.0) -> None:
        """Who holds what of an image, as it changes: ``on_event(seq, WatchEvent)`` for each
        event, the first (seq 0) naming every holder, until the tracker ends the watch (returns)
        or it fails (``TrackerUnavailable``: unreachable, ``silence`` seconds without an event,
        an event that is malformed or fails authentication; ``TrackerRefused``: 404, a tracker
        without watches).  Tries the replicas in order, as ``_call``."""
        path = f"{API}/images/{content}/watch?node={self.node_id}&nchunks={nchunks}"
        url = self._order()[0]
        seq = 0
        try:
            timeout = httpx.Timeout(self._client.timeout.connect or 2.0, read=silence)
            async with self._client.stream("GET", url + path, timeout=timeout) as resp:
                if resp.status_code >= 400:  # signed as any answer (the events are signed one by one)
                    self._check(url, resp, await resp.aread())
                nonce = resp.request.headers.get(H_NONCE, "")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue  # the blank line between events
                    on_event(seq, self._event(url, line[6:], nonce, seq, nchunks))
                    seq += 1
        except httpx.HTTPError as exc:
            if seq == 0:  # it did not answer at all: the next watch goes to another replica
                self._resting[url] = time.monotonic() + self.REPLICA_REST
            raise TrackerUnavailable(f"the watch at tracker {url} failed: {exc!r}") from exc

    def _event(self, url: str, text: str, nonce: str, seq: int, nchunks: int) -> WatchEvent:
        if self._secret is not None:
            sig, _, text = text.partition(" ")
            if not event_is_signed(self._secret, nonce, seq, text.encode(), sig):
                self.refused_answers += 1
                raise TrackerUnavailable(f"tracker {url}: a watch event failed authentication")
        try:
            return WatchEvent.parse(json.loads(text), nchunks)
        except (ValueError, ProtocolError) as exc:
            raise TrackerUnavailable(f"tracker {url}: a malformed watch event: {exc}") from None

    async def manifest(self, image_id: str, chunk_size: int) -> Manifest | None:
        """The image's manifest, or None while the tracker is still building it."""
        m = await self.manifest_state(image_id, chunk_size)
        if isinstance(m, Revocation):
            raise TrackerRefused(410, m.why)
        return m if isinstance(m, Manifest) else None

    async def manifest_state(self, image_id: str, chunk_size: int) -> Manifest | Revocation | str:
        """The image's manifest; or its revocation; or "lazy" (the seed's pieces stand in for
        it meanwhile) or "building"."""
        try:
            r = await self._call("GET", f"{API}/manifests/{image_id}?chunk_size={chunk_size}")
        except TrackerRefused as exc:
            if exc.status == 410 and "revoked" in exc.body:
                return Revocation.parse(exc.body["revoked"])
            raise
        if r.get("status") in ("building", "lazy"):
            return r["status"]
        return Manifest.parse(r)

    async def alike(self, image_id: str, chunk_size: int, first: int, count: int) -> list[Alike]:
        """For chunks ``first..first+count-1`` of an image: the chunks of other images with the same
        digests, and who holds them (issue 31); [] from a tracker without it (404)."""
        try:
            r = await self._call("GET", f"{API}/images/{image_id}/alike?chunk_size={chunk_size}&first={first}"
                                        f"&count={count}&node={self.node_id}")
        except TrackerRefused as exc:
            if exc.status == 404:
                return []
            raise
        if not isinstance(r, dict) or not isinstance(r.get("alike"), list):
            raise ProtocolError("an alike answer must have a list of alike")
        return [Alike.parse(a, first, count) for a in r["alike"][:MAX_IMAGES_PER_MESSAGE]]

    async def seed(self, image_id: str, chunk_size: int, first: int, count: int,
                   *, data: bool = True, timeout: float | None = None) -> tuple[Piece, bytes]:
        """A lazy image's chunks ``first..first+count-1`` from the tracker, which reads them from
        Glance once for all askers: their piece (digests, proven) and (``data``) their bytes,
        neither checked here."""
        body = await self._call("GET", f"{API}/images/{image_id}/seed?chunk_size={chunk_size}&first={first}"
                                       f"&count={count}&data={int(data)}", raw=True, timeout=timeout)
        head, sep, rest = body.partition(b"\n")
        try:
            if not sep:
                raise ValueError("no piece line")
            return Piece.parse(json.loads(head)), rest
        except (ValueError, ProtocolError) as exc:
            raise TrackerUnavailable(f"the tracker's seed answer is malformed: {exc}") from None

    async def claim(self, content: str, nchunks: int,
                    chunks: list[int]) -> tuple[list[int], list[tuple[PeerRecord, list[int], bool]]]:
        """Claim chunks about to be fetched from Glance: (granted, [(peer, its chunks, whether it
        holds them already rather than fetching them)])."""
        r = await self._call("POST", f"{API}/images/{content}/claims",
                             Claim(self.node_id, nchunks, chunks_to_bits(chunks)).to_json())
        reply = ClaimReply.parse(r, nchunks)
        return reply.granted, [(c.peer, c.chunks, c.held) for c in reply.claimed]

    async def profile(self, content: str, chunk_size: int) -> Profile | None:
        """The image's boot access profile, or None if nobody has recorded one yet."""
        try:
            r = await self._call("GET", f"{API}/profiles/{content}?chunk_size={chunk_size}")
        except TrackerRefused as exc:
            if exc.status == 404:
                return None
            raise
        return Profile.parse(r)

    async def add_recording(self, content: str, chunk_size: int, nchunks: int,
                            touches: list[tuple[int, int]]) -> int:
        """Send what a reader touched first ([(chunk, ms since open)]); the profile's new version."""
        r = await self._call("POST", f"{API}/profiles/{content}?chunk_size={chunk_size}",
                             Recording(self.node_id, nchunks, touches).to_json())
        return int(r["version"])

    async def report(self, node_id: str, content: str, chunk: int, reason: str) -> None:
        """Tell the tracker that a peer served a chunk that failed verification."""
        await self._call("POST", f"{API}/reports", Report(node_id, content, chunk, reason).to_json())

    async def stats(self) -> dict:
        return await self._call("GET", f"{API}/stats")
