"""Which chunks of an image are all zeros, as its manifest says: where ``lseek(SEEK_DATA)`` and
``lseek(SEEK_HOLE)`` land, so that ``qemu-img convert``, ``qemu-img map`` and ``cp --sparse``
skip them instead of reading them (through Glance, the first time).

A chunk is a zero chunk when the manifest's digest for it is the digest of as many zero bytes
(the last chunk may be short).  The manifest is checked before a node acts on it (the tracker's
proof, bound to Glance's ``os_hash_value``), so a chunk called zero here reads back as zeros: it
is still served as any chunk when read.  Without a manifest nothing is known to be zero, and the
whole image is data (what a file system without holes answers).
"""

from __future__ import annotations

from thunderfs_common.chunk_digest import zero_digest


class ZeroChunks:
    """One flag per chunk (1: all zeros) of an image of ``size`` bytes in chunks of ``chunk_size``."""

    def __init__(self, flags: bytes, chunk_size: int, size: int):
        self._flags, self._cs, self.size = bytes(flags), chunk_size, size

    @classmethod
    def of(cls, manifest) -> "ZeroChunks":
        """From a whole manifest (``digest(chunk)`` and ``nchunks``, ``chunk_size``, ``size``)."""
        cs, size, n = manifest.chunk_size, manifest.size, manifest.nchunks
        full, last = zero_digest(cs), zero_digest(size - (n - 1) * cs)
        flags = bytearray(n)
        for c in range(n):
            flags[c] = manifest.digest(c) == (last if c == n - 1 else full)
        return cls(flags, cs, size)

    @classmethod
    def none(cls, chunk_size: int, size: int) -> "ZeroChunks":
        """Nothing known to be zero: the whole image is data."""
        return cls(bytes(max(1, -(-size // chunk_size))), chunk_size, size)

    def is_zero(self, chunk: int) -> bool:
        return 0 <= chunk < len(self._flags) and self._flags[chunk] == 1

    @property
    def count(self) -> int:
        return self._flags.count(1)

    def data_from(self, offset: int) -> int | None:
        """``SEEK_DATA``: the first offset at or after ``offset`` in a chunk that is not zero;
        None past the last (ENXIO)."""
        if not 0 <= offset < self.size:
            return None
        c = self._flags.find(0, offset // self._cs)
        return None if c < 0 else max(offset, c * self._cs)

    def hole_from(self, offset: int) -> int | None:
        """``SEEK_HOLE``: the first offset at or after ``offset`` in a zero chunk, or the size
        (the implicit hole at the end); None at or past the end (ENXIO)."""
        if not 0 <= offset < self.size:
            return None
        c = self._flags.find(1, offset // self._cs)
        return self.size if c < 0 else max(offset, c * self._cs)
