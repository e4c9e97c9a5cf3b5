"""FUSE passthrough: image files the kernel reads from the cache's data file itself.

An open of a complete, just checked image may be answered with ``FOPEN_PASSTHROUGH`` and a
*backing id*: the kernel then reads that file's bytes from the data file registered under the id
(``FUSE_DEV_IOC_BACKING_OPEN``), with no request to the daemon at all.  The kernel's rules, which
this module keeps: every open of an inode with a passthrough open must be passthrough, under the
same backing file; no passthrough open of an inode with cached (page cache) opens (both fail the
opener with EIO).  So the first open of an inode decides until every open of it is closed.

Per inode: the backing id and how many opens of each kind, kept in the ``SessionState`` (the
backing ids belong to the connection, so they outlive this process: the next one must go on
using and finally closing them).  A count is saved before the answer is written, with the
request it counts (its unique): a process killed between the two leaves the request to the
kernel's resend, and the next process, finding it counted, answers it without counting it again
(an open counted twice would keep its backing file and its pin for good; a release counted twice
would let the data file change under an open file).  Keeping the data file whole while the kernel reads it is the
caller's part (``Readers.seal``: pinned, never punched).
"""

from __future__ import annotations

import fcntl
import logging
import os

from thunderfs.fuse import kernel as k
from thunderfs.fuse.state import SessionState

log = logging.getLogger(__name__)

COUNTED_KEPT = 256  # requests remembered as counted (only the last few can be resent)


class BackingFiles:
    def __init__(self, fd: int, state: SessionState, *, seal_new: bool = True):
        """``seal_new`` False: passthrough was agreed at INIT (by a process run with it) but is off
        now: inodes the kernel reads in passthrough go on so until their last close (anything
        else fails their opens), no other is opened so."""
        self._fd = fd
        self._state = state
        self.seal_new = seal_new
        self._broken: str | None = None  # why the kernel refused a backing file: passthrough off
        self._stats = dict.fromkeys(("passthrough_opens", "cached_opens", "backing_opened", "backing_closed",
                                     "resent_not_counted"), 0)

    def usable(self) -> bool:
        """Passthrough was agreed at INIT: inodes may be (or already are) read in passthrough."""
        init = self._state.init
        return init is not None and init.passthrough

    def sealing(self) -> bool:
        """New inodes may be opened in passthrough (on, and the kernel never refused a file)."""
        return self.seal_new and self._broken is None and self.usable()

    def mode(self, inode: int) -> str | None:
        """What the open files of ``inode`` are: "passthrough", "cached", or None (none open)."""
        rec = self._state.backing.get(inode)
        if rec is None:
            return None
        return "passthrough" if rec["pt"] else "cached" if rec["cached"] else None

    def _counted(self, request: int | None) -> bool:
        """Whether ``request`` (a unique, the resend bit off) was counted already (by a process
        killed before it answered); else it is, from the next save on."""
        if request is None:
            return False
        if request in self._state.counted:
            self._stats["resent_not_counted"] += 1
            return True
        self._state.counted.append(request)
        del self._state.counted[:-COUNTED_KEPT]
        return False

    def open_passthrough(self, inode: int, path: str | None, request: int | None = None) -> int:
        """One more passthrough open of ``inode``: its backing id, registered now from ``path``
        if it has none.  0 if the kernel refuses (then passthrough stays off, logged once).
        ``request``: the OPEN's unique (counted once, whatever the resends)."""
        rec = self._state.backing.get(inode)
        if rec is not None and rec["id"] and request is not None and request in self._state.counted:
            self._stats["resent_not_counted"] += 1
            return rec["id"]
        rec = self._state.backing.setdefault(inode, {"id": 0, "pt": 0, "cached": 0})
        if not rec["id"]:
            assert path is not None and rec["cached"] == 0
            try:
                rec["id"] = self._register(path)
            except OSError as exc:
                self._broken = f"{exc.strerror or exc}"
                log.warning("the kernel refused a backing file (%s): serving every image through the daemon",
                            self._broken)
                if not rec["pt"] and not rec["cached"]:
                    del self._state.backing[inode]
                return 0
            self._stats["backing_opened"] += 1
        if not self._counted(request):
            rec["pt"] += 1
            self._stats["passthrough_opens"] += 1
        self._state.save()
        return rec["id"]

    def open_cached(self, inode: int, request: int | None = None) -> None:
        rec = self._state.backing.setdefault(inode, {"id": 0, "pt": 0, "cached": 0})
        if self._counted(request):
            return
        rec["cached"] += 1
        self._stats["cached_opens"] += 1
        self._state.save()

    def release(self, inode: int, passthrough: bool, request: int | None = None) -> bool:
        """An open of ``inode`` closed; True when it was the last passthrough one (the backing
        file is let go, and the caller may let the data file change again).  ``request``: the
        RELEASE's unique (counted once)."""
        rec = self._state.backing.get(inode)
        if rec is None or self._counted(request):
            return False
        key = "pt" if passthrough else "cached"
        rec[key] = max(0, rec[key] - 1)
        last = passthrough and rec["pt"] == 0 and rec["id"] != 0
        if last:
            try:
                self._unregister(rec["id"])
            except OSError as exc:
                log.warning("closing backing file %d: %s", rec["id"], exc)
            rec["id"] = 0
            self._stats["backing_closed"] += 1
        if not rec["pt"] and not rec["cached"]:
            del self._state.backing[inode]
        self._state.save()
        return last

    def sealed_inodes(self) -> list[int]:
        """Inodes with passthrough opens (a previous process's too): their data files stay whole."""
        return [ino for ino, rec in self._state.backing.items() if rec["pt"]]

    def _register(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(self._fd, k.DEV_IOC_BACKING_OPEN, bytearray(k.BACKING_MAP.pack(fd, 0, 0)), True)
        finally:
            os.close(fd)

    def _unregister(self, backing_id: int) -> None:
        fcntl.ioctl(self._fd, k.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")), True)

    def statistics(self) -> dict:
        return {**self._stats, "passthrough_inodes": len(self.sealed_inodes()),
                "passthrough": "off: " + self._broken if self._broken else "on" if self.sealing()
                else "not agreed" if not self.usable() else "off"}
