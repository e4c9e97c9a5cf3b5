"""What one serving process hands to the next on the same FUSE connection, in a memfd.

The memfd lives as long as the connection's descriptor (both sit in the keeper's or systemd's
descriptor store), so a process killed with SIGKILL leaves it behind intact.  It holds what
INIT settled, the images the kernel still holds inodes of although Glance no longer lists
them, and the backing files of passthrough opens with how many opens of each kind each inode
has and which requests were counted (``passthrough.py``), and, on a kernel that cannot resend,
the requests read and not yet answered (``journal.py``); everything else the next process derives
again.

Written rarely (at INIT; when such an image appears or is forgotten; at an open or release of
an image while passthrough is on), into two slots in turn,
each with a sequence number and a CRC: a write cut short by SIGKILL leaves the other slot whole.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

from thunderfs.fuse.kernel import InitParams

SLOT = 1 << 20
JOURNAL_AT = 2 * SLOT  # where the requests in progress are kept (``journal.py``), after the two slots
_HEAD = struct.Struct("<QII")  # sequence, length, crc32


class SessionState:
    def __init__(self, fd: int):
        self.fd = fd
        self.init: InitParams | None = None
        self.held: dict[int, dict] = {}  # inode -> image record
        self.backing: dict[int, dict] = {}  # inode -> {"id": backing id or 0, "pt": opens, "cached": opens}
        # The OPENs and RELEASEs (their uniques) already counted in ``backing``, the latest last: a
        # request the kernel resends after a kill between the count and the answer is not counted twice.
        self.counted: list[int] = []
        self._seq = 0

    @classmethod
    def create(cls) -> "SessionState":
        fd = os.memfd_create("thunderfs-session", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * SLOT)
        return cls(fd)

    @classmethod
    def load(cls, fd: int) -> "SessionState":
        """The newest whole slot; an empty or unreadable memfd gives an empty state."""
        state = cls(fd)
        best = None
        for slot in (0, 1):
            head = os.pread(fd, _HEAD.size, slot * SLOT)
            if len(head) < _HEAD.size:
                continue
            seq, length, crc = _HEAD.unpack(head)
            if not seq or length > SLOT - _HEAD.size:
                continue
            body = os.pread(fd, length, slot * SLOT + _HEAD.size)
            if zlib.crc32(body) != crc:
                continue
            if best is None or seq > best[0]:
                best = (seq, body)
        if best is not None:
            record = json.loads(best[1])
            state._seq = best[0]
            state.init = InitParams.from_record(record["init"]) if record.get("init") else None
            state.held = {int(k): v for k, v in record.get("held", {}).items()}
            state.backing = {int(k): v for k, v in record.get("backing", {}).items()}
            state.counted = [int(u) for u in record.get("counted", [])]
        return state

    def save(self) -> None:
        body = json.dumps({"init": self.init.to_record() if self.init else None,
                           "held": {str(k): v for k, v in self.held.items()},
                           "backing": {str(k): v for k, v in self.backing.items()},
                           "counted": self.counted}).encode()
        if len(body) > SLOT - _HEAD.size:
            raise ValueError("session state too large")
        self._seq += 1
        os.pwrite(self.fd, _HEAD.pack(self._seq, len(body), zlib.crc32(body)) + body, (self._seq % 2) * SLOT)
