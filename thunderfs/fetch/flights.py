"""Single flight: one piece of work per key under way at a time, however many tasks want it.

The daemon's one keyed lock (after s3ql's ``multi_lock``): the fetcher runs one flight per missing
chunk (a flight may cover several chunks: one Range request), the peer source one manifest request
per image and one tracker lookup per window.  Whoever wants a key that is in flight waits for that
flight instead of starting another.  A flight that fails hands its exception to every waiter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any

import trio


class Flight:
    """One piece of work under way; ``await wait()`` for its result or its exception."""

    __slots__ = ("keys", "result", "error", "_done", "_progress", "state")

    def __init__(self, keys: tuple[Hashable, ...], state: Any = None):
        self.keys = keys
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = trio.Event()
        self._progress = trio.Event()
        self.state = state  # what the owner keeps with the flight (the fetcher: its urgency)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def progress(self) -> None:
        """Part of the work is done: wake whoever waits in ``wait_progress``."""
        event, self._progress = self._progress, trio.Event()
        event.set()

    async def wait_progress(self) -> None:
        """Until the next ``progress()`` or the flight's end (at once if it has ended)."""
        if not self._done.is_set():
            await self._progress.wait()

    async def wait_done(self) -> None:
        """Until it has finished, whatever its outcome."""
        await self._done.wait()

    async def wait(self) -> Any:
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[Hashable, Flight] = {}

    def get(self, key: Hashable) -> Flight | None:
        return self._flights.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``await fn()`` unless a flight for ``key`` is under way; then its result (or error).
        The caller runs the work: if it is cancelled, waiters see ``trio.Cancelled``'s cause as
        a failure of their own and may try again."""
        flight = self._flights.get(key)
        if flight is not None:
            return await flight.wait()
        flight = self._flights[key] = Flight((key,))
        try:
            flight.result = await fn()
            return flight.result
        except BaseException as exc:
            flight.error = exc if isinstance(exc, Exception) else FlightAbandoned(key)
            raise
        finally:
            self._finish(flight)

    def launch(self, nursery: trio.Nursery, keys: Iterable[Hashable], fn: Callable[[Flight], Awaitable[Any]],
               state: Any = None) -> Flight:
        """Start ``fn(flight)`` in ``nursery`` as the flight of every key in ``keys`` (none of them
        in flight now); it runs on whoever gives up waiting.  Its exceptions go to its waiters,
        never to the nursery."""
        flight = Flight(tuple(keys), state)
        for key in flight.keys:
            assert key not in self._flights, f"{key!r} is in flight already"
            self._flights[key] = flight

        async def fly() -> None:
            try:
                flight.result = await fn(flight)
            except Exception as exc:
                flight.error = exc
            finally:
                self._finish(flight)

        nursery.start_soon(fly)
        return flight

    def _finish(self, flight: Flight) -> None:
        for key in flight.keys:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight._done.set()
        flight.progress()

    def statistics(self) -> dict:
        return {"keys": len(self._flights), "flights": len({id(f) for f in self._flights.values()})}


class FlightAbandoned(Exception):
    """The task running a flight was cancelled before it finished."""

    def __init__(self, key: Hashable):
        super().__init__(f"the flight for {key!r} was abandoned")
