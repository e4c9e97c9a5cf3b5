"""A token bucket: at most ``rate`` bytes a second on average, bursts up to ``burst``."""

from __future__ import annotations

import logging

import trio

log = logging.getLogger(__name__)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 1 << 20)
        self._tokens = self.burst
        self._stamp = trio.current_time()
        self._lock = trio.Lock()

    async def wait_for(self, n: int) -> None:
        """Return once ``n`` bytes may go; 0 rate means unlimited."""
        if not self.rate:
            return
        async with self._lock:  # first come, first served
            now = trio.current_time()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)
