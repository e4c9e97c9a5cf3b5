"""Chunks known by their digest (issue 31): one copy of a chunk however many images hold it, and
no copy at all of a zero chunk.

An image's manifest gives every chunk's digest (BLAKE3, 256 bits: the identity of its bytes;
``thunderfs_common.chunk_digest``).  Once it is known here (``know``), a chunk of that image that
another image holds under the same digest is not fetched: it becomes ``SHARED``, served from the
other image's chunk (its *home*), and a chunk whose digest is that of as many zero bytes becomes
``ZERO``, served as zeros.

Invariants (the store's rule 8):

- A home is an ``INDEXED`` chunk (durable) of an image whose manifest named its digest, and
  whose bytes were hashed and found to match that digest before anything shared them (once per
  home and process: ``_proven``); a ``SHARED`` chunk copies its xxh3, so that every read of the
  home's bytes for it is checked as for the home itself (rule 5).  Digests come only from
  manifests the peer source accepted (signed by the tracker, bound to Glance's hash), and even a
  manifest that lied about a chunk it holds could not make another image's chunk be served with
  bytes that do not hash to that image's own digest.
- A share is written to the index only while its home is indexed; when the home goes (evicted,
  found rotten, its image dropped), every chunk that shares it goes back to ``ABSENT`` at once,
  and its share is deleted in the same index transaction as the home (the committer's order).
  So no image's chunk ever points at bytes that are gone, even across a crash.
- Shared and zero chunks take no room: ``Space.used`` counts a shared chunk's bytes once, at its
  home; eviction takes a home by its own last use, which a read through a share updates, and
  never while a read of any image that shares it holds a pin.
"""

from __future__ import annotations

import functools
import logging

import xxhash

from thunderfs.cache.changes import ChangeFeed
from thunderfs.cache.committer import Committer
from thunderfs.cache.image_data import ABSENT, INDEXED, SHARED, ZERO, ImageData, read_checked
from thunderfs_common import chunk_digest

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def zero_xxh(length: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(length))


class Sharing:
    def __init__(self, stats: dict, changes: ChangeFeed, committer: Committer):
        self._stats = stats
        self._changes = changes
        self._committer = committer
        # digest -> the chunks that hold its bytes (a few: the first that is indexed and proven serves)
        self._homes: dict[bytes, list[tuple[ImageData, int]]] = {}
        self._digest_of: dict[tuple[ImageData, int], bytes] = {}  # a home -> its digest
        self._proven: set[tuple[ImageData, int]] = set()  # homes whose bytes hashed to their digest

    def know(self, img: ImageData, digests: bytes, *, kept: bool = False) -> None:
        """``img``'s manifest (its digests, ``chunk_digest.SIZE`` bytes each) is known: its zero
        chunks become ``ZERO`` and its indexed chunks homes for other images' of the same digest;
        the digests go to the index (unless ``kept`` there already: loaded from it)."""
        if img.digests is not None:
            return
        if len(digests) != img.nchunks * chunk_digest.SIZE:
            raise ValueError(f"{len(digests)} bytes of digests for {img.nchunks} chunks")
        img.digests = bytes(digests)
        if not kept:
            self._committer.know(img)
        full, last = chunk_digest.zero_digest(img.chunk_size), chunk_digest.zero_digest(img.chunk_len(img.nchunks - 1))
        state = img.state
        for c in range(img.nchunks):
            if state[c] == ABSENT and img.digest(c) == (last if c == img.nchunks - 1 else full):
                state[c] = ZERO
                img.xxh[c] = zero_xxh(img.chunk_len(c))  # what its hole reads as (a seal's check)
            elif state[c] == INDEXED:
                self.indexed(img, c)

    HOMES = 4  # homes kept per digest: when one goes, the next serves

    def indexed(self, img: ImageData, c: int) -> None:
        """Chunk ``c`` of ``img`` became ``INDEXED``: a home for its digest, if its manifest is
        known and the digest has fewer than ``HOMES``."""
        d = img.digest(c)
        if d is None or (img, c) in self._digest_of:
            return
        homes = self._homes.setdefault(d, [])
        if len(homes) < self.HOMES:
            homes.append((img, c))
            self._digest_of[(img, c)] = d

    def share(self, img: ImageData, chunks: list[int]) -> list[int]:
        """Those of ``chunks`` another image holds under the same digest become ``SHARED`` now;
        returns the rest, still to be fetched."""
        if img.digests is None or not self._homes:
            return chunks
        rest = []
        for c in chunks:
            home = self._home(img, c) if img.state[c] == ABSENT else None
            if home is None:
                rest.append(c)
                continue
            h, hc = home
            self._link(img, c, h, hc)
            self._committer.shared(img, c, h, hc)
            self._changes.note(img, c, True)
            self._stats["chunks_shared"] += 1
            self._stats["bytes_shared"] += img.chunk_len(c)
        if len(rest) != len(chunks):
            img.wake_waiters()
        return rest

    def _home(self, img: ImageData, c: int) -> tuple[ImageData, int] | None:
        """An indexed, proven chunk of another place with chunk ``c``'s digest, or None."""
        for h, hc in list(self._homes.get(img.digest(c), ())):
            if (h is not img or hc != c) and h.state[hc] == INDEXED and h.chunk_len(hc) == img.chunk_len(c) \
                    and self._prove(h, hc):
                return h, hc
        return None

    def _prove(self, img: ImageData, c: int) -> bool:
        """Whether home ``c`` of ``img`` holds bytes that hash to its digest: hashed once (one
        chunk's read and BLAKE3, ~0.1 ms) before the first share; a home that fails is no home."""
        if (img, c) in self._proven:
            return True
        n = img.chunk_len(c)
        try:
            data, bad = read_checked(img.fd, c * img.chunk_size, n, 0, n, img.xxh[c:c + 1], img.chunk_size)
        except OSError as exc:
            log.warning("cannot read chunk %d of %s to share it: %s", c, img.content.hex(), exc)
            return False
        if bad is None and chunk_digest.digest(data) == self._digest_of[(img, c)]:
            self._proven.add((img, c))
            self._stats["homes_proven"] += 1
            return True
        if bad is None:  # (rot, bad is not None, is the reader's to find and fetch again)
            log.warning("chunk %d of %s does not hash to the digest its manifest gives: not shared",
                        c, img.content.hex())
            self._stats["homes_refused"] += 1
        self._forget(img, c)
        return False

    def _forget(self, img: ImageData, c: int) -> None:
        """Chunk ``c`` of ``img`` is no home any more."""
        d = self._digest_of.pop((img, c), None)
        if d is not None:
            homes = self._homes[d]
            homes.remove((img, c))
            if not homes:
                del self._homes[d]
        self._proven.discard((img, c))

    def load(self, img: ImageData, c: int, home: ImageData | None, hc: int) -> bool:
        """A share read from the index: ``SHARED`` again if its home is indexed (else False: the
        caller forgets it)."""
        if home is None or hc >= home.nchunks or home.state[hc] != INDEXED or img.state[c] != ABSENT:
            return False
        self._link(img, c, home, hc)
        return True

    @staticmethod
    def _link(img: ImageData, c: int, home: ImageData, hc: int) -> None:
        img.state[c] = SHARED
        img.xxh[c] = home.xxh[hc]
        img.home[c] = (home, hc)
        img.foreign += home is not img
        home.users.setdefault(hc, set()).add((img, c))

    def unshare(self, img: ImageData, c: int) -> None:
        """Chunk ``c`` of ``img`` (``SHARED``) no longer shares its home: ``ABSENT``, its share
        deleted at the next commit."""
        home = img.home.pop(c, None)
        if home is not None:
            img.foreign -= home[0] is not img
            users = home[0].users.get(home[1])
            if users is not None:
                users.discard((img, c))
                if not users:
                    del home[0].users[home[1]]
        img.state[c] = ABSENT
        self._committer.unshared(img, c)
        self._changes.note(img, c, False)

    def dropping(self, img: ImageData, c: int) -> None:
        """Chunk ``c`` of ``img`` (its own bytes) is going: every chunk that shares it goes too,
        and it is no home any more."""
        for user, uc in list(img.users.pop(c, ())):
            if user.state[uc] == SHARED:
                self.unshare(user, uc)
                user.wake_waiters()
        self._forget(img, c)

    def statistics(self) -> dict:
        return {"shared_digests": len(self._homes)}
