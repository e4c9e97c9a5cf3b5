"""The durable index of cached chunks, in LMDB.

Databases in one environment:

- ``meta``: layout version, chunk size, total indexed bytes.
- ``chunks``: ``content(16) chunk(u32 BE)`` -> ``length(u32) xxh3(u64) last_use(u64 ms)``.
- ``lru``: ``last_use(u64 BE) content(16) chunk(u32 BE)`` -> empty; the eviction order.
- ``images``: image id -> JSON of the last listing seen from Glance (served when Glance is down).

A chunk is put here only after its data is durable (see ``chunk_store``).  Every write is one
transaction; write transactions may run in a worker thread, one at a time (the committer is the
only writer), while reads run in the trio thread.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from thunderfs.errors import CacheError, CacheLayoutError

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
CONTENT_KEY_LEN = 16

_KEY = struct.Struct(">16sI")
_VAL = struct.Struct("<IQQ")
_LRU = struct.Struct(">Q16sI")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    chunk: int
    length: int
    xxh3: int
    last_use: int


@dataclass(frozen=True, slots=True)
class Put:
    content: bytes
    chunk: int
    length: int
    xxh3: int
    last_use: int


class ChunkIndex:
    def __init__(self, path: Path, map_size: int = 256 * 2**20):
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=4, readahead=False, sync=True,
                                  metasync=True, lock=True)
        except lmdb.Error as exc:
            raise CacheError(f"cannot open the cache index at {path}: {exc}") from exc
        # Readers left behind by a killed daemon would pin old pages forever.
        stale = self._env.reader_check()
        if stale:
            log.info("cleared %d stale LMDB readers left by an earlier process", stale)
        self._meta = self._env.open_db(b"meta")
        self._chunks = self._env.open_db(b"chunks")
        self._lru = self._env.open_db(b"lru")
        self._images = self._env.open_db(b"images")

    def close(self) -> None:
        self._env.close()

    # --- layout ----------------------------------------------------------------------------

    def check_layout(self, chunk_size: int) -> None:
        """Stamp a new index with our chunk size, or refuse one made with another."""
        with self._env.begin(write=True, db=self._meta) as txn:
            version = txn.get(b"version")
            stored = txn.get(b"chunk_size")
            if version is None:
                txn.put(b"version", str(LAYOUT_VERSION).encode())
                txn.put(b"chunk_size", str(chunk_size).encode())
                txn.put(b"used", _U64.pack(0))
                return
            if int(version) != LAYOUT_VERSION:
                raise CacheLayoutError(f"cache index layout {int(version)} is not {LAYOUT_VERSION}; use an empty cache dir")
            if int(stored) != chunk_size:
                raise CacheLayoutError(
                    f"this cache dir holds {int(stored)}-byte chunks, not {chunk_size}: "
                    f"mount with --chunk-size {int(stored)} or use an empty cache dir"
                )

    def used_bytes(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"used")
            return _U64.unpack(raw)[0] if raw else 0

    # --- chunks ----------------------------------------------------------------------------

    def chunks_of(self, content: bytes) -> Iterator[ChunkRecord]:
        with self._env.begin(db=self._chunks) as txn:
            cur = txn.cursor()
            if not cur.set_range(content):
                return
            for key, val in cur:
                c, chunk = _KEY.unpack(key)
                if c != content:
                    break
                length, xxh, last_use = _VAL.unpack(val)
                yield ChunkRecord(chunk, length, xxh, last_use)

    def contents(self) -> set[bytes]:
        """Every content key with at least one indexed chunk."""
        out: set[bytes] = set()
        with self._env.begin(db=self._chunks) as txn:
            cur = txn.cursor()
            key = cur.first() and cur.key()
            while key:
                content = key[:CONTENT_KEY_LEN]
                out.add(content)
                # Jump past this content's chunks.
                if not cur.set_range(content + b"\xff" * 4 + b"\x00"):
                    break
                key = cur.key()
        return out

    def lru_oldest(self) -> Iterator[tuple[bytes, int, int]]:
        """(content, chunk, last_use) oldest first; a snapshot, safe to use across awaits only if consumed."""
        with self._env.begin(db=self._lru) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                last_use, content, chunk = _LRU.unpack(key)
                yield content, chunk, last_use

    def commit(self, deletes: Iterable[tuple[bytes, int]] = (), puts: Iterable[Put] = (),
               touches: Iterable[tuple[bytes, int, int]] = ()) -> None:
        """One durable transaction: deletes first, then puts, then last-use updates.

        Deletes come first because a chunk deleted (evicted or found corrupt) may have been fetched
        again since: its new put must win.  Grows the map when it is full.
        """
        deletes, puts, touches = list(deletes), list(puts), list(touches)
        while True:
            try:
                self._commit_once(deletes, puts, touches)
                return
            except lmdb.MapFullError:
                # Not expected: the daemon sizes the map from --cache-size.
                new = self._env.info()["map_size"] * 2
                log.warning("cache index map full; growing it to %d MiB", new // 2**20)
                self._env.set_mapsize(new)
            except lmdb.Error as exc:
                raise CacheError(f"cache index write failed: {exc}") from exc

    def _commit_once(self, deletes, puts, touches) -> None:
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"used", db=self._meta)
            used = _U64.unpack(raw)[0] if raw else 0
            for content, chunk in deletes:
                key = _KEY.pack(content, chunk)
                old = txn.pop(key, db=self._chunks)
                if old is not None:
                    length, _, last_use = _VAL.unpack(old)
                    used -= length
                    txn.delete(_LRU.pack(last_use, content, chunk), db=self._lru)
            for p in puts:
                key = _KEY.pack(p.content, p.chunk)
                old = txn.get(key, db=self._chunks)
                if old is not None:
                    length, _, last_use = _VAL.unpack(old)
                    used -= length
                    txn.delete(_LRU.pack(last_use, p.content, p.chunk), db=self._lru)
                txn.put(key, _VAL.pack(p.length, p.xxh3, p.last_use), db=self._chunks)
                txn.put(_LRU.pack(p.last_use, p.content, p.chunk), b"", db=self._lru)
                used += p.length
            for content, chunk, now in touches:
                key = _KEY.pack(content, chunk)
                old = txn.get(key, db=self._chunks)
                if old is None:
                    continue
                length, xxh, last_use = _VAL.unpack(old)
                if last_use >= now:
                    continue
                txn.delete(_LRU.pack(last_use, content, chunk), db=self._lru)
                txn.put(key, _VAL.pack(length, xxh, now), db=self._chunks)
                txn.put(_LRU.pack(now, content, chunk), b"", db=self._lru)
            txn.put(b"used", _U64.pack(max(used, 0)), db=self._meta)

    def drop_content(self, content: bytes) -> int:
        """Forget every chunk of one content (its data file is gone); returns how many."""
        keys = [(content, r.chunk) for r in self.chunks_of(content)]
        self.commit(deletes=keys)
        return len(keys)

    # --- image listing ---------------------------------------------------------------------

    def save_images(self, images: dict[str, dict]) -> None:
        with self._env.begin(write=True, db=self._images) as txn:
            for key in list(txn.cursor().iternext(keys=True, values=False)):
                if key.decode() not in images:
                    txn.delete(key)
            for image_id, record in images.items():
                txn.put(image_id.encode(), json.dumps(record, sort_keys=True).encode())

    def load_images(self) -> dict[str, dict]:
        with self._env.begin(db=self._images) as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor()}

    # --- what the last start learnt (the Glance endpoint from Keystone's catalog) -----------

    def save_note(self, key: str, value: str) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(b"note:" + key.encode(), value.encode())

    def load_note(self, key: str) -> str | None:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"note:" + key.encode())
        return raw.decode() if raw is not None else None
