"""The composition root: builds every part in one nursery and one AsyncExitStack, mounts, serves.

Nothing else knows all the parts.  Teardown runs in reverse: stop serving FUSE, stop the
background tasks, make staged chunks durable, close the index.

A mount outlives this process when a service manager (systemd, or the keeper) holds its
``/dev/fuse`` descriptor: the process mounts once and stores the descriptor there; each later
process is handed it (``inherited``) and takes the connection over.  SIGTERM, or ``thunderfs
restart``, then ends this process without unmounting ("handed over"); only an unmount ends the
mount ("unmounted").
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import pwd
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from thunderfs.service import control
from thunderfs.service import systemd
from thunderfs.glance.catalog import Catalog
from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ChunkStore, ImageData
from thunderfs.config import MountConfig
from thunderfs.errors import CacheLayoutError, ConfigError
from thunderfs_common.glance import GlanceError
from thunderfs_common.image import ImageMeta
from thunderfs.fetch.fetcher import Fetcher
from thunderfs.glance.auth import GlanceAuthError, KeystoneAuth, KeystoneDown
from thunderfs.fetch.glance import GlanceSource, piece_bytes
from thunderfs.fuse import mounting
from thunderfs.fuse.operations import Operations
from thunderfs.fuse.kernel import KERNEL_MINOR, MAX_WRITE, InitParams
from thunderfs.fuse.session import Session
from thunderfs.fuse.passthrough import BackingFiles
from thunderfs.fuse.state import SessionState
from thunderfs_common.glance import GlanceClient
from thunderfs.cluster.peer_server import PeerServer
from thunderfs.fetch.peers import PeerSource
from thunderfs.fetch.seed import SeedSource
from thunderfs.fetch.slots import DEMAND
from thunderfs.profiles.control import ProfileControl
from thunderfs.profiles.service import Profiles
from thunderfs.fetch.reader import Readers
from thunderfs.service.metrics import DaemonMetrics
from thunderfs.nova.base_dir import NovaBaseDir, NovaBaseError
from thunderfs.nova.service import NovaService
from thunderfs.service.status import ImageStatus
from thunderfs.cluster.announcer import Announcer
from thunderfs_tracker.client import TrackerClient
from thunderfs_common.keystone import KeystoneSettings
from thunderfs_common.manifest_proof import KeyFileError, load_public_key
from thunderfs_common.tracker_protocol import NodeInfo, parse_location
from thunderfs_common.signing import SecretError, load_secret

log = logging.getLogger(__name__)

def _lock_cache_dir(cache_dir: Path) -> int:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheLayoutError(f"cache dir {cache_dir} is in use by another thunderfs daemon") from None
    return fd


def _summed(*counters: dict) -> dict:
    """Counters of several clients of one service, added up (the rest taken from the first that has it)."""
    out: dict = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out[k] + v if isinstance(v, int) and isinstance(out.get(k), int) else out.get(k, v)
    return out


def _set_kernel_readahead(mountpoint: Path, kb: int) -> None:
    """Let the kernel send reads of up to ``kb`` KiB (the FUSE default is 128 KiB): fewer, larger
    requests, since the daemon is bound by request count.  Found through mountinfo, not stat,
    which would ask this very daemon before it serves."""
    target = str(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target and " - fuse" in line:
                bdi = Path("/sys/class/bdi") / fields[2] / "read_ahead_kb"
                try:
                    bdi.write_text(str(kb))
                except OSError as exc:
                    log.info("could not raise the kernel readahead of %s: %s", target, exc)
                return


UNMOUNTED = "unmounted"
HANDED_OVER = "handed over"


async def _watch_signals(stop: Callable[[str], None], task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            stop(signal.Signals(signum).name)
            return


def _unmount_quietly(mountpoint: Path) -> None:
    """On the way out of a process nobody takes over from: the mount must not stay behind dead."""
    try:
        mounting.unmount(mountpoint, lazy=True)
    except mounting.MountError:
        pass  # unmounted already


def _image_owner(config: MountConfig) -> tuple[int, int]:
    """The uid and gid of the image files: ``image_owner``, and ``image_group`` (default: kvm if
    this host has it, else root)."""
    try:
        uid = pwd.getpwnam(config.image_owner).pw_uid
        group = config.image_group
        if group is None:
            try:
                return uid, grp.getgrnam("kvm").gr_gid
            except KeyError:
                group = "root"
        return uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ConfigError(f"no such user or group on this host: {exc.args[0]}") from None


def _check_mountpoint(mp: Path) -> None:
    """A directory with nothing mounted on it; a FUSE mount whose daemon is gone (ENOTCONN) is
    detached first."""
    try:
        fstype = mounting.mounted_type(mp)
    except mounting.MountError as exc:
        raise ConfigError(str(exc)) from None
    if fstype is not None and fstype.startswith("fuse") and mounting.is_dead(mp):
        try:
            mounting.unmount(mp, lazy=True)
        except mounting.MountError as exc:
            raise ConfigError(f"mount point {mp} is a dead mount that cannot be detached: {exc}") from None
        log.warning("detached the dead mount at %s (%s; the process that served it is gone)", mp, fstype)
    elif fstype is not None:
        raise ConfigError(f"mount point {mp} is already a mount point ({fstype}; busy)")
    if not mp.exists():
        raise ConfigError(f"mount point {mp} does not exist")
    if not mp.is_dir():
        raise ConfigError(f"mount point {mp} is not a directory")


async def run(config: MountConfig, keystone: KeystoneSettings | None = None,
              ready: Callable[[], None] = lambda: None, inherited: dict[str, int] | None = None) -> str:
    """Mount (or take over ``inherited``: the descriptors "fuse" and "session") and serve until
    unmounted (``UNMOUNTED``) or told to hand over (``HANDED_OVER``); calls ``ready()`` once the
    mount is served.  ``keystone``: the credentials to get Glance tokens with (None: a Glance
    without Keystone)."""
    inherited = dict(inherited or {})
    keeper = os.environ.get("THUNDERFS_KEEPER_PID")  # set by the keeper; None under systemd
    keeper_pid = int(keeper) if keeper and keeper.isdigit() else None
    # Once mounted, any stat under the mount point would wait on this very process.
    mountpoint = control.canonical(config.mountpoint)
    if "fuse" not in inherited:
        _check_mountpoint(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        for fd in inherited.values():
            stack.callback(os.close, fd)
        lock_fd = _lock_cache_dir(config.cache_dir)
        stack.callback(os.close, lock_fd)

        # Sized so that it should not need to grow (growing races readers in other threads; the
        # index doubles the map, with a warning, if it ever fills): two records of ~40 bytes per
        # chunk, with a wide margin for B-tree pages.
        map_size = max(256 * 2**20, (config.cache_size // config.chunk_size) * 512)
        index = ChunkIndex(config.cache_dir / "index", map_size=map_size)
        stack.callback(index.close)
        index.check_layout(config.chunk_size)
        # Glance's pieces arrive in these, and are served from them until written and read.
        piece = piece_bytes(config.chunk_size)
        buffers = ReceiveBuffers(piece, max(config.origin_concurrency + 1, config.receive_memory // piece))
        store = ChunkStore(config.cache_dir, index, config.chunk_size, config.cache_size, buffers=buffers)
        stack.callback(store.close)
        store.reclaim()

        auth = None
        glance_url = config.glance
        if keystone is not None:
            # Credentials that Keystone refuses, or a catalog without Glance: a clean start-up error.
            # Keystone not answering: the endpoint its catalog named at the last start, and the
            # cache served meanwhile (tokens are asked for again on every Glance request).
            auth = KeystoneAuth(keystone)
            try:
                await auth.token()
                glance_url = glance_url or await auth.endpoint()
                index.save_note("glance_endpoint", glance_url)
            except KeystoneDown as exc:
                glance_url = glance_url or index.load_note("glance_endpoint")
                if glance_url is None:
                    raise ConfigError(f"{exc}, and no Glance endpoint is known from an earlier start") from None
                log.warning("%s; serving the cache with Glance %s (from the last start) and authenticating "
                            "once Keystone answers", exc, glance_url)
            except GlanceAuthError as exc:
                raise ConfigError(str(exc)) from None
            log.info("Glance %s with Keystone tokens (%s)", glance_url, keystone.source)
        if glance_url is None:
            raise ConfigError("--glance is needed (or Keystone credentials, whose catalog names Glance)")
        origin = await stack.enter_async_context(GlanceClient(
            glance_url, connect_timeout=config.connect_timeout,
            request_timeout=config.fetch_timeout, concurrency=config.origin_concurrency, auth=auth))
        catalog = Catalog(origin, index, ttl=config.listing_ttl,
                          timeout=config.connect_timeout + 2)
        saved = catalog.load_saved()
        nova = None
        if config.nova_base_dir is not None:
            nova = NovaBaseDir(config.nova_base_dir, mountpoint / "images", config.nova_instances_path)
            try:
                nova.check()
            except NovaBaseError as exc:
                raise ConfigError(str(exc)) from None
            # Before the first listing: an image that left Glance while this daemon was down stays
            # listed if an instance disk is backed by its link.
            nova.scan_in_use()
            catalog.retain = lambda: nova.in_use_ids
            nova_service = NovaService(nova)
        try:
            await catalog.refresh()
        except GlanceError as exc:
            if not saved and not index.used_bytes():
                raise ConfigError(f"Glance at {glance_url} is unreachable ({exc}) and the cache "
                                  f"at {config.cache_dir} is empty: nothing to serve") from None
        peers = seed = peer_server = announcer = tracker = None
        ops = session = fuse_conn = None

        def _revoked(meta: ImageMeta) -> None:
            """The tracker revoked the image's lazy manifest: what this node took under it goes,
            from the cache and from the kernel's page cache."""
            store.drop_image(meta.content_key)
            if ops is not None:
                ops.image_bytes_dropped(meta)

        if config.tracker:
            try:
                secret = load_secret(config.secret_file) if config.secret_file else None
                tracker_key = load_public_key(config.tracker_public_key) if config.tracker_public_key else None
            except (SecretError, KeyFileError) as exc:
                raise ConfigError(str(exc)) from None
            # Kept with the cache: the tracker tells this daemon from another under the same id.
            instance = index.load_note("node_instance")
            if instance is None:
                instance = secrets.token_hex(8)
                index.save_note("node_instance", instance)
            node = NodeInfo(config.node_id, config.peer_url, parse_location(config.location), instance=instance)
            if secret is None:
                log.warning("no --secret-file: this node serves its cached chunks to anyone who can reach it")
            tracker = await stack.enter_async_context(
                TrackerClient(config.tracker_urls, config.node_id, secret=secret, timeout=config.peer_timeout))
            peers = PeerSource(tracker, node_id=config.node_id, secret=secret, chunk_size=config.chunk_size,
                               timeout=config.peer_timeout, fetch_timeout=config.fetch_timeout,
                               max_request_chunks=config.max_request // config.chunk_size, tracker_key=tracker_key,
                               location=node.location, on_revoked=lambda meta, why: _revoked(meta))
            stack.push_async_callback(peers.aclose)
            seed = SeedSource(tracker, peers.directory, chunk_size=config.chunk_size, timeout=config.peer_timeout)
            peer_server = PeerServer(store, secret=secret, max_uploads=config.max_uploads, rate=config.upload_rate)
            peer_server.pieces = peers.directory.pieces_header
            try:
                bound = await peer_server.listen(*config.peer_address)
            except OSError as exc:
                raise ConfigError(f"cannot serve peers on {config.peer_listen}: {exc.strerror}") from None
            log.info("serving peers on %s:%d as %s (%s), tracker %s", *bound, node.node_id, node.peer_url,
                     config.tracker)
            announcer = Announcer(tracker, store, node, load=lambda: peer_server.uploads, rtt=peers.rtt_ms)
        metrics = DaemonMetrics(lambda: stats({})) if config.metrics_listen else None
        glance = GlanceSource(origin, chunk_size=config.chunk_size, max_chunks=config.max_request // config.chunk_size,
                              fetch_timeout=config.fetch_timeout, concurrency=config.origin_concurrency,
                              rate=config.origin_rate, connect_timeout=config.connect_timeout, tokens=auth,
                              ssl_context=httpx.create_ssl_context(),  # trusts what httpx trusts (SSL_CERT_FILE too)
                              buffers=buffers)
        stack.push_async_callback(glance.aclose)
        fetcher = Fetcher(store, [peers, seed, glance] if peers else [glance], fetch_timeout=config.fetch_timeout,
                          max_request=config.max_request, observe=metrics.observe if metrics else None,
                          bdp=glance.cost.bdp)
        if peer_server is not None:  # a peer waits here only for chunks this node fetches or will
            peer_server.fetching = lambda img, chunk: fetcher.in_flight(img, chunk) or peers.will_fetch(img, chunk)

            def fetch_for_peer(img: ImageData, chunks: list[int]) -> bool:
                meta = peers.fetch_for_peer(img, chunks)
                if meta is not None:  # a waiting peer's: at a reader's priority
                    fetcher.start(meta, img, chunks, DEMAND)
                return meta is not None

            peer_server.fetch_for_peer = fetch_for_peer
        profiles = Profiles(fetcher, tracker, chunk_size=config.chunk_size,
                            record_window=config.record_window, record_idle=config.record_idle,
                            prefetch_flights=config.prefetch_flights, prefetch_idle=config.prefetch_idle,
                            wait_ready=peers.wait_manifest if peers else None,
                            plan=peers.plan if peers else None)
        # On every open: the peer source asks for the manifest, the profiles record and prefetch.
        on_open = [profiles.opened]
        if peers is not None:
            on_open.insert(0, lambda reader: peers.prepare(reader.meta))
        readers = Readers(store, fetcher, readahead=config.readahead, on_open=on_open,
                          zeros=peers.zero_chunks if peers is not None else None)
        jobs = ProfileControl(catalog, store, profiles)
        image_status = ImageStatus(catalog, store, profiles, peers)

        started = time.time()

        def stats(_req: dict) -> dict:
            return {
                "pid": os.getpid(),
                "keeper": keeper_pid,
                "uptime": time.time() - started,
                "mountpoint": str(mountpoint),
                "glance": {"url": glance_url, "reachable": catalog.origin_ok,
                           **_summed(origin.statistics(), glance.transfer_statistics()),
                           **({"token_renewals": auth.renewals} if auth is not None else {})},
                "cache": store.statistics(),
                "fetch": {**fetcher.statistics(), **glance.statistics()},
                "fs": {**ops.statistics(), **session.statistics(),
                       "kernel_waiting": mounting.waiting(fuse_conn)} if session is not None else {},
                "profiles": profiles.statistics(),
                "images": len(catalog.images),
                "per_image": image_status.images(),
                **({"peers": {**peers.statistics(), **seed.statistics()}, "peer_server": peer_server.statistics(),
                    "announcer": announcer.statistics()} if peers else {}),
                **({"nova": nova.statistics()} if nova else {}),
            }

        owner = _image_owner(config)  # before the mount, as every start-up error
        if metrics is not None:  # before the mount: a port in use is a start-up error, not a crash loop
            metrics.start(*config.metrics_address)
            stack.callback(metrics.stop)

        # The connection: taken over, or mounted now and put in the service manager's store.
        if "fuse" in inherited:
            fuse_fd = inherited["fuse"]
            state = SessionState.load(inherited["session"]) if "session" in inherited else SessionState.create()
            if state.init is None:
                # The kernel will not send INIT again: go by what this daemon always asks for.
                log.warning("the mount's session state is missing; assuming this daemon's own FUSE settings")
                state.init = InitParams(minor=KERNEL_MINOR, flags=0, max_write=MAX_WRITE, max_pages=256)
            kept = True
            log.info("taking over the mount at %s", mountpoint)
        else:
            try:
                fuse_fd = mounting.mount(mountpoint, allow_other=config.allow_other)
            except mounting.MountError as exc:
                raise ConfigError(f"cannot mount {mountpoint}: {exc}") from None
            stack.callback(os.close, fuse_fd)
            state = SessionState.create()
            stack.callback(os.close, state.fd)
            kept = systemd.store_fds({"fuse": fuse_fd, "session": state.fd})
            if not kept:
                log.info("no service manager keeps the mount: it ends with this process")
                stack.callback(_unmount_quietly, mountpoint)

        # The kernel checks the image files' owner and mode: only root and the image group read them.
        # Passthrough agreed by an earlier process but off now: its passthrough files stay so.
        agreed = state.init is not None and state.init.passthrough
        backing = BackingFiles(fuse_fd, state, seal_new=config.passthrough) if config.passthrough or agreed else None
        ops = Operations(catalog, readers, block_size=config.chunk_size, image_owner=owner,
                         image_mode=config.image_mode, state=state, backing=backing)
        session = Session(fuse_fd, ops, state, passthrough=config.passthrough)
        fuse_conn = mounting.connection_dir(mountpoint)  # fusectl: what the kernel waits on
        if session.takeover and not session.kernel_resends:
            log.info("this kernel cannot resend the requests a previous process read and did not answer: "
                     "those it kept in the session's journal are answered first (the kernel waits on %s "
                     "requests now, those queued for this process included)",
                     mounting.waiting(fuse_conn) if fuse_conn else "an unknown number of")
        ending = {"how": UNMOUNTED}

        def stop(why: str) -> None:
            if kept:
                log.info("%s: handing the mount over to the next serving process", why)
                ending["how"] = HANDED_OVER
                session.stop()
            else:
                log.info("%s: unmounting", why)
                systemd.notify("STOPPING=1")
                try:
                    mounting.unmount(mountpoint, lazy=True)
                except mounting.MountError as exc:
                    log.error("%s", exc)
                    session.stop()

        def restart(_req: dict) -> dict:
            if not kept:
                raise ValueError("no service manager (keeper or systemd) holds this mount: a restart would end it")
            stop("restart requested")
            return {"pid": os.getpid()}

        record = {"pid": os.getpid(), "mountpoint": str(mountpoint), "cache_dir": str(config.cache_dir),
                  "glance": glance_url, "socket": str(control.socket_path(mountpoint)),
                  "keeper": keeper_pid}

        async with trio.open_nursery() as nursery:
            async def serve_fuse() -> None:
                await session.serve()
                nursery.cancel_scope.cancel()

            await nursery.start(_watch_signals, stop)
            await nursery.start(store.run)
            await ops.start()
            await nursery.start(fetcher.run)
            await nursery.start(glance.run)
            if peers is not None:
                await nursery.start(peers.run)
            await nursery.start(catalog.run)
            await nursery.start(profiles.run)
            nursery.start_soon(serve_fuse)
            await session.wait_initialized()
            _set_kernel_readahead(mountpoint, config.kernel_readahead // 1024)
            await nursery.start(control.serve, control.socket_path(mountpoint),
                                {"stats": stats, "restart": restart, **jobs.handlers(), **image_status.handlers(),
                                 **({"nova_release": nova_service.release} if nova else {})})
            control.write_record(mountpoint, record)
            if peer_server is not None:
                await nursery.start(peer_server.serve)
                await nursery.start(announcer.run)
            if nova is not None:
                await nursery.start(nova_service.run, lambda: [i for i in catalog.images if i not in catalog.gone],
                                    catalog.ttl)
            log.info("%s %s: %d images, Glance %s, cache %s (%d MiB of %d MiB used)",
                     "took over" if session.takeover else "mounted",
                     mountpoint, len(catalog.images), glance_url, config.cache_dir,
                     store.statistics()["used"] >> 20, config.cache_size >> 20)
            ready()
        if session.unmounted:
            ending["how"] = UNMOUNTED
            control.remove_record(mountpoint)
        with trio.CancelScope(shield=True):
            await store.commit(touch=True)
        log.info("%s %s", "unmounted" if ending["how"] == UNMOUNTED else "handed over", mountpoint)
    return ending["how"]
