"""This node among its peers, where a tracker is configured: the tracker's client, the peer and
seed sources, the peer server and the announcer, wired to each other and to the cache."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ChunkStore
from thunderfs.p2p.announcer import Announcer
from thunderfs.p2p.peer_server import PeerServer
from thunderfs.config import MountConfig
from thunderfs.errors import ConfigError
from thunderfs.p2p.peer_source import PeerSource
from thunderfs.p2p.seed_source import SeedSource
from thunderfs_common.image import ImageMeta
from thunderfs_common.manifest_proof import KeyFileError, load_public_key
from thunderfs_common.signing import SecretError, load_secret
from thunderfs_common.tracker_protocol import NodeInfo, parse_location
from thunderfs_tracker.client import TrackerClient

log = logging.getLogger(__name__)


@dataclass
class Swarm:
    tracker: TrackerClient
    peers: PeerSource
    seed: SeedSource
    server: PeerServer
    announcer: Announcer

    def statistics(self) -> dict:
        return {"peers": {**self.peers.statistics(), **self.seed.statistics()},
                "peer_server": self.server.statistics(), "announcer": self.announcer.statistics()}


async def join_swarm(config: MountConfig, index: ChunkIndex, store: ChunkStore,
                     stack: contextlib.AsyncExitStack, on_revoked: Callable[[ImageMeta], None]) -> Swarm:
    """The parts, the peer server listening (a port in use is a start-up error).  ``on_revoked``:
    the tracker revoked an image's lazy manifest (what was taken under it must go)."""
    try:
        secret = load_secret(config.secret_file) if config.secret_file else None
        tracker_key = load_public_key(config.tracker_public_key) if config.tracker_public_key else None
    except (SecretError, KeyFileError) as exc:
        raise ConfigError(str(exc)) from None
    # Kept with the cache: the tracker tells this daemon from another under the same id.
    instance = index.load_note("node_instance")
    if instance is None:
        instance = secrets.token_hex(8)
        index.save_note("node_instance", instance)
    node = NodeInfo(config.node_id, config.peer_url, parse_location(config.location), instance=instance)
    if secret is None:
        log.warning("no --secret-file: this node serves its cached chunks to anyone who can reach it")
    tracker = await stack.enter_async_context(
        TrackerClient(config.tracker_urls, config.node_id, secret=secret, timeout=config.peer_timeout))
    peers = PeerSource(tracker, node_id=config.node_id, secret=secret, chunk_size=config.chunk_size,
                       timeout=config.peer_timeout, fetch_timeout=config.fetch_timeout,
                       max_request_chunks=config.max_request // config.chunk_size, tracker_key=tracker_key,
                       location=node.location, on_revoked=lambda meta, why: on_revoked(meta),
                       on_manifest=lambda meta, m: store.know_digests(store.image(meta.content_key, meta.size),
                                                                      m.digests))
    stack.push_async_callback(peers.aclose)
    seed = SeedSource(tracker, peers.directory, chunk_size=config.chunk_size, timeout=config.peer_timeout)
    server = PeerServer(store, secret=secret, max_uploads=config.max_uploads, rate=config.upload_rate)
    server.pieces = peers.directory.pieces_header
    try:
        bound = await server.listen(*config.peer_address)
    except OSError as exc:
        raise ConfigError(f"cannot serve peers on {config.peer_listen}: {exc.strerror}") from None
    log.info("serving peers on %s:%d as %s (%s), tracker %s", *bound, node.node_id, node.peer_url, config.tracker)
    announcer = Announcer(tracker, store, node, load=lambda: server.uploads, rtt=peers.rtt_ms,
                          news_wanted=peers.news_wanted)
    return Swarm(tracker, peers, seed, server, announcer)
