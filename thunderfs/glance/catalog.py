"""Which images exist: Glance's active images, refreshed on a TTL.

The last listing is kept in the index, so a mount made while Glance is down still shows what
was there.  Listeners hear of images that appeared and disappeared (the fs drops stale dentries).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection

import trio

from thunderfs.cache.index import ChunkIndex
from thunderfs_common.glance_client import GlanceError
from thunderfs_common.image import ImageMeta
from thunderfs_common.glance_client import GlanceClient
from thunderfs.reachability import Reachability

log = logging.getLogger(__name__)

# Glance image ids are UUIDs; anything else is no image and is never sent to Glance.
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")

Listener = Callable[[list[ImageMeta], list[ImageMeta]], None]


class Catalog:
    def __init__(self, origin: GlanceClient, index: ChunkIndex, *, ttl: float = 10.0, timeout: float = 5.0,
                 miss_refresh_interval: float = 1.0):
        self._origin = origin
        self._index = index
        self.ttl = ttl
        self._timeout = timeout
        self._miss_interval = miss_refresh_interval
        self.images: dict[str, ImageMeta] = {}
        self._listeners: list[Listener] = []
        self._last_attempt = -1e9
        self._misses: dict[str, float] = {}
        self._lock = trio.Lock()
        self._glance = Reachability("Glance")
        # Ids to keep listed when Glance drops them (images Nova instances are backed by: the
        # daemon sets it from nova_base), and those kept so now.
        self.retain: Callable[[], Collection[str]] = lambda: ()
        self.gone: set[str] = set()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def load_saved(self) -> int:
        self.images = {i: ImageMeta(**r) for i, r in self._index.load_images().items()}
        return len(self.images)

    async def refresh(self) -> None:
        """Ask Glance now; raises GlanceError if it cannot be asked (the old listing stays)."""
        async with self._lock:
            self._last_attempt = trio.current_time()
            try:
                with trio.fail_after(self._timeout):
                    listing = await self._origin.list_images()
            except trio.TooSlowError:
                self._glance.down(f"no listing within {self._timeout:g}s", self._meanwhile())
                raise GlanceError(f"Glance gave no image listing within {self._timeout:g}s") from None
            except GlanceError as exc:
                self._glance.down(str(exc), self._meanwhile())
                raise
            self._glance.up()
            new = {m.id: m for m in listing}
            old = self.images
            gone = {i for i in self.retain() if i not in new and i in old}
            for image_id in gone - self.gone:
                log.warning("image %s left Glance; still listed while Nova instances are backed by it "
                            "(what is cached reads, the rest cannot be fetched)", image_id)
            new.update((i, old[i]) for i in gone)
            self.gone = gone
            removed = [m for i, m in old.items() if i not in new or new[i].content_id != m.content_id]
            added = [m for i, m in new.items() if i not in old or old[i].content_id != m.content_id]
            self.images = new
            if added or removed or new != old:
                self._index.save_images({i: m.to_record() for i, m in new.items()})
            if added or removed:
                log.info("image listing: %d images (%d new, %d gone)", len(new), len(added), len(removed))
                for listener in self._listeners:
                    listener(added, removed)

    def _meanwhile(self) -> str:
        return f"serving the last listing of {len(self.images)} images"

    @property
    def origin_ok(self) -> bool | None:
        return self._glance.ok

    async def wait_fresh(self) -> None:
        """Before a directory listing: ask Glance now (a listing already under way counts), unless
        Glance is known to be down: then the background refresher finds out and ``ls`` never stalls."""
        if self.origin_ok is False:
            return
        started = trio.current_time()
        async with self._lock:
            if self._last_attempt >= started:
                return
        try:
            await self.refresh()
        except GlanceError:
            pass

    async def lookup(self, image_id: str) -> ImageMeta | None:
        """An image by id.  An id not in the listing is asked of Glance at once (a new image is
        there without waiting for the next listing); misses are remembered for a moment so that
        lookups of names that are no image cost Glance little."""
        meta = self.images.get(image_id)
        if meta is not None or not _IMAGE_ID.match(image_id):
            return meta
        now = trio.current_time()
        if now - self._misses.get(image_id, -1e9) < self._miss_interval:
            return None
        if len(self._misses) > 10_000:
            self._misses.clear()
        try:
            with trio.fail_after(self._timeout):
                meta = await self._origin.image(image_id)
        except (GlanceError, trio.TooSlowError):
            meta = None
        if meta is None or meta.status != "active" or meta.id != image_id:
            self._misses[image_id] = now
            return None
        self.images = {**self.images, meta.id: meta}
        self._index.save_images({i: m.to_record() for i, m in self.images.items()})
        for listener in self._listeners:
            listener([meta], [])
        return meta

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(max(0.0, self._last_attempt + self.ttl - trio.current_time()))
            try:
                await self.refresh()
            except GlanceError:
                pass
