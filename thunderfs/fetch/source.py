"""Where missing chunks come from: the one small protocol every source speaks.

The fetcher asks its sources in order (peers, then Glance) for the chunks of a flight::

    missing = await source.fetch(want, sink)

A source hands each run of verified bytes to ``sink.put(first, data)`` as it arrives (the sink
caches it at once, so that peers can take it) and returns the chunks it did not deliver, which the
fetcher gives to the next source.  A source that knows early that it will not deliver some chunks
(a peer source granted them by the tracker: nobody else is fetching them) gives them on at once
with ``sink.pass_on(chunks)``, so that the next source fetches them while this one goes on.
A source raises only ``thunderfs.errors`` (``SourceFailed`` for a failure of its own): what it
raises fails the flight's readers with EIO; anything else is a bug, logged whole by the fetcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from thunderfs.fetch.slots import PrioritySlots, Ticket

if TYPE_CHECKING:
    from thunderfs.cache.fresh import Buffer
    from thunderfs.cache.store import ImageData
    from thunderfs_common.image import ImageMeta


# A transfer may take its base timeout plus its size at this rate: a 16 MiB readahead request that
# shares a slow link with 60 others is slow, not hung.  A silent source is cut sooner, by the
# clients' inactivity timeouts (--fetch-timeout, --peer-timeout).
MIN_RATE = 64 * 2**10


def deadline_for(timeout: float, nbytes: int) -> float:
    """Up to 1 MiB (every demand read the kernel sends) gets exactly the configured timeout."""
    return timeout + max(0, nbytes - 2**20) / MIN_RATE


@dataclass(eq=False)
class Urgency:
    """One flight's priority (``slots.DEMAND`` first).  A demand read that joins a readahead or
    prefetch flight raises it, and with it every slot ticket the flight's sources took."""

    priority: int
    _tickets: list[Ticket] = field(default_factory=list)

    def ticket(self, slots: PrioritySlots) -> Ticket:
        t = slots.ticket(self.priority)
        self._tickets.append(t)
        return t

    def promote(self, priority: int) -> None:
        if priority < self.priority:
            self.priority = priority
            for t in self._tickets:
                t.promote(priority)


@dataclass(frozen=True, eq=False)
class Want:
    """What a flight asks a source for: ``chunks`` (sorted, adjacent or not) of one image."""

    meta: "ImageMeta"
    img: "ImageData"
    chunks: list[int]
    urgency: Urgency

    @property
    def priority(self) -> int:
        return self.urgency.priority

    def nbytes(self) -> int:
        return sum(self.img.chunk_len(c) for c in self.chunks)


class Sink(Protocol):
    def put(self, first: int, data: bytes | bytearray | memoryview, buffer: "Buffer | None" = None) -> None:
        """Verified bytes of chunks ``first..`` (whole chunks; the image's last may be short).
        ``buffer``: the receive buffer (``ChunkStore.buffers``) ``data`` starts, which the cache
        may hold on to and serve from (``cache/fresh.py``); else ``data`` is copied if kept."""

    def pass_on(self, chunks: list[int]) -> None:
        """Chunks this source will not deliver: the next source may start on them now."""


class Source(Protocol):
    name: str  # "peers", "origin": how status, metrics and logs call it

    async def fetch(self, want: Want, sink: Sink) -> list[int]:
        """Deliver what it can of ``want.chunks`` through ``sink``; return what it did not."""
