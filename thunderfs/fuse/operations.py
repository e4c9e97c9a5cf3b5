"""The FUSE side: translates kernel requests, keeps inodes, and is the one errno boundary.

Layout: ``/images/<image-id>``, one read-only regular file per active Glance image.
Everything below (the catalog, the readers) comes in through the constructor and raises its own
exceptions; ``_fuse_error`` turns them into ``FUSEError`` and logs once.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time

import pyfuse3

from thunderfs.glance.catalog import Catalog
from thunderfs.errors import FetchFailed, ThunderfsError
from thunderfs_common.glance import GlanceError, ImageGone
from thunderfs_common.image import ImageMeta
from thunderfs.fuse.inodes import IMAGES_DIR, ROOT, InodeTable
from thunderfs.fetch.reader import Reader, Readers

log = logging.getLogger(__name__)

IMAGES = b"images"
XATTR_PREFIX = b"user.thunderfs."


def _fuse_error(exc: ThunderfsError | GlanceError, what: str) -> pyfuse3.FUSEError:
    """The errno boundary: one log line per failed request, one errno."""
    if isinstance(exc, FetchFailed):
        log.error("read failed: %s", exc)
    elif isinstance(exc, ImageGone):
        log.error("%s: %s", what, exc)
    else:
        log.error("%s: %s: %s", what, type(exc).__name__, exc)
    return pyfuse3.FUSEError(errno.EIO)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, catalog: Catalog, readers: Readers, *, entry_timeout: float = 5.0,
                 attr_timeout: float = 300.0, block_size: int = 2**20, image_owner: tuple[int, int] | None = None,
                 image_mode: int = 0o440):
        """``image_owner`` (uid, gid) and ``image_mode``: who may read the image files (the kernel
        checks, with ``default_permissions``); default: this process's user and group, 0440."""
        super().__init__()
        self._catalog = catalog
        self._readers = readers
        self._inodes = InodeTable()
        self._handles: dict[int, tuple[int, Reader]] = {}
        self._fh = itertools.count(1)
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout
        self._block_size = block_size
        self._mounted_ns = time.time_ns()
        self._uid, self._gid = image_owner or (os.getuid(), os.getgid())
        self._image_mode = image_mode
        self._reads = self._read_bytes = 0
        # Times set with utime, by image id: kept in memory only (Nova's image cache manager
        # touches its base files to mark them in use; the images themselves never change).
        self._times: dict[str, tuple[int, int, int]] = {}  # id -> (atime, mtime, ctime) ns
        catalog.add_listener(self._listing_changed)

    # --- attributes ------------------------------------------------------------------------

    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | 0o555
        a.st_nlink = 2
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_size = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mounted_ns
        a.entry_timeout = self._entry_timeout
        a.attr_timeout = 1.0
        return a

    def _image_attr(self, ino: int, meta: ImageMeta) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFREG | self._image_mode
        a.st_nlink = 1
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_size = meta.size
        a.st_blksize = self._block_size
        a.st_blocks = -(-meta.size // 512)
        a.st_mtime_ns = a.st_atime_ns = meta.mtime_ns
        a.st_ctime_ns = meta.ctime_ns or meta.mtime_ns
        if (times := self._times.get(meta.id)) is not None:
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = times
        a.entry_timeout = self._entry_timeout
        a.attr_timeout = self._attr_timeout  # images are immutable
        return a

    async def getattr(self, inode, ctx=None):
        if inode in (ROOT, IMAGES_DIR):
            return self._dir_attr(inode)
        meta = self._inodes.image(inode)
        if meta is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._image_attr(inode, meta)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT:
            if name == IMAGES:
                return self._dir_attr(IMAGES_DIR)
            if name in (b".", b".."):
                return self._dir_attr(ROOT)
        elif parent_inode == IMAGES_DIR:
            if name == b".":
                return self._dir_attr(IMAGES_DIR)
            if name == b"..":
                return self._dir_attr(ROOT)
            meta = await self._catalog.lookup(os.fsdecode(name))
            if meta is not None:
                ino = self._inodes.of_image(meta)
                self._inodes.looked_up(ino)
                return self._image_attr(ino, meta)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self._inodes.forget(ino, n, self._catalog.images)

    # --- directories -----------------------------------------------------------------------

    async def opendir(self, inode, ctx=None):
        if inode not in (ROOT, IMAGES_DIR):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if inode == IMAGES_DIR:
            await self._catalog.wait_fresh()
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            if start_id == 0:
                pyfuse3.readdir_reply(token, IMAGES, self._dir_attr(IMAGES_DIR), 1)
            return
        images = sorted(self._catalog.images.values(), key=lambda m: m.id)
        for i, meta in enumerate(images[start_id:], start_id):
            ino = self._inodes.of_image(meta)
            if not pyfuse3.readdir_reply(token, os.fsencode(meta.id), self._image_attr(ino, meta), i + 1):
                return
            self._inodes.looked_up(ino)

    async def releasedir(self, fh):
        pass

    # --- files -----------------------------------------------------------------------------

    async def open(self, inode, flags, ctx=None):
        meta = self._inodes.image(inode)
        if meta is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in (ROOT, IMAGES_DIR) else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            reader = self._readers.open(meta)
        except (ThunderfsError, GlanceError, OSError) as exc:
            if isinstance(exc, OSError):
                log.error("opening the cache of image %s: %s", meta.id, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise _fuse_error(exc, f"open {meta.id}") from None
        fh = next(self._fh)
        self._handles[fh] = (inode, reader)
        self._inodes.opened(inode)
        # Images never change under an inode: let the kernel keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        _, reader = self._handles[fh]
        self._reads += 1
        self._read_bytes += size
        try:
            return await reader.read(off, size)
        except (ThunderfsError, GlanceError) as exc:
            raise _fuse_error(exc, f"read {reader.meta.id} at {off}+{size}") from None
        except OSError as exc:
            log.error("read %s at %d+%d: cache I/O failed: %s", reader.meta.id, off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        inode, _ = self._handles.pop(fh)
        self._inodes.closed(inode, self._catalog.images)

    # --- extended attributes: what the image is, for verify and status ---------------------

    def _xattrs(self, inode) -> dict[bytes, bytes]:
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

    async def getxattr(self, inode, name, ctx=None):
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx=None):
        return list(self._xattrs(inode))

    async def statfs(self, ctx=None):
        s = pyfuse3.StatvfsData()
        total = sum(m.size for m in self._catalog.images.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-total // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._catalog.images) + 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- the mount is read-only ------------------------------------------------------------

    async def setattr(self, inode, attr, fields, fh, ctx):
        """Only an image's times may change (utime, touch): kept in memory, never written."""
        meta = self._inodes.image(inode)
        if (meta is None or fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or not (fields.update_atime or fields.update_mtime)):
            raise pyfuse3.FUSEError(errno.EROFS)
        now = time.time_ns()
        current = self._image_attr(inode, meta)
        atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
        self._times[meta.id] = (atime, mtime, now)
        return self._image_attr(inode, meta)

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mkdir = mknod = symlink = link = unlink = rmdir = rename = _read_only
    write = setxattr = removexattr = _read_only

    # --- listing changes -------------------------------------------------------------------

    def _listing_changed(self, added: list[ImageMeta], removed: list[ImageMeta]) -> None:
        """Make the kernel forget dentries of images that went away or changed content."""
        for meta in removed:
            self._times.pop(meta.id, None)
            try:
                pyfuse3.invalidate_entry_async(IMAGES_DIR, os.fsencode(meta.id), ignore_enoent=True)
            except Exception as exc:  # not mounted yet, or already gone
                log.debug("invalidate %s: %s", meta.id, exc)

    def statistics(self) -> dict:
        return {"open_handles": len(self._handles), "inodes": len(self._inodes),
                "read_requests": self._reads, "read_request_bytes": self._read_bytes}
