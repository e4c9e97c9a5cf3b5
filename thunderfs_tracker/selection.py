"""Which peers a node should ask first: the peer-selection policy, apart from the store.

Nearest first: the longest shared location prefix (zone/rack/host), then the round-trip time the
asking node measured and reported, then the fewest uploads in progress.  Peers that tie are
shuffled, so that one peer does not serve everybody.
"""

from __future__ import annotations

import math
import random

from thunderfs_common.tracker_protocol import NodeInfo, shared_prefix


def rank(asking: NodeInfo | None, candidates: list[tuple[NodeInfo, int]],
         rng: random.Random | None = None) -> list[tuple[NodeInfo, int]]:
    rng = rng or random
    location = asking.location if asking else ()
    rtt = asking.rtt_ms if asking else {}
    keyed = [((-shared_prefix(location, node.location), rtt.get(node.node_id, math.inf), node.load),
              rng.random(), node, bits) for node, bits in candidates]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [(node, bits) for _, _, node, bits in keyed]
