"""One open image file: pins the chunks it reads, fetches what is missing, serves from the cache,
and fetches ahead of a sequential reader.

``Readers`` is the FUSE layer's one door to the read path: it opens a ``Reader`` per file handle
and tells whoever the daemon wired in (the profiles, the peer source) that an image was opened.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from thunderfs.cache.store import ChunkStore, ImageData
from thunderfs.errors import ChunkCorrupt, ChunkNotCached, FetchFailed
from thunderfs.fetch.fetcher import Fetcher
from thunderfs_common.image import ImageMeta
from thunderfs.fetch.slots import READAHEAD
from thunderfs.fetch.zero_chunks import ZeroChunks

# Called with (first chunk, last chunk, whether the read had to fetch) after every read.
ReadWatcher = Callable[[int, int, bool], None]
# The chunks an image's manifest says are zeros (None: no manifest to say so).
KnownZeros = Callable[[ImageMeta], Awaitable[ZeroChunks | None]]


class Reader:
    """One open image file.

    Readahead starts only once the reader has gone ``SEQUENTIAL_TRIGGER`` bytes in order: a boot's
    reads are mostly scattered (the recorded Debian boot never reads more than 1 MiB in order),
    and fetching ahead of scattered reads only wastes Glance's bandwidth.  Then a window of
    chunks, doubling up to ``readahead``, is kept in flight ahead of the reader.
    """

    SEQUENTIAL_TRIGGER = 2 * 2**20
    INITIAL_WINDOW = 8 * 2**20
    # A miss at the end of a read fetches, in the same request, the missing chunks after it, up
    # to the origin's bandwidth-delay product, and within a budget: this share of the bytes read
    # (issue 19: Glance sends at most 1.5 x what is read; a boot's next read is often just after),
    # of the image's own bytes: not of those another image's copy or the zero chunks gave (a v2
    # booting after v1 read 49 MiB, 3.4 MiB of it new, and the extension of its few misses
    # fetched 2 MiB it never read: issue 31).  Off with ``readahead`` 0 (nothing is then fetched
    # beyond what is read).
    EXTEND_SHARE = 0.4

    def __init__(self, store: ChunkStore, fetcher: Fetcher, meta: ImageMeta, img: ImageData, *,
                 readahead: int = 64 * 2**20, zeros: KnownZeros | None = None):
        self._store = store
        self._zeros = zeros
        self._known_zeros: ZeroChunks | None = None  # once a seek found them: not fetched ahead
        self._fetcher = fetcher
        self.meta = meta
        self.img = img
        self._readahead = readahead
        self._recent: deque[tuple[int, int]] = deque(maxlen=8)
        self._run_bytes = 0
        self._window = 0
        self._ahead_until = -1
        self._credit = 0.0  # bytes the next misses may fetch beyond what they asked
        self._watchers: list[ReadWatcher] = []
        self._expected: Callable[[int], bool] = lambda chunk: True

    def expect(self, expected: Callable[[int], bool]) -> None:
        """A miss is extended only over chunks ``expected(chunk)`` says will be read (the profiles
        say so while they prefetch a recorded boot)."""
        self._expected = expected

    def watch(self, watcher: ReadWatcher) -> None:
        self._watchers.append(watcher)

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """The bytes, or a view of a receive buffer valid until the caller's next checkpoint."""
        img = self.img
        if offset >= img.size or size <= 0:
            return b""
        size = min(size, img.size - offset)
        first, last = img.chunk_range(offset, size)
        store = self._store
        token = store.pin(img, first, last)
        store.share(img, img.missing(first, last))  # what another image holds: not fetched, no credit
        own = 1.0 - img.borrowed(first, last) / (last - first + 1)
        self._credit = min(self._credit + size * own * self.EXTEND_SHARE, self._fetcher.bdp())
        try:
            waited = False
            for _ in range(3):
                missing = img.missing(first, last)
                self._read_ahead(offset, size, last)
                extra = None
                zeros = self._known_zeros
                if missing and zeros is not None:  # the manifest says they are zeros: nothing to fetch
                    extra = {c: bytes(img.chunk_len(c)) for c in missing if zeros.is_zero(c)}
                    missing = [c for c in missing if c not in extra]
                if missing:
                    waited = True
                    fetched = await self._fetcher.ensure(self.meta, img, missing, self._extension(missing, last))
                    extra = {**extra, **fetched} if extra else fetched
                try:
                    # Borrowed where it can be (no copy out of a receive buffer): no checkpoint
                    # from here to the FUSE reply's write.
                    data = await store.read(img, offset, size, extra, borrow=True)
                except (ChunkCorrupt, ChunkNotCached):
                    continue
                for watcher in self._watchers:
                    watcher(first, last, waited)
                img.counters["bytes_read"] += len(data)
                return data
            raise FetchFailed(self.meta.id, first, "cached copy keeps failing its checksum or going away")
        finally:
            store.unpin(img, token)

    async def seek(self, offset: int, whence: int) -> int | None:
        """``lseek`` with ``SEEK_DATA`` or ``SEEK_HOLE`` from ``offset``: where the next data or
        hole starts, by the zero chunks the manifest knows (the whole image is data without
        one); None where there is none (ENXIO).  Reads nothing."""
        img = self.img
        zeros = await self._zeros(self.meta) if self._zeros is not None else None
        if zeros is None or zeros.size != img.size:
            zeros = ZeroChunks.none(img.chunk_size, img.size)
        else:
            self._known_zeros = zeros  # a reader that seeks holes reads around them: nothing ahead into them
        return zeros.data_from(offset) if whence == os.SEEK_DATA else zeros.hole_from(offset)

    def _ahead(self, chunk: int) -> bool:
        """Whether a chunk may be fetched ahead of this reader: expected (by the profile), and
        not a zero chunk the reader found holes by."""
        return self._expected(chunk) and not (self._known_zeros is not None and self._known_zeros.is_zero(chunk))

    def _extension(self, missing: list[int], last: int) -> list[int]:
        """Missing chunks just after a miss that ends the read, as far as the credit goes (they
        join the same request), unless a readahead window already runs ahead of this reader."""
        img, fetcher = self.img, self._fetcher
        if not self._readahead or missing[-1] != last or self._ahead_until > last:
            return []
        if img.shares_with_others():
            # A new version of a cached image: what it misses is what changed, scattered where
            # the update wrote; fetched next to a miss, it was mostly never read (v2 booting
            # after v1: 11 of 71 chunks fetched, ~1/6 over what its boot needed; issue 31).
            return []
        n = int(self._credit // img.chunk_size)
        out = []
        c = last + 1
        while (len(out) < n and c < img.nchunks and not img.cached(c) and not fetcher.in_flight(img, c)
               and self._ahead(c)):
            out.append(c)
            c += 1
        self._credit -= len(out) * img.chunk_size
        return out

    def _read_ahead(self, offset: int, size: int, last: int) -> None:
        limit = self._readahead
        # The kernel sends a sequential reader's requests concurrently, so they may arrive a little
        # out of order: "in order" means adjacent to one of the last few reads.
        if any(offset == end or offset + size == start for start, end in self._recent):
            self._run_bytes += size
        else:
            self._run_bytes = size
            self._window = 0
            self._ahead_until = last
        self._recent.append((offset, offset + size))
        if not limit or self._run_bytes < self.SEQUENTIAL_TRIGGER:
            return
        # Keep the whole window in flight, issued in pieces as large as one request may be, so
        # that several large requests overlap instead of the reader waiting on one at a time.
        self._window = min(limit, max(self.INITIAL_WINDOW, self._window * 2))
        fetcher, img = self._fetcher, self.img
        target = min(img.nchunks - 1, last + max(1, self._window // fetcher.chunk_size))
        ra_first = max(last + 1, self._ahead_until + 1)
        piece = min(fetcher.max_chunks, max(1, self._window // fetcher.chunk_size // 4))
        if target - ra_first + 1 < piece and target < img.nchunks - 1:
            return
        self._ahead_until = target
        missing = img.missing(ra_first, target)
        if self._known_zeros is not None:
            missing = [c for c in missing if not self._known_zeros.is_zero(c)]
        if missing:
            fetcher.start(self.meta, img, missing, READAHEAD)
        if len(missing) < target - ra_first + 1:  # cached ones ahead: into the page cache with them
            self._store.will_need_nowait(img, ra_first, target)


class Readers:
    """Opens readers; ``on_open(reader)`` hooks (wired by the daemon) hear of every open."""

    def __init__(self, store: ChunkStore, fetcher: Fetcher, *, readahead: int = 64 * 2**20,
                 on_open: list[Callable[[Reader], None]] | None = None, zeros: KnownZeros | None = None):
        self._store = store
        self._zeros = zeros
        self._fetcher = fetcher
        self._readahead = readahead
        self._on_open = list(on_open or ())
        self._seals: dict[bytes, tuple[ImageData, int]] = {}  # content -> its image, its pin (img.sealed counts)
        self._checked: dict[bytes, float] = {}  # content -> when it was last checked whole

    # A seal checks the whole image unless it did so this recently (a VM's start opens its base
    # image several times within seconds; a check of 2 GiB costs ~1 s).
    RECHECK_AFTER = 60.0

    async def seal(self, meta: ImageMeta, *, check: bool = True) -> str | None:
        """The cache file of ``meta``, for the kernel to read itself (FUSE passthrough), when
        every chunk is cached and passes its checksum now (``check``, unless it did within
        ``RECHECK_AFTER``; a previous process that sealed it checked it); from then on pinned
        whole and never punched (the store's rule 6) until as many ``unseal`` calls.  None when
        it is not complete or a chunk fails.  Chunks another image's copy serves are copied into
        its file first (the kernel reads that file alone)."""
        store = self._store
        img = store.image(meta.content_key, meta.size)
        if check and img.missing(0, img.nchunks - 1):
            return None
        if not await store.materialize(img):
            return None
        if check:
            last = self._checked.get(img.content)
            if last is not None and trio.current_time() - last < self.RECHECK_AFTER:
                check = False
        if check:
            token = store.pin(img, 0, img.nchunks - 1)
            try:
                ok = await store.verify(img)
            finally:
                store.unpin(img, token)
            if not ok:
                return None
            self._checked[img.content] = trio.current_time()
        if img.content not in self._seals:
            self._seals[img.content] = (img, store.pin(img, 0, img.nchunks - 1))
        img.sealed += 1
        return str(img.path)

    def unseal(self, meta: ImageMeta) -> None:
        seal = self._seals.get(meta.content_key)
        if seal is None:
            return
        img, token = seal
        img.sealed -= 1
        if not img.sealed:
            del self._seals[meta.content_key]
            self._store.unpin(img, token)

    def open(self, meta: ImageMeta) -> Reader:
        """Raises ``OSError`` if the image's cache file cannot be opened."""
        reader = Reader(self._store, self._fetcher, meta, self._store.image(meta.content_key, meta.size),
                        readahead=self._readahead, zeros=self._zeros)
        for hook in self._on_open:
            hook(reader)
        return reader
