"""Chunk data on local disk, bounded in size, crash-safe: the store, and the rules its parts keep.

The store is the image registry (one ``ImageData`` per image content, loaded from the index on
first use), the clean-up at start (``reclaim``), and the one face the rest of the daemon sees.
Its jobs are parts of their own, each with its rules at its top: ``reading`` (checked reads,
pins, page-cache hints), ``staging`` (verified bytes in, written now or behind), ``space``
(capacity, the disk's room, eviction), ``sharing`` (chunks known by their digest, across
images, and zero chunks), ``committer`` (durability and the index), ``changes`` (the feed the
announcer drains); a chunk's states are ``image_data``'s.

Layout: one sparse data file per image *content* (``data/<content-key>.data``, as long as the
image), chunk N at offset ``N * chunk_size``.  A read that spans many cached chunks is one
``pread``; an evicted chunk is a punched hole.

Invariants (read before adding an ``await`` to this module):

1. A chunk is served from disk only while its in-memory state is not ``ABSENT``.
2. ``INDEXED``: the index holds it and its data was made durable (fdatasync) before the index
   transaction.  ``PENDING``: written from verified bytes, readable through the page cache, not yet
   durable; the committer makes it ``INDEXED``.  A crash loses pending chunks, never corrupts:
   their leaked bytes are punched out at the next start (``reclaim``).
3. The committer task is the only writer of the index, one transaction at a time, in a thread.
4. Eviction runs synchronously in the trio thread: it takes only ``INDEXED`` chunks that no read
   has pinned and nobody touched since the last flush, marks them ``ABSENT`` and queues the index
   delete; the hole is punched only once that delete is durable, and only if the chunk is still
   ``ABSENT`` then (not staged again meanwhile).  So the index never lists a chunk over zeros: a
   crash in between leaves unindexed bytes, punched out at the next start like rule 2's.
5. Every chunk is checked against its xxh3 every time its bytes come from the data file, however
   recently it was checked before: a byte on disk can rot after its first read (issue 18).  A read
   takes whole chunks from the file (one ``pread`` per run), hashes each, and serves its slice; a
   mismatch drops the chunk (as in 4) and raises ``ChunkCorrupt`` so that the caller fetches it
   again.  Only bytes handed in from memory (``extra``: just fetched and verified) skip it.
6. A *sealed* image (``ImageData.sealed``: the kernel reads its data file itself, FUSE
   passthrough) was complete and checked whole when sealed, and is pinned whole: nothing of it is
   evicted, and nothing of it is ever punched, not even a chunk dropped as corrupt (its index
   entry goes; its bytes stay until a fetch writes the chunk again in place).  A hole there would
   be served as zeros: nothing checks what the kernel reads from it.
7. ``WRITING``: staged from a pooled receive buffer that the store holds (``fresh.py``), and being
   written behind; served from that buffer only, never from the data file, and neither indexed
   nor evicted.  Once written it is ``PENDING`` (rule 2), served from the buffer until the pool
   takes it back, then from the file.  A write that fails leaves it servable from memory until
   then, and ``ABSENT`` after.  Bytes from the buffer are not hashed again: they were verified
   on arrival and never left memory (as ``extra`` in rule 5).
8. ``SHARED``: another image's ``INDEXED`` chunk of the same digest (its home) holds the bytes,
   and is read for it, checked against the same xxh3; when the home goes, every chunk that
   shares it goes with it, in memory at once and in the index in the same transaction.
   ``ZERO``: the manifest says all zeros; served as zeros, never stored.  Neither takes room
   (``sharing.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from thunderfs.cache.ballast import Ballast
from thunderfs.cache.changes import ChangeFeed
from thunderfs.cache.committer import Committer
from thunderfs.cache.fresh import Buffer, ReceiveBuffers
from thunderfs.cache.holes import data_extents, punch_hole
from thunderfs.cache.image_data import (ABSENT, INDEXED, PENDING, SHARED, WRITING, ZERO, FileSpan, ImageData,
                                        read_checked)
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.reading import Reading
from thunderfs.cache.sharing import Sharing
from thunderfs.cache.space import Space
from thunderfs.cache.staging import Staging
from thunderfs.errors import ChunkCorrupt, ChunkNotCached
from thunderfs_common import chunk_digest

__all__ = ["ABSENT", "INDEXED", "PENDING", "SHARED", "WRITING", "ZERO", "ChunkStore", "FileSpan", "ImageData",
           "read_checked"]

log = logging.getLogger(__name__)

_STATS = ("bytes_read_disk", "bytes_checked", "reads_inline", "reads_disk_inline", "reads_threaded",
          "bytes_read_memory", "bytes_sendable", "chunks_staged", "bytes_written_direct", "chunks_committed", "evictions",
          "corrupt_dropped", "disk_full_events", "bytes_not_cached", "commit_failures", "bytes_written_behind",
          "write_behind_failures", "chunks_shared", "bytes_shared", "bytes_read_shared", "homes_proven", "homes_refused",
          "ballast_released")


class ChunkStore:
    def __init__(self, root: Path, index: ChunkIndex, chunk_size: int, capacity: int,
                 *, commit_interval: float = 0.2, touch_interval: float = 5.0, io_threads: int = 8,
                 buffers: ReceiveBuffers | None = None):
        self._dir = root / "data"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._index = index
        self.chunk_size = chunk_size
        self.buffers = buffers
        self._images: dict[bytes, ImageData] = {}
        self._stats = dict.fromkeys(_STATS, 0)
        self.changes = ChangeFeed()
        self.committer = Committer(index, self._images, self._stats, on_failed=self._release_chunk,
                                   on_punched=self._punched, commit_interval=commit_interval,
                                   touch_interval=touch_interval)
        self.sharing = Sharing(self._stats, self.changes, self.committer)
        self.committer.on_indexed = self.sharing.indexed
        self.space = Space(self._dir, index, capacity, chunk_size, self._stats, find=self.find,
                           changes=self.changes, committer=self.committer, sharing=self.sharing,
                           ballast=Ballast.in_dir(root, capacity))
        self.committer.on_disk_full = self.space.disk_full
        self.reading = Reading(chunk_size, self._stats, self.space, buffers, registered=self._registered,
                               io_threads=io_threads)
        self.staging = Staging(chunk_size, self._stats, self.space, self.changes, self.committer, buffers,
                               io_threads=io_threads)

    @property
    def capacity(self) -> int:
        return self.space.capacity

    # --- the parts' work, as the rest of the daemon asks for it (each part says how) -----------

    def pin(self, img: ImageData, first: int, last: int) -> int:
        return self.reading.pin(img, first, last)

    def unpin(self, img: ImageData, token: int) -> None:
        self.reading.unpin(img, token)

    async def read(self, img: ImageData, offset: int, size: int, extra: dict[int, bytes] | None = None, *,
                   borrow: bool = False) -> bytes | memoryview:
        return await self.reading.read(img, offset, size, extra, borrow=borrow)

    async def sendable(self, img: ImageData, offset: int, size: int) -> list[FileSpan | tuple[int, int]]:
        return await self.reading.sendable(img, offset, size)

    async def verify(self, img: ImageData, run: int = 4 * 2**20) -> bool:
        return await self.reading.verify(img, run)

    def will_need_nowait(self, img: ImageData, first: int, last: int) -> None:
        self.reading.will_need_nowait(img, first, last)

    def stage(self, img: ImageData, first: int, data: bytes | bytearray | memoryview,
              buffer: Buffer | None = None) -> bool:
        return self.staging.stage(img, first, data, buffer)

    async def commit(self, touch: bool = True) -> None:
        await self.committer.commit(touch)

    def know_digests(self, img: ImageData, digests: bytes) -> None:
        """``img``'s manifest is known: its digests, which make chunks shared across images
        (``sharing``)."""
        self.sharing.know(img, digests)

    def share(self, img: ImageData, chunks: list[int]) -> list[int]:
        """Those of ``chunks`` (missing) that another image holds become ``SHARED`` now; returns
        the rest, to fetch."""
        return self.sharing.share(img, chunks)

    async def materialize(self, img: ImageData) -> bool:
        """Copy every ``SHARED`` chunk of ``img`` into its own data file (read checked from its
        home, staged as its own): what a seal needs, since the kernel reads that file alone
        (rule 6; it then holds those bytes twice).  False if one could not be copied."""
        cs = self.chunk_size
        for c in [c for c in range(img.nchunks) if img.state[c] == SHARED]:
            token = self.pin(img, c, c)
            try:
                data = await self.reading.read(img, c * cs, img.chunk_len(c))
            except (ChunkCorrupt, ChunkNotCached):
                return False
            finally:
                self.unpin(img, token)
            if img.state[c] == SHARED and not self.stage(img, c, data):
                return False
        return True

    def drain_changes(self) -> dict[bytes, tuple[ImageData, set[int], set[int]]]:
        return self.changes.drain()

    def peek_changes(self) -> dict[bytes, tuple[ImageData, set[int], set[int]]]:
        return self.changes.peek()

    def changes_pending(self) -> int:
        return self.changes.pending()

    # --- images ----------------------------------------------------------------------------

    def _path(self, content: bytes) -> Path:
        return self._dir / f"{content.hex()}.data"

    def image(self, content: bytes, size: int) -> ImageData:
        """The data of one image content, loaded from the index on first use."""
        img = self._images.get(content)
        if img is not None:
            return img
        img = ImageData(content, size, self.chunk_size, self._path(content))
        bad = 0
        for rec in self._index.chunks_of(content):
            if rec.chunk >= img.nchunks or rec.length != img.chunk_len(rec.chunk):
                self.committer.forget(content, rec.chunk)
                bad += 1
                continue
            img.state[rec.chunk] = INDEXED
            img.xxh[rec.chunk] = rec.xxh3
        if bad:
            log.warning("dropping %d index entries of %s that do not fit the image", bad, content.hex())
        self._images[content] = img  # before its shares: their homes may share from it too
        for share in self._index.shared_of(content):
            home = self.find(share.home) if share.home != content else img
            if share.chunk >= img.nchunks or not self.sharing.load(img, share.chunk, home, share.home_chunk):
                self.committer.unshared(img, share.chunk)
        digests = self._index.digests_of(content)
        if digests is not None and len(digests) == img.nchunks * chunk_digest.SIZE:
            self.sharing.know(img, digests, kept=True)  # its zero chunks and homes, before any manifest
        return img

    def contents(self) -> list[ImageData]:
        return list(self._images.values())

    def find(self, content: bytes) -> ImageData | None:
        """The data of a content this cache has a file for, else None."""
        img = self._images.get(content)
        if img is None:
            path = self._path(content)
            if not path.exists():
                return None
            img = self.image(content, path.stat().st_size)
        return img

    def _registered(self, img: ImageData) -> bool:
        return self._images.get(img.content) is img

    def _release_chunk(self, img: ImageData, c: int) -> None:
        self.space.release(img, c)

    def _punched(self, img: ImageData, c: int) -> None:
        self.space.punched(img, c, self._registered(img))

    def drop_image(self, content: bytes) -> int:
        """Evict every unpinned chunk of one content now; returns how many."""
        img = self.find(content)
        return 0 if img is None else self.space.drop_image(img)

    def reclaim(self) -> None:
        """At start: punch data no index entry covers (a crash between write and index), drop
        index entries whose data file is gone, delete data files nothing indexes."""
        indexed = self._index.contents()
        for path in self._dir.glob("*.data"):
            try:
                content = bytes.fromhex(path.stem)
            except ValueError:
                continue
            if content not in indexed:
                log.info("removing unindexed cache file %s", path.name)
                path.unlink()
                continue
            img = self.find(content)
            leaked = 0
            for start, end in list(data_extents(img.fd)):
                for c in range(start // self.chunk_size, (end - 1) // self.chunk_size + 1):
                    if img.state[c] == ABSENT:
                        punch_hole(img.fd, c * self.chunk_size, img.chunk_len(c))
                        leaked += 1
            if leaked:
                log.info("punched %d unindexed chunks out of %s (left by a crash)", leaked, path.name)
        for content in indexed:
            if not self._path(content).exists():
                n = self._index.drop_content(content)
                log.warning("cache file of %s is missing; forgot its %d chunks", content.hex(), n)
        dangling = self._index.unshare_dangling()
        if dangling:
            log.info("forgot %d shared chunks whose home is not indexed", dangling)
        self._index.forget_digests_except(self._index.contents())  # of images nothing is cached of
        self.space.used = self._index.used_bytes()
        self.space.give_back()

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit staged chunks and queued deletes every ``commit_interval``; flush last-use times;
        read ahead in the data files for sequential readers (``will_need_nowait``); write behind;
        give room back when other files fill the cache's file system (``Space.give_back``)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reading.read_ahead)
            nursery.start_soon(self._give_back_room)
            self.staging.nursery = nursery
            try:
                await self.committer.run(task_status)
            finally:
                self.staging.nursery = None

    async def _give_back_room(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.space.give_back()

    def close(self) -> None:
        for img in self._images.values():
            img.close()
        self._images.clear()

    def statistics(self) -> dict:
        return {
            **self._stats,
            "capacity": self.space.capacity,
            "room": self.space.room,  # less than capacity: the disk is short
            "used": self.space.used,
            "pending_chunks": len(self.committer.pending),
            # Not durable yet: written behind still (rule 7), or waiting for the next commit.
            "uncommitted": sum(img.count(WRITING) for img in self._images.values()) + self.committer.backlog(),
            "open_contents": len(self._images),
            # Kept whole for the kernel (passthrough) and pinned by reads and answers in progress:
            # both back at 0 once nothing reads (a leak would keep chunks from eviction for good).
            "sealed_contents": sum(1 for img in self._images.values() if img.sealed),
            "pins": sum(len(img.pins) for img in self._images.values()),
            "shared_chunks": sum(img.count(SHARED) for img in self._images.values()),
            "zero_chunks": sum(img.count(ZERO) for img in self._images.values()),
            **self.sharing.statistics(),
        }
