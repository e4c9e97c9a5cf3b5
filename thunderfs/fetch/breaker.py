"""Whether a source is known to be down, so that reads stop waiting on it.

Closed, calls go through.  A call that gives up on temporary failures after its whole deadline
(connections refused, timeouts, for ``--fetch-timeout`` seconds) opens the breaker: from then on
calls fail at once (``check`` raises ``SourceFailed``), and calls in their retry loops stop at
their next attempt.  One probe in the background asks the source again, every ``interval``
seconds doubling up to ``max_interval`` (0.25 s to 2 s), until it answers; then the breaker
closes and reads go to the source again at once.  So the first read of an outage waits the
configured timeout, and the reads after it fail within a second instead of each waiting that long.

A source that answers the probe but fails the calls (a tracker whose lookups fail authentication
while its health answer passes) opens and closes the breaker over and over: the warnings are then
logged once a ``QUIET`` period, with how many opens were not logged meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from thunderfs.errors import SourceFailed

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]


class Breaker:
    QUIET = 60.0  # seconds between two logged openings

    def __init__(self, what: str, *, interval: float = 0.25, max_interval: float = 2.0):
        self.what = what
        self._interval = interval
        self.max_interval = max_interval
        self._why = ""
        self._since: float | None = None
        self._probe: Probe | None = None
        self._opened = trio.Event()
        self._stats = dict.fromkeys(("opened", "failed_fast", "probes"), 0)
        self._logged_at = -1e9  # when an opening was last logged
        self._unlogged = 0  # openings since, not logged

    @property
    def is_open(self) -> bool:
        return self._since is not None

    async def sleep_unless_open(self, seconds: float) -> None:
        """Pause, but wake as soon as the breaker opens (a retry loop then gives up at once)."""
        with trio.move_on_after(seconds):
            await self._opened.wait()

    def check(self) -> None:
        """Raise ``SourceFailed`` at once if the source is known to be down."""
        if self._since is not None:
            self._stats["failed_fast"] += 1
            raise SourceFailed(f"{self.what} is unreachable ({self._why}; for "
                               f"{trio.current_time() - self._since:.0f}s); not waiting on it until it answers again")

    def open(self, why: str, probe: Probe) -> None:
        """The source gave up after its deadline: fail fast until ``probe()`` succeeds."""
        self._probe = probe
        if self._since is None:
            self._since = trio.current_time()
            self._why = why
            self._stats["opened"] += 1
            if self._since - self._logged_at >= self.QUIET:
                again = f"; {self._unlogged} more time(s) since the last warning" if self._unlogged else ""
                log.warning("%s unreachable (%s%s): reads that need it fail at once until it answers again",
                            self.what, why, again)
                self._logged_at, self._unlogged = self._since, 0
            else:
                self._unlogged += 1
                log.debug("%s unreachable again (%s)", self.what, why)
            self._opened.set()

    def close(self) -> None:
        """The source answered."""
        if self._since is not None:
            logged = self._logged_at == self._since  # this opening was warned of: so is its end
            log.log(logging.WARNING if logged else logging.DEBUG, "%s answers again after %.1fs; reads go "
                    "to it again", self.what, trio.current_time() - self._since)
            self._since = None
            self._opened = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The probe: while open, ask the source until it answers."""
        task_status.started()
        while True:
            await self._opened.wait()
            interval = self._interval
            while self.is_open:
                await trio.sleep(interval)
                self._stats["probes"] += 1
                try:
                    await self._probe()
                except Exception as exc:  # whatever the probe raises: still down
                    log.debug("%s probe: %s", self.what, exc)
                    interval = min(self.max_interval, interval * 2)
                else:
                    self.close()

    def statistics(self) -> dict:
        return {**self._stats, "open": self.is_open}
