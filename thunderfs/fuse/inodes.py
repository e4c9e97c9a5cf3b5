"""Inode numbers of the mount, and the lookup counts the kernel holds on them.

Numbers are never reused within one mount.  An image whose bytes change under the same id gets
a new inode, so the kernel's page cache of the old one can never be served for the new bytes.
"""

from __future__ import annotations

from collections import Counter

from thunderfs_common.image import ImageMeta


ROOT = 1  # pyfuse3.ROOT_INODE
IMAGES_DIR = 2
FIRST_IMAGE = 3


class InodeTable:
    def __init__(self) -> None:
        self._by_content: dict[tuple[str, bytes], int] = {}
        self._meta: dict[int, ImageMeta] = {}
        self._lookups: Counter[int] = Counter()
        self._open: Counter[int] = Counter()
        self._next = FIRST_IMAGE

    def of_image(self, meta: ImageMeta) -> int:
        key = (meta.id, meta.content_key)
        ino = self._by_content.get(key)
        if ino is None:
            ino = self._by_content[key] = self._next
            self._next += 1
        self._meta[ino] = meta
        return ino

    def image(self, ino: int) -> ImageMeta | None:
        return self._meta.get(ino)

    def looked_up(self, ino: int) -> None:
        if ino >= FIRST_IMAGE:
            self._lookups[ino] += 1

    def forget(self, ino: int, n: int, current: dict[str, ImageMeta]) -> None:
        """The kernel dropped n references; drop the inode if no reference, handle or listing holds it."""
        if ino < FIRST_IMAGE:
            return
        self._lookups[ino] -= n
        if self._lookups[ino] <= 0:
            del self._lookups[ino]
            self._maybe_drop(ino, current)

    def opened(self, ino: int) -> None:
        self._open[ino] += 1

    def closed(self, ino: int, current: dict[str, ImageMeta]) -> None:
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            self._maybe_drop(ino, current)

    def _maybe_drop(self, ino: int, current: dict[str, ImageMeta]) -> None:
        meta = self._meta.get(ino)
        if meta is None:
            return
        listed = current.get(meta.id)
        if ino in self._lookups or ino in self._open or (
                listed is not None and listed.content_key == meta.content_key):
            return
        del self._meta[ino]
        self._by_content.pop((meta.id, meta.content_key), None)

    def __len__(self) -> int:
        return len(self._meta)
