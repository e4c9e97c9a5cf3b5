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

The kernel writes each request straight into the journal: the session reads ``/dev/fuse`` into
the journal's *landing* zone (as large as the largest request), so a request is in shared memory
the moment the read returns, whatever happens next; no instant remains in which a kill loses it.
The session then moves it into a slot of its own and clears the landing zone before it reads
again (a request that gets no answer, INIT or FORGET, is only cleared).  One slot per request in
progress (the session serves at most ``MAX_IN_FLIGHT``), cleared once the request is answered.
A slot is its length (0: free), then the request as the kernel sent it, cut at ``SLOT - 8``
bytes (a longer one can only be a write of some kind: it is answered EROFS from its header, as it
was going to be).  The length is written after the bytes, so a slot is whole or free; a kill
between the move and the clearing leaves the request in both, and it is served once.
"""

from __future__ import annotations

import mmap
import os
import struct

from thunderfs.fuse.kernel import IN_HEADER, NO_REPLY, Op

SLOT = 512
SLOTS = 1024  # the session's MAX_IN_FLIGHT
_LEN = struct.Struct("<I4x")


def kept(opcode: int) -> bool:
    """Whether a journal keeps a request of this kind: one whose caller waits for an answer the
    session gives later (not INIT, answered as it is read, nor FORGET or INTERRUPT)."""
    return opcode != Op.INIT and opcode not in NO_REPLY


class Journal:
    def __init__(self, fd: int, offset: int, landing: int):
        """The region of ``fd`` from ``offset`` on: the slots, then a landing zone of ``landing``
        bytes (the session's read buffer); the file is grown if it is shorter (a memfd an older
        version made)."""
        self._landing_at = SLOTS * SLOT
        size = self._landing_at + -(-landing // mmap.PAGESIZE) * mmap.PAGESIZE
        if os.fstat(fd).st_size < offset + size:
            os.ftruncate(fd, offset + size)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.landing = memoryview(self._map)[self._landing_at:]  # where the session reads requests into
        self._free = list(range(SLOTS - 1, -1, -1))

    def recover(self) -> list[tuple[int | None, bytes]]:
        """What a previous process left unanswered, ``(slot, request)`` oldest first (one it had
        read and not moved yet, from the landing zone, into a slot now: None if every slot is
        taken, as when it died serving ``SLOTS`` at once); those slots stay taken until ``remove``."""
        left = []
        for slot in range(SLOTS):
            (n,) = _LEN.unpack_from(self._map, slot * SLOT)
            if 0 < n <= SLOT - _LEN.size:
                left.append((slot, bytes(self._map[slot * SLOT + _LEN.size:slot * SLOT + _LEN.size + n])))
        taken = {slot for slot, _ in left}
        self._free = [s for s in self._free if s not in taken]
        landed = self._landed()
        if landed is not None and _unique(landed) not in {_unique(r) for _, r in left}:
            slot = self.keep(len(landed)) if self._free else None
            left.append((slot, landed if slot is None else landed[:SLOT - _LEN.size]))
        self.clear_landing()
        return sorted(left, key=lambda e: _unique(e[1]))

    def _landed(self) -> bytes | None:
        """The request in the landing zone, if it holds one that awaits an answer."""
        if len(self.landing) < IN_HEADER.size:
            return None
        n, opcode, *_ = IN_HEADER.unpack_from(self.landing)
        if n < IN_HEADER.size or n > len(self.landing) or not kept(opcode):
            return None
        return bytes(self.landing[:n])

    def keep(self, n: int) -> int:
        """Move the request of ``n`` bytes just read into the landing zone to a slot, then clear
        the zone; its slot, for ``remove``."""
        slot = self.add(self.landing[:n])
        self.clear_landing()
        return slot

    def clear_landing(self) -> None:
        """Nothing to keep in the landing zone (moved, or a request that gets no answer)."""
        _LEN.pack_into(self._map, self._landing_at, 0)

    def add(self, request) -> int:
        """Keep a request just read; its slot, for ``remove``."""
        slot = self._free.pop()  # never empty: the session serves at most SLOTS at once
        n = min(len(request), SLOT - _LEN.size)
        at = slot * SLOT
        self._map[at + _LEN.size:at + _LEN.size + n] = request[:n]
        _LEN.pack_into(self._map, at, n)  # last: a slot is whole or free
        return slot

    def remove(self, slot: int) -> None:
        """The request in ``slot`` was answered."""
        _LEN.pack_into(self._map, slot * SLOT, 0)
        self._free.append(slot)

    @property
    def used(self) -> int:
        return SLOTS - len(self._free)

    def close(self) -> None:
        self.landing.release()
        self._map.close()


def _unique(request: bytes) -> int:
    return IN_HEADER.unpack_from(request)[2] if len(request) >= IN_HEADER.size else 0
