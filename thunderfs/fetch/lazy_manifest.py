"""What a node knows of an image whose manifest the tracker has not built yet: a lazy manifest.

The tracker seeds such an image (``thunderfs_tracker.seed``): it reads each chunk from Glance
once and vouches for its sha256 with a ``Piece`` under its proof.  A node keeps the digests of
every piece it took (checked against the proof and Glance's listing first, ``PeerDirectory``)
and checks a peer's chunks against them as against a manifest; a chunk no piece covered yet has
no digest (``digest`` is None), and its bytes wait until one does (``PeerSource``).
"""

from __future__ import annotations

from thunderfs_common.image import ImageMeta
from thunderfs_tracker.protocol import Piece


class LazyManifest:
    def __init__(self, meta: ImageMeta, chunk_size: int):
        self.meta = meta
        self.image_id = meta.id
        self.size = meta.size
        self.chunk_size = chunk_size
        self._digests: dict[int, bytes] = {}

    @property
    def nchunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def digest(self, chunk: int) -> bytes | None:
        return self._digests.get(chunk)

    def unknown(self, first: int, count: int) -> list[int]:
        """The chunks of ``first..first+count-1`` no piece has covered yet."""
        return [c for c in range(first, first + count) if c not in self._digests]

    def add(self, piece: Piece) -> None:
        """A checked piece's digests (the caller checked its proof and that it is this image's)."""
        for i in range(piece.count):
            self._digests[piece.first + i] = piece.digest(piece.first + i)

    def __len__(self) -> int:
        return len(self._digests)
