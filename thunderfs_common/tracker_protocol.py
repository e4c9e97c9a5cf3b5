"""The tracker's wire format, version 1: value types and their strict parsing.

Shared by the server and the client the daemon imports, so both sides read and write the same
JSON.  Parsing refuses anything malformed with ``ProtocolError`` (the server answers 400 with its
message): every number is bounded, every name matches a pattern, so nothing a client sends can
grow the tracker's memory without bound or reach a path.

Chunk sets travel as bitmaps: bit ``c`` of a little-endian integer is chunk ``c``, base64'd.
Images are named by their *content key* (32 hex digits, what the daemon's cache is keyed by),
not by Glance id: two ids with the same bytes share chunks, a reused id with new bytes does not.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field

from thunderfs_common.chunk_digest import ALGORITHM, SIZE

API = "/v1"
MAX_CHUNKS = 1 << 24          # 1 TiB of 64 KiB chunks
MAX_RANGES = 10_000           # per image per delta
MAX_IMAGES_PER_MESSAGE = 1_000
MAX_RTT_ENTRIES = 256
MAX_LOCATION_DEPTH = 8

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CONTENT = re.compile(r"^[0-9a-f]{32}$")
_INSTANCE = re.compile(r"^(|[0-9a-f]{8,64})$")
_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]{1,200}(/[A-Za-z0-9._~/-]{0,50})?$")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong."""


def check_node_id(value) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(f"node id must match {_NAME.pattern}")
    return value


def check_content(value) -> str:
    if not isinstance(value, str) or not _CONTENT.match(value):
        raise ProtocolError("content key must be 32 lowercase hex digits")
    return value


def _int(obj: dict, name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{name} must be an integer from {lo} to {hi}")
    return value


def shared_prefix(a, b) -> int:
    """How many leading names two locations (zone, rack, host) share: the nearer, the more."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def parse_location(value) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if not isinstance(value, str):
        raise ProtocolError("location must be a string like zone/rack/host")
    parts = tuple(value.strip("/").split("/"))
    if len(parts) > MAX_LOCATION_DEPTH or not all(_NAME.match(p) for p in parts):
        raise ProtocolError(f"location must be up to {MAX_LOCATION_DEPTH} names joined by '/'")
    return parts


def encode_bits(bits: int, nbits: int) -> str:
    return base64.b64encode(bits.to_bytes(max(1, math.ceil(nbits / 8)), "little")).decode()


def decode_bits(text, nbits: int) -> int:
    if not isinstance(text, str) or len(text) > 4 * math.ceil(max(1, math.ceil(nbits / 8)) / 3) + 4:
        raise ProtocolError(f"bitmap must be base64 of at most {math.ceil(nbits / 8)} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bitmap is not valid base64") from None
    bits = int.from_bytes(raw, "little")
    if bits >> nbits:
        raise ProtocolError(f"bitmap has bits past chunk {nbits - 1}")
    return bits


def ranges_to_bits(value, nchunks: int) -> int:
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        raise ProtocolError(f"ranges must be a list of at most {MAX_RANGES} [first, last] pairs")
    bits = 0
    for item in value:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ProtocolError("each range must be [first, last] with integers")
        first, last = item
        if not 0 <= first <= last < nchunks:
            raise ProtocolError(f"range [{first}, {last}] is outside chunks 0..{nchunks - 1}")
        bits |= ((1 << (last - first + 1)) - 1) << first
    return bits


def chunks_to_bits(chunks) -> int:
    bits = 0
    for c in set(chunks):
        bits |= 1 << c
    return bits


def bits_to_ranges(bits: int) -> list[list[int]]:
    out, c = [], 0
    while bits:
        if bits & 1:
            run = (~bits & (bits + 1)).bit_length() - 1  # length of the run of ones at the bottom
            out.append([c, c + run - 1])
            bits >>= run
            c += run
        else:
            skip = (bits & -bits).bit_length() - 1
            bits >>= skip
            c += skip
    return out


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    peer_url: str
    location: tuple[str, ...] = ()
    load: int = 0
    rtt_ms: dict[str, float] = field(default_factory=dict, compare=False)
    # Random, kept with the node's cache: tells two daemons that claim one node id apart.
    instance: str = ""

    def to_json(self) -> dict:
        return {"peer_url": self.peer_url, "location": "/".join(self.location), "load": self.load,
                "rtt_ms": self.rtt_ms, **({"instance": self.instance} if self.instance else {})}

    @classmethod
    def parse(cls, node_id: str, obj) -> "NodeInfo":
        if not isinstance(obj, dict):
            raise ProtocolError("announce body must be a JSON object")
        url = obj.get("peer_url")
        if not isinstance(url, str) or not _URL.match(url):
            raise ProtocolError("peer_url must be an http(s) URL")
        rtt = obj.get("rtt_ms", {})
        if not isinstance(rtt, dict) or len(rtt) > MAX_RTT_ENTRIES:
            raise ProtocolError(f"rtt_ms must map at most {MAX_RTT_ENTRIES} node ids to milliseconds")
        clean = {}
        for k, v in rtt.items():
            check_node_id(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 600_000:
                raise ProtocolError("each rtt must be a number of milliseconds from 0 to 600000")
            clean[k] = float(v)
        instance = obj.get("instance", "")
        if not isinstance(instance, str) or not _INSTANCE.match(instance):
            raise ProtocolError("instance must be 8 to 64 hex digits")
        return cls(check_node_id(node_id), url, parse_location(obj.get("location")),
                   _int(obj, "load", 0, 1_000_000) if "load" in obj else 0, clean, instance)


@dataclass(frozen=True)
class ChunkUpdate:
    """One image's chunks on one node: the whole set (``full``), or bits added and removed."""

    content: str
    nchunks: int
    add: int = 0
    remove: int = 0
    full: bool = False

    def to_json(self) -> dict:
        if self.full:
            return {"content": self.content, "nchunks": self.nchunks, "bitmap": encode_bits(self.add, self.nchunks)}
        return {"content": self.content, "nchunks": self.nchunks,
                "add": bits_to_ranges(self.add), "remove": bits_to_ranges(self.remove)}

    @classmethod
    def parse(cls, obj, full: bool) -> "ChunkUpdate":
        if not isinstance(obj, dict):
            raise ProtocolError("each image must be a JSON object")
        content = check_content(obj.get("content"))
        nchunks = _int(obj, "nchunks", 1, MAX_CHUNKS)
        if full:
            return cls(content, nchunks, add=decode_bits(obj.get("bitmap"), nchunks), full=True)
        return cls(content, nchunks, add=ranges_to_bits(obj.get("add", []), nchunks),
                   remove=ranges_to_bits(obj.get("remove", []), nchunks))


@dataclass(frozen=True)
class ChunkState:
    """What a node holds, sent to the tracker: its whole state (``full``), or what changed."""

    full: bool
    updates: list[ChunkUpdate]

    def to_json(self) -> dict:
        return {"full": self.full, "images": [u.to_json() for u in self.updates]}

    @classmethod
    def parse(cls, obj) -> "ChunkState":
        if not isinstance(obj, dict) or not isinstance(obj.get("full"), bool):
            raise ProtocolError('chunks body must be {"full": true|false, "images": [...]}')
        images = obj.get("images")
        if not isinstance(images, list) or len(images) > MAX_IMAGES_PER_MESSAGE:
            raise ProtocolError(f"images must be a list of at most {MAX_IMAGES_PER_MESSAGE}")
        return cls(obj["full"], [ChunkUpdate.parse(i, obj["full"]) for i in images])


def parse_epoch(obj) -> str:
    """The tracker's epoch in a reply (a new one: it lost peer state)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("epoch"), str) or len(obj["epoch"]) > 64:
        raise ProtocolError("reply must have an epoch string")
    return obj["epoch"]


@dataclass(frozen=True)
class PeerRecord:
    """One answer of a lookup: a peer and which of the asked chunks it holds (bit 0 = first)."""

    node_id: str
    peer_url: str
    location: tuple[str, ...]
    load: int
    chunks: int

    def to_json(self, nbits: int) -> dict:
        return {"node_id": self.node_id, "peer_url": self.peer_url, "location": "/".join(self.location),
                "load": self.load, "chunks": encode_bits(self.chunks, nbits)}

    @classmethod
    def parse(cls, obj, nbits: int) -> "PeerRecord":
        node = NodeInfo.parse(obj.get("node_id"), obj)
        return cls(node.node_id, node.peer_url, node.location, node.load, decode_bits(obj.get("chunks"), nbits))


@dataclass(frozen=True)
class LookupReply:
    """Holders of chunks ``first..last``, nearest first; each peer's bits count from ``first``."""

    first: int
    last: int
    peers: list[PeerRecord]

    def to_json(self) -> dict:
        nbits = self.last - self.first + 1
        return {"first": self.first, "last": self.last, "peers": [p.to_json(nbits) for p in self.peers]}

    @classmethod
    def parse(cls, obj, first: int, last: int) -> "LookupReply":
        if not isinstance(obj, dict) or not isinstance(obj.get("peers"), list):
            raise ProtocolError("lookup reply must have peers")
        if (obj.get("first"), obj.get("last")) != (first, last):
            raise ProtocolError(f"lookup reply is for chunks {obj.get('first')}..{obj.get('last')}, "
                                f"not {first}..{last}")
        nbits = last - first + 1
        return cls(first, last, [PeerRecord.parse(p, nbits) for p in obj["peers"][:MAX_IMAGES_PER_MESSAGE]])


# A watch event writes a peer's chunks as [first, last] ranges when they are few, else as a bitmap.
WATCH_MAX_RANGES = 32


def _bits_json(bits: int, nbits: int):
    ranges = bits_to_ranges(bits)
    return ranges if len(ranges) <= WATCH_MAX_RANGES else encode_bits(bits, nbits)


@dataclass(frozen=True)
class WatchEvent:
    """What changed among an image's holders since a watch's last event
    (``GET /images/{content}/watch``): each peer named with all the chunks it holds (``whole``:
    the first event names every peer so) or with those it gained since.  Chunks count from 0.
    ``manifest``: the image's manifest was built or revoked since the watch's last event (the
    node asks for it now, instead of asking again and again while it is lazy)."""

    nchunks: int
    peers: list[tuple[PeerRecord, bool]]  # (record, whether its chunks are all it holds)
    manifest: bool = False

    def to_json(self) -> dict:
        out = []
        for p, whole in self.peers:
            rec = {"node_id": p.node_id, "peer_url": p.peer_url, "location": "/".join(p.location), "load": p.load}
            rec["chunks" if whole else "added"] = _bits_json(p.chunks, self.nchunks)
            out.append(rec)
        return {"nchunks": self.nchunks, "peers": out, **({"manifest": True} if self.manifest else {})}

    @classmethod
    def parse(cls, obj, nchunks: int) -> "WatchEvent":
        if not isinstance(obj, dict) or not isinstance(obj.get("peers"), list) or obj.get("nchunks") != nchunks:
            raise ProtocolError(f"a watch event must have peers, of an image of {nchunks} chunks")
        peers = []
        for p in obj["peers"][:MAX_IMAGES_PER_MESSAGE]:
            if not isinstance(p, dict):
                raise ProtocolError("a watch event's peer must be an object")
            whole = "chunks" in p
            raw = p.get("chunks" if whole else "added")
            bits = ranges_to_bits(raw, nchunks) if isinstance(raw, list) else decode_bits(raw, nchunks)
            node = NodeInfo.parse(p.get("node_id"), p)
            peers.append((PeerRecord(node.node_id, node.peer_url, node.location, node.load, bits), whole))
        return cls(nchunks, peers, obj.get("manifest") is True)


def parse_alive(obj) -> str:
    """The body of a light heartbeat (``POST /nodes/{node}/alive``): the announcing daemon's
    instance, so that a daemon whose id another one has taken meanwhile is told to announce."""
    if not isinstance(obj, dict):
        raise ProtocolError("alive body must be a JSON object")
    instance = obj.get("instance", "")
    if not isinstance(instance, str) or not _INSTANCE.match(instance):
        raise ProtocolError("instance must be 8 to 64 hex digits")
    return instance


@dataclass(frozen=True)
class AnnounceReply:
    """The tracker's answer to an announce: its epoch (a new one: it lost peer state, send the
    full state again) and the heartbeat it wants."""

    epoch: str
    heartbeat: float

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "heartbeat": self.heartbeat}

    @classmethod
    def parse(cls, obj) -> "AnnounceReply":
        if not isinstance(obj, dict) or not isinstance(obj.get("epoch"), str) or len(obj["epoch"]) > 64:
            raise ProtocolError("announce reply must have an epoch string")
        heartbeat = obj.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or not 0 < heartbeat <= 3600:
            raise ProtocolError("heartbeat must be a number of seconds from 0 to 3600")
        return cls(obj["epoch"], float(heartbeat))


@dataclass(frozen=True)
class Claim:
    """A node is about to fetch ``chunks`` (bits) of an image from Glance."""

    node_id: str
    nchunks: int
    chunks: int

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "nchunks": self.nchunks, "chunks": bits_to_ranges(self.chunks)}

    @classmethod
    def parse(cls, obj, signer: str | None = None) -> "Claim":
        """``signer``: the member that signed the request, who may speak only for itself."""
        if not isinstance(obj, dict):
            raise ProtocolError("claim must be a JSON object")
        node_id = check_node_id(signer or obj.get("node_id"))
        nchunks = _int(obj, "nchunks", 1, MAX_CHUNKS)
        return cls(node_id, nchunks, ranges_to_bits(obj.get("chunks", []), nchunks))


@dataclass(frozen=True)
class Claimed:
    """Chunks another node is fetching from Glance (or already ``held``): take them from it."""

    peer: PeerRecord  # its ``chunks`` unused (0): what it has is ``chunks`` here
    chunks: list[int]
    held: bool


@dataclass(frozen=True)
class ClaimReply:
    """The tracker's answer to a claim: the chunks this node may fetch from Glance, and who has
    or is fetching the others."""

    granted: list[int]
    claimed: list[Claimed]

    def to_json(self) -> dict:
        return {"granted": bits_to_ranges(chunks_to_bits(self.granted)), "claimed": [
            {"node_id": c.peer.node_id, "peer_url": c.peer.peer_url, "location": "/".join(c.peer.location),
             "load": c.peer.load, "chunks": bits_to_ranges(chunks_to_bits(c.chunks)), "held": c.held}
            for c in self.claimed]}

    @classmethod
    def parse(cls, obj, nchunks: int) -> "ClaimReply":
        if not isinstance(obj, dict) or not isinstance(obj.get("claimed"), list):
            raise ProtocolError("claim reply must have granted and claimed")

        def chunks(ranges) -> list[int]:  # checked, then expanded
            return [c for a, b in bits_to_ranges(ranges_to_bits(ranges, nchunks)) for c in range(a, b + 1)]

        claimed = []
        for o in obj["claimed"][:MAX_IMAGES_PER_MESSAGE]:
            node = NodeInfo.parse(o.get("node_id") if isinstance(o, dict) else None, o)
            claimed.append(Claimed(PeerRecord(node.node_id, node.peer_url, node.location, node.load, 0),
                                   chunks(o.get("chunks")), bool(o.get("held"))))
        return cls(chunks(obj.get("granted")), claimed)


MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4096, 16 * 2**20
DIGEST = SIZE


def check_chunk_size(value: int) -> int:
    if not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE or value & (value - 1):
        raise ProtocolError(f"chunk_size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    return value


def _signed(fields: dict, **kind: str) -> bytes:
    """What a proof covers: every field of a message but its proof, in one canonical form; a
    piece's and a revocation's carry their ``kind``, so that no proof passes for another
    message's (a manifest's has none: the form its stored proofs were made over)."""
    body = {k: v for k, v in fields.items() if k != "proof"}
    return json.dumps({**body, **kind}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Alike:
    """Chunks of an image that another image has under the same digest, and who holds them there
    (``GET /images/{image}/alike``): ``pairs`` of (chunk of the image asked about, chunk of
    ``content``), and each peer with its chunks of ``content`` (absolute bits)."""

    content: bytes
    size: int
    pairs: list[tuple[int, int]]
    peers: list[PeerRecord]

    def to_json(self) -> dict:
        lo = min((j for _, j in self.pairs), default=0)
        hi = max((j for _, j in self.pairs), default=0)
        return {"content": self.content.hex(), "size": self.size, "first": lo, "last": hi,
                "pairs": [list(p) for p in self.pairs],
                "peers": [PeerRecord(p.node_id, p.peer_url, p.location, p.load, p.chunks >> lo).to_json(hi - lo + 1)
                          for p in self.peers]}

    @classmethod
    def parse(cls, obj, first: int, count: int) -> "Alike":
        """One entry of an answer about chunks ``first..first+count-1``."""
        try:
            content = bytes.fromhex(obj["content"])
            size, lo, hi = int(obj["size"]), int(obj["first"]), int(obj["last"])
            pairs = [(int(k), int(j)) for k, j in obj["pairs"][:count]]
            if len(content) != 16 or size < 1 or not 0 <= lo <= hi < MAX_CHUNKS:
                raise ValueError("content, size or range out of bounds")
            if any(not first <= k < first + count or not lo <= j <= hi for k, j in pairs):
                raise ValueError("a pair outside the asked chunks or the answer's range")
            peers = [PeerRecord.parse(p, hi - lo + 1) for p in obj["peers"][:MAX_IMAGES_PER_MESSAGE]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed alike answer: {exc}") from None
        return cls(content, size, pairs,
                   [PeerRecord(p.node_id, p.peer_url, p.location, p.load, p.chunks << lo) for p in peers])


@dataclass(frozen=True)
class Manifest:
    """The digest (BLAKE3, ``chunk_digest``) of every chunk of one image, computed from Glance's bytes by the tracker and
    published only if the whole image's hash equals Glance's own ``os_hash_value``."""

    image_id: str
    size: int
    chunk_size: int
    os_hash_algo: str
    os_hash_value: str
    digests: bytes
    proof: bytes = b""  # the tracker's signature (or MAC) over ``signed_bytes()``; empty: none
    # How many of its chunks other images the tracker knows have (issue 31: 0, nothing to ask
    # ``alike`` for).  The tracker's word when it answers (its answer is authenticated), not part
    # of the manifest: not in ``to_json``, so not under the proof.
    alike: int = field(default=0, compare=False)

    @property
    def nchunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def signed_bytes(self) -> bytes:
        """What a manifest's proof covers: every field but the proof (and ``alike``), in one
        canonical form."""
        return _signed(self.to_json())

    def digest(self, chunk: int) -> bytes:
        return self.digests[chunk * DIGEST:(chunk + 1) * DIGEST]

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "size": self.size, "chunk_size": self.chunk_size,
                "os_hash_algo": self.os_hash_algo, "os_hash_value": self.os_hash_value,
                ALGORITHM: base64.b64encode(self.digests).decode(),
                **({"proof": base64.b64encode(self.proof).decode()} if self.proof else {})}

    @classmethod
    def parse(cls, obj) -> "Manifest":
        if not isinstance(obj, dict):
            raise ProtocolError("manifest must be a JSON object")
        try:
            m = cls(str(obj["image_id"]), int(obj["size"]), check_chunk_size(int(obj["chunk_size"])),
                    str(obj["os_hash_algo"]), str(obj["os_hash_value"]),
                    base64.b64decode(obj[ALGORITHM], validate=True),
                    base64.b64decode(obj.get("proof", ""), validate=True), max(0, int(obj.get("alike", 0))))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ProtocolError(f"malformed manifest: {exc}") from None
        if len(m.digests) != m.nchunks * DIGEST:
            raise ProtocolError(f"manifest has {len(m.digests) // DIGEST} digests for {m.nchunks} chunks")
        return m


MAX_PIECE_CHUNKS = 256  # chunks of one seed read or one piece of a lazy manifest


@dataclass(frozen=True)
class Piece:
    """The digests of chunks ``first..`` of one image, which the tracker read from Glance before it
    has checked the whole image against ``os_hash_value``: a part of a lazy manifest, proven like
    a manifest (``kind`` "piece" in what the proof covers: neither passes for the other)."""

    image_id: str
    size: int
    chunk_size: int
    os_hash_algo: str
    os_hash_value: str
    first: int
    digests: bytes
    proof: bytes = b""

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST

    def signed_bytes(self) -> bytes:
        return _signed(self.to_json(), kind="piece")

    def digest(self, chunk: int) -> bytes:
        i = chunk - self.first
        return self.digests[i * DIGEST:(i + 1) * DIGEST]

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "size": self.size, "chunk_size": self.chunk_size,
                "os_hash_algo": self.os_hash_algo, "os_hash_value": self.os_hash_value, "first": self.first,
                ALGORITHM: base64.b64encode(self.digests).decode(),
                **({"proof": base64.b64encode(self.proof).decode()} if self.proof else {})}

    @classmethod
    def parse(cls, obj) -> "Piece":
        if not isinstance(obj, dict):
            raise ProtocolError("a piece must be a JSON object")
        try:
            p = cls(str(obj["image_id"]), int(obj["size"]), check_chunk_size(int(obj["chunk_size"])),
                    str(obj["os_hash_algo"]), str(obj["os_hash_value"]), int(obj["first"]),
                    base64.b64decode(obj[ALGORITHM], validate=True),
                    base64.b64decode(obj.get("proof", ""), validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ProtocolError(f"malformed piece: {exc}") from None
        nchunks = max(1, -(-p.size // p.chunk_size))
        if (len(p.digests) % DIGEST or not 0 < p.count <= MAX_PIECE_CHUNKS or p.first < 0
                or p.first + p.count > nchunks):
            raise ProtocolError(f"a piece of {len(p.digests)} digest bytes from chunk {p.first} does not fit "
                                f"{nchunks} chunks")
        return p


# The peer answer's header that carries the tracker's pieces of the chunks it sends (a node
# forwards the pieces it checked them against), at most this long: the asker asks the tracker
# for what does not fit.
PIECES_HEADER = "X-Thunderfs-Pieces"
MAX_PIECES_HEADER = 12 * 1024


def encode_pieces(pieces: list[Piece]) -> str | None:
    """The header's value for ``pieces``; None if there are none or they do not fit."""
    if not pieces:
        return None
    value = json.dumps([p.to_json() for p in pieces], separators=(",", ":"))
    return value if len(value) <= MAX_PIECES_HEADER else None


def parse_pieces(value: str) -> list[Piece]:
    if len(value) > MAX_PIECES_HEADER:
        raise ProtocolError("the pieces header is too long")
    try:
        items = json.loads(value)
    except ValueError as exc:
        raise ProtocolError(f"the pieces header is not JSON: {exc}") from None
    if not isinstance(items, list) or len(items) > 64:
        raise ProtocolError("the pieces header must be a list of at most 64 pieces")
    return [Piece.parse(item) for item in items]


# The peer answer's header that names nodes that took the asked chunks from this one (relays):
# "node:hexbits,..." with bit i for chunk first+i.  A hint, not a fact: the asker asks only nodes
# the tracker named to it, and checks their bytes as any peer's.
TAKERS_HEADER = "X-Thunderfs-Takers"
MAX_TAKERS = 8

# On a 404 to a request that would wait: this node is not fetching some of those chunks either (its
# fetch failed or ended, or it never was: a claim the tracker still names is stale).  The waiter
# fetches them elsewhere at once instead of waiting for chunks that will not come.
NOT_FETCHING_HEADER = "X-Thunderfs-Not-Fetching"


def encode_takers(takers: list[tuple[str, int]]) -> str | None:
    """The header's value for (node id, bits relative to the asked first chunk); None if none."""
    return ",".join(f"{node}:{bits:x}" for node, bits in takers[:MAX_TAKERS]) or None


def parse_takers(value: str, count: int) -> list[tuple[str, int]]:
    """(node id, bits relative to the asked first chunk) of a takers header for ``count`` chunks."""
    items = value.split(",")
    if len(value) > MAX_TAKERS * 400 or len(items) > MAX_TAKERS:
        raise ProtocolError("the takers header is too long")
    out = []
    for item in items:
        node, _, bits = item.partition(":")
        try:
            n = int(bits, 16)
        except ValueError:
            raise ProtocolError(f"takers: {item[:80]!r} is not node:hexbits") from None
        if not _NAME.match(node) or n <= 0 or n >> count:
            raise ProtocolError(f"takers: {item[:80]!r} is not a node and some of {count} chunks")
        out.append((node, n))
    return out


@dataclass(frozen=True)
class Revocation:
    """The tracker's word that an image's lazy manifest is withdrawn: its whole-image check failed
    (Glance's bytes do not hash to ``os_hash_value``, or differ from what the pieces said), so
    every chunk a node took under it is dropped.  Proven like a manifest (``kind`` "revoked")."""

    image_id: str
    chunk_size: int
    os_hash_value: str
    why: str
    proof: bytes = b""

    def signed_bytes(self) -> bytes:
        return _signed(self.to_json(), kind="revoked")

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "chunk_size": self.chunk_size, "os_hash_value": self.os_hash_value,
                "why": self.why, **({"proof": base64.b64encode(self.proof).decode()} if self.proof else {})}

    @classmethod
    def parse(cls, obj) -> "Revocation":
        try:
            return cls(str(obj["image_id"]), check_chunk_size(int(obj["chunk_size"])), str(obj["os_hash_value"]),
                       str(obj["why"])[:500], base64.b64decode(obj.get("proof", ""), validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ProtocolError(f"malformed revocation: {exc}") from None


MAX_PROFILE_MS = 3_600_000   # first touches recorded up to an hour after the open
MAX_PROFILE_CHUNKS = 200_000  # 12 GiB of 64 KiB chunks read while booting: more is not a boot


def parse_touches(value, nchunks: int) -> list[tuple[int, int]]:
    """``[[chunk, ms], ...]``: each chunk once, inside the image, ms since the open."""
    if not isinstance(value, list) or len(value) > MAX_PROFILE_CHUNKS:
        raise ProtocolError(f"chunks must be a list of at most {MAX_PROFILE_CHUNKS} [chunk, ms] pairs")
    out, seen = [], set()
    for item in value:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ProtocolError("each profile entry must be [chunk, ms], two integers")
        c, ms = item
        if not 0 <= c < nchunks:
            raise ProtocolError(f"chunk {c} is outside the image's {nchunks} chunks")
        if not 0 <= ms <= MAX_PROFILE_MS:
            raise ProtocolError(f"time {ms} ms must be from 0 to {MAX_PROFILE_MS}")
        if c in seen:
            raise ProtocolError(f"chunk {c} is listed twice")
        seen.add(c)
        out.append((c, ms))
    return out


@dataclass(frozen=True)
class Recording:
    """A node's recording of the chunks a reader touched first after an open, with when."""

    node_id: str
    nchunks: int
    touches: list[tuple[int, int]]

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "nchunks": self.nchunks, "chunks": [[c, ms] for c, ms in self.touches]}

    @classmethod
    def parse(cls, obj, signer: str | None = None) -> "Recording":
        """``signer``: the member that signed the request, who may speak only for itself."""
        if not isinstance(obj, dict):
            raise ProtocolError("recording must be a JSON object")
        node_id = check_node_id(signer or obj.get("node_id"))
        nchunks = _int(obj, "nchunks", 1, MAX_CHUNKS)
        touches = parse_touches(obj.get("chunks"), nchunks)
        if not touches:
            raise ProtocolError("an empty recording says nothing")
        return cls(node_id, nchunks, touches)


@dataclass(frozen=True)
class Report:
    """A member says that a peer served a chunk that failed verification."""

    node_id: str  # the peer that lied
    content: str
    chunk: int
    reason: str

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "content": self.content, "chunk": self.chunk, "reason": self.reason[:200]}

    @classmethod
    def parse(cls, obj) -> "Report":
        if not isinstance(obj, dict):
            raise ProtocolError("report must be a JSON object")
        chunk = obj.get("chunk", 0)
        return cls(check_node_id(obj.get("node_id")), check_content(obj.get("content")),
                   chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else 0, str(obj.get("reason", ""))[:200])


@dataclass
class Profile:
    """A boot access profile: the chunks an image's readers touch first after opening it, in the
    order to fetch them (merged from several nodes' recordings), with their typical time."""

    content: str
    chunk_size: int
    nchunks: int
    version: int
    recordings: int
    touches: list[tuple[int, int]]

    def to_json(self) -> dict:
        return {"content": self.content, "chunk_size": self.chunk_size, "nchunks": self.nchunks,
                "version": self.version, "recordings": self.recordings,
                "chunks": [[c, ms] for c, ms in self.touches]}

    @classmethod
    def parse(cls, obj) -> "Profile":
        if not isinstance(obj, dict):
            raise ProtocolError("profile must be a JSON object")
        nchunks = _int(obj, "nchunks", 1, MAX_CHUNKS)
        return cls(check_content(obj.get("content")), check_chunk_size(_int(obj, "chunk_size", 1, 1 << 30)),
                   nchunks, _int(obj, "version", 1, 1 << 62), _int(obj, "recordings", 1, 1 << 20),
                   parse_touches(obj.get("chunks"), nchunks))
