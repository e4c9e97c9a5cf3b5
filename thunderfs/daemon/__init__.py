"""The composition root: builds every part in one nursery and one AsyncExitStack, mounts, serves.

Nothing else knows all the parts.  ``run`` reads as the order of the start: the host's checks
(``host``), the cache (``storage``), Glance and the listing (``origin``), the peers
(``swarm``), the read corridor (``read_path``), the FUSE connection and its session
(``connection``).  Teardown runs in reverse: stop serving FUSE, stop the background tasks, make
staged chunks durable, close the index.

A mount outlives this process when a service manager (systemd, or the keeper) holds its
``/dev/fuse`` descriptor: the process mounts once and stores the descriptor there; each later
process is handed it (``inherited``) and takes the connection over.  SIGTERM, or ``thunderfs
restart``, then ends this process without unmounting ("handed over"); only an unmount ends the
mount ("unmounted").
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import trio

from thunderfs.config import MountConfig
from thunderfs.daemon.connection import HANDED_OVER, UNMOUNTED, Connection, connect
from thunderfs.daemon.host import check_mountpoint, image_owner, lock_cache_dir
from thunderfs.daemon.origin import connect_glance, list_images
from thunderfs.daemon.read_path import build_read_path
from thunderfs.daemon.storage import open_storage
from thunderfs.daemon.swarm import Swarm, join_swarm
from thunderfs.fuse import mounting
from thunderfs.profiles.control import ProfileControl
from thunderfs.service import control
from thunderfs.service.metrics import DaemonMetrics
from thunderfs.service.status import ImageStatus
from thunderfs_common.image import ImageMeta
from thunderfs_common.keystone import KeystoneSettings

__all__ = ["HANDED_OVER", "UNMOUNTED", "run"]

log = logging.getLogger(__name__)


async def run(config: MountConfig, keystone: KeystoneSettings | None = None,
              ready: Callable[[], None] = lambda: None, inherited: dict[str, int] | None = None) -> str:
    """Mount (or take over ``inherited``: the descriptors "fuse" and "session") and serve until
    unmounted (``UNMOUNTED``) or told to hand over (``HANDED_OVER``); calls ``ready()`` once the
    mount is served.  ``keystone``: the credentials to get Glance tokens with (None: a Glance
    without Keystone)."""
    inherited = dict(inherited or {})
    # Once mounted, any stat under the mount point would wait on this very process.
    mountpoint = control.canonical(config.mountpoint)
    if "fuse" not in inherited:
        check_mountpoint(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        for fd in inherited.values():
            stack.callback(os.close, fd)
        daemon = Daemon(config, mountpoint)
        await daemon.build(keystone, inherited, stack)
        await daemon.serve(ready)
        with trio.CancelScope(shield=True):
            await daemon.store.commit(touch=True)
        log.info("%s %s", daemon.conn.ending, mountpoint)
    return daemon.conn.ending


class Daemon:
    """Every part of one serving process, built in the order of the start (``build``), then
    served (``serve``)."""

    def __init__(self, config: MountConfig, mountpoint: Path):
        self.config = config
        self.mountpoint = mountpoint
        keeper = os.environ.get("THUNDERFS_KEEPER_PID")  # set by the keeper; None under systemd
        self.keeper_pid = int(keeper) if keeper and keeper.isdigit() else None
        self.started = time.time()
        self.conn: Connection | None = None
        self.swarm: Swarm | None = None
        self.metrics: DaemonMetrics | None = None

    async def build(self, keystone: KeystoneSettings | None, inherited: dict[str, int],
                    stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        stack.callback(os.close, lock_cache_dir(config.cache_dir))
        self.storage = open_storage(config, stack)
        self.store = self.storage.store
        self.origin = await connect_glance(config, keystone, self.storage.index, stack)
        self.listing = await list_images(config, self.origin, self.storage.index, self.mountpoint)
        self.catalog = self.listing.catalog
        if config.tracker:
            self.swarm = await join_swarm(config, self.storage.index, self.store, stack, self._revoked)
        if config.metrics_listen:
            self.metrics = DaemonMetrics(lambda: self.stats({}))
        self.path = build_read_path(config, self.store, self.storage.buffers, self.origin, self.swarm, stack,
                                    self.metrics.observe if self.metrics else None)
        self.jobs = ProfileControl(self.catalog, self.store, self.path.profiles)
        self.image_status = ImageStatus(self.catalog, self.store, self.path.profiles,
                                        self.swarm.peers if self.swarm else None)
        owner = image_owner(config)  # before the mount, as every start-up error
        if self.metrics is not None:  # before the mount: a port in use is a start-up error, not a crash loop
            self.metrics.start(*config.metrics_address)
            stack.callback(self.metrics.stop)
        self.conn = connect(config, self.mountpoint, inherited, stack)
        self.session = self.conn.serve_with(config, self.catalog, self.path.readers, owner)

    def _revoked(self, meta: ImageMeta) -> None:
        """The tracker revoked the image's lazy manifest: what this node took under it goes,
        from the cache and from the kernel's page cache."""
        self.store.drop_image(meta.content_key)
        if self.conn is not None and self.conn.ops is not None:
            self.conn.ops.image_bytes_dropped(meta)

    async def serve(self, ready: Callable[[], None]) -> None:
        """Start every task, serve the mount, call ``ready()``; return once the session ends
        (unmounted, or handed over)."""
        session, path, swarm, listing, conn = self.session, self.path, self.swarm, self.listing, self.conn
        async with trio.open_nursery() as nursery:
            async def serve_fuse() -> None:
                await session.serve()
                nursery.cancel_scope.cancel()

            await nursery.start(_watch_signals, conn.stop)
            await nursery.start(self.store.run)
            await conn.ops.start()
            await nursery.start(path.fetcher.run)
            await nursery.start(path.glance.run)
            if swarm is not None:
                await nursery.start(swarm.peers.run)
            await nursery.start(self.catalog.run)
            await nursery.start(path.profiles.run)
            nursery.start_soon(serve_fuse)
            await session.wait_initialized()
            why = mounting.set_readahead(self.mountpoint, self.config.kernel_readahead // 1024)
            if why is not None:
                log.info("could not raise the kernel readahead of %s: %s", self.mountpoint, why)
            await nursery.start(control.serve, control.socket_path(self.mountpoint), self._handlers())
            control.write_record(self.mountpoint, self._record())
            if swarm is not None:
                await nursery.start(swarm.server.serve)
                await nursery.start(swarm.announcer.run)
            if listing.nova is not None:
                catalog = self.catalog
                await nursery.start(listing.nova_service.run,
                                    lambda: [i for i in catalog.images if i not in catalog.gone], catalog.ttl)
            log.info("%s %s: %d images, Glance %s, cache %s (%d MiB of %d MiB used)",
                     "took over" if session.takeover else "mounted", self.mountpoint, len(self.catalog.images),
                     self.origin.url, self.config.cache_dir, self.store.statistics()["used"] >> 20,
                     self.config.cache_size >> 20)
            ready()
        if session.unmounted:
            conn.ending = UNMOUNTED
            control.remove_record(self.mountpoint)

    def _handlers(self) -> dict:
        """What the control socket answers."""
        nova = self.listing.nova_service
        return {"stats": self.stats, "restart": self.conn.restart, **self.jobs.handlers(),
                **self.image_status.handlers(), **({"nova_release": nova.release} if nova else {})}

    def _record(self) -> dict:
        """What ``thunderfs`` commands find of this process (``control.write_record``)."""
        return {"pid": os.getpid(), "mountpoint": str(self.mountpoint), "cache_dir": str(self.config.cache_dir),
                "glance": self.origin.url, "socket": str(control.socket_path(self.mountpoint)),
                "keeper": self.keeper_pid}

    def stats(self, _req: dict) -> dict:
        origin, path, catalog = self.origin, self.path, self.catalog
        return {
            "pid": os.getpid(), "keeper": self.keeper_pid, "uptime": time.time() - self.started,
            "mountpoint": str(self.mountpoint),
            "glance": {"url": origin.url, "reachable": catalog.origin_ok,
                       **_summed(origin.client.statistics(), path.glance.transfer_statistics()),
                       **({"token_renewals": origin.auth.renewals} if origin.auth is not None else {})},
            "cache": self.store.statistics(),
            "fetch": {**path.fetcher.statistics(), **path.glance.statistics()},
            "fs": self.conn.statistics() if self.conn is not None else {},
            "profiles": path.profiles.statistics(),
            "images": len(catalog.images),
            "per_image": self.image_status.images(),
            **(self.swarm.statistics() if self.swarm else {}),
            **({"nova": self.listing.nova.statistics()} if self.listing.nova else {}),
        }


def _summed(*counters: dict) -> dict:
    """Counters of several clients of one service, added up (the rest taken from the first that has it)."""
    out: dict = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out[k] + v if isinstance(v, int) and isinstance(out.get(k), int) else out.get(k, v)
    return out


async def _watch_signals(stop: Callable[[str], None], task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            stop(signal.Signals(signum).name)
            return
