"""The control socket's profile operations: image ids in, plain dicts out."""

from __future__ import annotations

from thunderfs.glance.catalog import Catalog
from thunderfs.cache.store import ChunkStore, ImageData
from thunderfs_common.image import ImageMeta
from thunderfs.profiles.registry import Profiles


class ProfileControl:
    def __init__(self, catalog: Catalog, store: ChunkStore, profiles: Profiles):
        self._catalog = catalog
        self._store = store
        self._profiles = profiles

    def handlers(self) -> dict:
        return {"profile_record": self.record, "profile_show": self.show, "prefetch": self.prefetch,
                "warm": self.warm, "job": self.job, "cancel": self.cancel}

    async def _image(self, req: dict) -> tuple[ImageMeta, ImageData]:
        image_id = str(req.get("image_id", ""))
        meta = await self._catalog.lookup(image_id)
        if meta is None:
            raise ValueError(f"no active image {image_id!r} in Glance")
        return meta, self._store.image(meta.content_key, meta.size)

    def _need_tracker(self) -> None:
        if not self._profiles.has_tracker:
            raise ValueError("this mount has no --tracker: profiles live at the tracker")

    async def record(self, req: dict) -> dict:
        self._need_tracker()
        meta, img = await self._image(req)
        seconds = float(req.get("seconds") or self._profiles.record_window or 60.0)
        if not 0 < seconds <= 3600:
            raise ValueError("--seconds must be from 0 to 3600")
        started = self._profiles.start_recording(meta, img, seconds)
        return {"recording": True, "already": not started, "seconds": seconds}

    async def show(self, req: dict) -> dict:
        self._need_tracker()
        meta, img = await self._image(req)
        profile = await self._profiles.profile(meta, img)
        if profile is None:
            raise ValueError(f"the tracker has no profile of {meta.id} that fits it")
        return {"image_id": meta.id, **profile.to_json()}

    async def prefetch(self, req: dict) -> dict:
        self._need_tracker()
        meta, img = await self._image(req)
        return self._profiles.start_job(meta, img, "prefetch").statistics()

    async def warm(self, req: dict) -> dict:
        meta, img = await self._image(req)
        return self._profiles.start_job(meta, img, "warm").statistics()

    async def job(self, req: dict) -> dict:
        meta, img = await self._image(req)
        return self._profiles.activity(meta, img).statistics()

    async def cancel(self, req: dict) -> dict:
        meta, img = await self._image(req)
        return {"cancelled": self._profiles.cancel_job(meta, img)}
