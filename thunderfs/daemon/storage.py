"""The cache a daemon opens first: the index, the receive buffers, the chunk store."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ChunkStore
from thunderfs.config import MountConfig
from thunderfs.fetch.glance_source import piece_bytes


@dataclass
class Storage:
    index: ChunkIndex
    buffers: ReceiveBuffers
    store: ChunkStore


def open_storage(config: MountConfig, stack: contextlib.AsyncExitStack) -> Storage:
    """Open the index (its layout checked), the store over it, and reclaim what a crash left."""
    # Sized so that it should not need to grow (growing races readers in other threads; the
    # index doubles the map, with a warning, if it ever fills): two records of ~40 bytes per
    # chunk, with a wide margin for B-tree pages.
    map_size = max(256 * 2**20, (config.cache_size // config.chunk_size) * 512)
    index = ChunkIndex(config.cache_dir / "index", map_size=map_size)
    stack.callback(index.close)
    index.check_layout(config.chunk_size)
    # Glance's pieces arrive in these, and are served from them until written and read.
    piece = piece_bytes(config.chunk_size)
    buffers = ReceiveBuffers(piece, max(config.origin_concurrency + 1, config.receive_memory // piece))
    store = ChunkStore(config.cache_dir, index, config.chunk_size, config.cache_size, buffers=buffers)
    stack.callback(store.close)
    store.reclaim()
    return Storage(index, buffers, store)
