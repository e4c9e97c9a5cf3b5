"""Which images exist: Glance's active images, refreshed on a TTL.

The last listing is kept in the index, so a mount made while Glance is down still shows what
was there.  Listeners hear of images that appeared and disappeared (the fs drops stale dentries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from thunderfs.chunk_index import ChunkIndex
from thunderfs.errors import OriginError
from thunderfs.image import ImageMeta
from thunderfs.origin import GlanceOrigin

log = logging.getLogger(__name__)

Listener = Callable[[list[ImageMeta], list[ImageMeta]], None]


class Catalog:
    def __init__(self, origin: GlanceOrigin, index: ChunkIndex, *, ttl: float = 10.0, timeout: float = 5.0,
                 miss_refresh_interval: float = 1.0):
        self._origin = origin
        self._index = index
        self.ttl = ttl
        self._timeout = timeout
        self._miss_interval = miss_refresh_interval
        self.images: dict[str, ImageMeta] = {}
        self._listeners: list[Listener] = []
        self._last_attempt = -1e9
        self._lock = trio.Lock()
        self.origin_ok: bool | None = None
        self.refreshes = 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def load_saved(self) -> int:
        self.images = {i: ImageMeta(**r) for i, r in self._index.load_images().items()}
        return len(self.images)

    async def refresh(self) -> None:
        """Ask Glance now; raises OriginError if it cannot be asked (the old listing stays)."""
        async with self._lock:
            self._last_attempt = trio.current_time()
            try:
                with trio.fail_after(self._timeout):
                    listing = await self._origin.list_images()
            except trio.TooSlowError:
                self._set_origin_ok(False, f"no listing within {self._timeout:g}s")
                raise OriginError(f"Glance gave no image listing within {self._timeout:g}s") from None
            except OriginError as exc:
                self._set_origin_ok(False, str(exc))
                raise
            self._set_origin_ok(True)
            self.refreshes += 1
            new = {m.id: m for m in listing}
            old = self.images
            removed = [m for i, m in old.items() if i not in new or new[i].content_id != m.content_id]
            added = [m for i, m in new.items() if i not in old or old[i].content_id != m.content_id]
            self.images = new
            if added or removed or new != old:
                self._index.save_images({i: m.to_record() for i, m in new.items()})
            if added or removed:
                log.info("image listing: %d images (%d new, %d gone)", len(new), len(added), len(removed))
                for listener in self._listeners:
                    listener(added, removed)

    def _set_origin_ok(self, ok: bool, why: str = "") -> None:
        if ok and self.origin_ok is False:
            log.warning("Glance is reachable again")
        elif not ok and self.origin_ok is not False:
            log.warning("Glance listing failed (%s); serving the last listing of %d images", why, len(self.images))
        self.origin_ok = ok

    async def lookup(self, image_id: str) -> ImageMeta | None:
        """An image by id; an unknown id triggers a prompt refresh (at most one per interval)."""
        meta = self.images.get(image_id)
        if meta is None and trio.current_time() - self._last_attempt >= self._miss_interval:
            try:
                await self.refresh()
            except OriginError:
                pass
            meta = self.images.get(image_id)
        return meta

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(max(0.0, self._last_attempt + self.ttl - trio.current_time()))
            try:
                await self.refresh()
            except OriginError:
                pass
