"""A token bucket: at most ``rate`` bytes a second on average, bursts up to ``burst``.

Waiters are served by priority (lower first; the fetcher's DEMAND before READAHEAD before
PREFETCH), FIFO within one, so that a reader never queues behind prefetch for bandwidth.  A
request takes its tokens when it may start, possibly going into debt: the next one waits for
the debt to clear.
"""

from __future__ import annotations

import heapq
import itertools

import trio

class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 1 << 20)
        self._tokens = self.burst
        self._stamp = trio.current_time()
        self._waiters: list[list] = []  # [priority, seq] heads first
        self._seq = itertools.count()
        self._changed = trio.Event()

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def _wake_all(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, n: int, priority: int = 0) -> None:
        """Return once ``n`` bytes may go; 0 rate means unlimited."""
        if not self.rate:
            return
        entry = [priority, next(self._seq)]
        heapq.heappush(self._waiters, entry)
        try:
            while True:
                self._refill()
                if self._waiters[0] is entry:
                    if self._tokens >= 0:
                        heapq.heappop(self._waiters)
                        self._tokens -= n
                        self._wake_all()
                        return
                    # Until the debt clears, unless a more urgent waiter arrives first.
                    with trio.move_on_after(-self._tokens / self.rate):
                        await self._changed.wait()
                else:
                    await self._changed.wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._wake_all()
            raise
