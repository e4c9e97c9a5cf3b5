"""Asking one peer for a run of chunks, and checking every chunk against the image's manifest.

The answer is a ``Reply`` whose ``answer`` says what happened (``Answer``): the bytes, every chunk
verified; or that the peer does not hold them, is busy, is slow, failed, or lied.  The client
remembers what peers did: one that failed is avoided ``avoid_failed`` seconds, one that lied
``avoid_lying``, one that was slow is rested ``avoid_slow``; and how fast each answers (time to
first byte, smoothed), which the tracker ranks peers by after location.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from dataclasses import dataclass

import trio

from thunderfs.cache.store import ImageData
from thunderfs.fetch.buffers import AnswerMemory
from thunderfs.p2p.lazy_manifest import LazyManifest
from thunderfs.fetch.range_http import HTTPClient, HTTPFailed, HTTPTimeout
from thunderfs_common import chunk_digest
from thunderfs_common.signing import sign
from thunderfs_common.tracker_protocol import (NOT_FETCHING_HEADER, PIECES_HEADER, TAKERS_HEADER, Manifest, PeerRecord,
                                       ProtocolError, parse_pieces, parse_takers)

log = logging.getLogger(__name__)


class Answer(enum.Enum):
    OK = "ok"
    NOT_HELD = "not_held"
    NOT_FETCHING = "not_fetching"  # asked to wait: it neither holds them nor fetches them
    BUSY = "busy"
    SLOW = "slow"
    FAILED = "failed"
    LIED = "lied"
    UNCHECKED = "unchecked"  # the bytes came, but a lazy manifest has no digest for some yet


@dataclass(frozen=True)
class Reply:
    answer: Answer
    data: bytes | memoryview | None = None  # OK: the run's bytes, every chunk checked (UNCHECKED: not yet)
    bad_chunk: int = -1  # LIED: the first chunk that failed
    why: str = ""  # LIED: how
    pieces: tuple = ()  # UNCHECKED: the tracker's pieces the peer sent along (not checked yet)
    takers: tuple = ()  # (node id, chunks as absolute bits) the peer says took some of them from it
    digests: tuple = ()  # UNCHECKED: each chunk's digest, taken as it arrived (``check`` them later)


class ByteBudget:
    """At most ``limit`` bytes taken at once; a taker waits until its bytes fit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()
        self.waits = 0

    @contextlib.asynccontextmanager
    async def take(self, n: int):
        if self.used + n > self.limit:
            self.waits += 1
            while self.used + n > self.limit:
                await self._freed.wait()
        self.used += n
        try:
            yield
        finally:
            self.used -= n
            self._freed.set()
            self._freed = trio.Event()


class _Arriving:
    """The digests of an answer's chunks, each taken as soon as its last byte landed
    (``landed``, after every receive): in the event loop, while the bytes are still in the CPU's
    cache, rather than in a worker thread once the whole answer is in (BLAKE3 on bytes long out
    of the cache cost more, and the hop to the thread its wake-ups: ``benchmarks/README.md``,
    issue 28, seventh session).  The loop is held at most for one receive's bytes (BLAKE3 takes
    a few GiB/s on one core)."""

    def __init__(self, body, cs: int):
        self._view, self._cs = memoryview(body), cs
        self.digests: list[bytes] = []

    def landed(self, n: int) -> None:
        cs, view, digests = self._cs, self._view, self.digests
        at = len(digests) * cs
        while at + cs <= n:
            digests.append(chunk_digest.digest(view[at:at + cs]))
            at += cs
        if n == len(view) and at < n:
            digests.append(chunk_digest.digest(view[at:n]))

    def done(self) -> list[bytes]:
        self._view.release()
        return self.digests


class PeerClient:
    def __init__(self, *, node_id: str, secret: bytes | None, chunk_size: int, timeout: float = 2.0,
                 min_rate: float = 2**20, avoid_failed: float = 30.0, avoid_slow: float = 5.0,
                 avoid_lying: float = 3600.0, http: HTTPClient | None = None):
        self._cs = chunk_size
        self.timeout = timeout
        self._min_rate = min_rate
        self._avoid_failed, self._avoid_slow, self._avoid_lying = avoid_failed, avoid_slow, avoid_lying
        self._node_id, self._secret = node_id, secret
        # Per socket operation: connect, and silence between reads.  The whole transfer is bounded
        # separately, by its size (get).  The bytes are received straight into the reply's buffer
        # (range_http), not in httpx's pieces.
        self._http = http or HTTPClient(timeout=timeout, connect_timeout=min(timeout, 1.0),
                                        max_idle=4)  # tests: fakes.MockHTTP
        self._avoid: dict[str, float] = {}  # failed or lied: until when
        self._slow: dict[str, float] = {}   # slow (busy serving others, perhaps): until when
        self._rtt: dict[str, float] = {}
        self._served: dict[bytes, dict[str, int]] = {}  # content -> peer -> bytes it sent us
        self._answers = ByteBudget(self.ANSWER_BYTES)
        # What answers are received into: memory the cache was done with, used again.
        self.memory = AnswerMemory(self.KEPT_ANSWER_BYTES)
        self._stats = dict.fromkeys(("chunks", "bytes", "requests", "waits", "failures", "slow", "busy",
                                     "bad_chunks", "bad_hints"), 0)

    async def aclose(self) -> None:
        await self._http.aclose()

    def avoided(self, node_id: str) -> bool:
        """It failed or lied lately: not asked, not waited for."""
        return self._avoid.get(node_id, 0) > trio.current_time()

    def slow(self, node_id: str) -> bool:
        return self._slow.get(node_id, 0) > trio.current_time()

    def askable_at(self, node_id: str) -> float:
        """When the node is neither avoided nor slow any more (trio time; past: it is now)."""
        return max(self._avoid.get(node_id, 0), self._slow.get(node_id, 0))

    async def get(self, peer: PeerRecord, img: ImageData, manifest: Manifest | LazyManifest, first: int,
                  count: int, *, wait: float = 0.0) -> Reply:
        """``wait``: the peer is fetching these chunks; it answers as soon as they are there, or
        NOT_HELD after ``wait`` seconds.  UNCHECKED: the bytes, which a lazy manifest cannot check
        yet (``check`` them once it can).  Answers being received and checked hold at most
        ``ANSWER_BYTES`` at once: more wait their turn."""
        nbytes = min(self.ANSWER_BYTES, min(img.size, (first + count) * self._cs) - first * self._cs)
        async with self._answers.take(nbytes):
            return await self._get(peer, img, manifest, first, count, wait)

    async def _get(self, peer: PeerRecord, img: ImageData, manifest: Manifest | LazyManifest, first: int,
                   count: int, wait: float) -> Reply:
        path = f"/v1/chunks/{img.content.hex()}/{first}/{count}"
        if wait > 0:
            path += f"?wait={int(wait * 1000)}"
            self._stats["waits"] += 1
        self._stats["requests"] += 1
        started = trio.current_time()
        expected = min(img.size, (first + count) * self._cs) - first * self._cs
        headers = sign(self._secret, self._node_id, "GET", path) if self._secret else {}
        try:
            with trio.fail_after(self.timeout + wait + expected / self._min_rate):
                async with self._http.get(peer.peer_url.rstrip("/") + path, headers,
                                          timeout=self.timeout + wait) as resp:
                    if not wait:  # a wait's first byte comes when the chunks do
                        self._note_rtt(peer.node_id, trio.current_time() - started)
                    status = resp.status
                    pieces_header = resp.header(PIECES_HEADER)
                    not_fetching = resp.header(NOT_FETCHING_HEADER) is not None
                    takers = self._takers(resp.header(TAKERS_HEADER), first, count)
                    if status == 200 and resp.length != expected:
                        return self._lied(peer, img, first, f"promised {resp.length} bytes for {expected}")
                    if status == 200:
                        body = self.memory.take(expected)  # page aligned, filled by the socket,
                        arriving = _Arriving(body, self._cs)  # that the cache writes with O_DIRECT
                        try:
                            await resp.read_into(body, arriving.landed)
                        finally:
                            digests = arriving.done()
                    else:
                        await resp.read(64 * 1024)  # a refusal's few words (the connection kept)
        except (HTTPTimeout, trio.TooSlowError) as exc:
            # Slow, not dead: skip it for a moment (it may just be busy serving others).
            self._stats["slow"] += 1
            if not self.slow(peer.node_id):  # one line when it turns slow, not per request
                log.info("peer %s too slow (%s); skipping it for %.0fs", peer.node_id, type(exc).__name__,
                         self._avoid_slow)
            self._slow[peer.node_id] = trio.current_time() + self._avoid_slow
            return Reply(Answer.SLOW)
        except HTTPFailed as exc:
            self._stats["failures"] += 1
            if not self.avoided(peer.node_id):
                log.info("peer %s failed (%s); avoiding it for %.0fs", peer.node_id, exc, self._avoid_failed)
            self._avoid[peer.node_id] = trio.current_time() + self._avoid_failed
            return Reply(Answer.FAILED)
        if status != 200:
            if status == 404:
                return Reply(Answer.NOT_FETCHING if not_fetching and wait else Answer.NOT_HELD, takers=takers)
            self._stats["busy" if status == 503 else "failures"] += 1
            return Reply(Answer.BUSY if status == 503 else Answer.FAILED, takers=takers)
        if isinstance(manifest, LazyManifest) and manifest.unknown(first, count):
            try:
                pieces = tuple(parse_pieces(pieces_header)) if pieces_header else ()
            except ProtocolError:
                pieces = ()  # checked against the tracker's own, then
            return Reply(Answer.UNCHECKED, body, pieces=pieces, takers=takers, digests=tuple(digests))
        reply = self.check(peer, img, manifest, first, body, digests)
        return dataclasses.replace(reply, takers=takers) if takers else reply

    def _takers(self, value: str | None, first: int, count: int) -> tuple:
        """The relays a peer named (a hint: used only for nodes the tracker named, their bytes
        checked as any peer's); none if it named them wrongly."""
        if not value:
            return ()
        try:
            return tuple((node, bits << first) for node, bits in parse_takers(value, count))
        except ProtocolError as exc:
            self._stats["bad_hints"] += 1
            log.debug("a peer's takers header is refused: %s", exc)
            return ()

    # Bytes of answers being received and checked at once.  Each lands in memory of its own (up to
    # --max-request): 64 readers at once of an image held by a peer made the reader's peak RSS
    # rise 535 MiB without a bound (glibc keeps the freed answers' heap).
    ANSWER_BYTES = 32 * 2**20
    # Memory of answers the cache was done with, kept free for the next ones (``AnswerMemory``).
    KEPT_ANSWER_BYTES = ANSWER_BYTES

    def check(self, peer: PeerRecord, img: ImageData, manifest: Manifest | LazyManifest, first: int,
              body: bytes, digests) -> Reply:
        """A peer's run of chunks (``digests``: theirs, taken as they arrived) against the
        manifest: OK, or LIED (the peer is avoided)."""
        count = -(-len(body) // self._cs)
        for i in range(count):
            if digests[i] != manifest.digest(first + i):
                return self._lied(peer, img, first + i, "chunk does not match the manifest")
        self._stats["chunks"] += count
        self._stats["bytes"] += len(body)
        served = self._served.setdefault(img.content, {})
        served[peer.node_id] = served.get(peer.node_id, 0) + len(body)
        return Reply(Answer.OK, body)

    def _lied(self, peer: PeerRecord, img: ImageData, chunk: int, why: str) -> Reply:
        self._stats["bad_chunks"] += 1
        self._avoid[peer.node_id] = trio.current_time() + self._avoid_lying
        log.warning("peer %s sent a bad chunk %d of %s (%s): discarded, peer avoided and reported",
                    peer.node_id, chunk, img.content.hex(), why)
        return Reply(Answer.LIED, bad_chunk=chunk, why=why)

    def _note_rtt(self, node_id: str, seconds: float) -> None:
        """Time to first byte, smoothed: what the tracker ranks peers by after location."""
        ms = seconds * 1000
        old = self._rtt.pop(node_id, None)
        self._rtt[node_id] = ms if old is None else 0.8 * old + 0.2 * ms
        while len(self._rtt) > 256:
            self._rtt.pop(next(iter(self._rtt)))

    def sources_of(self, content: bytes) -> dict[str, int]:
        """The peers that sent chunks of ``content``, with the bytes each sent, most first."""
        return dict(sorted(self._served.get(content, {}).items(), key=lambda kv: -kv[1]))

    def rtt_ms(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._rtt.items()}

    def statistics(self) -> dict:
        now = trio.current_time()
        return {**self._stats, "answer_bytes": self._answers.used, "answer_waits": self._answers.waits,
                "answer_memory": self.memory.statistics(),
                "avoided_peers": sorted(n for n, t in self._avoid.items() if t > now),
                "slow_peers": sorted(n for n, t in self._slow.items() if t > now), "rtt_ms": self.rtt_ms()}
