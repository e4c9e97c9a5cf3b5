"""One Redis connection pool per tracker replica, shared by its peer, profile and manifest stores,
with one translation of Redis errors (``StoreUnavailable``: the replica answers 503)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from thunderfs_tracker.peer_store import StoreUnavailable


class RedisConnection:
    def __init__(self, url: str, *, max_connections: int = 32):
        self.url = url
        # A bounded pool that makes a request wait for a connection (up to 5 s) rather than fail:
        # under a burst, latency grows instead of 503s.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5.0,
                                                        socket_timeout=2.0, socket_connect_timeout=2.0)
        self.redis = aioredis.Redis(connection_pool=pool)

    async def call(self, pipe_or_coro):
        """Execute a pipeline or await a command; Redis errors become ``StoreUnavailable``."""
        try:
            if hasattr(pipe_or_coro, "execute"):
                return await pipe_or_coro.execute()
            return await pipe_or_coro
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the peer store (Redis at {self.where}) is unavailable: {exc}") from None

    @property
    def where(self) -> str:
        """The URL without its credentials."""
        return self.url.split("@")[-1]

    async def close(self) -> None:
        await self.redis.aclose()
