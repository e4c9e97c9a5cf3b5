"""The read corridor, built: Glance's source, the fetcher over the sources in order (peers, the
seed, Glance), the profiles that record and prefetch, the readers the FUSE layer asks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.cache.store import ChunkStore, ImageData
from thunderfs.config import MountConfig
from thunderfs.fetch.fetcher import Fetcher
from thunderfs.fetch.glance_source import GlanceSource
from thunderfs.fetch.reader import Readers
from thunderfs.fetch.slots import DEMAND
from thunderfs.profiles.registry import Profiles
from thunderfs.daemon.origin import Origin
from thunderfs.daemon.swarm import Swarm


@dataclass
class ReadPath:
    glance: GlanceSource
    fetcher: Fetcher
    profiles: Profiles
    readers: Readers


def build_read_path(config: MountConfig, store: ChunkStore, buffers: ReceiveBuffers, origin: Origin,
                    swarm: Swarm | None, stack: contextlib.AsyncExitStack,
                    observe: Callable | None) -> ReadPath:
    glance = GlanceSource(origin.client, chunk_size=config.chunk_size,
                          max_chunks=config.max_request // config.chunk_size, fetch_timeout=config.fetch_timeout,
                          concurrency=config.origin_concurrency, rate=config.origin_rate,
                          connect_timeout=config.connect_timeout, tokens=origin.auth,
                          ssl_context=httpx.create_ssl_context(),  # trusts what httpx trusts (SSL_CERT_FILE too)
                          buffers=buffers)
    stack.push_async_callback(glance.aclose)
    peers = swarm.peers if swarm is not None else None
    fetcher = Fetcher(store, [peers, swarm.seed, glance] if swarm is not None else [glance],
                      fetch_timeout=config.fetch_timeout, max_request=config.max_request, observe=observe,
                      bdp=glance.cost.bdp)
    if swarm is not None:
        _serve_peers_from(swarm, fetcher)
    profiles = Profiles(fetcher, swarm.tracker if swarm is not None else None, chunk_size=config.chunk_size,
                        record_window=config.record_window, record_idle=config.record_idle,
                        prefetch_flights=config.prefetch_flights, prefetch_idle=config.prefetch_idle,
                        wait_ready=peers.wait_manifest if peers else None, plan=peers.plan if peers else None)
    # On every open: the peer source asks for the manifest, the profiles record and prefetch.
    on_open = [profiles.opened]
    if peers is not None:
        on_open.insert(0, lambda reader: peers.prepare(reader.meta))
    readers = Readers(store, fetcher, readahead=config.readahead, on_open=on_open,
                      zeros=peers.zero_chunks if peers is not None else None)
    return ReadPath(glance, fetcher, profiles, readers)


def _serve_peers_from(swarm: Swarm, fetcher: Fetcher) -> None:
    """A peer waits for chunks this node fetches or will; a waiting peer's fetch runs at a
    reader's priority."""
    peers = swarm.peers
    swarm.server.fetching = lambda img, chunk: fetcher.in_flight(img, chunk) or peers.will_fetch(img, chunk)

    def fetch_for_peer(img: ImageData, chunks: list[int]) -> bool:
        meta = peers.fetch_for_peer(img, chunks)
        if meta is not None:
            fetcher.start(meta, img, chunks, DEMAND)
        return meta is not None

    swarm.server.fetch_for_peer = fetch_for_peer
