"""Inode numbers of the mount, and what the kernel holds of them.

An image's inode number is derived from its id and its content (a 63-bit hash), so that every
process serving the same connection, one after the other, gives the same numbers without being
told; an image whose bytes change under the same id gets a new inode, so the kernel's page cache
of the old bytes can never be served for the new ones.

What cannot be derived is an image Glance no longer lists while the kernel still holds its inode
(a file open since before the image was deleted).  So every image whose inode the kernel holds
(looked up or open) is kept in the ``SessionState`` from its first reference to its last, and the
next process keeps those (*inherited*: how many references the kernel has is not known there)
until the kernel forgets them: an image only the previous process had open stays readable if
Glance deletes it after the handover.  The kernel forgets an inode when it evicts it, with all
its references in one FORGET, so one FORGET of an inherited inode drops it (the rare FORGET of
one lookup whose answer the kernel discarded would drop it early).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

from thunderfs.fuse.state import SessionState
from thunderfs_common.image import ImageMeta

log = logging.getLogger(__name__)

ROOT = 1
IMAGES_DIR = 2
FIRST_IMAGE = 3


def derive(meta: ImageMeta) -> int:
    digest = hashlib.blake2b(meta.id.encode() + b"\0" + meta.content_key, digest_size=8).digest()
    return FIRST_IMAGE + int.from_bytes(digest, "little") % (2**63 - FIRST_IMAGE)


class InodeTable:
    def __init__(self, state: SessionState | None = None) -> None:
        self._state = state
        self._meta: dict[int, ImageMeta] = {}
        self._listed: dict[int, ImageMeta] = {}
        self._lookups: Counter[int] = Counter()
        self._open: Counter[int] = Counter()
        # Held by a previous process: how many references the kernel has is unknown, so kept.
        self._inherited: set[int] = set()
        if state is not None:
            for ino, record in state.held.items():
                self._meta[ino] = ImageMeta(**record)
                self._inherited.add(ino)

    def listing(self, images: dict[str, ImageMeta], removed: list[ImageMeta]) -> None:
        """Glance's listing changed: images it dropped that the kernel still holds are saved."""
        self._listed = {derive(m): m for m in images.values()}
        changed = False
        for meta in removed:
            ino = derive(meta)
            if ino in self._meta and (ino in self._lookups or ino in self._open or ino in self._inherited):
                if self._state is not None and ino not in self._state.held:
                    self._state.held[ino] = meta.to_record()
                    changed = True
        if changed:
            self._save()

    def of_image(self, meta: ImageMeta) -> int:
        ino = derive(meta)
        known = self._meta.get(ino)
        if known is not None and (known.id, known.content_key) != (meta.id, meta.content_key):
            log.error("inode %d of image %s collides with image %s; serving the newer", ino, meta.id, known.id)
        self._meta[ino] = meta
        return ino

    def image(self, ino: int) -> ImageMeta | None:
        meta = self._meta.get(ino)
        if meta is None:
            # Looked up by a previous process on this connection: derived from the listing.
            meta = self._listed.get(ino)
            if meta is not None:
                self._meta[ino] = meta
        return meta

    def looked_up(self, ino: int) -> None:
        if ino >= FIRST_IMAGE:
            self._held(ino)
            self._lookups[ino] += 1

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped n references; drop the inode if nothing else holds it."""
        if ino < FIRST_IMAGE:
            return
        if ino in self._inherited:  # evicted by the kernel: every reference, this process's too
            self._inherited.discard(ino)
            self._lookups.pop(ino, None)
            self._maybe_drop(ino)
            return
        if ino not in self._lookups:
            return
        self._lookups[ino] -= n
        if self._lookups[ino] <= 0:
            del self._lookups[ino]
            self._maybe_drop(ino)

    def opened(self, ino: int) -> None:
        self._held(ino)
        self._open[ino] += 1

    def _held(self, ino: int) -> None:
        """The kernel takes a reference to ``ino``: saved for the next process at the first."""
        state = self._state
        if state is None or ino in state.held:
            return
        meta = self._meta.get(ino)
        if meta is not None:
            state.held[ino] = meta.to_record()
            self._save()

    def closed(self, ino: int) -> None:
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            self._maybe_drop(ino)

    def _maybe_drop(self, ino: int) -> None:
        if ino in self._lookups or ino in self._open or ino in self._inherited:
            return
        meta = self._meta.get(ino)
        if meta is None:
            return
        if self._listed.get(ino) is None:
            del self._meta[ino]
        if self._state is not None and self._state.held.pop(ino, None) is not None:
            self._save()

    def _save(self) -> None:
        try:
            self._state.save()
        except (OSError, ValueError) as exc:
            log.warning("could not save the images the kernel holds for the next process: %s", exc)

    def __len__(self) -> int:
        return len(self._meta)
