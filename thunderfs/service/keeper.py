"""The keeper: where there is no systemd (a container, a shell), the smallest service manager that
keeps a mount alive across the death of the process serving it.

It speaks the part of systemd's protocol the daemon uses, so the daemon has one way to run: the
keeper gives the serving process a ``NOTIFY_SOCKET``; the daemon sends ``READY=1``, and, once it has
mounted, its ``/dev/fuse`` descriptor and session memfd with ``FDSTORE=1``; when the process dies,
however it dies, the keeper starts it again at once with those descriptors (``LISTEN_FDS``), and
the new process takes the connection over.  The mount never goes away in between: the kernel
keeps a connection while any process holds its descriptor, and the keeper does.

The keeper ends when the serving process exits 0 (the mount was unmounted), or on SIGTERM/SIGINT:
then it unmounts (``on_stop``), waits for the serving process, and exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

from thunderfs.service.systemd import LISTEN_FDS_START

log = logging.getLogger(__name__)

RESTART_EXIT = 75  # the serving process asks to be replaced (``thunderfs restart``, SIGTERM)
BACKOFF = (0.0, 0.2, 1.0, 2.0, 5.0, 10.0)
STABLE = 10.0  # a process that lived this long before dying restarts at once
STOP_GRACE = 10.0
GIVE_UP = 60.0  # seconds of serving processes failing to start before the keeper unmounts


class Keeper:
    def __init__(self, argv: list[str], *, on_ready: Callable[[str], None], on_stop: Callable[[], None]):
        """``argv``: the serving process's command; ``on_ready("READY")`` once it serves, or
        ``on_ready("ERROR why")`` if the first one fails; ``on_stop()`` unmounts."""
        self._argv = argv
        self._on_ready = on_ready
        self._on_stop = on_stop
        self._stored: dict[str, int] = {}
        self._ready = False
        self._served = False
        self._status = ""
        self._stopping = False
        self.pid: int | None = None

    def run(self) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        address = f"thunderfs-keeper-{os.getpid()}"
        sock.bind("\0" + address)
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)
        failures, failing_since = 0, None
        try:
            while True:
                started = time.monotonic()
                self._served = False
                self.pid = self._spawn("@" + address)
                status = self._wait(sock, wake_r)
                code = os.waitstatus_to_exitcode(status)
                lived = time.monotonic() - started
                if code == 0 or self._stopping:
                    log.info("the serving process %d exited (%s); the keeper ends", self.pid, code)
                    return 0 if code == 0 or self._stopping else 1
                if not self._ready:
                    # The first start failed: a start-up error, told to whoever waits; a mount it
                    # made and stored is undone (nobody served it yet).
                    why = self._status.removeprefix("error: ") if self._status.startswith("error: ") \
                        else f"the daemon exited ({_describe(code)}) before it served"
                    if self._stored:
                        self._on_stop_now()
                    self._on_ready(f"ERROR {why}")
                    log.error("%s", why)
                    return 1
                # One that served (said READY) restarts at once; one that keeps failing to start
                # waits longer each time, and past GIVE_UP seconds of failing the keeper gives up:
                # reads then fail (the mount is detached) instead of waiting for ever.
                if self._served or code == RESTART_EXIT or lived > STABLE:
                    failures, failing_since = 0, None
                else:
                    failures += 1
                    failing_since = failing_since or started
                    if time.monotonic() - failing_since > GIVE_UP:
                        log.error("the serving process keeps failing to start (%s; %s): unmounting",
                                  _describe(code), self._status or "see above")
                        self._on_stop_now()
                        return 1
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                log.warning("the serving process %d %s after %.1fs; starting a new one%s", self.pid,
                            _describe(code), lived, f" in {delay:g}s" if delay else "")
                if delay and self._sleep(delay, wake_r):
                    self._on_stop_now()
                    return 0
        finally:
            signal.set_wakeup_fd(-1)
            for fd in self._stored.values():
                os.close(fd)
            sock.close()

    def _signalled(self, signum, _frame) -> None:
        self._stopping = True

    def _on_stop_now(self) -> None:
        try:
            self._on_stop()
        except Exception as exc:  # the mount may be gone already
            log.warning("unmount: %s", exc)

    def _spawn(self, notify_address: str) -> int:
        fds = list(self._stored.values())
        env = {**os.environ, "NOTIFY_SOCKET": notify_address, "FDSTORE": "4",
               "THUNDERFS_KEEPER_PID": str(os.getpid())}
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(self._stored))
        pid = os.fork()
        if pid == 0:  # the child: descriptors to 3, 4, ..., then exec
            try:
                # Out of the way first: a copy must not land on 3, 4, ... before it is moved there.
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, LISTEN_FDS_START + i)
                    os.close(fd)
                env["LISTEN_PID"] = str(os.getpid())
                os.execve(self._argv[0], self._argv, env)
            finally:
                os._exit(127)
        log.info("started serving process %d%s", pid, " (taking the mount over)" if fds else "")
        return pid

    def _wait(self, sock: socket.socket, wake: socket.socket) -> int:
        """Serve the process's notifications until it exits; its wait status.  Once signalled to
        stop: unmount (the process sees the unmount and exits), and if it is still there after
        ``STOP_GRACE`` seconds, SIGTERM it."""
        pidfd = os.pidfd_open(self.pid)
        deadline = None
        unmounted = False
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([sock, pidfd, wake], [], [], timeout)
                if not ready and deadline is not None:
                    log.warning("serving process %d still there %gs after the unmount: SIGTERM",
                                self.pid, STOP_GRACE)
                    os.kill(self.pid, signal.SIGTERM)
                    deadline = None
                if wake in ready:
                    wake.recv(64)
                    if self._stopping and not unmounted:
                        log.info("signalled: unmounting")
                        self._on_stop_now()
                        unmounted = True
                        deadline = time.monotonic() + STOP_GRACE
                if sock in ready:
                    self._message(sock)
                if pidfd in ready:
                    while sock in select.select([sock], [], [], 0)[0]:
                        self._message(sock)
                    _, status = os.waitpid(self.pid, 0)
                    return status
        finally:
            os.close(pidfd)

    def _sleep(self, seconds: float, wake: socket.socket) -> bool:
        """Wait, unless signalled to stop (True)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([wake], [], [], left)[0]:
                wake.recv(64)
                if self._stopping:
                    return True
        return False

    def _message(self, sock: socket.socket) -> None:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 16)
        for fd in fds:
            os.set_inheritable(fd, False)  # a child gets them at 3, 4, ... only
        fields = dict(line.split("=", 1) for line in msg.decode(errors="replace").splitlines() if "=" in line)
        if fields.get("FDSTORE") == "1" and fds:
            name = fields.get("FDNAME", f"fd{len(self._stored)}")
            old = self._stored.pop(name, None)
            if old is not None:
                os.close(old)
            self._stored[name] = fds[0]
            for extra in fds[1:]:
                os.close(extra)
            return
        for fd in fds:
            os.close(fd)
        if "STATUS" in fields:
            self._status = fields["STATUS"]
        if fields.get("READY") == "1":
            self._served = True
            if not self._ready:
                self._ready = True
                self._on_ready("READY")


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == RESTART_EXIT:
        return "handed over"
    return f"exited with status {code}"


def serving_command(argv: list[str]) -> list[str]:
    """The serving process's command: this program again, with the same arguments."""
    return [sys.executable, "-m", "thunderfs", *argv]
