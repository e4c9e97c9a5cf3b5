"""Where the tracker keeps which node holds which chunks: a small interface, and the in-memory
store (the embedded default).  ``redis_store.RedisPeerStore`` implements the same methods for
replicas on shared state.  The methods are coroutines (a shared store is a network away).

Chunk sets are Python ints used as bitsets: a lookup of a range is a shift and a mask, in C.
Memory is bounded by ``max_nodes`` and ``max_images_per_node``; a node that stops announcing is
expired with everything it held.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from thunderfs_common.tracker_protocol import ChunkUpdate, NodeInfo

class NodeIdTaken(Exception):
    """Another live daemon announces under this node id (two hosts with one name)."""


def check_same_node(old: NodeInfo | None, new: NodeInfo) -> None:
    """Refuse ``new`` if a live record of its id comes from another daemon (another instance)."""
    if old is not None and old.instance and new.instance and old.instance != new.instance:
        raise NodeIdTaken(f"node id {new.node_id} is taken by another live node (peer URL {old.peer_url}); "
                          f"give each node its own --node-id (this one announced {new.peer_url})")


class StoreFull(Exception):
    """The store holds as much as it may; the client is told 503 and tries later."""


class StoreUnavailable(Exception):
    """The shared store cannot be reached: the client is told 503, with why."""


class PeerStore(Protocol):
    async def epoch(self) -> str:
        """Changes when the store loses its state (a restart): nodes then send their full state."""

    async def put_node(self, node: NodeInfo, now: float) -> str:
        """Records the node as alive; returns the epoch."""

    async def refresh_node(self, node_id: str, instance: str, now: float) -> str | None:
        """A light heartbeat: the node's record, as last announced, is kept alive; returns the
        epoch, or None if there is no record of it (expired) or the record is another daemon's
        (``instance`` differs): the node must announce in full."""

    async def node(self, node_id: str) -> NodeInfo | None: ...

    async def nchunks(self, content: str) -> int | None: ...

    async def update_chunks(self, node_id: str, full: bool, updates: list[ChunkUpdate], now: float) -> str:
        """Applies a node's full state or deltas, and keeps its record alive as a light heartbeat
        does (a node that sends chunks skips the heartbeat it would have sent); returns the epoch."""

    async def holders(self, content: str, first: int, last: int) -> list[tuple[NodeInfo, int]]: ...

    async def lookup(self, content: str, first: int, last: int,
                     asking: str | None) -> tuple[int | None, NodeInfo | None, list[tuple[NodeInfo, int]]]:
        """(the content's number of chunks or None, the asking node's record, the holders of
        chunks ``first..last`` with their bits from ``first``): what a lookup needs, at once."""

    async def expire(self, older_than: float) -> list[str]: ...

    async def claim(self, content: str, node_id: str, nchunks: int, want: int, now: float,
                    ttl: float) -> tuple[int, list[tuple[NodeInfo, int, bool]]]: ...

    async def statistics(self) -> dict: ...

    async def close(self) -> None: ...


class MemoryPeerStore:
    def __init__(self, max_nodes: int = 100_000, max_images_per_node: int = 10_000):
        self._nodes: dict[str, NodeInfo] = {}
        self._seen: dict[str, float] = {}
        self._chunks: dict[str, dict[str, int]] = {}      # content -> node -> bits
        self._nchunks: dict[str, int] = {}
        self._held: dict[str, set[str]] = {}               # node -> contents
        self._claims: dict[str, dict[str, tuple[int, float]]] = {}  # content -> node -> (bits, expires)
        self._max_nodes = max_nodes
        self._max_images = max_images_per_node
        self._epoch = secrets.token_hex(8)  # a restarted tracker has lost peer state: nodes resend it

    async def epoch(self) -> str:
        return self._epoch

    async def close(self) -> None:
        pass

    async def node(self, node_id: str) -> NodeInfo | None:
        return self._nodes.get(node_id)

    async def put_node(self, node: NodeInfo, now: float) -> str:
        check_same_node(self._nodes.get(node.node_id), node)
        if node.node_id not in self._nodes and len(self._nodes) >= self._max_nodes:
            raise StoreFull(f"the tracker tracks {self._max_nodes} nodes already")
        self._nodes[node.node_id] = node
        self._seen[node.node_id] = now
        self._held.setdefault(node.node_id, set())
        return self._epoch

    async def refresh_node(self, node_id: str, instance: str, now: float) -> str | None:
        node = self._nodes.get(node_id)
        if node is None or node.instance != instance:
            return None
        self._seen[node_id] = now
        return self._epoch

    async def update_chunks(self, node_id: str, full: bool, updates: list[ChunkUpdate], now: float) -> str:
        if node_id not in self._nodes:
            raise KeyError(node_id)
        self._seen[node_id] = now
        held = self._held[node_id]
        if full:
            listed = {u.content for u in updates}
            for content in list(held - listed):
                self._drop(node_id, content)
        for u in updates:
            known = self._nchunks.get(u.content)
            if known is not None and known != u.nchunks:
                raise ValueError(f"image {u.content} has {known} chunks, not {u.nchunks}")
            per_node = self._chunks.setdefault(u.content, {})
            self._nchunks[u.content] = u.nchunks
            claims = self._claims.get(u.content)
            if claims and node_id in claims:  # what it now holds is no longer merely claimed
                cbits, expires = claims[node_id]
                claims[node_id] = (cbits & ~u.add, expires)
            bits = u.add if u.full else (per_node.get(node_id, 0) | u.add) & ~u.remove
            if bits:
                if u.content not in held and len(held) >= self._max_images:
                    raise StoreFull(f"node {node_id} announces more than {self._max_images} images")
                per_node[node_id] = bits
                held.add(u.content)
            else:
                self._drop(node_id, u.content)
        return self._epoch

    def _drop(self, node_id: str, content: str) -> None:
        per_node = self._chunks.get(content)
        if per_node is not None:
            per_node.pop(node_id, None)
            if not per_node:
                del self._chunks[content]
                del self._nchunks[content]
        self._held.get(node_id, set()).discard(content)

    async def holders(self, content: str, first: int, last: int) -> list[tuple[NodeInfo, int]]:
        per_node = self._chunks.get(content)
        if not per_node:
            return []
        mask = (1 << (last - first + 1)) - 1
        out = []
        for node_id, bits in per_node.items():
            have = (bits >> first) & mask
            if have:
                out.append((self._nodes[node_id], have))
        return out

    async def lookup(self, content: str, first: int, last: int,
                     asking: str | None) -> tuple[int | None, NodeInfo | None, list[tuple[NodeInfo, int]]]:
        nchunks = self._nchunks.get(content)
        me = self._nodes.get(asking) if asking else None
        if nchunks is None or last >= nchunks:
            return nchunks, me, []
        return nchunks, me, await self.holders(content, first, last)

    async def claim(self, content: str, node_id: str, nchunks: int, want: int, now: float,
              ttl: float) -> tuple[int, list[tuple[NodeInfo, int, bool]]]:
        """A node is about to fetch ``want`` (bits) from Glance.  Chunks another live node holds
        or has claimed are not granted: that node is named instead (with whether it holds them
        already or is fetching them), so that the asker takes them from it (or from whoever has
        them by then).  The rest is granted, and claimed for ``ttl`` seconds."""
        if node_id not in self._nodes:
            raise KeyError(node_id)
        known = self._nchunks.get(content)
        if known is not None and known != nchunks:
            raise ValueError(f"image {content} has {known} chunks, not {nchunks}")
        claims = self._claims.setdefault(content, {})
        others, taken = [], 0
        # Held first: a claim's bits are cleared when its chunks are announced, and a node whose
        # lookup was a moment old must not be granted what has just arrived elsewhere.
        for other, bits in self._chunks.get(content, {}).items():
            if other != node_id and bits & want & ~taken:
                others.append((self._nodes[other], bits & want & ~taken, True))
                taken |= bits & want
                if taken & want == want:
                    break
        for other, (bits, expires) in list(claims.items()):
            if expires < now or other not in self._nodes:
                del claims[other]
                continue
            if other != node_id and bits & want & ~taken:
                others.append((self._nodes[other], bits & want & ~taken, False))
                taken |= bits & want
        granted = want & ~taken
        mine = claims.get(node_id, (0, 0.0))[0]
        claims[node_id] = (mine | granted, now + ttl)
        return granted, others

    async def nchunks(self, content: str) -> int | None:
        return self._nchunks.get(content)

    async def expire(self, older_than: float) -> list[str]:
        gone = [n for n, seen in self._seen.items() if seen < older_than]
        for node_id in gone:
            for claims in self._claims.values():
                claims.pop(node_id, None)
            for content in list(self._held.pop(node_id, ())):
                self._drop(node_id, content)
            del self._nodes[node_id]
            del self._seen[node_id]
        return gone

    async def statistics(self) -> dict:
        return {"nodes": len(self._nodes), "images": len(self._chunks)}
