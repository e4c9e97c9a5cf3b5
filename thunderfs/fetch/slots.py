"""A counting limiter whose waiters are served by priority (lower first), FIFO within one."""

from __future__ import annotations

import heapq
import itertools

import trio


DEMAND, READAHEAD, PREFETCH = 0, 1, 2


class Ticket:
    """One claim on a slot; ``async with ticket:`` holds the slot.  ``promote()`` while waiting
    moves it ahead (a demand read joined a readahead fetch that is still queued)."""

    __slots__ = ("_slots", "priority", "_seq", "_event", "_queued", "holding")

    def __init__(self, slots: "PrioritySlots", priority: int):
        self._slots = slots
        self.priority = priority
        self._seq = 0
        self._event = trio.Event()
        self._queued = False
        self.holding = False

    def __lt__(self, other: "Ticket") -> bool:
        return (self.priority, self._seq) < (other.priority, other._seq)

    def promote(self, priority: int) -> None:
        if priority >= self.priority:
            return
        self.priority = priority
        if self._queued:
            heapq.heapify(self._slots._waiters)

    async def __aenter__(self) -> "Ticket":
        await self._slots._acquire(self)
        return self

    async def __aexit__(self, *exc) -> None:
        self._slots._release(self)


class PrioritySlots:
    def __init__(self, total: int):
        self.total = total
        self._free = total
        self._waiters: list[Ticket] = []
        self._seq = itertools.count()

    def ticket(self, priority: int) -> Ticket:
        return Ticket(self, priority)

    async def _acquire(self, ticket: Ticket) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._free > 0 and not self._waiters:
            self._free -= 1
            ticket.holding = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        ticket._seq = next(self._seq)
        ticket._queued = True
        heapq.heappush(self._waiters, ticket)
        try:
            await ticket._event.wait()
        except BaseException:
            if ticket.holding:
                self._release(ticket)
            elif ticket._queued:
                self._waiters.remove(ticket)
                heapq.heapify(self._waiters)
                ticket._queued = False
            raise

    def _release(self, ticket: Ticket) -> None:
        ticket.holding = False
        if self._waiters:
            nxt = heapq.heappop(self._waiters)
            nxt._queued = False
            nxt.holding = True
            nxt._event.set()
        else:
            self._free += 1

    def statistics(self) -> dict:
        waiting: dict[int, int] = {}
        for t in self._waiters:
            waiting[t.priority] = waiting.get(t.priority, 0) + 1
        return {"total": self.total, "busy": self.total - self._free, "waiting": waiting}
