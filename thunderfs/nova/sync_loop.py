"""Keeping Nova's image cache while the daemon runs: a sync pass every listing TTL, off the event
loop; released (no more passes, the links stay) for a rollback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio

from thunderfs.nova.base_dir import NovaBaseDir, NovaBaseError

log = logging.getLogger(__name__)


class NovaService:
    def __init__(self, base: NovaBaseDir):
        self.base = base
        self._pass_lock = trio.Lock()

    async def run(self, image_ids: Callable[[], Iterable[str]], interval: float, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sync every ``interval`` seconds, off the event loop (the directory may be on NFS)."""
        task_status.started()
        try:
            await self._passes(image_ids, interval)
        finally:
            self.base.stopped = True  # no pass runs from now on

    async def _passes(self, image_ids: Callable[[], Iterable[str]], interval: float) -> None:
        while not self.base.released:
            async with self._pass_lock:
                if self.base.released:
                    break
                try:
                    await trio.to_thread.run_sync(self.base.sync, list(image_ids()))
                except NovaBaseError as exc:
                    if str(exc) != self.base.last_error:
                        log.error("%s", exc)
                    self.base.last_error = str(exc)
            await trio.sleep(interval)

    async def release(self, _req: dict | None = None) -> dict:
        """Stop keeping the directory (for a rollback), once no pass is under way; the links stay."""
        self.base.released = True
        async with self._pass_lock:
            self.base.in_use_ids = set()  # the copies serve instances now: nothing to keep listed
        log.info("no longer keeping %s (released for a rollback); its links stay", self.base.base_dir)
        return {"base_dir": str(self.base.base_dir), "released": True}
