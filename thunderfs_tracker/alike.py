"""Chunks other images hold under the same digest (issue 31): which chunk of which other image
has the bytes of a chunk of this one, by the manifests the tracker holds in memory.

A node booting v2 of an image asks, for a window of v2's chunks nobody holds as v2's, who holds
them as another image's (``GET /v1/images/{image}/alike``), and takes v1's chunks from a
rack-mate that never heard of v2, checking each against v2's own manifest.  The index keeps, per
chunk size, each non-zero digest's first few places (``PLACES``): bounded by the manifests the
tracker keeps in memory (``ManifestStore``'s ``keep_in_memory``), which it indexes as it loads
them and forgets as it drops them, and by ``MAX_DIGESTS`` in all (~200 B each): an image loaded
beyond it is not indexed (its chunks are found in no other image's asks; logged once).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from thunderfs_common import chunk_digest
from thunderfs_common.image import content_key
from thunderfs_common.tracker_protocol import Manifest

log = logging.getLogger(__name__)

PLACES = 4  # places kept per digest: a chunk in more images needs no more to be found
MAX_DIGESTS = 1_000_000


def key_of(m: Manifest) -> bytes:
    return content_key(m.os_hash_algo, m.os_hash_value, m.size)


class AlikeIndex:
    def __init__(self) -> None:
        # chunk size -> digest -> [(content key, chunk)]
        self._places: dict[int, dict[bytes, list[tuple[bytes, int]]]] = defaultdict(dict)
        self._counts: dict[tuple[bytes, int], int] = {}  # (content, chunk size) -> chunks alike elsewhere
        self._sizes: dict[bytes, int] = {}  # content -> the image's size

    def size_of(self, content: bytes) -> int:
        return self._sizes.get(content, 0)

    def add(self, m: Manifest) -> None:
        content, places = key_of(m), self._places[m.chunk_size]
        if sum(len(p) for p in self._places.values()) + m.nchunks > MAX_DIGESTS:
            log.warning("image %s is not indexed for chunks alike across images: %d digests already",
                        m.image_id, MAX_DIGESTS)
            return
        self._sizes[content] = m.size
        zeros = {chunk_digest.zero_digest(m.chunk_size),
                 chunk_digest.zero_digest(m.size - (m.nchunks - 1) * m.chunk_size)}
        for c in range(m.nchunks):
            d = m.digest(c)
            if d in zeros:
                continue
            where = places.setdefault(d, [])
            if len(where) < PLACES and (content, c) not in where:
                where.append((content, c))
        self._counts.clear()  # a new image may be alike to any

    def drop(self, m: Manifest) -> None:
        content, places = key_of(m), self._places.get(m.chunk_size, {})
        for c in range(m.nchunks):
            where = places.get(m.digest(c))
            if where is not None:
                where[:] = [p for p in where if p[0] != content]
                if not where:
                    del places[m.digest(c)]
        self._counts.clear()

    def count(self, m: Manifest) -> int:
        """How many of the image's chunks another image has (0: nothing to ask for)."""
        key = (key_of(m), m.chunk_size)
        if key not in self._counts:
            self._counts[key] = sum(1 for c, _ in self._scan(m, 0, m.nchunks))
        return self._counts[key]

    def find(self, m: Manifest, first: int, count: int) -> dict[bytes, list[tuple[int, int]]]:
        """For chunks ``first..first+count-1`` of the image: {other content: [(chunk here, chunk
        there)]}, every place of each chunk's digest."""
        out: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
        for c, where in self._scan(m, first, min(m.nchunks, first + count)):
            for other, oc in where:
                out[other].append((c, oc))
        return dict(out)

    def _scan(self, m: Manifest, start: int, end: int):
        content, places = key_of(m), self._places.get(m.chunk_size, {})
        for c in range(start, end):
            where = [p for p in places.get(m.digest(c), ()) if p[0] != content]
            if where:
                yield c, where
