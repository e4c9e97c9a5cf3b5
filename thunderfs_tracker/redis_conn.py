"""One Redis connection pool per tracker replica, shared by its peer, profile and manifest stores,
with one translation of Redis errors (``StoreUnavailable``: the replica answers 503), and the
batches of the hot path coalesced into shared pipelines.

Every request a replica serves makes one to three round trips to Redis (its nonce, its reads,
its writes).  In redis-py each round trip costs the replica about as much CPU as the aiohttp
request itself (a connection from the pool, a timeout, a parser), whatever it carries: at 10,000
nodes that, not Redis, saturated two replicas.  So the stores write their commands into a
``Batch``, and ``run`` sends every batch queued within one turn of the event loop as one
pipeline: under load a round trip carries the commands of many requests, alone it carries one.

A batch's commands stay together and in order; batches are independent of each other (no
transaction, as before: each store's pipelines were never transactions).  A Redis error in one
of a batch's replies fails that batch only; a connection error fails every batch of its pipeline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from thunderfs_tracker.peer_store import StoreUnavailable

# The most commands one shared pipeline carries; beyond that the next turn's pipeline takes them.
MAX_PIPELINE = 2048


class Batch:
    """Commands to send together, written as on a redis-py pipeline (``b.get(key)``,
    ``b.set(key, value, nx=True)``): each call is recorded, nothing is sent until ``run``."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs) -> Batch:
            self.commands.append((name, args, kwargs))
            return self
        return record


class RedisConnection:
    def __init__(self, url: str, *, max_connections: int = 32):
        self.url = url
        # A bounded pool that makes a request wait for a connection (up to 5 s) rather than fail:
        # under a burst, latency grows instead of 503s.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5.0,
                                                        socket_timeout=2.0, socket_connect_timeout=2.0)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._queued: deque[tuple[Batch, asyncio.Future]] = deque()
        self._flushing: set[asyncio.Task] = set()
        self.stats = {"redis_round_trips": 0, "redis_batches": 0, "redis_commands": 0}

    def batch(self) -> Batch:
        return Batch()

    async def run(self, batch: Batch) -> list:
        """The replies to ``batch``'s commands, in order, sent with whatever else is queued now."""
        if not batch.commands:
            return []
        future = asyncio.get_running_loop().create_future()
        if not self._queued:  # the first of this turn: a flush after every task of this turn has queued
            self._schedule()
        self._queued.append((batch, future))
        return await future

    async def one(self, name: str, *args, **kwargs) -> Any:
        """One command's reply (sent with whatever else is queued now)."""
        return (await self.run(getattr(Batch(), name)(*args, **kwargs)))[0]

    def _schedule(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self) -> None:
        taken, n = [], 0
        while self._queued and (not taken or n + len(self._queued[0][0].commands) <= MAX_PIPELINE):
            taken.append(self._queued.popleft())
            n += len(taken[-1][0].commands)
        if self._queued:  # the rest in a pipeline of its own, at once
            self._schedule()
        await self._send(taken)

    @staticmethod
    def _queue(p, batch: Batch) -> None:
        for name, args, kwargs in batch.commands:
            getattr(p, name)(*args, **kwargs)

    async def _send(self, taken: list[tuple[Batch, asyncio.Future]]) -> None:
        p = self.redis.pipeline(transaction=False)
        good = []
        for batch, future in taken:  # a command redis-py refuses as written fails its batch alone
            try:
                self._queue(p, batch)
            except Exception as exc:
                future.set_exception(exc)
                p = self.redis.pipeline(transaction=False)  # again, without that batch (rare)
                for b, _ in good:
                    self._queue(p, b)
            else:
                good.append((batch, future))
        taken = good
        if not taken:
            return
        self.stats["redis_round_trips"] += 1
        self.stats["redis_batches"] += len(taken)
        self.stats["redis_commands"] += sum(len(b.commands) for b, _ in taken)
        try:
            replies = await p.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            error = self._unavailable(exc)
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException as exc:  # cancelled with the replica: nobody waits any more
            for _, future in taken:
                if not future.done():
                    future.cancel()
            raise
        at = 0
        for batch, future in taken:
            mine = replies[at:at + len(batch.commands)]
            at += len(batch.commands)
            if future.done():  # its request was cancelled meanwhile
                continue
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is not None:
                future.set_exception(self._unavailable(failed))
            else:
                future.set_result(mine)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the peer store (Redis at {self.where}) is unavailable: {exc}")

    async def call(self, pipe_or_coro):
        """Execute a redis-py pipeline or await a command (paths that are not hot: manifests,
        profiles); Redis errors become ``StoreUnavailable``."""
        if isinstance(pipe_or_coro, Batch):
            return await self.run(pipe_or_coro)
        try:
            if hasattr(pipe_or_coro, "execute"):
                return await pipe_or_coro.execute()
            return await pipe_or_coro
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    @property
    def where(self) -> str:
        """The URL without its credentials."""
        return self.url.split("@")[-1]

    async def close(self) -> None:
        for task in list(self._flushing):
            task.cancel()
        await self.redis.aclose()
