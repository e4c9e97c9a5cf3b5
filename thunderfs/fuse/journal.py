"""The requests a serving process has read and not answered yet, kept where its successor finds
them: a region of the session memfd (``state.py``), mapped shared.

Only where the kernel cannot send them again itself (no ``FUSE_NOTIFY_RESEND``: Linux before 6.9).
There a request read by a process that dies before answering would wait forever: the kernel keeps
it in the connection's processing list, under its unique, until an answer with that unique comes
on the same descriptor.  The next process holds that very descriptor (the keeper's or systemd's
store passes the open file, not a new one), so it can answer: it reads the journal, serves each
request again, and answers it.  A request the dead process had answered after all (killed between
its answer and clearing the slot) is unknown to the kernel by then: the second answer gets
``ENOENT`` and is dropped, and uniques are never reused on a connection.

One slot per request in progress (the session serves at most ``MAX_IN_FLIGHT``), written when the
request is read and cleared once it is answered.  A slot is its length (0: free), then the request
as the kernel sent it, cut at ``SLOT - 8`` bytes (a longer one can only be a write of some kind: it is answered EROFS
from its header, as it was going to be).
The length is written after the bytes, so a SIGKILL halfway leaves a free slot: that request, read
in the instant before the kill, is the one a crash can still lose.
"""

from __future__ import annotations

import mmap
import os
import struct

SLOT = 512
SLOTS = 1024  # the session's MAX_IN_FLIGHT
_LEN = struct.Struct("<I4x")
_UNIQUE = struct.Struct("<Q")  # at byte 8 of a request


class Journal:
    def __init__(self, fd: int, offset: int):
        """The region ``[offset, offset + SLOTS * SLOT)`` of ``fd`` (grown if the file is shorter:
        a memfd an older version made)."""
        end = offset + SLOTS * SLOT
        if os.fstat(fd).st_size < end:
            os.ftruncate(fd, end)
        self._map = mmap.mmap(fd, SLOTS * SLOT, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._free = list(range(SLOTS - 1, -1, -1))
        self._used = 0

    def recover(self) -> list[tuple[int, bytes]]:
        """What a previous process left unanswered, ``(slot, request)`` oldest first; those slots
        stay taken until ``remove``."""
        left = []
        for slot in range(SLOTS):
            (n,) = _LEN.unpack_from(self._map, slot * SLOT)
            if 0 < n <= SLOT - _LEN.size:
                left.append((slot, bytes(self._map[slot * SLOT + _LEN.size:slot * SLOT + _LEN.size + n])))
        taken = {slot for slot, _ in left}
        self._free = [s for s in self._free if s not in taken]
        self._used = len(taken)
        return sorted(left, key=lambda e: _UNIQUE.unpack_from(e[1], 8)[0] if len(e[1]) >= 16 else 0)

    def add(self, request: bytes) -> int:
        """Keep a request just read; its slot, for ``remove``."""
        slot = self._free.pop()  # never empty: the session serves at most SLOTS at once
        n = min(len(request), SLOT - _LEN.size)
        at = slot * SLOT
        self._map[at + _LEN.size:at + _LEN.size + n] = request[:n]
        _LEN.pack_into(self._map, at, n)  # last: a slot is whole or free
        self._used += 1
        return slot

    def remove(self, slot: int) -> None:
        """The request in ``slot`` was answered."""
        _LEN.pack_into(self._map, slot * SLOT, 0)
        self._free.append(slot)
        self._used -= 1

    @property
    def used(self) -> int:
        return self._used

    def close(self) -> None:
        self._map.close()
