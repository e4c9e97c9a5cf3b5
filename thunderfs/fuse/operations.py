"""The FUSE side: translates kernel requests, keeps inodes, and is the one errno boundary.

Layout: ``/images/<image-id>``, one read-only regular file per active Glance image.
Everything below (the catalog, the readers) comes in through the constructor and raises its own
exceptions; ``_fuse_error`` turns them into ``FuseError`` and logs once.  The session
(``session.py``) speaks the kernel's protocol; this class knows only inodes, names and bytes.

File handles are numbers from a random base, so that a handle a previous process on the same
connection opened is never mistaken for one of ours: a read on such a handle opens a reader for
its inode then and there.  An odd handle is a passthrough open (``passthrough.py``), an even one
a cached open, so that a release tells which kind closed whoever opened it.

With ``backing`` (``--passthrough``), the first open of a complete image whose every chunk
passes its checksum at that moment is answered with a backing file: the kernel reads the cache's
data file itself until the last such open closes (``Readers.seal``).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from thunderfs.glance.catalog import Catalog
from thunderfs.errors import FetchFailed, ThunderfsError
from thunderfs.fuse.kernel import Attr, Entry, FuseError
from thunderfs.fuse.state import SessionState
from thunderfs_common.glance_client import GlanceError, ImageGone
from thunderfs_common.image import ImageMeta
from thunderfs.fuse.inodes import IMAGES_DIR, ROOT, InodeTable, derive
from thunderfs.fuse.passthrough import BackingFiles
from thunderfs.fetch.reader import Reader, Readers

log = logging.getLogger(__name__)

IMAGES = b"images"
XATTR_PREFIX = b"user.thunderfs."
ENOATTR = errno.ENODATA


@dataclass(frozen=True)
class SetTimes:
    """A setattr request: new times (ns; -1: now; None: unchanged), and whether it asks to change
    anything else (mode, owner, size)."""
    other: bool = False
    atime_ns: int | None = None
    mtime_ns: int | None = None


def _fuse_error(exc: ThunderfsError | GlanceError, what: str) -> FuseError:
    """The errno boundary: one log line per failed request, one errno."""
    if isinstance(exc, FetchFailed):
        log.error("read failed: %s", exc)
    elif isinstance(exc, ImageGone):
        log.error("%s: %s", what, exc)
    else:
        log.error("%s: %s: %s", what, type(exc).__name__, exc)
    return FuseError(errno.EIO)


class Operations:
    def __init__(self, catalog: Catalog, readers: Readers, *, entry_timeout: float = 5.0,
                 attr_timeout: float = 300.0, block_size: int = 2**20, image_owner: tuple[int, int] | None = None,
                 image_mode: int = 0o440, state: SessionState | None = None,
                 backing: BackingFiles | None = None):
        """``image_owner`` (uid, gid) and ``image_mode``: who may read the image files (the kernel
        checks, with ``default_permissions``); default: this process's user and group, 0440.
        ``state``: what the previous process on this connection left (and where to leave ours)."""
        self._catalog = catalog
        self._readers = readers
        self._inodes = InodeTable(state)
        self._inodes.listing(catalog.images, [])
        self._handles: dict[int, tuple[int, Reader | None]] = {}  # fh -> inode, reader (made at first read)
        self._fh = itertools.count(secrets.randbits(40) << 20, 2)  # even; +1: a passthrough open
        self._backing = backing
        self._deciding: dict[int, trio.Lock] = {}  # inode -> the lock its opens decide their kind under
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout
        self._block_size = block_size
        self._mounted_ns = time.time_ns()
        self._uid, self._gid = image_owner or (os.getuid(), os.getgid())
        self._image_mode = image_mode
        self._reads = self._read_bytes = self._reopened = 0
        # Times set with utime, by image id: kept in memory only (Nova's image cache manager
        # touches its base files to mark them in use; the images themselves never change).
        self._times: dict[str, tuple[int, int, int]] = {}  # id -> (atime, mtime, ctime) ns
        # Wired by the session: make the kernel forget a name, an inode's cached pages.
        self.invalidate_entry: Callable[[int, bytes], None] = lambda parent, name: None
        self.invalidate_inode: Callable[[int], None] = lambda ino: None
        catalog.add_listener(self._listing_changed)
        self._resealed: list[int] = backing.sealed_inodes() if backing is not None else []

    async def start(self) -> None:
        """Keep whole the data files a previous process gave the kernel as backing files."""
        for inode in self._resealed:
            meta = self._inodes.image(inode)
            if meta is None:
                log.error("inode %d is open in passthrough but no image this process knows: its "
                          "cache file is not protected from eviction", inode)
                continue
            await self._readers.seal(meta, check=False)
        self._resealed = []

    # --- attributes ------------------------------------------------------------------------

    def _dir_entry(self, ino: int) -> Entry:
        attr = Attr(ino=ino, mode=stat.S_IFDIR | 0o555, nlink=2, uid=self._uid, gid=self._gid,
                    atime_ns=self._mounted_ns, mtime_ns=self._mounted_ns, ctime_ns=self._mounted_ns)
        return Entry(attr, self._entry_timeout, 1.0)

    def _image_entry(self, ino: int, meta: ImageMeta) -> Entry:
        atime = mtime = meta.mtime_ns
        ctime = meta.ctime_ns or meta.mtime_ns
        if (times := self._times.get(meta.id)) is not None:
            atime, mtime, ctime = times
        attr = Attr(ino=ino, mode=stat.S_IFREG | self._image_mode, size=meta.size, uid=self._uid, gid=self._gid,
                    blksize=self._block_size, atime_ns=atime, mtime_ns=mtime, ctime_ns=ctime)
        return Entry(attr, self._entry_timeout, self._attr_timeout)  # images are immutable

    def getattr(self, inode: int) -> Entry:
        if inode in (ROOT, IMAGES_DIR):
            return self._dir_entry(inode)
        meta = self._inodes.image(inode)
        if meta is None:
            raise FuseError(errno.ENOENT)
        return self._image_entry(inode, meta)

    async def lookup(self, parent_inode: int, name: bytes) -> Entry:
        if parent_inode == ROOT:
            if name == IMAGES:
                return self._dir_entry(IMAGES_DIR)
            if name in (b".", b".."):
                return self._dir_entry(ROOT)
        elif parent_inode == IMAGES_DIR:
            if name == b".":
                return self._dir_entry(IMAGES_DIR)
            if name == b"..":
                return self._dir_entry(ROOT)
            meta = await self._catalog.lookup(os.fsdecode(name))
            if meta is not None:
                ino = self._inodes.of_image(meta)
                self._inodes.looked_up(ino)
                return self._image_entry(ino, meta)
        raise FuseError(errno.ENOENT)

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self._inodes.forget(ino, n)

    # --- directories -----------------------------------------------------------------------

    async def opendir(self, inode: int) -> int:
        if inode not in (ROOT, IMAGES_DIR):
            raise FuseError(errno.ENOTDIR)
        if inode == IMAGES_DIR:
            await self._catalog.wait_fresh()
        return inode

    def readdir(self, inode: int, offset: int) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attributes, offset of the next entry) from ``offset`` on."""
        if inode == ROOT:
            if offset == 0:
                yield IMAGES, self._dir_entry(IMAGES_DIR).attr, 1
            return
        images = sorted(self._catalog.images.values(), key=lambda m: m.id)
        for i, meta in enumerate(images[offset:], offset):
            yield os.fsencode(meta.id), self._image_entry(self._inodes.of_image(meta), meta).attr, i + 1

    # --- files -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, request: int | None = None) -> tuple[int, int]:
        """(file handle, backing id or 0).  ``request``: the OPEN's unique (its resend counted once)."""
        meta = self._inodes.image(inode)
        if meta is None:
            raise FuseError(errno.EISDIR if inode in (ROOT, IMAGES_DIR) else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FuseError(errno.EROFS)
        backing = self._backing
        if backing is not None and backing.usable():
            # One decision at a time per inode: two first opens must not come out one of each kind.
            lock = self._deciding.setdefault(inode, trio.Lock())
            async with lock:
                mode = backing.mode(inode)
                if mode == "passthrough" or (mode is None and backing.sealing()):
                    backing_id = await self._open_passthrough(inode, meta, first=mode is None, request=request)
                    if backing_id:
                        fh = next(self._fh) + 1
                        self._handles[fh] = (inode, None)
                        self._inodes.opened(inode)
                        return fh, backing_id
                fh, _ = self._open_cached(inode, meta)
                backing.open_cached(inode, request)
                return fh, 0
        return self._open_cached(inode, meta)

    def _open_cached(self, inode: int, meta: ImageMeta) -> tuple[int, int]:
        fh = next(self._fh)
        self._handles[fh] = (inode, self._open_reader(meta))
        self._inodes.opened(inode)
        return fh, 0

    async def _open_passthrough(self, inode: int, meta: ImageMeta, first: bool, request: int | None) -> int:
        assert self._backing is not None
        if not first:  # the kernel has this inode's backing file: every open must use it
            return self._backing.open_passthrough(inode, None, request)
        path = await self._readers.seal(meta)
        if path is None:
            return 0
        backing_id = self._backing.open_passthrough(inode, path, request)
        if not backing_id:
            self._readers.unseal(meta)
        return backing_id

    def _open_reader(self, meta: ImageMeta) -> Reader:
        try:
            return self._readers.open(meta)
        except (ThunderfsError, GlanceError, OSError) as exc:
            if isinstance(exc, OSError):
                log.error("opening the cache of image %s: %s", meta.id, exc)
                raise FuseError(errno.EIO) from None
            raise _fuse_error(exc, f"open {meta.id}") from None

    def _handle(self, inode: int, fh: int) -> Reader:
        handle = self._handles.get(fh)
        if handle is not None and handle[1] is not None:
            return handle[1]
        # Opened by a previous process on this connection (or a passthrough open: no reader yet).
        meta = self._inodes.image(inode)
        if meta is None:
            log.error("read of handle %d: inode %d is no image this process knows", fh, inode)
            raise FuseError(errno.EIO)
        reader = self._open_reader(meta)
        self._handles[fh] = (inode, reader)
        if handle is None:
            self._inodes.opened(inode)
            self._reopened += 1
        return reader

    async def read(self, inode: int, fh: int, off: int, size: int) -> bytes | memoryview:
        reader = self._handle(inode, fh)
        self._reads += 1
        self._read_bytes += size
        try:
            return await reader.read(off, size)
        except (ThunderfsError, GlanceError) as exc:
            raise _fuse_error(exc, f"read {reader.meta.id} at {off}+{size}") from None
        except OSError as exc:
            log.error("read %s at %d+%d: cache I/O failed: %s", reader.meta.id, off, size, exc)
            raise FuseError(errno.EIO) from None

    async def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` (the kernel does the other kinds itself): by the zero
        chunks the image's manifest knows; ENXIO past the last data or at the end."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        reader = self._handle(inode, fh)
        try:
            found = await reader.seek(offset, whence)
        except (ThunderfsError, GlanceError) as exc:
            raise _fuse_error(exc, f"lseek {reader.meta.id} at {offset}") from None
        if found is None:
            raise FuseError(errno.ENXIO)
        return found

    def release(self, inode: int, fh: int, request: int | None = None) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            self._inodes.closed(handle[0])
        if self._backing is not None:
            if self._backing.release(inode, passthrough=bool(fh & 1), request=request):
                meta = self._inodes.image(inode)
                if meta is not None:
                    self._readers.unseal(meta)
            lock = self._deciding.get(inode)  # dropped with the inode's last open
            if self._backing.mode(inode) is None and lock is not None and not lock.locked():
                del self._deciding[inode]

    # --- extended attributes: what the image is, for verify and status ---------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        meta = self._inodes.image(inode)
        if meta is None:
            return {}
        return {
            XATTR_PREFIX + b"image_id": meta.id.encode(),
            XATTR_PREFIX + b"name": meta.name.encode(),
            XATTR_PREFIX + b"os_hash_algo": (meta.os_hash_algo or "").encode(),
            XATTR_PREFIX + b"os_hash_value": (meta.os_hash_value or "").encode(),
            XATTR_PREFIX + b"content_key": meta.content_key.hex().encode(),
        }

    def getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(inode).get(name)
        if value is None:
            raise FuseError(ENOATTR)
        return value

    def listxattr(self, inode: int) -> list[bytes]:
        return list(self._xattrs(inode))

    def statfs(self) -> tuple[int, int]:
        """(4 KiB blocks, files): the images' total size, nothing free."""
        total = sum(m.size for m in self._catalog.images.values())
        return -(-total // 4096), len(self._catalog.images) + 2

    # --- the mount is read-only ------------------------------------------------------------

    def setattr(self, inode: int, changes: SetTimes) -> Entry:
        """Only an image's times may change (utime, touch): kept in memory, never written."""
        meta = self._inodes.image(inode)
        if meta is None or changes.other or (changes.atime_ns is None and changes.mtime_ns is None):
            raise FuseError(errno.EROFS)
        now = time.time_ns()
        current = self._image_entry(inode, meta).attr
        atime = current.atime_ns if changes.atime_ns is None else now if changes.atime_ns < 0 else changes.atime_ns
        mtime = current.mtime_ns if changes.mtime_ns is None else now if changes.mtime_ns < 0 else changes.mtime_ns
        self._times[meta.id] = (atime, mtime, now)
        return self._image_entry(inode, meta)

    # --- listing changes -------------------------------------------------------------------

    def _listing_changed(self, added: list[ImageMeta], removed: list[ImageMeta]) -> None:
        """Make the kernel forget dentries of images that went away or changed content."""
        self._inodes.listing(self._catalog.images, removed)
        for meta in removed:
            self._times.pop(meta.id, None)
            self.invalidate_entry(IMAGES_DIR, os.fsencode(meta.id))

    def image_bytes_dropped(self, meta: ImageMeta) -> None:
        """The image's cached chunks were dropped (its lazy manifest was revoked): the kernel
        drops its cached pages of it too, so that the next read comes here."""
        self.invalidate_inode(derive(meta))

    def statistics(self) -> dict:
        return {"open_handles": len(self._handles), "inodes": len(self._inodes),
                "read_requests": self._reads, "read_request_bytes": self._read_bytes,
                "handles_reopened": self._reopened,
                **(self._backing.statistics() if self._backing is not None else {})}
