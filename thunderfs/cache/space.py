"""Space: how many bytes the cache holds, how many it may (its capacity, or less where its disk
runs short), and eviction.

Invariants (the store's rules 4 and 6):

- ``used`` counts the bytes of every chunk not ``ABSENT``; ``punching`` the bytes evicted whose
  holes are not punched yet (still on the disk until their index delete is durable).
- Eviction runs synchronously in the trio thread: it takes only ``INDEXED`` chunks that no read
  has pinned and nobody touched since the last flush, marks them ``ABSENT`` and queues the index
  delete; the hole is punched only once that delete is durable (``punched``), and only if the
  chunk is still ``ABSENT`` then (not staged again meanwhile).
- Nothing of a sealed image is evicted or punched (rule 6): a dropped chunk's index entry goes,
  its bytes stay.
- A chunk whose own bytes go takes every chunk that shares them along (rule 8, ``sharing.py``);
  a shared or zero chunk that goes frees nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from thunderfs.cache.ballast import DISK_FULL, Ballast
from thunderfs.cache.changes import ChangeFeed
from thunderfs.cache.committer import Committer
from thunderfs.cache.holes import punch_hole
from thunderfs.cache.image_data import ABSENT, INDEXED, OWN, SHARED, ZERO, ImageData
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.sharing import Sharing

log = logging.getLogger(__name__)


class Space:
    def __init__(self, root: Path, index: ChunkIndex, capacity: int, chunk_size: int, stats: dict, *,
                 find: Callable[[bytes], ImageData | None], changes: ChangeFeed, committer: Committer,
                 sharing: Sharing, ballast: Ballast):
        self._dir = root
        self._index = index
        self.capacity = capacity
        self.chunk_size = chunk_size
        self._stats = stats
        self._find = find
        self._changes = changes
        self._committer = committer
        self._sharing = sharing
        self.ballast = ballast
        self.used = index.used_bytes()
        self.punching = 0  # bytes evicted whose holes are not punched yet (still on disk)
        self._room = capacity  # what the file system lets the cache hold (see disk_room)
        self._room_checked = -1.0
        self._spare = 0  # what the disk had free beyond the reserve and the ballast at the last check
        self._last_full_warning = 0.0

    @property
    def room(self) -> int:
        return min(self.capacity, self._room)

    def disk_room(self, recheck: bool = False) -> int:
        """The most the cache may hold now: its capacity, or less when its file system runs short
        (other files grew, or the capacity was set larger than the disk).  It keeps a reserve
        free there (2 % of the file system, at least 1 MiB, at most 1 GiB) for the index and
        everyone else, and room for its ballast (``ballast.py``) where that is not laid.  Checked at
        most once a second, and at once after ENOSPC."""
        now = time.monotonic()
        if recheck or now - self._room_checked >= 1.0:
            self._room_checked = now
            try:
                st = os.statvfs(self._dir)
            except OSError as exc:
                log.warning("cannot check the cache's file system: %s", exc)
                return min(self.capacity, self._room)
            reserve = min(max(st.f_blocks * st.f_frsize // 50, 2**20), 2**30)
            self._spare = st.f_bavail * st.f_frsize - reserve - self.ballast.missing
            room = self.used + self.punching + self._spare
            if room < self.capacity and room < self._room - self.chunk_size:
                self.warn_full(f"cache file system is short of space: holding at most {max(room, 0)} "
                               f"bytes there (cache size {self.capacity})")
            self._room = max(room, 0)
        return min(self.capacity, self._room)

    def give_back(self) -> None:
        """Shrink to what the file system holds now, reads or not: when other files fill it, the
        cache evicts until its reserve is free again (the holes go after the next commit).
        Called at start-up (``ChunkStore.reclaim``) and once a second by the store's ``run``;
        between reads nothing else would.  Lays the ballast again where the disk has room for it."""
        self.evict(0, self.disk_room(recheck=True))
        if self.ballast.missing and self._spare >= 0:
            self.ballast.lay()

    def disk_full(self) -> bool:
        """An index commit failed for want of space: the ballast gives its room, so that the next
        try makes the evictions durable and their bytes can go.  False if it had none to give."""
        released = self.ballast.release()
        if not released:
            return False
        self._stats["ballast_released"] += 1
        log.warning("cache file system full: released the %d byte ballast for the index", released)
        return True

    def make_room(self, n: int) -> bool:
        """Room for ``n`` bytes more, evicting if needed; False if there is none now (the bytes
        are then served uncached)."""
        limit = self.disk_room()
        if self.used + n > limit:
            self.evict(n, limit)
            if self.used + n > limit:
                self._stats["bytes_not_cached"] += n
                self.warn_full("cache is full of chunks in use; serving %d bytes uncached" % n)
                return False
        if self.used + self.punching + n > self._room:
            # The disk is what is short: room made by evictions whose holes are not punched yet
            # (they are, once the next commit has made the index deletes durable: rule 4) is not
            # on it yet.  Serve these bytes uncached rather than write into a full disk, and make
            # the room they need now (against the disk as it is now: the index and other files
            # grow too), so that the writes after the next commit find it.
            self.evict(n + self.punching, self.disk_room(recheck=True))
            self._stats["bytes_not_cached"] += n
            self._committer.wake_nowait()
            return False
        return True

    def failed_write(self, exc: OSError, n: int) -> None:
        self._stats["bytes_not_cached"] += n
        if exc.errno in DISK_FULL:
            # Make room for what comes next: shrink to what the disk holds (the holes are
            # punched once the next commit has made the evictions durable).
            self._stats["disk_full_events"] += 1
            self.evict(n, self.disk_room(recheck=True))
            self.warn_full(f"cache disk full ({exc.strerror}); evicting to make room, serving "
                           "these reads uncached")
        else:
            log.error("writing to the cache failed: %s; serving uncached", exc)

    def scrub(self, img: ImageData, offset: int, length: int) -> None:
        try:
            punch_hole(img.fd, offset, length)
        except OSError as exc:
            log.error("could not punch out a failed write in %s: %s", img.path.name, exc)

    def warn_full(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_full_warning > 30:
            self._last_full_warning = now
            log.warning(message)

    def release(self, img: ImageData, c: int) -> None:
        """Drop one cached chunk now (evicted or corrupt); its index entry goes in the next commit,
        its bytes once that is durable (rule 4), and with them every chunk that shares them
        (rule 8).  A shared chunk only stops sharing; a zero chunk is forgotten."""
        was = img.state[c]
        if was == SHARED:
            self._sharing.unshare(img, c)
            return
        img.state[c] = ABSENT
        if was == ZERO:
            return
        if was:
            self._sharing.dropping(img, c)
        if was == INDEXED:
            self._committer.evicted(img, c)
            self.punching += img.chunk_len(c)
        elif not img.sealed:  # rule 6
            self.scrub(img, c * self.chunk_size, img.chunk_len(c))
        if was in OWN:
            self.used -= img.chunk_len(c)
            self._changes.note(img, c, False)
        self._committer.wake_nowait()

    def punched(self, img: ImageData, c: int, registered: bool) -> None:
        """An evicted chunk's index delete is durable: its bytes go now, if it is still
        ``ABSENT`` (not staged again meanwhile) and its image still open (``registered``)."""
        self.punching -= img.chunk_len(c)
        if img.state[c] == ABSENT and registered and not img.sealed:
            self.scrub(img, c * self.chunk_size, img.chunk_len(c))

    def evict(self, need: int, limit: int | None = None) -> None:
        """Make ``used + need <= limit`` (default: the capacity) if chunks not in use allow;
        oldest last use first."""
        target = (self.capacity if limit is None else limit) - need
        if self.used <= target:
            return
        # The index's last-use order lags by up to one touch flush: first spare what was read since.
        for spare_touched in (True, False):
            for content, c, _ in self._index.lru_oldest():
                if self.used <= target:
                    return
                img = self._find(content)
                if img is None or c >= img.nchunks or img.state[c] != INDEXED or img.pinned(c):
                    continue
                if spare_touched and c in img.touched:
                    continue
                self.release(img, c)
                self._stats["evictions"] += 1

    def drop_image(self, img: ImageData) -> int:
        """Evict every unpinned chunk of one content now (its own, and its shares); returns how many."""
        dropped = 0
        for c in range(img.nchunks):
            if img.state[c] in (INDEXED, SHARED) and not img.pinned(c):
                self.release(img, c)
                dropped += 1
        return dropped
