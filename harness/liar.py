"""Fault injection: turn a real daemon into a lying peer.

A daemon checks every chunk it reads from its cache against the xxh3 in its index, so bytes
altered behind its back are never served, to it or to peers.  A liar is a node whose cache is
wrong *and* consistent: its data file and its index agree on bytes that are not Glance's (a
malicious node, or one whose disk and index were both damaged).  Made while the daemon is
unmounted (its index in memory would still hold the true checksums), then mounted again: from
then on it serves wrong bytes with a straight face, and only the manifest catches them.
"""

from __future__ import annotations

import random
from pathlib import Path

import xxhash

from thunderfs.cache.holes import data_extents
from thunderfs.cache.index import ChunkIndex, Put

CHUNK = 64 * 1024


def alter(cache_dir: Path, content_key: str, rng: random.Random, chunks: list[int] | None = None,
          most: int = 8) -> list[int]:
    """Flip 4 bytes in ``chunks`` (default: up to ``most`` cached ones, at random) of one content
    in a cache no daemon is using, and index the altered bytes' xxh3; the chunks altered."""
    path = cache_dir / "data" / f"{content_key}.data"
    index = ChunkIndex(cache_dir / "index")
    try:
        content = bytes.fromhex(content_key)
        records = {r.chunk: r for r in index.chunks_of(content)}
        with open(path, "r+b") as f:
            if chunks is None:
                cached = sorted({c for a, b in data_extents(f.fileno()) for c in range(a // CHUNK, (b - 1) // CHUNK + 1)}
                                & set(records))
                chunks = rng.sample(cached, min(most, len(cached)))
            puts = []
            for c in chunks:
                rec = records[c]
                f.seek(c * CHUNK)
                data = bytearray(f.read(rec.length))
                data[100:104] = bytes(x ^ 0xFF for x in data[100:104])
                f.seek(c * CHUNK)
                f.write(data)
                puts.append(Put(content, c, rec.length, xxhash.xxh3_64_intdigest(bytes(data)), rec.last_use))
        index.commit(puts=puts)
    finally:
        index.close()
    return list(chunks)
