"""fuse.Operations called directly, as the session calls it for the kernel's requests, with a
catalog and readers of our own: attributes, lookups, opens, reads, errors, handles of a previous
process."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pytest

from fakes import meta_of
from thunderfs.errors import FetchFailed
from thunderfs_common.glance_client import ImageGone
from thunderfs.fuse.kernel import FuseError
from thunderfs.fuse.operations import ENOATTR, IMAGES, XATTR_PREFIX, Operations, SetTimes
from thunderfs.fuse.inodes import IMAGES_DIR, ROOT, derive
from thunderfs.fuse.kernel import InitParams
from thunderfs.fuse.passthrough import BackingFiles
from thunderfs.fuse.state import SessionState
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

    async def seek(self, off, whence):  # no zero chunk known: the whole image is data
        if not 0 <= off < self.meta.size:
            return None
        return off if whence == os.SEEK_DATA else self.meta.size


class FakeReaders:
    def __init__(self):
        self.error = None
        self.opened = []
        self.complete: set[str] = set()  # images whose every chunk is cached and checks out
        self.seals: list[tuple[str, bool]] = []
        self.unseals: list[str] = []

    def open(self, meta):
        self.opened.append(meta.id)
        return FakeReader(meta, self.error)

    async def seal(self, meta, check=True):
        self.seals.append((meta.id, check))
        return f"/cache/{meta.id}.data" if meta.id in self.complete or not check else None

    def unseal(self, meta):
        self.unseals.append(meta.id)


class FakeBacking(BackingFiles):
    """The kernel's side of backing files: ids handed out, closes seen, or a refusal."""

    def __init__(self, state, refuse=None, seal_new=True):
        super().__init__(-1, state, seal_new=seal_new)
        self.refuse, self.registered, self.closed = refuse, [], []

    def _register(self, path):
        if self.refuse:
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.registered.append(path)
        return len(self.registered) + 40

    def _unregister(self, backing_id):
        self.closed.append(backing_id)


@pytest.fixture
def ops():
    return Operations(FakeCatalog(A, B), FakeReaders(), block_size=4096)


async def lookup(ops, name):
    return (await ops.lookup(IMAGES_DIR, os.fsencode(name))).attr


async def fuse_errno(call) -> int:
    with pytest.raises(FuseError) as info:
        result = call()
        if hasattr(result, "__await__"):
            await result
    return info.value.errno


async def test_the_root_holds_images_and_images_holds_one_file_per_image(ops):
    root = ops.getattr(ROOT).attr
    assert stat.S_ISDIR(root.mode) and root.mode & 0o777 == 0o555
    d = (await ops.lookup(ROOT, IMAGES)).attr
    assert d.ino == IMAGES_DIR
    a = await lookup(ops, A.id)
    assert stat.S_ISREG(a.mode) and a.mode & 0o777 == 0o440
    assert (a.size, a.blksize, a.mtime_ns) == (1000, 4096, A.mtime_ns)
    assert (await lookup(ops, A.id)).ino == a.ino != (await lookup(ops, B.id)).ino
    assert ops.getattr(a.ino).attr.size == 1000


async def test_inode_numbers_are_derived_from_the_image_and_its_content(ops):
    """Every process serving the connection gives an image the same number without being told."""
    a = await lookup(ops, A.id)
    assert a.ino == derive(A) > IMAGES_DIR
    other = Operations(FakeCatalog(A, B), FakeReaders())
    assert other.getattr(a.ino).attr.size == A.size  # never looked up in this one
    changed = meta_of(b"c" * 1000, A.id, "alpha")  # same id, other bytes: another inode
    assert derive(changed) != a.ino


async def test_unknown_names_and_inodes_are_enoent(ops):
    assert await fuse_errno(lambda: lookup(ops, "nope")) == errno.ENOENT
    assert await fuse_errno(lambda: ops.lookup(ROOT, b"other")) == errno.ENOENT
    assert await fuse_errno(lambda: ops.getattr(12345)) == errno.ENOENT


async def test_dot_and_dotdot(ops):
    assert (await ops.lookup(IMAGES_DIR, b"..")).attr.ino == ROOT
    assert (await ops.lookup(IMAGES_DIR, b".")).attr.ino == IMAGES_DIR


async def test_opening_for_writing_is_erofs_and_a_directory_eisdir(ops):
    ino = (await lookup(ops, A.id)).ino
    assert await fuse_errno(lambda: ops.open(ino, os.O_RDWR)) == errno.EROFS
    assert await fuse_errno(lambda: ops.open(ino, os.O_RDONLY | os.O_TRUNC)) == errno.EROFS
    assert await fuse_errno(lambda: ops.open(IMAGES_DIR, os.O_RDONLY)) == errno.EISDIR


async def test_a_read_goes_to_the_files_reader(ops):
    ino = (await lookup(ops, B.id)).ino
    fh, _ = await ops.open(ino, os.O_RDONLY)
    assert await ops.read(ino, fh, 4990, 100) == b"x" * 10
    assert ops.statistics()["open_handles"] == 1
    ops.release(ino, fh)
    assert ops.statistics()["open_handles"] == 0


async def test_a_handle_a_previous_process_opened_is_served(ops):
    """After a takeover the kernel reads on handles this process never gave out: the inode in the
    request names the image, and a reader is opened for it then."""
    ino = derive(B)
    assert await ops.read(ino, 987654321, 0, 10) == b"x" * 10
    assert ops._readers.opened == [B.id]
    assert ops.statistics()["handles_reopened"] == 1
    await ops.read(ino, 987654321, 10, 10)
    assert ops.statistics()["handles_reopened"] == 1  # once per handle
    ops.release(ino, 987654321)
    assert ops.statistics()["open_handles"] == 0
    assert await fuse_errno(lambda: ops.read(4242, 1, 0, 10)) == errno.EIO  # no image of ours


async def test_an_image_glance_dropped_while_open_is_left_to_the_next_process():
    state = SessionState.create()
    try:
        catalog = FakeCatalog(A, B)
        ops = Operations(catalog, FakeReaders(), state=state)
        ino = (await lookup(ops, A.id)).ino
        fh, _ = await ops.open(ino, os.O_RDONLY)
        del catalog.images[A.id]
        catalog.listeners[0]([], [A])
        assert ino in SessionState.load(state.fd).held
        # The next process on the connection knows it although Glance does not list it.
        nxt = Operations(FakeCatalog(B), FakeReaders(), state=SessionState.load(state.fd))
        assert await nxt.read(ino, fh, 0, 5) == b"x" * 5
        # Here, closed and forgotten: dropped from the state.
        ops.release(ino, fh)
        ops.forget([(ino, 1)])
        assert ino not in SessionState.load(state.fd).held
    finally:
        os.close(state.fd)


@pytest.mark.parametrize("error", [FetchFailed("i", 3, "Glance down"), ImageGone("gone"), OSError(5, "disk")])
async def test_every_failure_below_is_one_eio_and_one_log_line(ops, caplog, error):
    ino = (await lookup(ops, A.id)).ino
    ops._readers.error = error
    fh, _ = await ops.open(ino, os.O_RDONLY)
    caplog.clear()
    assert await fuse_errno(lambda: ops.read(ino, fh, 0, 10)) == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info


async def test_an_open_that_cannot_reach_the_cache_is_eio(ops):
    class Broken(FakeReaders):
        def open(self, meta):
            raise OSError(errno.ENOSPC, "No space left on device")

    ops = Operations(FakeCatalog(A), Broken())
    ino = (await lookup(ops, A.id)).ino
    assert await fuse_errno(lambda: ops.open(ino, os.O_RDONLY)) == errno.EIO


async def test_utime_is_kept_and_everything_else_is_read_only(ops):
    ino = (await lookup(ops, A.id)).ino
    got = ops.setattr(ino, SetTimes(atime_ns=10**18, mtime_ns=2 * 10**18)).attr
    assert (got.atime_ns, got.mtime_ns) == (10**18, 2 * 10**18)
    assert ops.getattr(ino).attr.mtime_ns == 2 * 10**18
    touched = ops.setattr(ino, SetTimes(mtime_ns=-1)).attr  # touch: now
    assert touched.mtime_ns > 2 * 10**18 - 10**18 and touched.atime_ns == 10**18
    assert await fuse_errno(lambda: ops.setattr(ino, SetTimes(other=True, mtime_ns=5))) == errno.EROFS
    assert await fuse_errno(lambda: ops.setattr(ino, SetTimes())) == errno.EROFS


async def test_a_listing_change_forgets_kept_times(ops):
    invalidated = []
    ops.invalidate_entry = lambda parent, name: invalidated.append((parent, name))
    ino = (await lookup(ops, A.id)).ino
    ops.setattr(ino, SetTimes(mtime_ns=5))
    ops._catalog.listeners[0]([], [A])
    assert invalidated == [(IMAGES_DIR, os.fsencode(A.id))]
    assert ops.getattr(ino).attr.mtime_ns == A.mtime_ns


async def test_xattrs_say_what_the_image_is(ops):
    ino = (await lookup(ops, A.id)).ino
    assert ops.getxattr(ino, XATTR_PREFIX + b"image_id") == A.id.encode()
    assert ops.getxattr(ino, XATTR_PREFIX + b"os_hash_value") == A.os_hash_value.encode()
    assert XATTR_PREFIX + b"content_key" in ops.listxattr(ino)
    assert await fuse_errno(lambda: ops.getxattr(ino, b"user.other")) == ENOATTR


async def test_readdir_lists_images_by_id_after_asking_for_a_fresh_listing(ops):
    fh = await ops.opendir(IMAGES_DIR)
    assert ops._catalog.fresh == 1
    names = [name for name, _attr, _next in ops.readdir(fh, 0)]
    assert names == sorted([os.fsencode(A.id), os.fsencode(B.id)])
    resumed = list(ops.readdir(fh, 1))  # after the first entry
    assert [n for n, _, _ in resumed] == [os.fsencode(max(A.id, B.id))] and resumed[0][2] == 2


async def test_statfs_counts_the_images(ops):
    assert ops.statfs() == (-(-6000 // 4096), 4)


@pytest.fixture
def pt_state():
    state = SessionState.create()
    state.init = InitParams(minor=40, flags=0, max_write=2**17, max_pages=256, passthrough=True)
    yield state
    os.close(state.fd)


async def test_a_complete_image_is_opened_in_passthrough_and_its_backing_file_let_go_at_the_last_close(pt_state):
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    readers.complete.add(B.id)
    ops = Operations(FakeCatalog(A, B), readers, state=pt_state, backing=backing)
    ino = (await lookup(ops, B.id)).ino
    fh1, id1 = await ops.open(ino, os.O_RDONLY)
    fh2, id2 = await ops.open(ino, os.O_RDONLY)
    assert id1 == id2 == 41 and fh1 % 2 == fh2 % 2 == 1
    assert readers.seals == [(B.id, True)] and backing.registered == ["/cache/" + B.id + ".data"]
    assert SessionState.load(pt_state.fd).backing[ino] == {"id": 41, "pt": 2, "cached": 0}
    ops.release(ino, fh1)
    assert backing.closed == [] and readers.unseals == []
    ops.release(ino, fh2)
    assert backing.closed == [41] and readers.unseals == [B.id]
    assert SessionState.load(pt_state.fd).backing == {}
    # Not complete: served through the daemon, as without passthrough.
    ino_a = (await lookup(ops, A.id)).ino
    fh, backing_id = await ops.open(ino_a, os.O_RDONLY)
    assert backing_id == 0 and fh % 2 == 0 and await ops.read(ino_a, fh, 0, 3) == b"xxx"


async def test_an_inode_open_through_the_daemon_stays_so_until_its_last_close(pt_state):
    """The kernel refuses (EIO to the opener) a passthrough open beside a cached one and the
    other way round: the first open decides until every open is closed."""
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    ops = Operations(FakeCatalog(B), readers, state=pt_state, backing=backing)
    ino = (await lookup(ops, B.id)).ino
    fh1, id1 = await ops.open(ino, os.O_RDONLY)
    readers.complete.add(B.id)  # the image became complete meanwhile
    fh2, id2 = await ops.open(ino, os.O_RDONLY)
    assert id1 == id2 == 0 and backing.registered == []
    ops.release(ino, fh1)
    ops.release(ino, fh2)
    fh3, id3 = await ops.open(ino, os.O_RDONLY)
    assert id3 == 41 and fh3 % 2 == 1


async def test_the_next_process_keeps_the_backing_files_whole_and_closes_them(pt_state):
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    readers.complete.add(B.id)
    ops = Operations(FakeCatalog(B), readers, state=pt_state, backing=backing)
    ino = (await lookup(ops, B.id)).ino
    fh, backing_id = await ops.open(ino, os.O_RDONLY)
    # The process dies; the next one finds the open in the state.
    state = SessionState.load(pt_state.fd)
    readers2, backing2 = FakeReaders(), FakeBacking(state)
    nxt = Operations(FakeCatalog(B), readers2, state=state, backing=backing2)
    await nxt.start()
    assert readers2.seals == [(B.id, False)]  # pinned whole again, no new check needed
    fh2, id2 = await nxt.open(ino, os.O_RDONLY)  # the kernel's backing file, not a second one
    assert id2 == backing_id and backing2.registered == []
    nxt.release(ino, fh)  # a handle of the previous process
    nxt.release(ino, fh2)
    assert backing2.closed == [backing_id] and readers2.unseals == [B.id]


async def test_a_kernel_that_refuses_backing_files_leaves_every_open_to_the_daemon(pt_state, caplog):
    readers, backing = FakeReaders(), FakeBacking(pt_state, refuse=errno.EPERM)
    readers.complete.add(B.id)
    ops = Operations(FakeCatalog(B), readers, state=pt_state, backing=backing)
    ino = (await lookup(ops, B.id)).ino
    fh, backing_id = await ops.open(ino, os.O_RDONLY)
    assert backing_id == 0 and fh % 2 == 0 and readers.unseals == [B.id]
    assert not backing.sealing() and "refused a backing file" in caplog.text
    assert await ops.read(ino, fh, 0, 2) == b"xx"


async def test_an_inode_in_passthrough_stays_so_after_the_kernel_refuses_another(pt_state):
    """A later refusal (another file) stops new passthrough opens only: the kernel would fail a
    cached open of an inode it reads in passthrough."""
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    readers.complete.update({A.id, B.id})
    ops = Operations(FakeCatalog(A, B), readers, state=pt_state, backing=backing)
    ino_b = (await lookup(ops, B.id)).ino
    _, id_b = await ops.open(ino_b, os.O_RDONLY)
    backing.refuse = errno.EMFILE
    ino_a = (await lookup(ops, A.id)).ino
    assert (await ops.open(ino_a, os.O_RDONLY))[1] == 0
    assert (await ops.open(ino_b, os.O_RDONLY))[1] == id_b
    assert ops.statistics()["passthrough"].startswith("off: ")


async def test_a_process_without_passthrough_keeps_the_files_an_earlier_one_opened_so(pt_state):
    """Passthrough turned off and the daemon restarted while a VM reads in passthrough: that
    inode's opens go on in passthrough (the kernel would fail any other), no new inode does."""
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    readers.complete.update({A.id, B.id})
    ops = Operations(FakeCatalog(A, B), readers, state=pt_state, backing=backing)
    ino_b = (await lookup(ops, B.id)).ino
    fh, backing_id = await ops.open(ino_b, os.O_RDONLY)
    state = SessionState.load(pt_state.fd)
    nxt = Operations(FakeCatalog(A, B), FakeReaders(), state=state, backing=FakeBacking(state, seal_new=False))
    await nxt.start()
    fh2, id2 = await nxt.open(ino_b, os.O_RDONLY)
    assert id2 == backing_id and fh2 % 2 == 1
    ino_a = (await lookup(nxt, A.id)).ino
    fh3, id3 = await nxt.open(ino_a, os.O_RDONLY)
    assert id3 == 0 and fh3 % 2 == 0


async def test_an_open_or_release_resent_after_a_kill_between_count_and_answer_counts_once(pt_state):
    """A process counts an OPEN (and saves it) and is killed before it answers; the kernel
    resends the OPEN (same unique) to the next process, which answers it with the same backing
    file without counting it again; likewise a RELEASE.  Counted twice, the backing file and
    the pin would stay for good (or go while a file is still open)."""
    readers, backing = FakeReaders(), FakeBacking(pt_state)
    readers.complete.add(B.id)
    ops = Operations(FakeCatalog(B), readers, state=pt_state, backing=backing)
    ino = (await lookup(ops, B.id)).ino
    fh, backing_id = await ops.open(ino, os.O_RDONLY, request=7)  # answered
    await ops.open(ino, os.O_RDONLY, request=8)  # counted, saved; killed before the answer
    state = SessionState.load(pt_state.fd)
    assert state.backing[ino]["pt"] == 2 and state.counted == [7, 8]
    readers2, backing2 = FakeReaders(), FakeBacking(state)
    nxt = Operations(FakeCatalog(B), readers2, state=state, backing=backing2)
    await nxt.start()
    fh8, id8 = await nxt.open(ino, os.O_RDONLY, request=8)  # the resend
    assert id8 == backing_id and state.backing[ino]["pt"] == 2 and backing2.statistics()["resent_not_counted"] == 1
    nxt.release(ino, fh, request=9)  # counted, saved; killed before the answer
    state3 = SessionState.load(state.fd)
    backing3 = FakeBacking(state3)
    third = Operations(FakeCatalog(B), FakeReaders(), state=state3, backing=backing3)
    await third.start()
    third.release(ino, fh, request=9)  # the resend: not counted again
    assert state3.backing[ino]["pt"] == 1 and backing3.closed == []
    third.release(ino, fh8, request=10)  # the last open closes: the backing file goes
    assert backing3.closed == [backing_id] and state3.backing == {}


async def test_an_image_only_the_previous_process_had_open_stays_readable_if_glance_deletes_it_after():
    """The kernel's references are saved from the first: the next process, which never looked
    the image up, keeps it (inherited) although Glance drops it after the handover, and lets it
    go when the kernel forgets the inode."""
    state = SessionState.create()
    try:
        ops = Operations(FakeCatalog(A, B), FakeReaders(), state=state)
        ino = (await lookup(ops, A.id)).ino
        fh, _ = await ops.open(ino, os.O_RDONLY)
        assert ino in SessionState.load(state.fd).held  # saved at the first reference
        # Handed over; then Glance deletes A before the new process hears of the open file.
        catalog = FakeCatalog(A, B)
        nxt = Operations(catalog, FakeReaders(), state=SessionState.load(state.fd))
        del catalog.images[A.id]
        catalog.listeners[0]([], [A])
        assert await nxt.read(ino, fh, 0, 5) == b"x" * 5  # was EIO: the inode unknown
        nxt.release(ino, fh)
        nxt.forget([(ino, 3)])  # the kernel evicts it: every reference at once
        assert await fuse_errno(lambda: nxt.read(ino, fh, 0, 5)) == errno.EIO
        assert ino not in SessionState.load(state.fd).held
    finally:
        os.close(state.fd)
