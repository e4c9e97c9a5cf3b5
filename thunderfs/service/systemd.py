"""What the daemon tells systemd (or the keeper, which speaks the same protocol): readiness
(Type=notify), the descriptors to keep while the daemon restarts (the file descriptor store), and
log priorities journald understands.

All are a few lines of protocol (sd_notify(3), sd_listen_fds(3), sd-daemon(3)'s ``<N>``
prefixes), not worth a dependency on libsystemd; all do nothing when not run by systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


LISTEN_FDS_START = 3


def notify(state: str, fds: list[int] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1", "STOPPING=1") to systemd if it asked for it, with ``fds``
    attached; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            if fds:
                socket.send_fds(s, [state.encode()], fds)
            else:
                s.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state.splitlines()[0], exc)
        return False
    return True


def store_fds(named: dict[str, int]) -> bool:
    """Put descriptors in the service manager's store (``FileDescriptorStoreMax=``): it keeps them
    while this process restarts, and hands them to the next one (``listen_fds``).  False if there
    is no store: the manager says there is one with ``$FDSTORE`` (its size; systemd 254+ sets it,
    the unit sets it for older ones, the keeper sets it)."""
    try:
        size = int(os.environ.get("FDSTORE", "0"))
    except ValueError:
        size = 0
    if size < len(named):
        return False
    return all([notify(f"FDSTORE=1\nFDNAME={name}", [fd]) for name, fd in named.items()])


def listen_fds() -> dict[str, int]:
    """The descriptors the service manager passed to this process, by name (sd_listen_fds(3));
    taken once: the variables are removed so that no child takes them too."""
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not count or pid != str(os.getpid()):
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    out = {}
    for i, fd in enumerate(fds):
        os.set_inheritable(fd, False)
        out[labels[i] if i < len(labels) else f"fd{i}"] = fd
    return out


def under_journal() -> bool:
    """Whether stderr is journald's stream (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<priority>message``: journald files each line under its syslog priority (and adds the time)."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())
