"""Which nodes took which chunks from this node lately: the peer server names them to a later
asker (``X-Thunderfs-Takers``), so that a crowd relays chunks among itself instead of all asking
the node that fetched them.  Bounded: the latest ``TAKERS_KEPT`` images, and nodes per image."""

from __future__ import annotations

TAKERS_KEPT = (16, 64)  # images, and nodes per image, whose takes are remembered (the latest)


class Takers:
    def __init__(self):
        self._takers: dict[bytes, dict[str, int]] = {}  # content -> node -> chunks it took (bits)

    def took(self, content: bytes, node: str, first: int, count: int) -> None:
        """``node`` was sent chunks ``first .. first + count - 1`` of ``content``."""
        images, nodes = TAKERS_KEPT
        takers = self._takers.pop(content, None) or {}
        self._takers[content] = takers  # the latest last
        if len(self._takers) > images:
            del self._takers[next(iter(self._takers))]
        bits = takers.pop(node, 0) | ((1 << count) - 1) << first
        takers[node] = bits
        if len(takers) > nodes:
            del takers[next(iter(takers))]

    def of(self, content: bytes, first: int, count: int, asker: str) -> list[tuple[str, int]]:
        """Nodes other than ``asker`` that took some of the chunks from here, latest first, with
        which (bits from ``first``): those that took them all first."""
        mask = (1 << count) - 1
        found = [(node, have) for node, bits in reversed(self._takers.get(content, {}).items())
                 if node != asker and (have := bits >> first & mask)]
        found.sort(key=lambda t: t[1] != mask)  # stable: latest first among equals
        return found  # the header names the first MAX_TAKERS (encode_takers)
