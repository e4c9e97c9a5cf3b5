"""One FUSE connection served on trio: requests read from ``/dev/fuse``, one task each, answered
by the ``Operations``; notifications to the kernel.

A session can start on a connection another process served before it (a takeover): it does not
wait for INIT (the kernel sent it once, to the first process; what was settled is in the
``SessionState``), and it asks the kernel to send again every request the previous process read
but never answered (``FUSE_NOTIFY_RESEND``, Linux 6.9+).  An older kernel cannot: there every
request is kept in the session's journal (``journal.py``) from its reading to its answer, and a
new process starts serving what the journal holds before it reads anything new.

Stopping (``stop()``) stops reading requests at once (those not read yet wait in the kernel for
the next process).  The requests in progress are then, by what the kernel offered at INIT:
cancelled without an answer where it can resend them (``HAS_RESEND``: the next process gets them
again), else drained: answered here before ``serve`` returns, so that a planned restart on an
older kernel leaves no caller waiting.  A drain that outlasts ``DRAIN_LIMIT`` answers what is
left ``EINTR`` (a caller retries: qemu does), never nothing.

The session ends by itself when the kernel says the mount is gone, or that the connection was
aborted (``/sys/fs/fuse/connections/N/abort``: one log line, the mount is dead).  Whatever the
kernel sends, each request is answered once, with a reply or an errno: a malformed one is logged
(once per kind) and answered ``EIO``, an operation that fails unexpectedly ``EIO`` with its
traceback in the log; a FORGET that fails is logged and the session goes on.  At most
``MAX_IN_FLIGHT`` requests are served at once (the reading waits for one to end), and the reading
yields to the others after every request.
"""

from __future__ import annotations

import errno as E
import logging
import os
import struct

import trio

from thunderfs.fuse import kernel as k
from thunderfs.fuse import journal
from thunderfs.fuse.journal import Journal
from thunderfs.fuse.kernel import FuseError, Header, Op
from thunderfs.fuse.operations import Operations
from thunderfs.fuse.requests import HANDLERS
from thunderfs.fuse.state import JOURNAL_AT, SessionState

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = journal.SLOTS  # requests served at once; the kernel's own queue holds the rest
DRAIN_LIMIT = 60.0  # seconds a stop waits for requests in progress where the kernel cannot resend


class Session:
    def __init__(self, fd: int, ops: Operations, state: SessionState, *, max_pages: int = 256,
                 max_background: int = 64, passthrough: bool = False):
        self._fd = fd
        self._ops = ops
        self._state = state
        self._max_pages = max_pages
        self._max_background = max_background
        self._passthrough = passthrough  # asked for at INIT (a later process goes by what was agreed)
        self._cancel = trio.CancelScope()  # the whole session: gone, or stopped where requests resend
        self._reading = trio.CancelScope()  # the reading of requests: stopped
        self._stopping = False
        self._pending: dict[int, Header] = {}  # unique -> request in progress, not answered yet
        self._room = trio.lowlevel.ParkingLot()  # the reading waits here while MAX_IN_FLIGHT are served
        self._malformed_logged: set[str] = set()
        self.drained = self.answered_eintr = self.replayed = 0
        self._journal: Journal | None = None  # where the kernel cannot resend: set at INIT or takeover
        self.aborted = False
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

    @property
    def kernel_resends(self) -> bool:
        """Whether the kernel sends again, to the next process, what this one read but did not
        answer (it offered ``HAS_RESEND`` at INIT: Linux 6.9+)."""
        init = self._state.init
        return init is not None and bool(init.flags & k.HAS_RESEND)

    def stop(self) -> None:
        """Stop reading requests now; those in progress are cancelled unanswered where the kernel
        resends them, else answered first (``serve`` returns once they are)."""
        self._stopping = True
        self._reading.cancel()
        if self.kernel_resends:
            self._cancel.cancel()

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop()`` or the unmount (then ``unmounted`` is set)."""
        os.set_blocking(self._fd, False)
        with self._cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_invalidations)
                if self.takeover and self.kernel_resends:
                    self._resend()
                elif self.takeover:
                    self._journal = Journal(self._state.fd, JOURNAL_AT, self._read_size())
                task_status.started()
                async with trio.open_nursery() as requests:
                    if self._journal is not None and self.takeover:
                        self._replay(requests)
                    with self._reading:
                        await self._receive(requests)
                    if self._stopping:  # (where the kernel resends, cancelled with the session already)
                        in_progress = self._in_flight
                        with trio.move_on_after(DRAIN_LIMIT) as drain:
                            while self._in_flight:
                                await self._room.park()
                        if drain.cancelled_caught:
                            requests.cancel_scope.cancel()
                        log.info("stopped reading requests; the %d in progress were answered first (the kernel "
                                 "cannot resend them)", in_progress - self._in_flight)
                    else:  # the mount is gone: nobody waits for answers
                        requests.cancel_scope.cancel()
                if self._stopping and self._pending and not self.kernel_resends:  # past the drain's limit
                    log.warning("%d requests still in progress after %g s: answered EINTR (their callers retry)",
                                len(self._pending), DRAIN_LIMIT)
                    for unique in list(self._pending):
                        self._answer(unique, k.reply(unique, E.EINTR))
                        self.answered_eintr += 1
                nursery.cancel_scope.cancel()

    def _resend(self) -> None:
        try:
            os.writev(self._fd, k.notify(k.Notify.RESEND))
            self.resent = True
        except OSError as exc:
            # EINVAL: it offered HAS_RESEND at INIT, yet refuses.  Those requests wait on.
            log.error("took over the FUSE connection, but the kernel refused to resend the requests the "
                      "previous process left unanswered (%s): they stay unanswered", exc.strerror)

    def _replay(self, nursery: trio.Nursery) -> None:
        """Serve again what the previous process read and did not answer (its journal)."""
        for slot, data in self._journal.recover():
            try:
                header = Header.parse(data)
            except k.ProtocolError as exc:
                # Longer than a slot keeps: a write (this file system refuses those), else EIO;
                # answered either way, never served from half of it.
                if len(data) >= k.IN_HEADER.size:
                    _, opcode, unique, *_ = k.IN_HEADER.unpack_from(data)
                    self._write(k.reply(unique, E.EROFS if opcode in k.WRITES else E.EIO))
                    self.replayed += 1
                else:
                    self._malformed("journal entry", str(exc))
                if slot is not None:
                    self._journal.remove(slot)
                continue
            self._in_flight += 1
            self.replayed += 1
            nursery.start_soon(self._handle, header, data, slot)
        if self.replayed:
            log.warning("answering %d requests the previous process had read and not answered (this kernel "
                        "cannot resend them; they were kept in the session's journal)", self.replayed)

    async def _receive(self, nursery: trio.Nursery) -> None:
        plain = bytearray(self._read_size())
        fd = self._fd
        while True:
            # Where the kernel cannot resend, it writes each request into the journal itself.
            buf = self._journal.landing if self._journal is not None else plain
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
                if exc.errno == E.ECONNABORTED:
                    log.error("the FUSE connection was aborted (fusectl's abort): the mount is dead; "
                              "unmount it and mount again")
                    self.unmounted = self.aborted = True
                    return
                raise
            if n == 0:  # never from /dev/fuse; the other end of a socket closed
                self.unmounted = True
                return
            data = bytes(buf[:n])
            try:
                header = Header.parse(data)
            except k.ProtocolError as exc:
                if self._journal is not None:
                    self._journal.clear_landing()  # answered EIO below: nothing to keep
                self._malformed("request", str(exc))
                if len(data) >= 16:  # its unique is there: answered, so that nobody waits on it
                    unique = struct.unpack_from("<Q", data, 8)[0]
                    self._write(k.reply(unique, E.EIO))
                continue
            keep = self._journal is not None and journal.kept(header.opcode)
            if self._journal is not None and not keep:
                self._journal.clear_landing()  # INIT, FORGET, INTERRUPT: no answer to wait for later
            self._requests += 1
            if header.opcode == Op.INIT:
                self._init(header, memoryview(data)[k.IN_HEADER.size:])
                continue
            while self._in_flight >= MAX_IN_FLIGHT:
                await self._room.park()
            self._in_flight += 1  # counted from here: the cap holds before the tasks start
            # Kept until answered where the kernel cannot resend (from the landing zone, which a kill
            # before this line leaves holding it, to a slot of its own).
            slot = self._journal.keep(n) if keep else None
            nursery.start_soon(self._handle, header, data, slot)
            await trio.lowlevel.checkpoint()  # the requests just read, and everyone else, run too

    def _read_size(self) -> int:
        """The read buffer the kernel asks for: the largest request it may send (a write's)."""
        init = self._state.init
        return max(k.MIN_READ_BUFFER, (init.max_write if init else k.MAX_WRITE) + 64 * 1024)

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
        if not self.kernel_resends and self._journal is None:
            self._journal = Journal(self._state.fd, JOURNAL_AT, self._read_size())
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
            # ENODEV: the mount is gone, ECONNABORTED: the connection aborted (the reading notices).
            if exc.errno not in (E.ENOENT, E.ENODEV, E.ECONNABORTED):
                log.error("answering the kernel failed: %s", exc)

    def _answer(self, unique: int, pieces: list) -> None:
        """A request's one answer (a second is never written)."""
        if self._pending.pop(unique, None) is not None:
            self._write(pieces)

    def _malformed(self, what: str, why: str) -> None:
        if what not in self._malformed_logged:
            self._malformed_logged.add(what)
            log.error("the kernel sent a malformed %s, answered EIO (later ones of its kind are not logged): %s",
                      what, why)

    async def _handle(self, h: Header, data: bytes, slot: int | None = None) -> None:
        body = memoryview(data)[k.IN_HEADER.size:]
        try:
            try:
                op = Op(h.opcode)
            except ValueError:
                self._write(k.reply(h.unique, E.ENOSYS))
                return
            if op in k.NO_REPLY:
                try:
                    self._no_reply(op, h, body)
                except struct.error as exc:  # no answer to give; the session goes on
                    self._malformed(op.name, repr(exc))
                except Exception:
                    log.exception("%s failed (the session goes on)", op.name)
                return
            handler = HANDLERS.get(op)
            self._pending[h.unique] = h
            try:
                if op in k.WRITES:
                    raise FuseError(E.EROFS)
                if handler is None:
                    raise FuseError(E.ENOSYS)
                pieces = await handler(self._ops, h, body)
            except FuseError as exc:
                self._answer(h.unique, k.reply(h.unique, exc.errno))
            except (struct.error, k.ProtocolError) as exc:  # a body shorter than its kind's
                self._malformed(op.name, repr(exc))
                self._answer(h.unique, k.reply(h.unique, E.EIO))
            except Exception:
                # Operations answers every failure it expects with an errno; this is a bug.
                log.exception("%s failed", op.name)
                self._answer(h.unique, k.reply(h.unique, E.EIO))
            else:
                self._answer(h.unique, k.reply(h.unique, 0, *pieces))
                if self._stopping:
                    self.drained += 1
        finally:
            if slot is not None:
                self._journal.remove(slot)
            self._in_flight -= 1
            self._room.unpark_all()

    def _no_reply(self, op: Op, h: Header, body) -> None:
        if op == Op.FORGET:
            (n,) = k.FORGET_IN.unpack_from(body)
            self._ops.forget([(h.nodeid, n)])
        elif op == Op.BATCH_FORGET:
            count, _ = k.BATCH_FORGET_IN.unpack_from(body)
            if k.BATCH_FORGET_IN.size + count * k.FORGET_ONE.size > len(body):
                raise struct.error(f"BATCH_FORGET of {count} in {len(body)} bytes")
            self._ops.forget([k.FORGET_ONE.unpack_from(body, k.BATCH_FORGET_IN.size + i * k.FORGET_ONE.size)
                              for i in range(count)])
        # INTERRUPT: ignored; the request it names is answered when it is done.

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
            # Abandoned when the session ends: one blocked on a lock a request in progress held
            # must not keep ``serve`` from returning (and the next process from starting).
            await trio.to_thread.run_sync(send, abandon_on_cancel=True)

    def statistics(self) -> dict:
        return {"requests": self._requests, "in_flight": self._in_flight, "takeover": self.takeover,
                "resent": self.resent, "kernel_resends": self.kernel_resends, "drained": self.drained,
                "answered_eintr": self.answered_eintr, "aborted": self.aborted, "replayed": self.replayed,
                "journaled": self._journal.used if self._journal is not None else None}
