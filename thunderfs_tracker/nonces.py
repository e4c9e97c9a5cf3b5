"""The nonces of signed requests seen within the replay window, remembered where replicas share
them: a request captured on its way to one replica cannot be replayed to another.  In memory for
one tracker (a full cache refuses new requests: 503), in Redis for replicas (``SET NX`` with the
window as its expiry)."""

from __future__ import annotations

import time

from thunderfs_common.signing import MAX_SKEW, NonceCache
from thunderfs_tracker.redis_conn import RedisConnection


class MemoryNonces:
    def __init__(self, max_nonces: int = 200_000):
        self._cache = NonceCache(max_nonces)

    async def remember(self, nonce: str) -> bool:
        """True if new; False if seen (a replay); ``NonceCacheFull`` when it cannot remember it."""
        return self._cache.remember(nonce, time.time())


class RedisNonces:
    def __init__(self, conn: RedisConnection):
        self._conn = conn

    async def remember(self, nonce: str) -> bool:
        """True if new; False if seen by any replica; ``StoreUnavailable`` with Redis down."""
        fresh = await self._conn.one("set", f"tf:nonce:{nonce}", 1, nx=True, ex=int(2 * MAX_SKEW) + 1)
        return bool(fresh)
