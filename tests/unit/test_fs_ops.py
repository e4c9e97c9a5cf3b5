"""fs.Operations called directly, as the kernel's requests would call it, with a fake request
context and a catalog and readers of our own: attributes, lookups, opens, reads, errors."""

from __future__ import annotations

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from fakes import meta_of
from thunderfs.errors import FetchFailed
from thunderfs_common.glance import ImageGone
from thunderfs.fuse.operations import IMAGES, XATTR_PREFIX, Operations
from thunderfs.fuse.inodes import IMAGES_DIR, ROOT

CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
A = meta_of(b"a" * 1000, "aaaaaaaa-0000-0000-0000-000000000001", "alpha")
B = meta_of(b"b" * 5000, "bbbbbbbb-0000-0000-0000-000000000002", "beta")


class FakeCatalog:
    def __init__(self, *metas):
        self.images = {m.id: m for m in metas}
        self.listeners = []
        self.fresh = 0

    def add_listener(self, listener):
        self.listeners.append(listener)

    async def lookup(self, image_id):
        return self.images.get(image_id)

    async def wait_fresh(self):
        self.fresh += 1


class FakeReader:
    def __init__(self, meta, error=None):
        self.meta, self.error = meta, error

    async def read(self, off, size):
        if self.error is not None:
            raise self.error
        return b"x" * min(size, max(0, self.meta.size - off))


class FakeReaders:
    def __init__(self):
        self.error = None
        self.opened = []

    def open(self, meta):
        self.opened.append(meta.id)
        return FakeReader(meta, self.error)


@pytest.fixture
def ops():
    return Operations(FakeCatalog(A, B), FakeReaders(), block_size=4096)


async def lookup(ops, name):
    return await ops.lookup(IMAGES_DIR, os.fsencode(name), CTX)


async def fuse_errno(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_the_root_holds_images_and_images_holds_one_file_per_image(ops):
    root = await ops.getattr(ROOT, CTX)
    assert stat.S_ISDIR(root.st_mode) and root.st_mode & 0o777 == 0o555
    d = await ops.lookup(ROOT, IMAGES, CTX)
    assert d.st_ino == IMAGES_DIR
    a = await lookup(ops, A.id)
    assert stat.S_ISREG(a.st_mode) and a.st_mode & 0o777 == 0o440
    assert (a.st_size, a.st_blksize, a.st_mtime_ns) == (1000, 4096, A.mtime_ns)
    assert (await lookup(ops, A.id)).st_ino == a.st_ino != (await lookup(ops, B.id)).st_ino
    assert (await ops.getattr(a.st_ino, CTX)).st_size == 1000


async def test_unknown_names_and_inodes_are_enoent(ops):
    assert await fuse_errno(lookup(ops, "nope")) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"other", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.getattr(12345, CTX)) == errno.ENOENT


async def test_dot_and_dotdot(ops):
    assert (await ops.lookup(IMAGES_DIR, b"..", CTX)).st_ino == ROOT
    assert (await ops.lookup(IMAGES_DIR, b".", CTX)).st_ino == IMAGES_DIR


async def test_opening_for_writing_is_erofs_and_a_directory_eisdir(ops):
    ino = (await lookup(ops, A.id)).st_ino
    assert await fuse_errno(ops.open(ino, os.O_RDWR, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(ino, os.O_RDONLY | os.O_TRUNC, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(IMAGES_DIR, os.O_RDONLY, CTX)) == errno.EISDIR


async def test_a_read_goes_to_the_files_reader(ops):
    ino = (await lookup(ops, B.id)).st_ino
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert fi.keep_cache  # images never change under an inode
    assert await ops.read(fi.fh, 4990, 100) == b"x" * 10
    assert ops.statistics()["open_handles"] == 1
    await ops.release(fi.fh)
    assert ops.statistics()["open_handles"] == 0


@pytest.mark.parametrize("error", [FetchFailed("i", 3, "Glance down"), ImageGone("gone"), OSError(5, "disk")])
async def test_every_failure_below_is_one_eio_and_one_log_line(ops, caplog, error):
    ino = (await lookup(ops, A.id)).st_ino
    ops._readers.error = error
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    caplog.clear()
    assert await fuse_errno(ops.read(fi.fh, 0, 10)) == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info


async def test_an_open_that_cannot_reach_the_cache_is_eio(ops):
    class Broken(FakeReaders):
        def open(self, meta):
            raise OSError(errno.ENOSPC, "No space left on device")

    ops = Operations(FakeCatalog(A), Broken())
    ino = (await lookup(ops, A.id)).st_ino
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, CTX)) == errno.EIO


async def test_utime_is_kept_and_everything_else_is_read_only(ops):
    ino = (await lookup(ops, A.id)).st_ino
    attr = pyfuse3.EntryAttributes()
    attr.st_atime_ns, attr.st_mtime_ns = 10**18, 2 * 10**18
    fields = SimpleNamespace(update_size=False, update_mode=False, update_uid=False, update_gid=False,
                             update_atime=True, update_mtime=True)
    got = await ops.setattr(ino, attr, fields, None, CTX)
    assert (got.st_atime_ns, got.st_mtime_ns) == (10**18, 2 * 10**18)
    assert (await ops.getattr(ino, CTX)).st_mtime_ns == 2 * 10**18
    fields.update_size = True
    assert await fuse_errno(ops.setattr(ino, attr, fields, None, CTX)) == errno.EROFS
    for call in (ops.write(1, 0, b"x"), ops.mkdir(IMAGES_DIR, b"d", 0o755, CTX), ops.unlink(IMAGES_DIR, b"x", CTX),
                 ops.rename(IMAGES_DIR, b"a", IMAGES_DIR, b"b", 0, CTX), ops.setxattr(ino, b"user.x", b"1", CTX)):
        assert await fuse_errno(call) == errno.EROFS


async def test_a_listing_change_forgets_kept_times(ops, monkeypatch):
    invalidated = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", lambda ino, name, ignore_enoent: invalidated.append(name))
    ino = (await lookup(ops, A.id)).st_ino
    attr = pyfuse3.EntryAttributes()
    attr.st_mtime_ns = 5
    fields = SimpleNamespace(update_size=False, update_mode=False, update_uid=False, update_gid=False,
                             update_atime=False, update_mtime=True)
    await ops.setattr(ino, attr, fields, None, CTX)
    ops._catalog.listeners[0]([], [A])
    assert invalidated == [os.fsencode(A.id)]
    assert (await ops.getattr(ino, CTX)).st_mtime_ns == A.mtime_ns


async def test_xattrs_say_what_the_image_is(ops):
    ino = (await lookup(ops, A.id)).st_ino
    assert await ops.getxattr(ino, XATTR_PREFIX + b"image_id", CTX) == A.id.encode()
    assert await ops.getxattr(ino, XATTR_PREFIX + b"os_hash_value", CTX) == A.os_hash_value.encode()
    assert XATTR_PREFIX + b"content_key" in await ops.listxattr(ino, CTX)
    assert await fuse_errno(ops.getxattr(ino, b"user.other", CTX)) == pyfuse3.ENOATTR


async def test_readdir_lists_images_by_id_after_asking_for_a_fresh_listing(ops, monkeypatch):
    names = []
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attr, nxt: names.append(name) or True)
    fh = await ops.opendir(IMAGES_DIR, CTX)
    assert ops._catalog.fresh == 1
    await ops.readdir(fh, 0, None)
    assert names == sorted([os.fsencode(A.id), os.fsencode(B.id)])
    names.clear()
    await ops.readdir(fh, 1, None)  # resumed after the first entry
    assert names == [os.fsencode(max(A.id, B.id))]


async def test_statfs_counts_the_images(ops):
    s = await ops.statfs(CTX)
    assert s.f_files == 4 and s.f_blocks == -(-6000 // 4096) and s.f_bavail == 0
