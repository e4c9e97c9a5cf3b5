"""The FUSE session against a fake kernel: a SEQPACKET socket pair stands in for /dev/fuse (one
request per read, one answer per write).  INIT, answers and errors, the resend a takeover asks
for, and the session state left for the next process."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
import trio

from fakes import meta_of
from thunderfs.fuse import journal
from thunderfs.fuse import kernel as k
from thunderfs.fuse.inodes import IMAGES_DIR, derive
from thunderfs.fuse.journal import Journal
from thunderfs.fuse.kernel import Op
from thunderfs.fuse.operations import Operations
from thunderfs.fuse.session import Session
from thunderfs.fuse.state import JOURNAL_AT, SLOT, SessionState
from test_fs_ops import FakeCatalog, FakeReaders

A = meta_of(b"a" * 100_000, "aaaaaaaa-0000-0000-0000-000000000001", "alpha")
LANDING = 131072 + 65536  # the read buffer of the fake kernel's INIT (max_write 128 KiB)


class FakeKernel:
    def __init__(self):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs.setblocking(False)
        self._unique = 0

    async def send(self, op: Op, body: bytes = b"", nodeid: int = 0) -> int:
        self._unique += 1
        self.ours.send(k.IN_HEADER.pack(k.IN_HEADER.size + len(body), op, self._unique, nodeid, 0, 0, 1, 0, 0)
                       + body)
        return self._unique

    async def answer(self) -> tuple[int, int, bytes]:
        """(unique, errno, payload) of the next message the session wrote."""
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(self.ours)
        msg = self.ours.recv(1 << 20)
        length, error, unique = k.OUT_HEADER.unpack_from(msg)
        assert length == len(msg)
        return unique, -error, msg[k.OUT_HEADER.size:]

    async def init(self, minor: int = 44, flags: int = k.ASYNC_READ | k.MAX_PAGES | k.INIT_EXT | (1 << 3),
                   flags2: int = k.HAS_RESEND >> 32) -> bytes:
        await self.send(Op.INIT, struct.pack("<IIIII44x", 7, minor, 131072, flags, flags2))
        unique, err, out = await self.answer()
        assert err == 0
        return out


@pytest.fixture
def state():
    s = SessionState.create()
    yield s
    os.close(s.fd)


async def serve(nursery, kern: FakeKernel, state: SessionState, catalog=None) -> Session:
    ops = Operations(catalog or FakeCatalog(A), FakeReaders(), state=state)
    session = Session(kern.theirs.fileno(), ops, state)
    await nursery.start(session.serve)
    return session


async def test_init_agrees_on_what_both_sides_know_and_is_saved_first(state):
    kern = FakeKernel()
    async with trio.open_nursery() as nursery:
        session = await serve(nursery, kern, state)
        assert not session.takeover
        out = await kern.init()
        major, minor, _ra, flags, max_bg, _cong, max_write, _gran, max_pages, _align, flags2, depth = \
            k.INIT_OUT.unpack(out)
        assert (major, minor) == (7, k.KERNEL_MINOR)  # the lower of the two
        assert flags == k.ASYNC_READ | k.MAX_PAGES  # (1 << 3) was offered, not wanted
        assert (max_pages, max_bg, flags2, depth) == (256, 64, 0, 0)
        await session.wait_initialized()
        assert SessionState.load(state.fd).init.minor == k.KERNEL_MINOR
        nursery.cancel_scope.cancel()


def test_passthrough_is_agreed_only_when_asked_for_and_offered():
    """It lives in flags2, which the kernel reads only with INIT_EXT in the answer, and needs a
    stack depth (the backing files' file system is not a stacked one: 1)."""
    offer = struct.pack("<IIIII44x", 7, 44, 131072, k.ASYNC_READ | k.INIT_EXT, (k.PASSTHROUGH | k.HAS_RESEND) >> 32)
    params, out = k.negotiate(offer, max_pages=256, max_background=64, passthrough=True)
    fields = k.INIT_OUT.unpack(out)
    assert params.passthrough and fields[3] & k.INIT_EXT and fields[10] == k.PASSTHROUGH >> 32 and fields[11] == 1
    assert k.InitParams.from_record(params.to_record()) == params
    params, out = k.negotiate(offer, max_pages=256, max_background=64)  # not asked
    assert not params.passthrough and k.INIT_OUT.unpack(out)[10:] == (0, 0)
    old_kernel = struct.pack("<IIIII44x", 7, 38, 131072, k.ASYNC_READ | k.INIT_EXT, 0)
    params, out = k.negotiate(old_kernel, max_pages=256, max_background=64, passthrough=True)
    assert not params.passthrough and k.INIT_OUT.unpack(out)[10:] == (0, 0)


async def test_requests_are_answered_and_what_cannot_be_done_is_an_errno(state):
    kern = FakeKernel()
    async with trio.open_nursery() as nursery:
        await serve(nursery, kern, state)
        await kern.init()
        u = await kern.send(Op.LOOKUP, b"images\0", nodeid=1)
        unique, err, out = await kern.answer()
        assert (unique, err) == (u, 0) and k.ENTRY_OUT.unpack_from(out)[0] == IMAGES_DIR
        await kern.send(Op.LOOKUP, A.id.encode() + b"\0", nodeid=IMAGES_DIR)
        _, err, out = await kern.answer()
        ino = k.ENTRY_OUT.unpack_from(out)[0]
        assert err == 0 and ino == derive(A)
        await kern.send(Op.OPEN, k.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=ino)
        _, err, out = await kern.answer()
        fh, flags, _ = k.OPEN_OUT.unpack(out)
        assert flags & k.FOPEN_KEEP_CACHE and flags & k.FOPEN_NOFLUSH
        await kern.send(Op.READ, k.READ_IN.pack(fh, 99_990, 4096, 0, 0, 0, 0), nodeid=ino)
        _, err, out = await kern.answer()
        assert (err, out) == (0, b"x" * 10)
        await kern.send(Op.FORGET, k.FORGET_IN.pack(1), nodeid=ino)  # no answer to this one
        for op, want in ((Op.MKDIR, errno.EROFS), (Op.WRITE, errno.EROFS), (Op.BMAP, errno.ENOSYS), (99, errno.ENOSYS)):
            u = await kern.send(op, b"\0" * 16, nodeid=ino)
            assert (await kern.answer())[:2] == (u, want)
        await kern.send(Op.GETXATTR, k.GETXATTR_IN.pack(0, 0) + b"user.thunderfs.image_id\0", nodeid=ino)
        _, err, out = await kern.answer()
        assert (err, k.GETXATTR_OUT.unpack(out)[0]) == (0, len(A.id))
        await kern.send(Op.GETXATTR, k.GETXATTR_IN.pack(4, 0) + b"user.thunderfs.image_id\0", nodeid=ino)
        assert (await kern.answer())[1] == errno.ERANGE
        nursery.cancel_scope.cancel()


async def test_readdir_fills_at_most_the_size_asked(state):
    b = meta_of(b"b" * 10, "bbbbbbbb-0000-0000-0000-000000000002", "beta")
    kern = FakeKernel()
    async with trio.open_nursery() as nursery:
        await serve(nursery, kern, state, FakeCatalog(A, b))
        await kern.init()
        one = len(k.dirent(1, 1, A.id.encode(), 0o100000))
        await kern.send(Op.READDIR, k.READ_IN.pack(IMAGES_DIR, 0, one + 8, 0, 0, 0, 0), nodeid=IMAGES_DIR)
        _, err, out = await kern.answer()
        ino, nxt, namelen, kind = k.DIRENT.unpack_from(out)
        assert (len(out), ino, nxt, kind) == (one, derive(A), 1, 8)
        assert out[k.DIRENT.size:k.DIRENT.size + namelen] == A.id.encode()
        await kern.send(Op.READDIR, k.READ_IN.pack(IMAGES_DIR, nxt, 4096, 0, 0, 0, 0), nodeid=IMAGES_DIR)
        _, err, out = await kern.answer()
        assert k.DIRENT.unpack_from(out)[0] == derive(b) and len(out) == one
        nursery.cancel_scope.cancel()


async def test_a_takeover_asks_the_kernel_to_resend_and_serves_old_handles(state):
    state.init = k.InitParams(minor=40, flags=k.HAS_RESEND, max_write=131072, max_pages=256)
    state.save()
    kern = FakeKernel()
    async with trio.open_nursery() as nursery:
        session = await serve(nursery, kern, SessionState.load(state.fd))
        assert session.takeover
        unique, code, payload = await kern.answer()  # first of all: the resend notification
        assert (unique, code, payload) == (0, -k.Notify.RESEND, b"")
        # A read the previous process had taken, sent again with the resend bit, on its handle.
        u = await kern.send(Op.READ, k.READ_IN.pack(777, 0, 5, 0, 0, 0, 0), nodeid=derive(A))
        assert await kern.answer() == (u, 0, b"x" * 5)
        assert session.statistics()["resent"] is True
        nursery.cancel_scope.cancel()


async def test_stop_leaves_requests_in_progress_unanswered(state):
    class Slow(FakeReaders):
        def open(self, meta):
            reader = super().open(meta)

            async def read(off, size):
                await trio.sleep_forever()
            reader.read = read
            return reader

    kern = FakeKernel()
    async with trio.open_nursery() as nursery:
        ops = Operations(FakeCatalog(A), Slow(), state=state)
        session = Session(kern.theirs.fileno(), ops, state)
        await nursery.start(session.serve)
        await kern.init()
        await kern.send(Op.READ, k.READ_IN.pack(1, 0, 5, 0, 0, 0, 0), nodeid=derive(A))
        await trio.testing.wait_all_tasks_blocked()
        assert session.statistics()["in_flight"] == 1
        session.stop()
    with pytest.raises(BlockingIOError):
        kern.ours.recv(1 << 16, socket.MSG_DONTWAIT)  # no answer: the next process gets it


async def test_the_session_ends_when_the_kernel_goes(state):
    kern = FakeKernel()
    ops = Operations(FakeCatalog(A), FakeReaders(), state=state)
    session = Session(kern.theirs.fileno(), ops, state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await kern.init()
        kern.ours.close()
    assert session.unmounted


def test_the_state_survives_a_write_cut_short(state):
    state.init = k.InitParams(minor=40, flags=0, max_write=131072, max_pages=256)
    state.save()
    state.held = {5: A.to_record()}
    state.save()
    # The newest slot torn (a SIGKILL in the middle of a write): the one before it is read.
    newest = (2 % 2) * SLOT
    os.pwrite(state.fd, b"\xff" * 64, newest + 20)
    loaded = SessionState.load(state.fd)
    assert loaded.init.max_pages == 256 and loaded.held == {}
    # And a whole newest slot wins.
    state.save()
    assert SessionState.load(state.fd).held == {5: A.to_record()}


class Gated(FakeReaders):
    """Reads that wait for ``gate`` (a trio.Event), then answer."""

    def __init__(self):
        super().__init__()
        self.gate = trio.Event()

    def open(self, meta):
        reader = super().open(meta)
        plain = reader.read

        async def read(off, size):
            await self.gate.wait()
            return await plain(off, size)
        reader.read = read
        return reader


async def _open(kern: FakeKernel) -> int:
    await kern.send(Op.OPEN, k.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=derive(A))
    _, err, out = await kern.answer()
    assert err == 0
    return k.OPEN_OUT.unpack(out)[0]


async def test_stop_drains_requests_in_progress_where_the_kernel_cannot_resend(state):
    """A kernel older than 6.9 (no HAS_RESEND offered): a stop reads no new request, answers the
    ones in progress, and only then returns; what it did not read stays for the next process."""
    kern = FakeKernel()
    readers = Gated()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), readers, state=state), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.serve)
        await kern.init(minor=38, flags2=0)
        assert not session.kernel_resends
        fh = await _open(kern)
        u = await kern.send(Op.READ, k.READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), nodeid=derive(A))
        await trio.testing.wait_all_tasks_blocked()
        session.stop()
        await trio.testing.wait_all_tasks_blocked()
        later = await kern.send(Op.GETATTR, b"\0" * 16, nodeid=1)  # after the stop: not read here
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BlockingIOError):
            kern.ours.recv(1 << 16, socket.MSG_DONTWAIT)  # the read waits; nothing answered yet
        readers.gate.set()
        assert await kern.answer() == (u, 0, b"x" * 5)
    assert session.statistics()["drained"] == 1
    left = kern.theirs.recv(1 << 16)  # what the next process reads first
    assert k.Header.parse(left).unique == later


async def test_a_drain_past_its_limit_answers_eintr_rather_than_nothing(state, monkeypatch):
    from thunderfs.fuse import session as session_mod
    monkeypatch.setattr(session_mod, "DRAIN_LIMIT", 0.05)
    kern = FakeKernel()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), Gated(), state=state), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.serve)
        await kern.init(minor=38, flags2=0)
        fh = await _open(kern)
        u = await kern.send(Op.READ, k.READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), nodeid=derive(A))
        await trio.testing.wait_all_tasks_blocked()
        session.stop()
    assert await kern.answer() == (u, errno.EINTR, b"")
    assert session.statistics()["answered_eintr"] == 1
    with pytest.raises(BlockingIOError):
        kern.ours.recv(1 << 16, socket.MSG_DONTWAIT)  # answered once


async def test_failed_forgets_and_malformed_requests_do_not_end_the_session(state, caplog):
    """A FORGET whose handling fails, a BATCH_FORGET that claims more than it carries, and
    requests shorter than their kind: each logged (malformed ones once per kind), each request
    that wants an answer answered EIO, and the session serves on."""
    kern = FakeKernel()
    ops = Operations(FakeCatalog(A), FakeReaders(), state=state)

    def broken(_inodes):
        raise RuntimeError("forget went wrong")
    ops.forget = broken
    async with trio.open_nursery() as nursery:
        session = Session(kern.theirs.fileno(), ops, state)
        await nursery.start(session.serve)
        await kern.init()
        await kern.send(Op.FORGET, k.FORGET_IN.pack(1), nodeid=5)
        await kern.send(Op.BATCH_FORGET, k.BATCH_FORGET_IN.pack(1000, 0), nodeid=0)
        for _ in range(2):
            u = await kern.send(Op.READ, b"\0" * 4, nodeid=derive(A))
            assert (await kern.answer())[:2] == (u, errno.EIO)
        # A header whose length is not what was read: answered by its unique all the same.
        kern._unique += 1
        kern.ours.send(k.IN_HEADER.pack(999, Op.GETATTR, kern._unique, 1, 0, 0, 1, 0, 0))
        assert (await kern.answer())[:2] == (kern._unique, errno.EIO)
        u = await kern.send(Op.LOOKUP, b"images\0", nodeid=1)
        assert (await kern.answer())[:2] == (u, 0)
        nursery.cancel_scope.cancel()
    text = caplog.text
    assert "forget went wrong" in text and text.count("malformed READ") == 1 and "malformed BATCH_FORGET" in text
    assert "malformed request" in text


async def test_an_aborted_connection_ends_the_session_with_one_line(state, caplog, monkeypatch):
    from thunderfs.fuse import session as session_mod
    kern = FakeKernel()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), FakeReaders(), state=state), state)
    real = os.readv
    aborted = False

    def readv(fd, bufs):
        if aborted:
            raise OSError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED))
        return real(fd, bufs)
    monkeypatch.setattr(session_mod.os, "readv", readv)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await kern.init()
            aborted = True
            await kern.send(Op.GETATTR, b"\0" * 16, nodeid=1)  # wakes the reading up
    assert session.unmounted and session.statistics()["aborted"]
    assert caplog.text.count("the FUSE connection was aborted") == 1 and "Traceback" not in caplog.text


async def test_requests_in_flight_are_capped(state, monkeypatch):
    from thunderfs.fuse import session as session_mod
    monkeypatch.setattr(session_mod, "MAX_IN_FLIGHT", 4)
    kern = FakeKernel()
    readers = Gated()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), readers, state=state), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.serve)
        await kern.init()
        fh = await _open(kern)
        sent = {await kern.send(Op.READ, k.READ_IN.pack(fh, i, 1, 0, 0, 0, 0), nodeid=derive(A)) for i in range(10)}
        await trio.testing.wait_all_tasks_blocked()
        st = session.statistics()
        assert st["in_flight"] == 4 and st["requests"] == 2 + 5  # INIT, OPEN; four served, one waiting for room
        readers.gate.set()
        got = {(await kern.answer())[0] for _ in range(10)}
        assert got == sent
        nursery.cancel_scope.cancel()


async def test_an_invalidation_stuck_in_the_kernel_does_not_keep_serve_from_returning(state, monkeypatch):
    """The kernel may hold an entry invalidation on a lock a request in progress holds; a stop
    (here, on a kernel that resends) returns all the same."""
    import threading
    from thunderfs.fuse import session as session_mod
    kern = FakeKernel()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), FakeReaders(), state=state), state)
    stuck, release = threading.Event(), threading.Event()
    real = os.writev

    def writev(fd, pieces):
        if len(pieces) == 2 and k.OUT_HEADER.unpack_from(pieces[0])[1] == k.Notify.INVAL_ENTRY:
            stuck.set()
            release.wait(10)
        return real(fd, pieces)
    monkeypatch.setattr(session_mod.os, "writev", writev)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                await kern.init()
                session.invalidate_entry_nowait(2, b"gone")
                await trio.to_thread.run_sync(stuck.wait)
                session.stop()
    finally:
        release.set()


async def test_lseek_finds_data_and_holes_by_the_zero_chunks_known(state):
    """SEEK_DATA and SEEK_HOLE answered from the reader's zero chunks (four chunks of 64 KiB, the
    second and the fourth zeros); ENXIO past the data and at the end; other kinds EINVAL."""
    from thunderfs.fetch.zero_chunks import ZeroChunks
    cs = 65536
    big = meta_of(b"\0" * 4 * cs, "cccccccc-0000-0000-0000-000000000003", "gamma")
    zeros = ZeroChunks(bytes([0, 1, 0, 1]), cs, 4 * cs)

    class Zeros(FakeReaders):
        def open(self, meta):
            reader = super().open(meta)

            async def seek(offset, whence):
                return zeros.data_from(offset) if whence == os.SEEK_DATA else zeros.hole_from(offset)
            reader.seek = seek
            return reader

    kern = FakeKernel()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(big), Zeros(), state=state), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.serve)
        await kern.init()
        await kern.send(Op.OPEN, k.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=derive(big))
        fh = k.OPEN_OUT.unpack((await kern.answer())[2])[0]
        for offset, whence, want in ((0, os.SEEK_DATA, 0), (0, os.SEEK_HOLE, cs), (cs + 5, os.SEEK_DATA, 2 * cs),
                                     (2 * cs + 7, os.SEEK_DATA, 2 * cs + 7), (2 * cs, os.SEEK_HOLE, 3 * cs),
                                     (3 * cs, os.SEEK_DATA, errno.ENXIO), (4 * cs, os.SEEK_HOLE, errno.ENXIO),
                                     (0, os.SEEK_END, errno.EINVAL)):
            u = await kern.send(Op.LSEEK, k.LSEEK_IN.pack(fh, offset, whence, 0), nodeid=derive(big))
            unique, err, out = await kern.answer()
            got = err if err else k.LSEEK_OUT.unpack(out)[0]
            assert (unique, got) == (u, want), (offset, whence)
        nursery.cancel_scope.cancel()


def test_zero_chunks_come_from_the_manifests_digests_the_short_last_one_included():
    from thunderfs.fetch.zero_chunks import ZeroChunks
    from thunderfs_common import chunk_digest

    class Manifest:
        chunk_size, size = 4096, 4096 * 4 + 100
        nchunks = 5

        def __init__(self, data):
            self.d = chunk_digest.digests(data, 4096)

        def digest(self, c):
            return self.d[c]

    data = bytearray(Manifest.size)
    data[4096 * 2 + 10] = 1  # chunk 2 is not zero; 0, 1, 3 and the short 4 are
    z = ZeroChunks.of(Manifest(data))
    assert z.count == 4
    assert (z.data_from(0), z.data_from(4096 * 3)) == (4096 * 2, None)
    assert (z.hole_from(4096 * 2 + 1), z.hole_from(0), z.hole_from(Manifest.size)) == (4096 * 3, 0, None)
    data[-1] = 7  # the short last chunk is data now
    z = ZeroChunks.of(Manifest(data))
    assert z.data_from(4096 * 3) == 4096 * 4 and z.hole_from(4096 * 4) == Manifest.size
    whole = ZeroChunks.none(4096, Manifest.size)  # no manifest: all data
    assert (whole.data_from(5), whole.hole_from(5), whole.count) == (5, Manifest.size, 0)


async def test_a_takeover_answers_what_a_killed_process_read_where_the_kernel_cannot_resend(state):
    """A kernel older than 6.9: the process killed (SIGKILL: nothing of it runs again) while a
    READ, a LOOKUP and a WRITE are in its hands; the next process answers all three from the
    session's journal as it starts (and serves what was queued meanwhile), and asks the kernel
    for no resend."""
    kern = FakeKernel()
    readers = Gated()
    session = Session(kern.theirs.fileno(), Operations(FakeCatalog(A), readers, state=state), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.serve)
        await kern.init(minor=38, flags2=0)
        fh = await _open(kern)
        read = await kern.send(Op.READ, k.READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), nodeid=derive(A))
        with trio.fail_after(5):  # until the session has read it (all tasks blocked is not enough:
            while session.statistics()["journaled"] != 1:  # its read may still wait for the fd)
                await trio.sleep(0.001)
        # A WRITE longer than a slot holds (answered EROFS all the same).
        write = await kern.send(Op.WRITE, b"\0" * 40 + b"w" * 4096, nodeid=derive(A))
        assert await kern.answer() == (write, errno.EROFS, b"")
        assert session.statistics()["journaled"] == 1  # answered, so no longer kept
        # The kill: the memfd as it is now is what the next process finds.
        memory = os.pread(state.fd, os.fstat(state.fd).st_size - JOURNAL_AT, JOURNAL_AT)
        nursery.cancel_scope.cancel()
    os.pwrite(state.fd, memory, JOURNAL_AT)
    # A LOOKUP and a long WRITE it had read as well (the slots as the journal writes them), and a
    # GETATTR the kernel had just written into the landing zone when the kill came.
    lost = Journal(state.fd, JOURNAL_AT, LANDING)
    lost.recover()
    lookup_u, write_u, landed_u = 1001, 1003, 1005
    lost.add(k.IN_HEADER.pack(k.IN_HEADER.size + 6, Op.LOOKUP, lookup_u, 1, 0, 0, 1, 0, 0) + b"images")
    lost.add(k.IN_HEADER.pack(k.IN_HEADER.size + 4136, Op.WRITE, write_u, derive(A), 0, 0, 1, 0, 0)
             + b"\0" * 40 + b"w" * 4096)
    _land(lost, k.IN_HEADER.pack(k.IN_HEADER.size + 16, Op.GETATTR, landed_u, 1, 0, 0, 1, 0, 0) + b"\0" * 16)
    later = await kern.send(Op.GETATTR, b"\0" * 16, nodeid=1)  # queued for the next process
    readers.gate.set()
    async with trio.open_nursery() as nursery:
        session = await serve(nursery, kern, SessionState.load(state.fd))
        got = {}
        for _ in range(5):
            unique, code, _payload = await kern.answer()
            got[unique] = code
        assert got == {read: 0, lookup_u: 0, write_u: errno.EROFS, landed_u: 0, later: 0}
        st = session.statistics()
        assert (st["replayed"], st["journaled"], st["resent"]) == (4, 0, False)
        nursery.cancel_scope.cancel()
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == []  # nothing left for a third process


def _land(j: Journal, request: bytes) -> None:
    """As the kernel does: a request written into the landing zone by a read."""
    j.landing[:len(request)] = request


def test_a_request_in_the_landing_zone_is_recovered_once_and_only_if_it_awaits_an_answer(state):
    j = Journal(state.fd, JOURNAL_AT, LANDING)
    getattr_ = k.IN_HEADER.pack(56, Op.GETATTR, 7, 1, 0, 0, 1, 0, 0) + b"\0" * 16
    # Read, and the kill came before the move to a slot: recovered from the landing zone.
    _land(j, getattr_)
    assert [r for _, r in Journal(state.fd, JOURNAL_AT, LANDING).recover()] == [getattr_]
    # Moved to a slot, and the kill came before the zone was cleared: recovered once.
    _land(j, getattr_)
    slot = j.add(getattr_)
    assert [r for _, r in Journal(state.fd, JOURNAL_AT, LANDING).recover()] == [getattr_]
    j.remove(slot)
    # Every slot taken (it died serving SLOTS requests) and one more landed: recovered all the
    # same, without a slot of its own.
    full = [j.add(getattr_[:8] + (100 + i).to_bytes(8, "little") + getattr_[16:]) for i in range(journal.SLOTS)]
    _land(j, getattr_)
    left = Journal(state.fd, JOURNAL_AT, LANDING).recover()
    assert len(left) == journal.SLOTS + 1 and (None, getattr_) in left
    for slot in full:
        j.remove(slot)
    # A FORGET awaits no answer: never served again.
    _land(j, k.IN_HEADER.pack(48, Op.FORGET, 9, 5, 0, 0, 1, 0, 0) + k.FORGET_IN.pack(1))
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == []


def test_a_journal_slot_is_whole_or_free(state):
    j = Journal(state.fd, JOURNAL_AT, LANDING)
    request = k.IN_HEADER.pack(80, Op.READ, 7, 5, 0, 0, 1, 0, 0) + b"r" * 40
    slot = j.add(request)
    # A kill after the bytes and before the length: the slot reads as free.
    os.pwrite(state.fd, b"\0" * 4, JOURNAL_AT + slot * journal.SLOT)
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == []
    slot = j.add(request)
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == [(slot, request)]
    j.remove(slot)
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == []
    # A length no slot can hold (garbage) is not a request.
    os.pwrite(state.fd, (journal.SLOT * 2).to_bytes(4, "little"), JOURNAL_AT)
    assert Journal(state.fd, JOURNAL_AT, LANDING).recover() == []


def test_the_journal_grows_a_memfd_an_older_version_made():
    fd = os.memfd_create("old")
    try:
        os.ftruncate(fd, JOURNAL_AT)  # the two state slots only
        j = Journal(fd, JOURNAL_AT, LANDING)
        assert os.fstat(fd).st_size == JOURNAL_AT + journal.SLOTS * journal.SLOT + LANDING
        assert j.recover() == []
        j.close()
    finally:
        os.close(fd)
