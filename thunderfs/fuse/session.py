"""One FUSE connection served on trio: requests read from ``/dev/fuse``, one task each, answered
by the ``Operations``; notifications to the kernel.

A session can start on a connection another process served before it (a takeover): it does not
wait for INIT (the kernel sent it once, to the first process; what was settled is in the
``SessionState``), and it asks the kernel to send again every request the previous process read
but never answered (``FUSE_NOTIFY_RESEND``, Linux 6.9+).  On an older kernel those requests are
lost: their callers wait until the connection is aborted; the requests after them are served.

Stopping (``stop()``) cancels the requests in progress without an answer: the next process on the
connection gets them again.  The session ends by itself when the kernel says the mount is gone.
"""

from __future__ import annotations

import errno as E
import logging
import os
from collections.abc import Callable

import trio

from thunderfs.fuse import kernel as k
from thunderfs.fuse.kernel import FuseError, Header, Op
from thunderfs.fuse.operations import Operations, SetTimes
from thunderfs.fuse.state import SessionState

log = logging.getLogger(__name__)


class Session:
    def __init__(self, fd: int, ops: Operations, state: SessionState, *, max_pages: int = 256,
                 max_background: int = 64, passthrough: bool = False):
        self._fd = fd
        self._ops = ops
        self._state = state
        self._max_pages = max_pages
        self._max_background = max_background
        self._passthrough = passthrough  # asked for at INIT (a later process goes by what was agreed)
        self._cancel = trio.CancelScope()
        self._inval_send, self._inval_recv = trio.open_memory_channel[tuple[list, str]](1000)
        self.unmounted = False
        self.resent = False
        self._requests = 0
        self._in_flight = 0
        self._initialized = trio.Event()
        # Whether this session starts on a connection another process served (INIT is done).
        self.takeover = state.init is not None
        if self.takeover:
            self._initialized.set()
        ops.invalidate_entry = self.invalidate_entry_nowait
        ops.invalidate_inode = self.invalidate_inode_nowait

    async def wait_initialized(self) -> None:
        await self._initialized.wait()

    def stop(self) -> None:
        """Stop reading requests; those in progress stay unanswered (the next process gets them)."""
        self._cancel.cancel()

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop()`` or the unmount (then ``unmounted`` is set)."""
        os.set_blocking(self._fd, False)
        with self._cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_invalidations)
                if self.takeover:
                    self._resend()
                task_status.started()
                await self._receive(nursery)
                nursery.cancel_scope.cancel()

    def _resend(self) -> None:
        try:
            os.writev(self._fd, k.notify(k.Notify.RESEND))
            self.resent = True
        except OSError as exc:
            # EINVAL: a kernel older than 6.9.  The requests the previous process had read wait on.
            log.warning("took over the FUSE connection, but the kernel cannot resend the requests the "
                        "previous process left unanswered (%s): they stay unanswered", exc.strerror)

    async def _receive(self, nursery: trio.Nursery) -> None:
        init = self._state.init
        size = max(k.MIN_READ_BUFFER, (init.max_write if init else k.MAX_WRITE) + 64 * 1024)
        buf = bytearray(size)
        fd = self._fd
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:
                if exc.errno in (E.EINTR, E.ENOENT):  # ENOENT: interrupted before it was read
                    continue
                if exc.errno == E.ENODEV:  # unmounted
                    self.unmounted = True
                    return
                raise
            if n == 0:  # never from /dev/fuse; the other end of a socket closed
                self.unmounted = True
                return
            data = bytes(buf[:n])
            try:
                header = Header.parse(data)
            except k.ProtocolError as exc:
                log.error("ignored a request from the kernel: %s", exc)
                continue
            self._requests += 1
            if header.opcode == Op.INIT:
                self._init(header, memoryview(data)[k.IN_HEADER.size:])
                continue
            nursery.start_soon(self._handle, header, data)

    def _init(self, h: Header, body) -> None:
        try:
            params, out = k.negotiate(body, max_pages=self._max_pages, max_background=self._max_background,
                                      passthrough=self._passthrough)
        except k.ProtocolError as exc:
            log.error("cannot start the FUSE session: %s", exc)
            self._write(k.reply(h.unique, E.EPROTO))
            return
        if self._state.init is None:
            # Saved before the answer: a process that dies in between leaves it for the next one.
            self._state.init = params
            self._state.save()
        self._write(k.reply(h.unique, 0, out))
        self._initialized.set()
        log.debug("FUSE %d.%d, flags %#x, max_pages %d", k.KERNEL_MAJOR, params.minor, params.flags,
                  params.max_pages)
        if self._passthrough and not params.passthrough:
            log.warning("the kernel does not offer FUSE passthrough (Linux 6.9+): every read goes through the daemon")

    def _write(self, pieces: list) -> None:
        try:
            os.writev(self._fd, pieces)
        except OSError as exc:
            # ENOENT: the request was interrupted or aborted and nobody waits for the answer;
            # ENODEV: the mount is gone (the reader notices).
            if exc.errno not in (E.ENOENT, E.ENODEV):
                log.error("answering the kernel failed: %s", exc)

    async def _handle(self, h: Header, data: bytes) -> None:
        body = memoryview(data)[k.IN_HEADER.size:]
        self._in_flight += 1
        try:
            try:
                op = Op(h.opcode)
            except ValueError:
                self._write(k.reply(h.unique, E.ENOSYS))
                return
            if op in k.NO_REPLY:
                self._no_reply(op, h, body)
                return
            handler: Callable | None = self._handlers.get(op)
            try:
                if op in k.WRITES:
                    raise FuseError(E.EROFS)
                if handler is None:
                    raise FuseError(E.ENOSYS)
                pieces = await handler(self, h, body)
            except FuseError as exc:
                self._write(k.reply(h.unique, exc.errno))
            except Exception:
                # Operations answers every failure it expects with an errno; this is a bug.
                log.exception("%s failed", op.name)
                self._write(k.reply(h.unique, E.EIO))
            else:
                self._write(k.reply(h.unique, 0, *pieces))
        finally:
            self._in_flight -= 1

    def _no_reply(self, op: Op, h: Header, body) -> None:
        if op == Op.FORGET:
            (n,) = k.FORGET_IN.unpack_from(body)
            self._ops.forget([(h.nodeid, n)])
        elif op == Op.BATCH_FORGET:
            count, _ = k.BATCH_FORGET_IN.unpack_from(body)
            self._ops.forget([k.FORGET_ONE.unpack_from(body, k.BATCH_FORGET_IN.size + i * k.FORGET_ONE.size)
                              for i in range(count)])
        # INTERRUPT: ignored; the request it names is answered when it is done.

    # --- one handler per request -------------------------------------------------------------

    async def _lookup(self, h, body):
        return [k.entry_out(await self._ops.lookup(h.nodeid, k.name_of(body)))]

    async def _getattr(self, h, body):
        entry = self._ops.getattr(h.nodeid)
        return [k.attr_out(entry.attr, entry.attr_timeout)]

    async def _setattr(self, h, body):
        (valid, _, _fh, _size, _lo, atime, mtime, _c, atimensec, mtimensec, *_rest) = k.SETATTR_IN.unpack_from(body)
        changes = SetTimes(
            other=bool(valid & (k.FATTR_MODE | k.FATTR_UID | k.FATTR_GID | k.FATTR_SIZE)),
            atime_ns=None if not valid & k.FATTR_ATIME else -1 if valid & k.FATTR_ATIME_NOW
            else atime * 10**9 + atimensec,
            mtime_ns=None if not valid & k.FATTR_MTIME else -1 if valid & k.FATTR_MTIME_NOW
            else mtime * 10**9 + mtimensec)
        entry = self._ops.setattr(h.nodeid, changes)
        return [k.attr_out(entry.attr, entry.attr_timeout)]

    async def _open(self, h, body):
        flags, _ = k.OPEN_IN.unpack_from(body)
        fh, backing_id = await self._ops.open(h.nodeid, flags)
        # A read-only file has nothing to flush: no FLUSH on every close (a close while no
        # process serves the connection would wait for the next one).
        if backing_id:  # the kernel reads the backing file (no page cache of ours: its rule)
            return [k.open_out(fh, k.FOPEN_PASSTHROUGH | k.FOPEN_NOFLUSH, backing_id)]
        # Images never change under an inode: the kernel keeps its page cache across opens.
        return [k.open_out(fh, k.FOPEN_KEEP_CACHE | k.FOPEN_NOFLUSH)]

    async def _read(self, h, body):
        fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        return [await self._ops.read(h.nodeid, fh, offset, size)]

    async def _release(self, h, body):
        fh, *_ = k.RELEASE_IN.unpack_from(body)
        self._ops.release(h.nodeid, fh)
        return []

    async def _opendir(self, h, body):
        return [k.open_out(await self._ops.opendir(h.nodeid), 0)]

    async def _readdir(self, h, body):
        _fh, offset, size, *_ = k.READ_IN.unpack_from(body)
        out, used = [], 0
        for name, attr, next_offset in self._ops.readdir(h.nodeid, offset):
            entry = k.dirent(attr.ino, next_offset, name, attr.mode)
            if used + len(entry) > size:
                break
            out.append(entry)
            used += len(entry)
        return out

    async def _empty(self, h, body):
        return []

    async def _statfs(self, h, body):
        blocks, files = self._ops.statfs()
        return [k.statfs_out(blocks, files)]

    async def _getxattr(self, h, body):
        size, _ = k.GETXATTR_IN.unpack_from(body)
        value = self._ops.getxattr(h.nodeid, k.name_of(body[k.GETXATTR_IN.size:]))
        return self._sized(value, size)

    async def _listxattr(self, h, body):
        size, _ = k.GETXATTR_IN.unpack_from(body)
        return self._sized(b"".join(n + b"\0" for n in self._ops.listxattr(h.nodeid)), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> list:
        if size == 0:
            return [k.GETXATTR_OUT.pack(len(value), 0)]
        if len(value) > size:
            raise FuseError(E.ERANGE)
        return [value]

    _handlers = {
        Op.LOOKUP: _lookup, Op.GETATTR: _getattr, Op.SETATTR: _setattr, Op.OPEN: _open, Op.READ: _read,
        Op.RELEASE: _release, Op.FLUSH: _empty, Op.OPENDIR: _opendir, Op.READDIR: _readdir,
        Op.RELEASEDIR: _empty, Op.STATFS: _statfs, Op.GETXATTR: _getxattr, Op.LISTXATTR: _listxattr,
        Op.DESTROY: _empty, Op.FSYNC: _empty, Op.FSYNCDIR: _empty,
    }

    # --- notifications -----------------------------------------------------------------------

    def invalidate_entry_nowait(self, parent: int, name: bytes) -> None:
        """Make the kernel forget a name.  Sent from a thread: the kernel may need a lock that a
        request this very session is serving holds."""
        self._invalidate(k.inval_entry(parent, name), repr(name))

    def invalidate_inode_nowait(self, ino: int) -> None:
        """Make the kernel drop an inode's cached pages (its bytes changed)."""
        self._invalidate(k.inval_inode(ino), f"inode {ino}")

    def _invalidate(self, message: list, what: str) -> None:
        try:
            self._inval_send.send_nowait((message, what))
        except trio.WouldBlock:
            log.warning("too many pending invalidations; the kernel forgets %s when its cache times out", what)

    async def _send_invalidations(self) -> None:
        async for message, what in self._inval_recv:
            def send() -> None:
                try:
                    os.writev(self._fd, message)
                except OSError as exc:
                    if exc.errno not in (E.ENOENT, E.ENODEV):
                        log.debug("invalidate %s: %s", what, exc)
            await trio.to_thread.run_sync(send)

    def statistics(self) -> dict:
        return {"requests": self._requests, "in_flight": self._in_flight, "takeover": self.takeover,
                "resent": self.resent}
