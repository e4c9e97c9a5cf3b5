"""What ``thunderfs status`` and ``thunderfs evict`` see of a running daemon: one record per image.

Per image: its size, how much of it is cached, the bytes read through the mount and fetched by
source, the peers that sent it, what it shares with other cached images and its zero chunks
(issue 31: bytes neither fetched nor stored for it), and its profile and prefetch state.  Plain dicts out (the control
socket's JSON); the CLI renders them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thunderfs.glance.catalog import Catalog
    from thunderfs.cache.store import ChunkStore
    from thunderfs.p2p.peer_source import PeerSource
    from thunderfs.profiles.registry import Profiles

from thunderfs.cache.image_data import SHARED, ZERO

log = logging.getLogger(__name__)


class ImageStatus:
    def __init__(self, catalog: "Catalog", store: "ChunkStore", profiles: "Profiles",
                 peers: "PeerSource | None"):
        self._catalog = catalog
        self._store = store
        self._profiles = profiles
        self._peers = peers

    def images(self) -> list[dict]:
        activity = self._profiles.statistics()
        out = []
        for meta in sorted(self._catalog.images.values(), key=lambda m: m.name or m.id):
            content = meta.content_key
            img = self._store.find(content)
            cached = 0 if img is None else img.cached_count()
            nchunks = max(1, -(-meta.size // self._store.chunk_size))
            act = activity.get(content.hex())
            out.append({
                "id": meta.id,
                "name": meta.name,
                "size": meta.size,
                "cached_chunks": cached,
                "chunks": nchunks,
                "cached_fraction": round(cached / nchunks, 4),
                # Its chunks whose bytes another cached image's copy holds, and its zero chunks:
                # bytes saved, neither fetched nor stored for this image.
                "shared_bytes": 0 if img is None else img.bytes_in(SHARED),
                "zero_bytes": 0 if img is None else img.bytes_in(ZERO),
                **(img.counters if img is not None else
                   {"bytes_read": 0, "bytes_from_peers": 0, "bytes_from_seed": 0, "bytes_from_origin": 0}),
                "peers": self._peers.sources_of(content) if self._peers is not None else {},
                "profile": None if act is None else {
                    k: act[k] for k in ("profile_version", "recording", "job", "job_done", "job_total",
                                        "prefetched", "hits", "waste", "demand_waits")},
            })
        return out

    async def evict(self, req: dict) -> dict:
        """Drop every cached chunk of one image (those being read at this moment stay)."""
        image_id = str(req.get("image_id", ""))
        meta = self._catalog.images.get(image_id)
        if meta is None:
            raise ValueError(f"no image {image_id!r} in this mount's listing")
        img = self._store.find(meta.content_key)  # None: never opened here, nothing to drop
        if img is not None:
            self._profiles.cancel_job(meta, img)
        dropped = self._store.drop_image(meta.content_key)
        await self._store.commit(touch=False)
        log.info("evicted %s: %d chunks dropped", image_id, dropped)
        return {"image_id": image_id, "dropped_chunks": dropped}

    def handlers(self) -> dict:
        return {"images": lambda _req: {"images": self.images()}, "evict": self.evict}
