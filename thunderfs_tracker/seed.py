"""The tracker as the first seed of an image nobody has read yet: a lazy manifest, piece by piece.

Until an image's manifest is built (its whole bytes read and checked against Glance's
``os_hash_value``, ``manifests``), nodes still trade its chunks: a node that the tracker granted
a run of chunks (a claim) asks the tracker for them (``GET /v1/images/{id}/seed``) instead of
Glance.  The tracker reads the run from Glance once (one read per chunk however many ask at once,
adjacent chunks in one Range request), hashes every chunk, and answers with the bytes and a
``Piece``: the run's digests under the tracker's proof.  Later askers of those chunks are
answered from memory (``cache_bytes``, least recently used dropped first); a node that took them
from a peer asks for the piece alone (``data=0``) to check them.  So Glance sends each chunk about
once, to the tracker, from the storm's first second, and the tracker's uplink carries the first
copy of each chunk only (the claims send the crowd to the claimer).

A piece vouches only that the tracker read these bytes from Glance under this image id, which is
what a node reading Glance itself trusts too.  The whole-image check binds them to
``os_hash_value`` later; a chunk read again that differs from what a piece said revokes the image
at once (``on_mismatch``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

from thunderfs_common import chunk_digest
from thunderfs_common.chunk_runs import runs
from thunderfs_common.glance_client import GlanceClient, GlanceError, ImageGone
from thunderfs_common.image import ImageMeta
from thunderfs_common.manifest_proof import ManifestProof
from thunderfs_common.tracker_protocol import DIGEST, MAX_PIECE_CHUNKS, Piece

# How long Glance's record of an image (its size and hash) is taken as known.
META_TTL = 60.0


class SeedUnavailable(Exception):
    """The tracker cannot seed this image (unknown, not active, no hash) or, ``transient``, this
    run (Glance failed: the node reads it from Glance itself)."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class _Image:
    __slots__ = ("meta", "digests", "used")

    def __init__(self, meta: ImageMeta):
        self.meta = meta
        self.digests: dict[int, bytes] = {}  # every chunk read so far: what the pieces said
        self.used = 0.0  # when a node last asked for any of it


class Seed:
    def __init__(self, glance: GlanceClient, proof: ManifestProof, *, cache_bytes: int = 256 * 2**20,
                 on_mismatch: Callable[[str, int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``on_mismatch(image_id, chunk_size, why)``: Glance sent other bytes for a chunk than
        a piece already said (the manifest store revokes the image)."""
        self._glance = glance
        self._proof = proof
        self._cache_bytes = cache_bytes
        self.on_mismatch = on_mismatch
        self._clock = clock
        self._images: dict[tuple[str, int], _Image] = {}
        self._metas: dict[str, tuple[float, ImageMeta]] = {}
        self._bytes: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._held = 0
        self._reading: dict[tuple[str, int, int], asyncio.Future] = {}
        self.stats = dict.fromkeys(("glance_reads", "bytes_read", "chunks_served", "bytes_served", "pieces",
                                    "cache_hits", "mismatches"), 0)

    async def meta(self, image_id: str) -> ImageMeta:
        """Glance's record of the image, if it can be seeded: active, with a hash."""
        now = self._clock()
        cached = self._metas.get(image_id)
        if cached is not None and now - cached[0] < META_TTL:
            return cached[1]
        try:
            meta = await self._glance.image(image_id)
        except ImageGone:
            raise SeedUnavailable(f"Glance has no image {image_id}", transient=False) from None
        except GlanceError as exc:
            raise SeedUnavailable(f"Glance did not answer for {image_id}: {exc}") from None
        if meta.status != "active" or not meta.os_hash_value:
            raise SeedUnavailable(f"image {image_id} is {meta.status} with no os_hash_value", transient=False)
        if len(self._metas) > 4096:
            self._metas.clear()
        self._metas[image_id] = (now, meta)
        return meta

    def listed(self, image_id: str) -> ImageMeta | None:
        """Glance's record of the image as last read, however old."""
        cached = self._metas.get(image_id)
        return cached[1] if cached else None

    def known(self, image_id: str, chunk_size: int) -> dict[int, bytes]:
        """Every digest a piece of the image said so far (the whole-image check compares)."""
        img = self._images.get((image_id, chunk_size))
        return dict(img.digests) if img else {}

    def quiet_for(self, image_id: str, chunk_size: int) -> float:
        """Seconds since a node last asked for a chunk of the image (a long time: never)."""
        img = self._images.get((image_id, chunk_size))
        return self._clock() - img.used if img else float("inf")

    def forget(self, image_id: str, chunk_size: int) -> None:
        """The image's manifest is built (or revoked): its pieces are no longer needed."""
        self._images.pop((image_id, chunk_size), None)
        for key in [k for k in self._bytes if k[:2] == (image_id, chunk_size)]:
            self._held -= len(self._bytes.pop(key))

    async def read(self, image_id: str, chunk_size: int, first: int, count: int,
                   *, data: bool) -> tuple[Piece, bytes | None]:
        """The piece of chunks ``first..first+count-1`` and, with ``data``, their bytes: read from
        Glance what no earlier ask left in memory.  Raises ``SeedUnavailable``."""
        meta = await self.meta(image_id)
        nchunks = max(1, -(-meta.size // chunk_size))
        if not (0 <= first and 0 < count <= MAX_PIECE_CHUNKS and first + count <= nchunks):
            raise ValueError(f"chunks {first}+{count} are not inside the image's {nchunks} (at most "
                             f"{MAX_PIECE_CHUNKS} at once)")
        img = self._images.get((image_id, chunk_size))
        if img is None or img.meta.os_hash_value != meta.os_hash_value:
            img = self._images[(image_id, chunk_size)] = _Image(meta)
        img.used = self._clock()
        wanted = range(first, first + count)
        got: dict[int, bytes] = {}
        need: list[int] = []
        for c in wanted:
            b = self._bytes.get((image_id, chunk_size, c))
            if b is not None:
                self._bytes.move_to_end((image_id, chunk_size, c))
                got[c] = b
                self.stats["cache_hits"] += 1
            elif data or c not in img.digests:
                need.append(c)
        waits = [(c, f) for c in need if (f := self._reading.get((image_id, chunk_size, c))) is not None]
        mine = [c for c in need if (image_id, chunk_size, c) not in self._reading]
        loop = asyncio.get_running_loop()
        futures = {c: loop.create_future() for c in mine}
        for c, f in futures.items():
            self._reading[(image_id, chunk_size, c)] = f
        try:
            for rfirst, rcount in runs(mine, MAX_PIECE_CHUNKS):
                got.update(await self._read_glance(img, chunk_size, rfirst, rcount, futures))
        except BaseException as exc:
            failed = SeedUnavailable(str(exc)) if not isinstance(exc, SeedUnavailable) else exc
            for f in futures.values():
                if not f.done():
                    f.set_exception(failed)
                    f.exception()  # retrieved: nobody else may be waiting
            if isinstance(exc, (GlanceError, SeedUnavailable)):
                raise failed from None
            raise
        finally:
            for c in mine:
                self._reading.pop((image_id, chunk_size, c), None)
        for c, f in waits:
            got[c] = await f
        piece = Piece(meta.id, meta.size, chunk_size, meta.os_hash_algo or "sha512", meta.os_hash_value or "",
                      first, b"".join(img.digests[c] for c in wanted))
        piece = dataclasses.replace(piece, proof=self._proof.make(piece.signed_bytes()))
        self.stats["pieces"] += 1
        if not data:
            return piece, None
        body = b"".join(got[c] for c in wanted)
        self.stats["chunks_served"] += count
        self.stats["bytes_served"] += len(body)
        return piece, body

    async def _read_glance(self, img: _Image, chunk_size: int, first: int, count: int,
                           futures: dict[int, asyncio.Future]) -> dict[int, bytes]:
        image_id = img.meta.id
        a, b = first * chunk_size, min(img.meta.size, (first + count) * chunk_size)
        buf = await self._glance.read_range(image_id, a, b)
        self.stats["glance_reads"] += 1
        self.stats["bytes_read"] += len(buf)
        digests = await asyncio.to_thread(chunk_digest.digests, buf, chunk_size)
        out: dict[int, bytes] = {}
        for i, d in enumerate(digests):
            c = first + i
            said = img.digests.get(c)
            if said is not None and said != d:
                self.stats["mismatches"] += 1
                why = (f"Glance sent other bytes for chunk {c} of {image_id} than it did before: the image "
                       f"changed under its id")
                if self.on_mismatch is not None:
                    self.on_mismatch(image_id, chunk_size, why)
                raise SeedUnavailable(why)
            img.digests[c] = d
            out[c] = chunk = bytes(buf[i * chunk_size:(i + 1) * chunk_size])
            self._keep((image_id, chunk_size, c), chunk)
            futures[c].set_result(chunk)
        return out

    def _keep(self, key: tuple[str, int, int], chunk: bytes) -> None:
        if self._cache_bytes <= 0:
            return
        old = self._bytes.pop(key, None)
        self._held += len(chunk) - (len(old) if old is not None else 0)
        self._bytes[key] = chunk
        while self._held > self._cache_bytes and self._bytes:
            self._held -= len(self._bytes.popitem(last=False)[1])

    async def aclose(self) -> None:
        await self._glance.aclose()

    def statistics(self) -> dict:
        return {**self.stats, "images": len(self._images), "cached_bytes": self._held,
                "digests": sum(len(i.digests) for i in self._images.values()) * DIGEST}
