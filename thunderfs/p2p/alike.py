"""Chunks of an image that other images have under the same digests, from the nodes that hold
them as those images' chunks (issue 31): a node booting v2 takes v1's chunks from a rack-mate
that never read v2, and checks each against v2's own manifest, as any peer's.

The tracker says which chunks of which images are alike (``TrackerClient.alike``, answered from
the manifests it holds), asked per lookup window and kept ``ALIKE_TTL`` seconds, and only for an
image whose manifest it says shares chunks with others (``Manifest.alike``): an image that
shares nothing costs the tracker no request more.
"""

from __future__ import annotations

import logging

import trio

from thunderfs.p2p.asking import Asker
from thunderfs.p2p.peer_client import Answer, PeerClient
from thunderfs.p2p.peer_directory import PeerDirectory
from thunderfs_common.image import ImageMeta
from thunderfs_common.tracker_protocol import Alike, Manifest, ProtocolError
from thunderfs_tracker.client import TrackerClient, TrackerError

log = logging.getLogger(__name__)


class _Other:
    """Another image's chunks, as the peer client asks for them (its content key and size)."""

    def __init__(self, content: bytes, size: int):
        self.content, self.size = content, size


class _Shifted:
    """This image's manifest, read at ``chunk + delta``: another image's chunk ``j`` is checked
    against this image's digest of chunk ``j + delta``."""

    def __init__(self, manifest: Manifest, delta: int):
        self._m, self._delta = manifest, delta

    def digest(self, chunk: int) -> bytes:
        return self._m.digest(chunk + self._delta)


def _pair_runs(pairs: list[tuple[int, int]], most: int) -> list[tuple[int, int, int]]:
    """(chunk here, chunk there, count) runs of ``pairs`` that are adjacent on both sides."""
    out: list[list[int]] = []
    for k, j in sorted(pairs):
        if out and k == out[-1][0] + out[-1][2] and j == out[-1][1] + out[-1][2] and out[-1][2] < most:
            out[-1][2] += 1
        else:
            out.append([k, j, 1])
    return [tuple(r) for r in out]


class Alikes:
    def __init__(self, tracker: TrackerClient, directory: PeerDirectory, client: PeerClient, asker: Asker, *,
                 chunk_size: int, timeout: float, max_request_chunks: int):
        self._tracker = tracker
        self._directory = directory
        self._client = client
        self._asker = asker
        self._cs = chunk_size
        self.timeout = timeout
        self._max = max_request_chunks
        self._alikes: dict[tuple[bytes, int], tuple[float, list[Alike]]] = {}  # (content, window) -> (when, answer)
        self._stats = dict.fromkeys(("alike_asks", "alike_chunks"), 0)

    # How long the tracker's word on a window's chunks that other images have is kept.
    ALIKE_TTL = 30.0

    async def take(self, meta: ImageMeta, chunks: list[int]) -> list[tuple[int, bytes]]:
        """Verified runs ``(first chunk, bytes)`` of ``chunks`` from peers that hold them as chunks
        of another image with the same digests (issue 31: a node booting v2 takes v1's chunks
        from a rack-mate that never read v2), each checked against this image's manifest.  Only
        for an image whose manifest the tracker says shares chunks with others (``alike``)."""
        manifest = self._directory.manifest_nowait(meta)
        if not isinstance(manifest, Manifest) or not manifest.alike or self._directory.tracker_breaker.is_open:
            return []
        want = set(chunks)
        got: list[tuple[int, bytes]] = []
        for alike in await self._alike(meta, min(chunks), max(chunks)):
            other = _Other(alike.content, alike.size)
            for peer in alike.peers:
                if self._client.avoided(peer.node_id) or self._client.slow(peer.node_id):
                    continue
                has = [(k, j) for k, j in alike.pairs if k in want and peer.chunks >> j & 1]
                for k, j, n in _pair_runs(has, self._max):
                    reply = await self._asker.ask(peer, other, _Shifted(manifest, k - j), j, n)
                    if reply.answer is not Answer.OK:
                        break  # this peer failed: the next one
                    got.append((k, reply.data))
                    want.difference_update(range(k, k + n))
                    self._stats["alike_chunks"] += n
                if not want:
                    return got
        return got

    async def _alike(self, meta: ImageMeta, first: int, last: int) -> list[Alike]:
        """The tracker's word on chunks ``first..last`` (asked per lookup window, kept
        ``ALIKE_TTL`` seconds; none while it fails)."""
        window = self._directory.window
        out: list[Alike] = []
        for w in range(first // window, last // window + 1):
            key = (meta.content_key, w)
            when, answer = self._alikes.get(key, (-1e9, []))
            if trio.current_time() - when >= self.ALIKE_TTL:
                try:
                    with trio.move_on_after(self.timeout):
                        answer = await self._tracker.alike(meta.id, self._cs, w * window,
                                                           min(window, -(-meta.size // self._cs) - w * window))
                except (TrackerError, ProtocolError) as exc:
                    log.debug("no word on chunks of %s other images have: %s", meta.id, exc)
                self._alikes[key] = (trio.current_time(), answer)
                self._stats["alike_asks"] += 1
                while len(self._alikes) > 256:
                    del self._alikes[next(iter(self._alikes))]
            out.extend(answer)
        return out

    def statistics(self) -> dict:
        return dict(self._stats)
