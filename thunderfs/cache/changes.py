"""The change feed: which chunks became servable or went away since the announcer last asked.

Invariant: a chunk is in at most one of an image's two sets, the side of its latest change (a
chunk staged then dropped before the next drain is reported gone, not both).  Nothing is
recorded until the first ``drain``: a node without peers keeps no such log.
"""

from __future__ import annotations

from thunderfs.cache.image_data import ImageData


class ChangeFeed:
    def __init__(self):
        self._changes: dict[bytes, tuple[ImageData, set[int], set[int]]] = {}
        self._tracking = False

    def drain(self) -> dict[bytes, tuple[ImageData, set[int], set[int]]]:
        """Per content: (its data, chunks added, chunks removed) since the last call."""
        self._tracking = True
        changes, self._changes = self._changes, {}
        return changes

    def peek(self) -> dict[bytes, tuple[ImageData, set[int], set[int]]]:
        """What ``drain`` would return, left in place (not to be changed by the caller)."""
        return self._changes

    def pending(self) -> int:
        """Chunks that became servable or went away since the last ``drain``."""
        return sum(len(added) + len(removed) for _, added, removed in self._changes.values())

    def note(self, img: ImageData, chunk: int, added: bool) -> None:
        if not self._tracking:
            return
        entry = self._changes.get(img.content)
        if entry is None:
            entry = self._changes[img.content] = (img, set(), set())
        (entry[1] if added else entry[2]).add(chunk)
        (entry[2] if added else entry[1]).discard(chunk)
