"""Where a tracker keeps its state, chosen by ``--store``: in memory and files of its own (one
tracker), or in Redis through one connection pool shared by the peer, profile and manifest stores
(replicas on one state)."""

from __future__ import annotations

from dataclasses import dataclass

from thunderfs_tracker.config import TrackerConfig
from thunderfs_tracker.nonces import MemoryNonces, RedisNonces
from thunderfs_tracker.peer_store import MemoryPeerStore, PeerStore
from thunderfs_tracker.profiles import FileProfileStore, ProfileStore, RedisProfileStore
from thunderfs_tracker.redis_conn import RedisConnection
from thunderfs_tracker.redis_store import RedisPeerStore


@dataclass(frozen=True)
class Stores:
    peers: PeerStore
    profiles: ProfileStore
    nonces: MemoryNonces | RedisNonces  # of signed requests: a replay is refused by every replica
    shared: RedisConnection | None  # what replicas share (manifests too), None in memory


def open_stores(config: TrackerConfig) -> Stores:
    if config.store == "memory":
        return Stores(MemoryPeerStore(), FileProfileStore(config.state_dir), MemoryNonces(), None)
    conn = RedisConnection(config.store)  # redis://, rediss:// or unix:// (the config checks which)
    return Stores(RedisPeerStore(conn, node_ttl=config.node_ttl), RedisProfileStore(conn), RedisNonces(conn), conn)
