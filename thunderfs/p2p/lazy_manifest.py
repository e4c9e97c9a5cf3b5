"""What a node knows of an image whose manifest the tracker has not built yet: a lazy manifest.

The tracker seeds such an image (``thunderfs_tracker.seed``): it reads each chunk from Glance
once and vouches for its digest with a ``Piece`` under its proof.  A node keeps the digests of
every piece it took (checked against the proof and Glance's listing first, ``PeerDirectory``)
and checks a peer's chunks against them as against a manifest; a chunk no piece covered yet has
no digest (``digest`` is None), and its bytes wait until one does (``PeerSource``).  The pieces
themselves are kept too: a node sends those that cover the chunks it serves along with them
(``pieces_for``), so that the asker needs no word from the tracker to check them.
"""

from __future__ import annotations

from thunderfs_common.image import ImageMeta
from thunderfs_common.tracker_protocol import Piece


class LazyManifest:
    def __init__(self, meta: ImageMeta, chunk_size: int):
        self.meta = meta
        self.image_id = meta.id
        self.size = meta.size
        self.chunk_size = chunk_size
        self._digests: dict[int, bytes] = {}
        self._piece_of: dict[int, Piece] = {}  # chunk -> a piece that covers it

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
            c = piece.first + i
            self._digests[c] = piece.digest(c)
            self._piece_of.setdefault(c, piece)

    def pieces_for(self, first: int, count: int) -> list[Piece]:
        """Pieces that cover the chunks ``first..first+count-1`` this node has pieces of, few."""
        out: list[Piece] = []
        c, end = first, first + count
        while c < end:
            piece = self._piece_of.get(c)
            if piece is None:
                c += 1
                continue
            out.append(piece)
            c = piece.first + piece.count
        return out

    def __len__(self) -> int:
        return len(self._digests)
