"""The digest a manifest gives every chunk, which a node checks a peer's bytes against.

BLAKE3 (256 bits), not sha256: a node computes one for every chunk a peer sends, and on this
machine sha256 cost 0.59 CPU s per GiB of the 2.36 a GiB from a peer cost the daemon, BLAKE3 a
quarter of that (issue 28; the stage lines of `benchmarks/dataplane_bench.py` print both).  It is as strong for this job:
a collision or a second preimage is what a lying peer would need, and BLAKE3 gives 128 bits of
security against either.  The tracker computes them from Glance's bytes; Glance's own
``os_hash_value`` (sha512 as a rule) still binds the whole image.
"""

from __future__ import annotations

import functools

from blake3 import blake3

ALGORITHM = "blake3"  # the manifest's and a piece's field that carries the digests
SIZE = 32  # bytes per digest


def digest(data) -> bytes:
    """One chunk's digest (any bytes-like object; the GIL is released while it hashes)."""
    return blake3(data).digest()


def digests(data, chunk_size: int) -> list[bytes]:
    """The digest of every ``chunk_size`` piece of ``data`` (the last one may be short; an empty
    ``data`` has one, of nothing)."""
    view = memoryview(data)
    return [blake3(view[i:i + chunk_size]).digest() for i in range(0, max(len(view), 1), chunk_size)]


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes: a manifest's zero chunk (the last may be short)."""
    return digest(bytes(length))
