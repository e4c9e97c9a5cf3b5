"""The peer store in Redis, shared by tracker replicas (``--store redis://HOST:PORT/DB``).

Keys (all under ``tf:``):

    tf:epoch            a random token, set if absent; a Redis that lost its data gets a new one,
                        and nodes that see it change send their full state again
    tf:n:<node>         the node's record (JSON), expiring ``node_ttl`` after its last announce
                        or light heartbeat (``refresh_node``: the expiry pushed back, nothing
                        rewritten): liveness is key expiry, no sweeper runs on any replica
    tf:h:<node>         set of contents the node holds chunks of (expires with the node)
    tf:b:<content>      hash node -> its chunks of the content: a bitset (chunk c = bit c) as a
                        little-endian integer, zlib-compressed (a boot's scattered 2 % of a 2 GiB
                        image is a 4 KiB bitmap, ~200 bytes compressed).  A field has no expiry of
                        its own: a dead node's field goes when a lookup draws it, or at the
                        node's next full state
    tf:k:<content>      the content's number of chunks
    tf:cl:<content>:<chunk>  the node fetching that chunk from Glance (SET NX, expires with the
                        claim's ttl: the claim is atomic across replicas)
    tf:images           set of contents someone holds (for statistics)
    tf:alive            sorted set node -> last announce (statistics: live nodes)

Round trips: an announce 2, a light heartbeat 2, a chunk update 2, a lookup 2, a claim 3-4 (all pipelined, and shared
with the other requests of the moment, ``redis_conn``), whatever the number of nodes: a lookup draws at most ``sample`` holders of the content at random
(HRANDFIELD) and ranks those (with 10,000 holders of one image, any 64 serve as well as all:
a node takes at most 20 of them).

Claims are atomic (one key per chunk, SET NX).  Holders are a sample: a node may be granted a
chunk that a holder outside the sample has (some egress, never a wrong byte: every chunk is
verified against its manifest).  A node's deltas are applied in the order its requests arrive (a
node sends one update at a time).  Redis errors become ``StoreUnavailable`` (a 503 saying why).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
import zlib

from thunderfs_common.tracker_protocol import ChunkUpdate, NodeInfo
from thunderfs_tracker.peer_store import check_same_node
from thunderfs_tracker.redis_conn import RedisConnection

def _pack(bits: int) -> bytes:
    # Level 6: within 5 % of level 9's size on a boot's bitmap, at 40 % of its CPU.
    return zlib.compress(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), 6)


@functools.lru_cache(maxsize=4096)
def _unpack_blob(blob: bytes) -> int:
    return int.from_bytes(zlib.decompress(blob), "little")


def _unpack(blob: bytes | None) -> int:
    """A bitset as stored; the same blob drawn by many lookups is decompressed once."""
    return _unpack_blob(blob) if blob else 0


def _node_json(node: NodeInfo) -> str:
    return json.dumps(node.to_json())


@functools.lru_cache(maxsize=8192)
def _node_parse(node_id: str, raw: bytes) -> NodeInfo:
    """A node's record as stored; one drawn by many lookups is parsed once (records change only
    when a node announces anew; a ``NodeInfo`` is never altered once made)."""
    return NodeInfo.parse(node_id, json.loads(raw))


class RedisPeerStore:
    def __init__(self, conn: RedisConnection, *, node_ttl: float = 30.0, sample: int = 64):
        self.conn = conn
        self.call = conn.call
        self._ttl_ms = max(1000, int(node_ttl * 1000))
        self._sample = sample

    async def close(self) -> None:
        await self.conn.close()

    @staticmethod
    def _epoch(p) -> None:
        """Queues the two commands whose last reply is the epoch."""
        p.set("tf:epoch", secrets.token_hex(8), nx=True)
        p.get("tf:epoch")

    async def epoch(self) -> str:
        p = self.conn.batch()
        self._epoch(p)
        return (await self.call(p))[1].decode()

    async def put_node(self, node: NodeInfo, now: float) -> str:
        """Two round trips (the record and the epoch; then the writes), shared with other requests."""
        nid = node.node_id
        p = self.conn.batch()
        p.get(f"tf:n:{nid}")
        self._epoch(p)
        old, _, epoch = await self.call(p)
        check_same_node(_node_parse(nid, old) if old else None, node)
        p = self.conn.batch()
        p.set(f"tf:n:{nid}", _node_json(node), px=self._ttl_ms)
        p.pexpire(f"tf:h:{nid}", self._ttl_ms)
        p.zadd("tf:alive", {nid: time.time()})
        await self.call(p)
        return epoch.decode()

    async def refresh_node(self, node_id: str, instance: str, now: float) -> str | None:
        """One round trip; of the record only its instance is read.  The expiries are pushed back
        before the instance is compared: a daemon whose id another took meanwhile keeps that
        one's record alive for one heartbeat, then announces in full and is refused."""
        p = self.conn.batch()
        p.get(f"tf:n:{node_id}")
        p.pexpire(f"tf:n:{node_id}", self._ttl_ms)
        p.pexpire(f"tf:h:{node_id}", self._ttl_ms)
        p.zadd("tf:alive", {node_id: time.time()})  # statistics only; an expired one announces at once
        self._epoch(p)
        raw, alive, _, _, _, epoch = await self.call(p)
        if not alive or raw is None or json.loads(raw).get("instance", "") != instance:
            return None
        return epoch.decode()

    async def node(self, node_id: str) -> NodeInfo | None:
        raw = await self.conn.one("get", f"tf:n:{node_id}")
        return _node_parse(node_id, raw) if raw else None

    async def nchunks(self, content: str) -> int | None:
        raw = await self.conn.one("get", f"tf:k:{content}")
        return int(raw) if raw else None

    async def update_chunks(self, node_id: str, full: bool, updates: list[ChunkUpdate], now: float) -> str:
        p = self.conn.batch()
        self._epoch(p)
        p.exists(f"tf:n:{node_id}")
        p.smembers(f"tf:h:{node_id}")
        for u in updates:
            p.get(f"tf:k:{u.content}")
            p.hget(f"tf:b:{u.content}", node_id)
        res = await self.call(p)
        epoch = res[1].decode()
        res = res[2:]
        if not res[0]:
            raise KeyError(node_id)
        held = {c.decode() for c in res[1]}
        w = self.conn.batch()
        listed = set()
        for i, u in enumerate(updates):
            known, old = res[2 + 2 * i], res[3 + 2 * i]
            if known is not None and int(known) != u.nchunks:
                raise ValueError(f"image {u.content} has {int(known)} chunks, not {u.nchunks}")
            listed.add(u.content)
            bits = u.add if u.full else (_unpack(old) | u.add) & ~u.remove
            w.set(f"tf:k:{u.content}", u.nchunks)
            if bits:
                w.hset(f"tf:b:{u.content}", node_id, _pack(bits))
                w.sadd(f"tf:h:{node_id}", u.content)
                w.sadd("tf:images", u.content)
            else:
                self._drop(w, node_id, u.content)
        if full:
            for content in held - listed:
                self._drop(w, node_id, content)
        w.pexpire(f"tf:h:{node_id}", self._ttl_ms)
        w.pexpire(f"tf:n:{node_id}", self._ttl_ms)  # alive, as a light heartbeat keeps it
        w.zadd("tf:alive", {node_id: time.time()})
        await self.call(w)
        return epoch

    @staticmethod
    def _drop(w, node_id: str, content: str) -> None:
        w.hdel(f"tf:b:{content}", node_id)
        w.srem(f"tf:h:{node_id}", content)

    async def _sampled_holders(self, content: str, extra: list = ()) -> tuple[list[tuple[NodeInfo, int]], list]:
        """Up to ``sample`` live holders of ``content`` with their bits (2 round trips), and the
        results of ``extra`` commands queued in the first."""
        p = self.conn.batch()
        p.hrandfield(f"tf:b:{content}", self._sample, withvalues=True)
        for name, args in extra:
            getattr(p, name)(*args)
        first = await self.call(p)
        flat = first[0] or []
        pairs = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
        if not pairs:
            return [], first[1:]
        records = await self.conn.one("mget", [f"tf:n:{nid}" for nid, _ in pairs])  # one reply to parse
        out, dead = [], []
        for (nid, blob), raw in zip(pairs, records):
            if raw is None:
                dead.append(nid)
                continue
            out.append((_node_parse(nid, raw), _unpack(blob)))
        if dead:
            await self.conn.one("hdel", f"tf:b:{content}", *dead)
        return out, first[1:]

    async def holders(self, content: str, first: int, last: int) -> list[tuple[NodeInfo, int]]:
        return (await self.lookup(content, first, last, None))[2]

    async def lookup(self, content: str, first: int, last: int,
                     asking: str | None) -> tuple[int | None, NodeInfo | None, list[tuple[NodeInfo, int]]]:
        """As ``MemoryPeerStore.lookup``, in two round trips."""
        mask = (1 << (last - first + 1)) - 1
        extra = [("get", (f"tf:k:{content}",))] + ([("get", (f"tf:n:{asking}",))] if asking else [])
        found, (known, *me) = await self._sampled_holders(content, extra)
        nchunks = int(known) if known else None
        me_info = _node_parse(asking, me[0]) if asking and me and me[0] else None
        if nchunks is None or last >= nchunks:
            return nchunks, me_info, []
        return nchunks, me_info, [(n, have) for n, bits in found if (have := (bits >> first) & mask)]

    async def claim(self, content: str, node_id: str, nchunks: int, want: int, now: float,
                    ttl: float) -> tuple[int, list[tuple[NodeInfo, int, bool]]]:
        """As ``MemoryPeerStore.claim``: chunks held by others (in the sample) first; the rest is
        claimed chunk by chunk with ``SET NX``, atomic in Redis: of any number of nodes and
        replicas asking at once, one gets each chunk, the others are told whose it is."""
        found, (exists, known) = await self._sampled_holders(
            content, [("exists", (f"tf:n:{node_id}",)), ("get", (f"tf:k:{content}",))])
        if not exists:
            raise KeyError(node_id)
        if known is not None and int(known) != nchunks:
            raise ValueError(f"image {content} has {int(known)} chunks, not {nchunks}")
        others, taken = [], 0
        for n, bits in found:
            if n.node_id != node_id and bits & want & ~taken:
                others.append((n, bits & want & ~taken, True))
                taken |= bits & want
                if taken & want == want:
                    break
        rest = [c for c in range(want.bit_length()) if (want & ~taken) >> c & 1]
        if not rest:
            return 0, others
        p = self.conn.batch()
        for c in rest:  # SET NX GET: nil if this node now holds the claim, else the claimer's id
            p.set(f"tf:cl:{content}:{c}", node_id, nx=True, get=True, px=int(ttl * 1000))
        owners: dict[str, int] = {}
        granted = 0
        for c, owner in zip(rest, await self.call(p)):
            if owner is None or owner.decode() == node_id:
                granted |= 1 << c
            else:
                owners[owner.decode()] = owners.get(owner.decode(), 0) | 1 << c
        if owners:
            records = await self.conn.one("mget", [f"tf:n:{other}" for other in owners])
            for (other, bits), raw in zip(owners.items(), records):
                if raw is None:  # its claimer is gone: this node fetches them (unclaimed)
                    granted |= bits
                else:
                    others.append((_node_parse(other, raw), bits, False))
        return granted, others

    async def expire(self, older_than: float) -> list[str]:
        """Nothing to sweep (keys expire by themselves): trims the statistics' set of live nodes
        and returns the nodes this replica took out of it (each is reported by one replica)."""
        old = await self.conn.one("zrangebyscore", "tf:alive", 0, time.time() - self._ttl_ms / 1000)
        if not old:
            return []
        p = self.conn.batch()
        for nid in old:
            p.zrem("tf:alive", nid)
        removed = await self.call(p)
        return [nid.decode() for nid, n in zip(old, removed) if n]

    async def statistics(self) -> dict:
        p = self.conn.batch()
        p.zcount("tf:alive", time.time() - self._ttl_ms / 1000, "+inf")
        p.scard("tf:images")
        p.info("memory")
        nodes, images, mem = await self.call(p)
        return {"nodes": nodes, "images": images, "store": "redis", "store_memory_bytes": mem.get("used_memory", 0),
                **self.conn.stats}
