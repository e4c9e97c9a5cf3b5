"""Chunk owners: each chunk of an image nobody holds yet has one owner among the nodes that hold
some of the image, by rendezvous hashing (highest random weight): every node that knows the same
holders names the same owner for a chunk, and asks nobody.

A node fetches the chunks it owns (from the seed without a claim while the tracker seeds the
image; from Glance, claimed, once it has a manifest), and asks each other chunk's owner for it,
which fetches it when asked (``PeerSource.fetch_for_peer``).  Claimed alone, a known image's
first copies went to whoever claimed first: one node of 8 read a whole image from Glance and the
others took it from that one.  A claim per read made
a crowd's first boot of a new image cost the tracker one request per node and per read (issue 27:
334 a node as 32 nodes booted at once, the target 30).  Nodes that know different holders (a new
holder is named a second or two later to some than to others) may fetch a chunk twice from the
seed, which reads Glance once for everybody: Glance sends no more for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash


# The bytes one owner owns together: a read's few chunks, and the run a crowd waits for, go to one
# node in one request (owned chunk by chunk, a 32-node storm sent twice the peer requests and
# 2.4 x the tracker's seed requests of claims, and its daemons spent 3.3 CPU s a node, not 2.7).
WINDOW = 2**20


def window(chunk: int, chunk_size: int) -> int:
    """The ``WINDOW`` a chunk is in: its owner is the window's."""
    return chunk * chunk_size // WINDOW


def owner(content: bytes, window: int, members: Iterable[str]) -> str:
    """The member (node id) that owns ``window`` of the image ``content`` (``members``: not empty)."""
    key = content + window.to_bytes(8, "little")
    return max(members, key=lambda node: xxhash.xxh3_64_intdigest(key + node.encode()))
