"""One peer asked for a run of chunks, with what every ask needs around the peer client: bytes a
lazy manifest had no digests for yet checked once the tracker's piece for them came, and a peer
that lied reported to the tracker.  The peer source and the claims both ask through it."""

from __future__ import annotations

import logging

import trio

from thunderfs.cache.store import ImageData
from thunderfs.p2p.lazy_manifest import LazyManifest
from thunderfs.p2p.peer_client import Answer, PeerClient, Reply
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs_common.tracker_protocol import Manifest, PeerRecord
from thunderfs_tracker.client import TrackerClient, TrackerError

log = logging.getLogger(__name__)


class Asker:
    def __init__(self, tracker: TrackerClient, directory: PeerDirectory, client: PeerClient, *, timeout: float):
        self._tracker = tracker
        self._directory = directory
        self._client = client
        self.timeout = timeout
        self._stats = {"unchecked_dropped": 0}

    async def ask(self, peer: PeerRecord, img: ImageData, manifest: Manifest | LazyManifest, first: int,
                  count: int, *, wait: float = 0.0) -> Reply:
        """One peer asked for a run (``wait``: until it has it, at most that long); a peer that
        lied is reported to the tracker.  Bytes a lazy manifest has no digests for yet are
        checked once the tracker's piece for them came (not used, if it did not)."""
        reply = await self._client.get(peer, img, manifest, first, count, wait=wait)
        if reply.answer is Answer.UNCHECKED:
            for piece in reply.pieces:  # what the peer checked them against: proven, or refused
                self._directory.add_piece(manifest.meta, piece, from_peer=True)
            if isinstance(manifest, LazyManifest) and await self._directory.digests(manifest, first, count):
                reply = self._client.check(peer, img, manifest, first, reply.data, reply.digests)
            else:
                self._stats["unchecked_dropped"] += 1
                return Reply(Answer.NOT_HELD)
        if reply.answer is Answer.LIED:
            try:
                with trio.move_on_after(self.timeout):
                    await self._tracker.report(peer.node_id, img.content.hex(), reply.bad_chunk, reply.why)
            except TrackerError as exc:
                log.info("could not report peer %s to the tracker: %s", peer.node_id, exc)
        return reply

    def statistics(self) -> dict:
        return dict(self._stats)
