"""Watches: a node that waits for chunks of an image learns who holds what as it changes, on one
long request (``GET /v1/images/{content}/watch``), instead of asking again and again.

One poll of the peer store per image every ``interval`` seconds while anyone watches it, on each
replica: what other replicas were told (a shared Redis store) shows up in it too, and a thousand
watchers of one image cost the store what one does.  Each watch then writes what changed for its
node, as a server-sent event: the first names every holder (nearest first, at most ``peers``),
the next ones the chunks each gained since, or all of a holder's chunks when it lost some.  A watch
writes at most one event per interval, an empty one at least every ``KEEPALIVE`` seconds, and ends
after ``seconds`` (the node asks again if it still wants to know).  An event also says when the
image's manifest was built or revoked (``manifest_changed``: what this replica saw), so that
nodes reading a lazy image ask for it then, not every few seconds.  With many watchers the
interval grows so that a replica writes at most ``events_per_second`` events.

With a secret, each event carries its signature over the request's nonce and its sequence number
(``signing.sign_event``): nobody on the way can alter, drop or reorder one unnoticed.  A suspect
(reported for a bad chunk) is never named.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time

from aiohttp import web

from thunderfs_common.signing import sign_event
from thunderfs_tracker import selection
from thunderfs_tracker.peer_store import PeerStore, StoreUnavailable
from thunderfs_common.tracker_protocol import NodeInfo, PeerRecord, WatchEvent

log = logging.getLogger(__name__)

# At least this often a watch writes an event (empty if nothing changed): a node that hears
# nothing for a few of these counts the watch as dead and asks the tracker again.
KEEPALIVE = 5.0


class _Image:
    """One image's holders as the last poll saw them, and who waits for the next."""

    def __init__(self, nchunks: int) -> None:
        self.version = 0
        self.nchunks = nchunks
        self.holders: dict[str, tuple[NodeInfo, int]] = {}
        self.changed = asyncio.Event()
        self.watchers = 0
        self.manifest = 0  # how many times its manifest was built or revoked while watched
        self.failed = False
        self.poller: asyncio.Task | None = None


class Watches:
    def __init__(self, store: PeerStore, *, interval: float = 0.5, seconds: float = 60.0, peers: int = 64,
                 events_per_second: int = 4000):
        self._store = store
        self._interval = interval
        self._seconds = seconds
        self._peers = peers
        self._rate = events_per_second
        self._images: dict[str, _Image] = {}
        self._stats = dict.fromkeys(("watches", "watch_events", "watch_polls"), 0)
        self._watchers = 0  # of every image (an image replaced keeps its watchers till they end)

    def manifest_changed(self, content: str) -> None:
        """The image's manifest was built or revoked: each of its watches says so in its next
        event."""
        image = self._images.get(content)
        if image is not None:
            image.manifest += 1
            if image.version:  # (not polled yet: its first event comes anyway)
                image.version += 1
            image.changed.set()
            image.changed = asyncio.Event()

    def interval(self) -> float:
        """Seconds between two polls of an image (and two events of a watch)."""
        return max(self._interval, self._watchers / self._rate)

    async def _poll(self, content: str, image: _Image) -> None:
        while image.watchers > 0:
            # The chunk count the watchers were told stands: holders of another count (nobody
            # holds the image yet, or they hold something else under its name) are not named.
            n = image.nchunks
            try:
                found = await self._store.holders(content, 0, n - 1) if await self._store.nchunks(content) == n else []
            except StoreUnavailable as exc:
                log.warning("watches of %s end: %s", content, exc)
                image.failed, found = True, []
            except Exception:  # a poller that died quietly would leave its watchers with keepalives only
                log.exception("the poll of %s's watches failed: they end (their nodes ask again)", content)
                image.failed, found = True, []
            self._stats["watch_polls"] += 1
            holders = {node.node_id: (node, bits) for node, bits in found}
            if image.version == 0 or image.failed or holders.keys() != image.holders.keys() \
                    or any(bits != image.holders[k][1] for k, (_, bits) in holders.items()):
                image.version += 1
                image.holders = holders
                image.changed.set()
                image.changed = asyncio.Event()
            if image.failed:
                return
            await asyncio.sleep(self.interval())

    @contextlib.asynccontextmanager
    async def _watching(self, content: str, nchunks: int):
        image = self._images.get(content)
        if image is None or image.failed or image.nchunks != nchunks:
            image = self._images[content] = _Image(nchunks)
        image.watchers += 1
        self._watchers += 1
        if image.poller is None or image.poller.done():
            image.poller = asyncio.create_task(self._poll(content, image))
        try:
            yield image
        finally:
            image.watchers -= 1
            self._watchers -= 1
            if image.watchers == 0 and self._images.get(content) is image:
                del self._images[content]

    async def serve(self, request: web.Request, content: str, nchunks: int, me: NodeInfo | None,
                    suspects: dict[str, float], secret: bytes | None, nonce: str | None) -> web.StreamResponse:
        """The watch of ``content`` (of ``nchunks`` chunks: the store's count, else the
        watcher's, while nobody holds any) for the node ``me`` (None: an anonymous one, ranked
        as nobody)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        self._stats["watches"] += 1
        sent: dict[str, int] = {}  # node id -> the chunks this watch has named it with
        seq, seen = 0, 0  # version 0: not polled yet
        loop = asyncio.get_running_loop()
        end = loop.time() + self._seconds
        try:
            async with self._watching(content, nchunks) as image:
                told = image.manifest  # the node asked for the manifest before it watched
                while not image.failed and (left := end - loop.time()) > 0:
                    if image.version == seen:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(image.changed.wait(), min(left, KEEPALIVE))
                    if image.failed:
                        break
                    if image.version == 0:
                        continue  # not polled yet
                    seen = image.version
                    event = self._event(image, sent, me, suspects)
                    if image.manifest != told:
                        told, event = image.manifest, dataclasses.replace(event, manifest=True)
                    body = json.dumps(event.to_json(), separators=(",", ":")).encode()
                    sig = sign_event(secret, nonce, seq, body) if secret and nonce else ""
                    await resp.write(b"data: " + (sig + " " if sig else "").encode() + body + b"\n\n")
                    seq += 1
                    self._stats["watch_events"] += 1
                    await asyncio.sleep(self.interval())  # at most one event per interval
        except ConnectionError as exc:  # the node went away
            log.debug("a watch of %s ended: %r", content, exc)
        return resp

    def _event(self, image: _Image, sent: dict[str, int], me: NodeInfo | None,
               suspects: dict[str, float]) -> WatchEvent:
        """What ``sent`` (what the watch named so far) lacks of the image's holders; the first
        event of a watch is one with every holder new."""
        now = time.monotonic()
        mine = me.node_id if me else None
        peers: list[tuple[PeerRecord, bool]] = []
        for node_id, bits in list(sent.items()):  # those already named: what changed
            held = image.holders.get(node_id)
            if held is None or suspects.get(node_id, 0) >= now:
                continue  # not in this poll (a store's sample), or suspect: the node finds out by asking
            node, now_bits = held
            if now_bits != bits:
                whole = bool(bits & ~now_bits)
                peers.append((PeerRecord(node.node_id, node.peer_url, node.location, node.load,
                                         now_bits if whole else now_bits & ~bits), whole))
                sent[node_id] = now_bits
        room = self._peers - len(sent)
        if room > 0:  # holders not named yet, nearest first
            new = [(n, b) for k, (n, b) in image.holders.items()
                   if k not in sent and k != mine and suspects.get(k, 0) < now]
            for node, bits in selection.rank(me, new)[:room]:
                peers.append((PeerRecord(node.node_id, node.peer_url, node.location, node.load, bits), True))
                sent[node.node_id] = bits
        return WatchEvent(image.nchunks, peers)

    def statistics(self) -> dict:
        return {**self._stats, "watchers": self._watchers}
