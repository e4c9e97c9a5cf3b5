"""The durable index of cached chunks, in LMDB.

Databases in one environment:

- ``meta``: layout version, chunk size, total indexed bytes.
- ``chunks``: ``content(16) chunk(u32 BE)`` -> ``length(u32) xxh3(u64) last_use(u64 ms)``.
- ``digests``: ``content(16)`` -> the image's manifest's digests, 32 bytes a chunk, once known
  (issue 31: which chunks are zeros, and which other images' chunks are the same).
- ``shared``: ``content(16) chunk(u32 BE)`` -> ``home content(16) home chunk(u32 BE)``: a chunk whose
  bytes another image's indexed chunk of the same digest holds (issue 31); written only while that
  one is indexed, and deleted in the transaction that deletes it.  Neither counted in ``used``
  nor in the eviction order: the home chunk is.
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


@dataclass(frozen=True, slots=True)
class Share:
    """Chunk ``chunk`` of ``content`` is chunk ``home_chunk`` of ``home``'s (same digest)."""
    content: bytes
    chunk: int
    home: bytes
    home_chunk: int


class ChunkIndex:
    def __init__(self, path: Path, map_size: int = 256 * 2**20):
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=8, readahead=False, sync=True,
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
        self._shared = self._env.open_db(b"shared")
        self._digests = self._env.open_db(b"digests")

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

    def _of(self, db, content: bytes) -> Iterator[tuple[int, bytes]]:
        """(chunk, value) of every entry of ``content`` in ``db``, in chunk order."""
        with self._env.begin(db=db) as txn:
            cur = txn.cursor()
            if not cur.set_range(content):
                return
            for key, val in cur:
                c, chunk = _KEY.unpack(key)
                if c != content:
                    break
                yield chunk, val

    def chunks_of(self, content: bytes) -> Iterator[ChunkRecord]:
        for chunk, val in self._of(self._chunks, content):
            yield ChunkRecord(chunk, *_VAL.unpack(val))

    def digests_of(self, content: bytes) -> bytes | None:
        """The manifest's digests of ``content``, if they were known here."""
        with self._env.begin(db=self._digests) as txn:
            return txn.get(content)

    def shared_of(self, content: bytes) -> Iterator[Share]:
        """The chunks of ``content`` whose bytes another content's chunk holds."""
        for chunk, val in self._of(self._shared, content):
            yield Share(content, chunk, *_KEY.unpack(val))

    def contents(self) -> set[bytes]:
        """Every content key with at least one indexed or shared chunk."""
        return self._contents(self._chunks) | self._contents(self._shared)

    def _contents(self, db) -> set[bytes]:
        out: set[bytes] = set()
        with self._env.begin(db=db) as txn:
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
               touches: Iterable[tuple[bytes, int, int]] = (), unshares: Iterable[tuple[bytes, int]] = (),
               shares: Iterable[Share] = (), digests: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """One durable transaction: deletes first (of chunks and of shares), then puts (of chunks,
        then of shares), then last-use updates.

        Deletes come first because a chunk deleted (evicted or found corrupt) may have been fetched
        again since: its new put must win.  A share is put only if its home chunk is indexed in
        the same transaction's end state.  Grows the map when it is full.
        """
        deletes, puts, touches = list(deletes), list(puts), list(touches)
        unshares, shares, digests = list(unshares), list(shares), list(digests)
        while True:
            try:
                self._commit_once(deletes, puts, touches, unshares, shares, digests)
                return
            except lmdb.MapFullError:
                # Not expected: the daemon sizes the map from --cache-size.
                new = self._env.info()["map_size"] * 2
                log.warning("cache index map full; growing it to %d MiB", new // 2**20)
                self._env.set_mapsize(new)
            except lmdb.Error as exc:
                raise CacheError(f"cache index write failed: {exc}") from exc

    def _commit_once(self, deletes, puts, touches, unshares=(), shares=(), digests=()) -> None:
        with self._env.begin(write=True) as txn:
            for content, blob in digests:
                txn.put(content, blob, db=self._digests)
            raw = txn.get(b"used", db=self._meta)
            used = _U64.unpack(raw)[0] if raw else 0
            for content, chunk in deletes:
                key = _KEY.pack(content, chunk)
                old = txn.pop(key, db=self._chunks)
                if old is not None:
                    length, _, last_use = _VAL.unpack(old)
                    used -= length
                    txn.delete(_LRU.pack(last_use, content, chunk), db=self._lru)
            for content, chunk in unshares:
                txn.delete(_KEY.pack(content, chunk), db=self._shared)
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
            for s in shares:
                home = _KEY.pack(s.home, s.home_chunk)
                if txn.get(home, db=self._chunks) is not None:
                    txn.put(_KEY.pack(s.content, s.chunk), home, db=self._shared)
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
        """Forget every chunk of one content (its data file is gone), and every share of them or
        of it; returns how many chunks."""
        keys = [(content, r.chunk) for r in self.chunks_of(content)]
        unshares = [(s.content, s.chunk) for s in self.shared_of(content)]
        with self._env.begin(db=self._shared) as txn:  # others' chunks whose home this was
            unshares += [_KEY.unpack(k) for k, v in txn.cursor() if v[:CONTENT_KEY_LEN] == content]
        self.commit(deletes=keys, unshares=unshares)
        with self._env.begin(write=True, db=self._digests) as txn:
            txn.delete(content)
        return len(keys)

    def forget_digests_except(self, keep: set[bytes]) -> int:
        """Delete the digests of every content not in ``keep`` (nothing of it cached any more);
        returns how many."""
        with self._env.begin(write=True, db=self._digests) as txn:
            gone = [k for k in txn.cursor().iternext(keys=True, values=False) if k not in keep]
            for k in gone:
                txn.delete(k)
        return len(gone)

    def unshare_dangling(self) -> int:
        """Delete every share whose home chunk is not indexed (none should be: a share goes in
        the transaction that deletes its home); returns how many."""
        with self._env.begin(write=True) as txn:
            dangling = [k for k, v in txn.cursor(db=self._shared) if txn.get(v, db=self._chunks) is None]
            for k in dangling:
                txn.delete(k, db=self._shared)
        return len(dangling)

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
