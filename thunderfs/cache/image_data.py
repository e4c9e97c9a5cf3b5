"""One image content's chunks in the cache: its data file, and each chunk's state, checksum, pins
and last use (``ImageData``); and the checked read of whole chunks from the file
(``read_checked``), or their check where they lie (``check_mapped``), which any thread may run.

A chunk's state (``state``; the rules are ``store.py``'s):

- ``ABSENT``: not cached; never served from the file (a hole, or bytes nobody vouches for).
- ``WRITING``: staged from a receive buffer the store holds and being written behind; served from
  that buffer only.
- ``PENDING``: written from verified bytes, readable, not yet durable.
- ``INDEXED``: durable, in the index.
- ``SHARED``: another image's chunk of the same digest holds its bytes (``home``: that image and
  chunk, ``INDEXED``); served from there, checked against the same xxh3 (issue 31).
- ``ZERO``: the image's manifest says it is all zeros: served as zeros, never fetched, stored or
  offered to peers (its range of the data file is a hole, or that chunk's own bytes: zeros).

Every read of a chunk from the file checks it against its xxh3 (``read_checked``), however
recently it was checked before.  A *sealed* image (``sealed``: the kernel reads its file itself,
FUSE passthrough) is never punched, not even where a chunk is dropped.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from array import array
from pathlib import Path

import trio
import xxhash

from thunderfs.cache.fresh import Buffer
from thunderfs_common import chunk_digest

ABSENT, PENDING, INDEXED, WRITING, SHARED, ZERO = 0, 1, 2, 3, 4, 5
# The states whose bytes lie in the image's own data file or buffers (``Space.used`` counts them).
OWN = frozenset((PENDING, INDEXED, WRITING))


def now_ms() -> int:
    return int(time.time() * 1000)


_local = threading.local()  # each thread's buffer (page aligned, for O_DIRECT)
PAGE = mmap.PAGESIZE


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
    want = -(-n // PAGE) * PAGE  # O_DIRECT reads whole pages; the file's end cuts the last one short
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


def check_mapped(fd: int, offset: int, n: int, expect, cs: int) -> int | None:
    """Check the chunks (of ``cs`` bytes) of ``n`` bytes at ``offset`` against ``expect[i]``
    (xxh3) where they lie: in the page cache's own pages, through a mapping of the file, not a
    copy.  The index of the first bad chunk, or None.  The mapping reads what the page cache
    lacks from the disk: a worker thread's work."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + n - start, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                   offset=start) as mapped:
        view = memoryview(mapped)[offset - start:]
        try:
            for i in range(len(expect)):
                if xxhash.xxh3_64_intdigest(view[i * cs:(i + 1) * cs]) != expect[i]:
                    return i
            return None
        finally:
            view.release()


class FileSpan:
    """``count`` bytes at ``offset`` of an image's data file, checked (``Reading.sendable``), for
    the kernel to send from the page cache (``os.sendfile``)."""

    __slots__ = ("img", "offset", "count")

    def __init__(self, img: ImageData, offset: int, count: int):
        self.img, self.offset, self.count = img, offset, count

    def __len__(self) -> int:
        return self.count

    def fileno(self) -> int:
        """The data file's descriptor; ``OSError`` once the image is closed (never a number
        that another file may have taken since)."""
        if self.img.fd < 0:
            raise OSError(errno.EBADF, "the image's cache file is closed")
        return self.img.fd


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
        # writes of whole pages from page-aligned memory (``staging.py``): filling the page
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
        # Chunks known by their digest (issue 31): the manifest's digests, once it is known here
        # (``Sharing.know``); for a ``SHARED`` chunk the image and chunk that hold its bytes; for
        # an ``INDEXED`` one, the chunks of other images it holds the bytes of.
        self.digests: bytes | None = None
        self.home: dict[int, tuple[ImageData, int]] = {}
        self.users: dict[int, set[tuple[ImageData, int]]] = {}
        self.foreign = 0  # SHARED chunks whose home is another image's
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
        """A read or an answer in progress holds it, here or through an image that shares it."""
        return (any(first <= chunk <= last for first, last in self.pins.values())
                or any(img.pinned(c) for img, c in self.users.get(chunk, ())))

    def digest(self, chunk: int) -> bytes | None:
        """The manifest's digest of ``chunk``, if the manifest is known here."""
        d = self.digests
        return None if d is None else d[chunk * chunk_digest.SIZE:(chunk + 1) * chunk_digest.SIZE]

    # --- chunk state, for everyone outside the cache room (only its own modules read ``state``) --

    def cached(self, chunk: int) -> bool:
        """Servable now: its bytes are in the data file (durable or about to be)."""
        return self.state[chunk] != ABSENT

    def missing(self, first: int, last: int) -> list[int]:
        state = self.state
        return [c for c in range(first, last + 1) if not state[c]]

    def shares_with_others(self) -> bool:
        """Whether another image's copies serve some of its chunks (a new version of a cached
        image)."""
        return self.foreign > 0

    def borrowed(self, first: int, last: int) -> int:
        """How many of chunks ``first..last`` are served from another image's copy or as zeros."""
        state = self.state
        return sum(1 for c in range(first, last + 1) if state[c] == SHARED or state[c] == ZERO)

    def cached_count(self) -> int:
        """Chunks whose bytes are here, its own or shared (not zero chunks: nothing is held)."""
        return self.nchunks - self.state.count(ABSENT) - self.state.count(ZERO)

    def count(self, state: int) -> int:
        """How many chunks are in ``state`` (``SHARED``, ``ZERO``: status and metrics)."""
        return self.state.count(state)

    def bytes_in(self, state: int) -> int:
        """The bytes of the chunks in ``state`` (the last chunk may be short)."""
        n = self.state.count(state) * self.chunk_size
        if self.state[-1] == state:
            n -= self.chunk_size - self.chunk_len(self.nchunks - 1)
        return n

    def held_bits(self) -> int:
        """The cached chunks as an integer, bit ``c`` for chunk ``c`` (what the tracker is told;
        not zero chunks: nobody asks for them)."""
        packed = bytearray((self.nchunks + 7) // 8)
        for c, s in enumerate(self.state):
            if s and s != ZERO:
                packed[c >> 3] |= 1 << (c & 7)
        return int.from_bytes(packed, "little")

    def close(self) -> None:
        if self.direct_fd != self.fd:
            os.close(self.direct_fd)
        os.close(self.fd)
        self.fd = self.direct_fd = -1
