"""Chunk data on local disk, bounded in size, crash-safe.

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
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import threading
import time
from array import array
from pathlib import Path

import trio
import xxhash

from thunderfs.cache.fresh import Buffer, ReceiveBuffers
from thunderfs.cache.index import ChunkIndex, Put
from thunderfs.errors import ChunkCorrupt, ChunkNotCached
from thunderfs.cache.holes import data_extents, punch_hole

log = logging.getLogger(__name__)

ABSENT, PENDING, INDEXED, WRITING = 0, 1, 2, 3

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _now_ms() -> int:
    return int(time.time() * 1000)


_local = threading.local()  # each thread's buffer (page aligned, for O_DIRECT)
_PAGE = mmap.PAGESIZE


_KEPT_BUFFER = 4 * 2**20  # a larger read (a peer's) gets a buffer of its own, not kept


def _buffer(n: int) -> mmap.mmap:
    if n > _KEPT_BUFFER:
        return mmap.mmap(-1, n)
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = mmap.mmap(-1, max(n, 2**20))
    return buf


def read_checked(fd: int, offset: int, n: int, a: int, b: int, expect, cs: int,
                 nowait: bool = False) -> tuple[bytes, int | None] | None:
    """Read ``n`` bytes at ``offset`` (whole chunks of ``cs``), check chunk ``i`` against
    ``expect[i]`` (xxh3), and return (bytes ``[a, b)`` of them, index of the first bad chunk or
    None).  ``nowait``: None unless the page cache holds every byte (``RWF_NOWAIT``: no disk
    wait).  Runs in any thread (``preadv`` and xxh3 release the GIL).  The bytes land in the
    thread's own page-aligned buffer (``fd`` may be an O_DIRECT descriptor; a fresh buffer per
    read would cost a page fault per page, ~0.8 ms a MiB) and what is asked for is copied out
    (~30 us a MiB) once every chunk passed."""
    want = -(-n // _PAGE) * _PAGE  # O_DIRECT reads whole pages; the file's end cuts the last one short
    buf = _buffer(want)
    try:
        got = os.preadv(fd, [memoryview(buf)[:want]], offset, os.RWF_NOWAIT if nowait else 0)
    except OSError as exc:
        # EAGAIN: not all in the page cache; EOPNOTSUPP: no RWF_NOWAIT here (tmpfs): a thread reads it.
        if nowait and exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
            return None
        raise
    if got < n:
        return None if nowait else (b"", 0)  # shorter than the index says: as good as rot
    view = memoryview(buf)[:n]
    try:
        for i in range(len(expect)):
            if xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs]) != expect[i]:
                return b"", i
        return bytes(view[a:b]), None
    finally:
        view.release()


class ImageData:
    """The data file and per-chunk state of one image content."""

    def __init__(self, content: bytes, size: int, chunk_size: int, path: Path):
        self.content = content
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = max(1, -(-size // chunk_size))
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        # Reads that miss the page cache go to the disk directly (``read_checked``), and so do
        # writes of whole pages from page-aligned memory (``ChunkStore._write``): filling the page
        # cache costs the daemon more CPU than the copy itself (a written GiB cost 1-3 CPU s in
        # the page cache's fresh pages on this VM, 0.05 s direct), and a guest's O_DIRECT reads
        # (qemu cache=none) should not fill it on the daemon's side either.  Where the file
        # system has no O_DIRECT (tmpfs), or chunks are not page aligned, the plain descriptor.
        self.direct_fd = self.fd
        if chunk_size % mmap.PAGESIZE == 0:
            try:
                self.direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                pass
        self.state = bytearray(self.nchunks)
        # 1: written straight to the disk by this process and not read since, so not in the page
        # cache: its first read goes to the disk at once (a page-cache-only try, RWF_NOWAIT, would
        # start the kernel's readahead into fresh pages, the cost the direct write saved); later
        # reads try the page cache first as any (a warm random reader gains from that readahead:
        # with every read of such chunks kept off it, 4 KiB reads at depth 32 gave 0.04 x a local
        # file where the code before gave 0.11 the same hour).
        self.direct = bytearray(self.nchunks)
        self.xxh = array("Q", bytes(8 * self.nchunks))
        self.pins: dict[int, tuple[int, int]] = {}
        self.touched: dict[int, int] = {}  # chunk -> when it was last read (ms), until the next flush
        self.sealed = 0  # holders that need the data file whole (rule 6)
        self.held: dict[int, Buffer] = {}  # chunk -> the receive buffer it is served from (rule 7)
        # Bytes served to readers, and fetched by source (status and metrics per image).
        self.counters = dict.fromkeys(("bytes_read", "bytes_from_peers", "bytes_from_seed", "bytes_from_origin"), 0)
        self._arrival: trio.Event | None = None  # set when chunks become servable, if anyone waits

    async def wait_arrival(self) -> None:
        """Until some chunks of this image become servable (``ChunkStore.stage``), or a fetch
        of some ended (``wake_waiters``): a waiter then looks again at what it waits for."""
        if self._arrival is None:
            self._arrival = trio.Event()
        await self._arrival.wait()

    def wake_waiters(self) -> None:
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None

    def chunk_range(self, offset: int, size: int) -> tuple[int, int]:
        return offset // self.chunk_size, (offset + size - 1) // self.chunk_size

    def chunk_len(self, chunk: int) -> int:
        return min(self.chunk_size, self.size - chunk * self.chunk_size)

    def pinned(self, chunk: int) -> bool:
        return any(first <= chunk <= last for first, last in self.pins.values())

    # --- chunk state, for everyone outside this module (nobody else reads ``state``) ----------

    def cached(self, chunk: int) -> bool:
        """Servable now: its bytes are in the data file (durable or about to be)."""
        return self.state[chunk] != ABSENT

    def missing(self, first: int, last: int) -> list[int]:
        state = self.state
        return [c for c in range(first, last + 1) if not state[c]]

    def cached_count(self) -> int:
        return self.nchunks - self.state.count(ABSENT)

    def held_bits(self) -> int:
        """The cached chunks as an integer, bit ``c`` for chunk ``c`` (what the tracker is told)."""
        packed = bytearray((self.nchunks + 7) // 8)
        for c, s in enumerate(self.state):
            if s:
                packed[c >> 3] |= 1 << (c & 7)
        return int.from_bytes(packed, "little")

    def close(self) -> None:
        if self.direct_fd != self.fd:
            os.close(self.direct_fd)
        os.close(self.fd)


class ChunkStore:
    def __init__(self, root: Path, index: ChunkIndex, chunk_size: int, capacity: int,
                 *, commit_interval: float = 0.2, touch_interval: float = 5.0, io_threads: int = 8,
                 buffers: ReceiveBuffers | None = None):
        self._dir = root / "data"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._index = index
        self.chunk_size = chunk_size
        self.capacity = capacity
        self._commit_interval = commit_interval
        self._touch_interval = touch_interval
        self._images: dict[bytes, ImageData] = {}
        self._pending: list[tuple[ImageData, int]] = []
        self._changes: dict[bytes, tuple[ImageData, set[int], set[int]]] = {}
        self._track_changes = False
        self._deletes: list[tuple[bytes, int]] = []
        self._punches: list[tuple[ImageData, int]] = []  # evicted: punched once their delete is durable
        self._used = index.used_bytes()
        self._punching = 0  # bytes evicted whose holes are not punched yet (still on disk)
        self._room = capacity  # what the file system lets the cache hold (see _disk_room)
        self._room_checked = -1.0
        self._wake = trio.Event()
        self._writer = trio.CapacityLimiter(1)
        self._pin_ids = itertools.count()
        self._last_full_warning = 0.0
        self._io = trio.CapacityLimiter(io_threads)  # reads that wait for the disk, at once
        # Writes behind (rule 7) at once: with two, they fell ~100 ms behind a 500 MiB/s receive
        # on this VM's disk (1 MiB O_DIRECT writes took 1.8 ms beside the reads) and the receive
        # waited for buffers; with six, none waited.
        self._writes = trio.CapacityLimiter(io_threads)
        self._nursery: trio.Nursery | None = None  # where writes behind run, while ``run`` does
        self.buffers = buffers
        if buffers is not None:
            buffers.set_let_go(self._let_go)
        self._will_need, self._will_need_recv = trio.open_memory_channel[tuple[ImageData, int, int]](64)
        self._disk_wait: float | None = None  # seconds a small read from the disk took lately
        self._stats = dict.fromkeys(
            ("bytes_read_disk", "bytes_checked", "reads_inline", "reads_disk_inline", "reads_threaded",
             "bytes_read_memory", "chunks_staged", "bytes_written_direct", "chunks_committed", "evictions",
             "corrupt_dropped", "disk_full_events", "bytes_not_cached", "commit_failures", "bytes_written_behind",
             "write_behind_failures"), 0)

    # --- images ----------------------------------------------------------------------------

    def _path(self, content: bytes) -> Path:
        return self._dir / f"{content.hex()}.data"

    def image(self, content: bytes, size: int) -> ImageData:
        """The data of one image content, loaded from the index on first use."""
        img = self._images.get(content)
        if img is not None:
            return img
        img = ImageData(content, size, self.chunk_size, self._path(content))
        bad = []
        for rec in self._index.chunks_of(content):
            if rec.chunk >= img.nchunks or rec.length != img.chunk_len(rec.chunk):
                bad.append((content, rec.chunk))
                continue
            img.state[rec.chunk] = INDEXED
            img.xxh[rec.chunk] = rec.xxh3
        if bad:
            log.warning("dropping %d index entries of %s that do not fit the image", len(bad), content.hex())
            self._deletes.extend(bad)
        self._images[content] = img
        return img

    def contents(self) -> list[ImageData]:
        return list(self._images.values())

    def drain_changes(self) -> dict[bytes, tuple[ImageData, set[int], set[int]]]:
        """Chunks that became servable or went away since the last call (for the announcer).
        Recorded only once this has been called: a node without peers keeps no such log."""
        self._track_changes = True
        changes, self._changes = self._changes, {}
        return changes

    def changes_pending(self) -> int:
        """Chunks that became servable or went away since the last ``drain_changes``."""
        return sum(len(added) + len(removed) for _, added, removed in self._changes.values())

    def _changed(self, img: ImageData, chunk: int, added: bool) -> None:
        if not self._track_changes:
            return
        entry = self._changes.get(img.content)
        if entry is None:
            entry = self._changes[img.content] = (img, set(), set())
        (entry[1] if added else entry[2]).add(chunk)
        (entry[2] if added else entry[1]).discard(chunk)

    def find(self, content: bytes) -> ImageData | None:
        """The data of a content this cache has a file for, else None."""
        img = self._images.get(content)
        if img is None:
            path = self._path(content)
            if not path.exists():
                return None
            img = self.image(content, path.stat().st_size)
        return img

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
        self._used = self._index.used_bytes()
        self._evict(0, self._disk_room(recheck=True))

    # --- reads -----------------------------------------------------------------------------

    def pin(self, img: ImageData, first: int, last: int) -> int:
        token = next(self._pin_ids)
        img.pins[token] = (first, last)
        return token

    def unpin(self, img: ImageData, token: int) -> None:
        del img.pins[token]

    async def read(self, img: ImageData, offset: int, size: int, extra: dict[int, bytes] | None = None, *,
                   borrow: bool = False) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)``: every chunk must be cached or given in ``extra``, else
        ``ChunkNotCached`` (a hole is never served); a cached chunk whose bytes fail their checksum
        is dropped and ``ChunkCorrupt`` raised (rule 5).  The caller pins the chunks (rule 4).
        ``borrow``: where every byte lies in one receive buffer (rule 7), a view of it rather
        than a copy, valid only until the caller's next checkpoint (the pool may reuse the
        buffer after it): the FUSE reply is written before any."""
        first, last = img.chunk_range(offset, size)
        state = img.state
        for c in range(first, last + 1):
            if not state[c] and not (extra and c in extra):
                raise ChunkNotCached(c)
        cs, end = self.chunk_size, offset + size
        held = img.held
        parts = []
        c = first
        while c <= last:
            if extra and c in extra:
                start, stop = max(offset, c * cs), min(end, (c + 1) * cs)
                parts.append(extra[c][start - c * cs:stop - c * cs])
                self._stats["bytes_read_memory"] += stop - start
                c += 1
                continue
            buf = held.get(c)
            if buf is not None:  # rule 7: from the receive buffer, as one run
                run_last = min(last, buf.last)
                base = buf.first * cs
                view = buf.view(max(offset, c * cs) - base, min(end, (run_last + 1) * cs) - base)
                if borrow and c == first and run_last == last:
                    parts.append(view)  # the whole read: lent, not copied
                else:
                    parts.append(bytes(view))
                    view.release()
                self._stats["bytes_read_memory"] += len(parts[-1])
                # Read once, as a read back from the disk would have: later reads try the page
                # cache first, and a sequential reader's readahead fills it (``_read_ahead``).
                img.direct[c:run_last + 1] = bytes(run_last - c + 1)
                self.buffers.mark_read(buf, c, run_last)
                c = run_last + 1
                continue
            run_last = c
            while run_last < last and not (extra and run_last + 1 in extra) and run_last + 1 not in held:
                run_last += 1
            base = c * cs
            parts.append(await self._checked(img, c, run_last, max(offset, base) - base,
                                             min(end, (run_last + 1) * cs) - base))
            self._stats["bytes_read_disk"] += len(parts[-1])
            c = run_last + 1
        img.touched.update(dict.fromkeys(range(first, last + 1), _now_ms()))
        return parts[0] if len(parts) == 1 and isinstance(parts[0], (bytes, memoryview)) else b"".join(parts)

    # A read that must wait for the disk runs in the event loop when it is small and the disk's
    # recent reads took less than this (a moving average); else in a worker thread.
    INLINE_DISK_READ = 256 * 1024
    INLINE_DISK_WAIT = 300e-6

    def _note_disk_wait(self, seconds: float) -> None:
        last = self._disk_wait
        self._disk_wait = seconds if last is None else last + 0.1 * (seconds - last)

    def _timed_read(self, *args) -> tuple[bytes, int | None]:
        t = time.perf_counter()
        got = read_checked(*args)
        if args[2] <= self.INLINE_DISK_READ:
            self._note_disk_wait(time.perf_counter() - t)  # (a float store: safe from a thread)
        return got

    async def verify(self, img: ImageData, run: int = 4 * 2**20) -> bool:
        """Check every chunk of a complete image against its xxh3 now (in worker threads); False
        if a chunk is missing or fails (and is dropped, rule 5).  The caller pins it."""
        per = max(1, run // self.chunk_size)
        for first in range(0, img.nchunks, per):
            last = min(img.nchunks - 1, first + per - 1)
            if img.missing(first, last):
                return False
            for c in range(first, last + 1):
                buf = img.held.get(c)
                if img.state[c] == WRITING and buf is not None:  # rule 7: wait until it is on disk
                    await buf.wait_written()
                    if buf.failed:
                        return False
            try:
                await self._checked(img, first, last, 0, 0, nowait=False)
            except ChunkCorrupt:
                return False
        return True

    async def _checked(self, img: ImageData, first: int, last: int, a: int, b: int, nowait: bool = True) -> bytes:
        """Bytes ``[a, b)`` of chunks ``first..last`` (offsets from the first chunk's start), read
        whole from the data file, each chunk checked against its xxh3 (``read_checked``).  In the
        event loop when the page cache holds the whole run (``preadv2(RWF_NOWAIT)``: a copy and
        a hash cost ~70 us a MiB, a hop to a thread ~100 us).  Else from the disk with O_DIRECT:
        in the loop too while the disk is fast (a small run, recent reads under
        ``INLINE_DISK_WAIT``), in a worker thread when it is slow, so that reads waiting for it
        overlap (up to ``io_threads``) instead of stalling the loop one after the other.
        ``nowait`` False (``verify``): always in a thread."""
        cs = self.chunk_size
        offset = first * cs
        n = min(img.size, (last + 1) * cs) - offset
        expect = img.xxh[first:last + 1]
        cold = img.direct[first] or img.direct[last]
        got = read_checked(img.fd, offset, n, a, b, expect, cs, nowait=True) if nowait and not cold else None
        self._stats["reads_inline"] += got is not None
        fast = self._disk_wait is not None and self._disk_wait < self.INLINE_DISK_WAIT
        if got is None and nowait and n <= self.INLINE_DISK_READ and fast:
            # The disk answers faster than a hop to a thread costs: read it here (measured on this
            # 2-core VM, a thread per 4 KiB read cost about a fifth of the IOPS at depth 32).
            t = time.perf_counter()
            got = read_checked(img.direct_fd, offset, n, a, b, expect, cs)
            self._note_disk_wait(time.perf_counter() - t)
            self._stats["reads_disk_inline"] += 1
        if got is None:
            self._stats["reads_threaded"] += 1
            got = await trio.to_thread.run_sync(self._timed_read, img.direct_fd, offset, n, a, b, expect, cs,
                                                limiter=self._io)
        data, bad = got
        if cold:  # read back once from the disk: from now on, as any chunk (the page cache first)
            img.direct[first:last + 1] = bytes(last - first + 1)
        self._stats["bytes_checked"] += n
        if bad is not None:
            c = first + bad
            # Dropped only if it is still the chunk that was read: one staged again meanwhile
            # (another reader found the same rot and it was fetched anew) is left alone.
            if img.state[c] != ABSENT and img.xxh[c] == expect[bad]:
                log.warning("cached chunk %d of %s failed its checksum: dropped, fetching it again",
                            c, img.content.hex())
                self._stats["corrupt_dropped"] += 1
                self._release(img, c)
            raise ChunkCorrupt(c)
        return data

    # --- writes ----------------------------------------------------------------------------

    def _disk_room(self, recheck: bool = False) -> int:
        """The most the cache may hold now: its capacity, or less when its file system runs short
        (other files grew, or the capacity was set larger than the disk).  It keeps a reserve
        free there (2 % of the file system, at least 1 MiB, at most 1 GiB) for the index and
        everyone else.  Checked at most once a second, and at once after ENOSPC."""
        now = time.monotonic()
        if recheck or now - self._room_checked >= 1.0:
            self._room_checked = now
            try:
                st = os.statvfs(self._dir)
            except OSError as exc:
                log.warning("cannot check the cache's file system: %s", exc)
                return min(self.capacity, self._room)
            reserve = min(max(st.f_blocks * st.f_frsize // 50, 2**20), 2**30)
            room = self._used + self._punching + st.f_bavail * st.f_frsize - reserve
            if room < self.capacity and room < self._room - self.chunk_size:
                self._warn_full(f"cache file system is short of space: holding at most {max(room, 0)} "
                                f"bytes there (cache size {self.capacity})")
            self._room = max(room, 0)
        return min(self.capacity, self._room)

    def stage(self, img: ImageData, first: int, data: bytes | bytearray | memoryview,
              buffer: Buffer | None = None) -> bool:
        """Cache verified bytes of chunks ``first..``; False when they could not be cached
        (cache full of chunks in use, or disk full): the caller serves them from memory.
        ``buffer``: the pooled receive buffer (``self.buffers``) whose start ``data`` is; the store
        holds it and writes behind (rule 7) where it can."""
        n = len(data)
        limit = self._disk_room()
        if self._used + n > limit:
            self._evict(n, limit)
            if self._used + n > limit:
                self._stats["bytes_not_cached"] += n
                self._warn_full("cache is full of chunks in use; serving %d bytes uncached" % n)
                return False
        if self._used + self._punching + n > self._room:
            # The disk is what is short: room made by evictions whose holes are not punched yet
            # (they are, once the next commit has made the index deletes durable: rule 4) is not
            # on it yet.  Serve these bytes uncached rather than write into a full disk, and make
            # the room they need now (against the disk as it is now: the index and other files
            # grow too), so that the writes after the next commit find it.
            self._evict(n + self._punching, self._disk_room(recheck=True))
            self._stats["bytes_not_cached"] += n
            self._wake.set()
            return False
        offset = first * self.chunk_size
        if (buffer is not None and self._nursery is not None and not img.sealed and self.buffers is not None
                and self._hold(img, first, data, buffer)):
            try:
                self._nursery.start_soon(self._write_behind, img, buffer)
            except RuntimeError as exc:  # the store stops: never written (served until let go)
                self._write_behind_failed(img, buffer, OSError(errno.ESHUTDOWN, str(exc)))
            return True
        try:
            written = self._write(img, data, offset)
            if written != n:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            if not img.sealed:  # rule 6: a sealed file keeps what it had (the chunk is not indexed)
                self._scrub(img, offset, n)
            self._failed_write(exc, n)
            return False
        cs = self.chunk_size
        view = memoryview(data)
        for i in range(-(-n // cs)):
            c = first + i
            img.xxh[c] = xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs])
            img.state[c] = PENDING
            self._pending.append((img, c))
            self._changed(img, c, True)
        self._used += n
        self._stats["chunks_staged"] += -(-n // cs)
        self._wake.set()
        img.wake_waiters()
        return True

    def _hold(self, img: ImageData, first: int, data, buffer: Buffer) -> bool:
        """Rule 7: serve ``data`` from ``buffer`` from now on, for ``_write_behind`` to write;
        False if the pool cannot hold it (a loose buffer past its budget)."""
        n, cs = len(data), self.chunk_size
        count = -(-n // cs)
        if not self.buffers.hold(buffer, img, first, count, n):
            return False
        with buffer.view(0, n) as view:
            for i in range(count):
                c = first + i
                img.xxh[c] = xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs])
                img.state[c] = WRITING
                img.held[c] = buffer
                self._changed(img, c, True)
        self._used += n
        self._stats["chunks_staged"] += count
        img.wake_waiters()
        return True

    async def _write_behind(self, img: ImageData, buffer: Buffer) -> None:
        first, n = buffer.first, buffer.nbytes
        offset = first * self.chunk_size
        error: OSError | None = None
        try:
            with buffer.view(0, n) as view:
                written, direct = await trio.to_thread.run_sync(self._pwrite, img, view, offset, limiter=self._writes,
                                                                abandon_on_cancel=False)
            if written != n:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            error = exc
        chunks = range(first, first + buffer.count)
        if error is None:
            if direct:  # those not read from the buffer yet: their first read goes to the disk
                for c in buffer.unread:
                    img.direct[c] = 1
            self._stats["bytes_written_behind"] += n
            for c in chunks:
                if img.state[c] == WRITING and img.held.get(c) is buffer:
                    img.state[c] = PENDING
                    self._pending.append((img, c))
            self._wake.set()
            self.buffers.mark_written(buffer, True)
        else:
            self._write_behind_failed(img, buffer, error)

    def _write_behind_failed(self, img: ImageData, buffer: Buffer, error: OSError) -> None:
        """The bytes stay servable from the buffer until the pool takes it back (``_let_go``)."""
        n = buffer.nbytes
        self._stats["write_behind_failures"] += 1
        self._used -= n
        if not img.sealed:
            self._scrub(img, buffer.first * self.chunk_size, n)
        self._failed_write(error, n)
        self.buffers.mark_written(buffer, False)

    def _pwrite(self, img: ImageData, data, offset: int) -> tuple[int, bool]:
        """Straight to the disk (O_DIRECT) when the bytes are whole pages in page-aligned memory
        (a pooled receive buffer, a peer's answer); through the page cache otherwise: ``bytes``
        (the tracker's seed), or unaligned memory (the kernel refuses it with EINVAL, which costs
        one system call).  (bytes written, whether straight); in any thread."""
        if img.direct_fd != img.fd and len(data) % _PAGE == 0 and not memoryview(data).readonly:
            try:
                return os.pwrite(img.direct_fd, data, offset), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.pwrite(img.fd, data, offset), False

    def _let_go(self, buffer: Buffer) -> None:
        """The pool takes ``buffer`` back: its chunks are served from the file from now on, or,
        where its write failed, not at all."""
        img: ImageData = buffer.owner
        for c in range(buffer.first, buffer.first + buffer.count):
            if img.held.get(c) is buffer:
                del img.held[c]
                if img.state[c] == WRITING:
                    img.state[c] = ABSENT
                    self._changed(img, c, False)

    def _failed_write(self, exc: OSError, n: int) -> None:
        self._stats["bytes_not_cached"] += n
        if exc.errno in _DISK_FULL:
            # Make room for what comes next: shrink to what the disk holds (the holes are
            # punched once the next commit has made the evictions durable).
            self._stats["disk_full_events"] += 1
            self._evict(n, self._disk_room(recheck=True))
            self._warn_full(f"cache disk full ({exc.strerror}); evicting to make room, serving "
                            "these reads uncached")
        else:
            log.error("writing to the cache failed: %s; serving uncached", exc)

    def _write(self, img: ImageData, data, offset: int) -> int:
        """``data`` written now, in the event loop (``_pwrite``), and marked as written straight
        or not."""
        first, n = offset // self.chunk_size, -(-len(data) // self.chunk_size)
        written, direct = self._pwrite(img, data, offset)
        if direct:
            self._stats["bytes_written_direct"] += written
        img.direct[first:first + n] = (b"\1" if direct else b"\0") * n
        return written

    def _scrub(self, img: ImageData, offset: int, length: int) -> None:
        try:
            punch_hole(img.fd, offset, length)
        except OSError as exc:
            log.error("could not punch out a failed write in %s: %s", img.path.name, exc)

    def _warn_full(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_full_warning > 30:
            self._last_full_warning = now
            log.warning(message)

    def _release(self, img: ImageData, c: int) -> None:
        """Drop one cached chunk now (evicted or corrupt); its index entry goes in the next commit,
        its bytes once that is durable (rule 4)."""
        was = img.state[c]
        img.state[c] = ABSENT
        if was == INDEXED:
            self._deletes.append((img.content, c))
            self._punches.append((img, c))
            self._punching += img.chunk_len(c)
        elif not img.sealed:  # rule 6
            self._scrub(img, c * self.chunk_size, img.chunk_len(c))
        if was:
            self._used -= img.chunk_len(c)
            self._changed(img, c, False)
        self._wake.set()

    def _evict(self, need: int, limit: int | None = None) -> None:
        """Make ``used + need <= limit`` (default: the capacity) if chunks not in use allow;
        oldest last use first."""
        target = (self.capacity if limit is None else limit) - need
        if self._used <= target:
            return
        # The index's last-use order lags by up to one touch flush: first spare what was read since.
        for spare_touched in (True, False):
            for content, c, _ in self._index.lru_oldest():
                if self._used <= target:
                    return
                img = self.find(content)
                if img is None or c >= img.nchunks or img.state[c] != INDEXED or img.pinned(c):
                    continue
                if spare_touched and c in img.touched:
                    continue
                self._release(img, c)
                self._stats["evictions"] += 1

    def drop_image(self, content: bytes) -> int:
        """Evict every unpinned chunk of one content now; returns how many."""
        img = self.find(content)
        if img is None:
            return 0
        dropped = 0
        for c in range(img.nchunks):
            if img.state[c] == INDEXED and not img.pinned(c):
                self._release(img, c)
                dropped += 1
        return dropped

    # --- the committer ---------------------------------------------------------------------

    def will_need_nowait(self, img: ImageData, first: int, last: int) -> None:
        """A sequential reader will want chunks ``first..last`` soon: have the kernel read them
        into the page cache now (``POSIX_FADV_WILLNEED``, in a worker), so that its reads find
        them there and are served in the event loop.  Dropped when too many are queued."""
        try:
            self._will_need.send_nowait((img, first, last))
        except trio.WouldBlock:
            pass

    async def _read_ahead(self) -> None:
        async for img, first, last in self._will_need_recv:
            offset = first * self.chunk_size
            length = min(img.size, (last + 1) * self.chunk_size) - offset
            # Not chunks written straight (their first read goes to the disk anyway), nor ones
            # served from a receive buffer (rule 7: perhaps not on the disk yet).
            if self._images.get(img.content) is img and not img.direct[first] and first not in img.held:
                await trio.to_thread.run_sync(os.posix_fadvise, img.fd, offset, length, os.POSIX_FADV_WILLNEED,
                                              limiter=self._io)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit staged chunks and queued deletes every ``commit_interval``; flush last-use times;
        read ahead in the data files for sequential readers (``will_need_nowait``)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_ahead)
            self._nursery = nursery
            try:
                await self._commit_loop(task_status)
            finally:
                self._nursery = None

    async def _commit_loop(self, task_status) -> None:
        task_status.started()
        last_touch = time.monotonic()
        while True:
            with trio.move_on_after(self._commit_interval):
                await self._wake.wait()
            await trio.sleep(0.02)  # gather a batch
            self._wake = trio.Event()
            touch = time.monotonic() - last_touch >= self._touch_interval
            if touch:
                last_touch = time.monotonic()
            await self.commit(touch=touch)

    async def commit(self, touch: bool = True) -> None:
        pending, self._pending = self._pending, []
        deletes, self._deletes = self._deletes, []
        punches, self._punches = self._punches, []
        now = _now_ms()
        touches = []
        if touch:
            for img in self._images.values():
                # When each was read, not when the flush ran: the LRU order is the order of the reads.
                touches.extend((img.content, c, t) for c, t in img.touched.items() if img.state[c] == INDEXED)
                img.touched.clear()
        pending = [(img, c) for img, c in pending if img.state[c] == PENDING]
        if not (pending or deletes or touches):
            return
        puts = [Put(img.content, c, img.chunk_len(c), img.xxh[c], now) for img, c in pending]
        fds = {img.fd for img, _ in pending}
        try:
            await trio.to_thread.run_sync(self._durable_commit, fds, deletes, puts, touches,
                                          limiter=self._writer, abandon_on_cancel=False)
        except OSError as exc:
            self._stats["commit_failures"] += 1
            log.warning("could not make %d cached chunks durable (%s); dropping them", len(pending), exc)
            self._deletes[:0] = deletes
            self._punches[:0] = punches
            for img, c in pending:
                if img.state[c] == PENDING:
                    self._release(img, c)
            return
        for img, c in pending:
            if img.state[c] == PENDING:
                img.state[c] = INDEXED
        # The deletes are durable: now the evicted bytes may go (no await since the check).
        for img, c in punches:
            self._punching -= img.chunk_len(c)
            if img.state[c] == ABSENT and self._images.get(img.content) is img and not img.sealed:
                self._scrub(img, c * self.chunk_size, img.chunk_len(c))
        self._stats["chunks_committed"] += len(pending)

    def _durable_commit(self, fds, deletes, puts, touches) -> None:
        for fd in fds:
            os.fdatasync(fd)
        try:
            self._index.commit(deletes=deletes, puts=puts, touches=touches)
        except Exception as exc:
            raise OSError(errno.EIO, str(exc)) from exc

    def close(self) -> None:
        for img in self._images.values():
            img.close()
        self._images.clear()

    def statistics(self) -> dict:
        return {
            **self._stats,
            "capacity": self.capacity,
            "room": min(self.capacity, self._room),  # less than capacity: the disk is short
            "used": self._used,
            "pending_chunks": len(self._pending),
            "open_contents": len(self._images),
            # Kept whole for the kernel (passthrough) and pinned by reads and answers in progress:
            # both back at 0 once nothing reads (a leak would keep chunks from eviction for good).
            "sealed_contents": sum(1 for img in self._images.values() if img.sealed),
            "pins": sum(len(img.pins) for img in self._images.values()),
        }
