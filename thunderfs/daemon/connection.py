"""The FUSE connection: taken over from the process before (the descriptors a service manager
kept), or mounted now and put in the service manager's store; the session over it; and how this
process lets it go (handed over to the next process, or unmounted)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from thunderfs.config import MountConfig
from thunderfs.daemon.host import unmount_quietly
from thunderfs.errors import ConfigError
from thunderfs.fetch.reader import Readers
from thunderfs.fuse import mounting
from thunderfs.fuse.kernel import KERNEL_MINOR, MAX_WRITE, InitParams
from thunderfs.fuse.operations import Operations
from thunderfs.fuse.passthrough import BackingFiles
from thunderfs.fuse.session import Session
from thunderfs.fuse.state import SessionState
from thunderfs.glance.catalog import Catalog
from thunderfs.service import systemd

log = logging.getLogger(__name__)

UNMOUNTED = "unmounted"
HANDED_OVER = "handed over"


class Connection:
    """One process's hold on the mount.  ``kept``: a service manager (systemd, the keeper) holds
    the descriptor, so a stop hands the mount over rather than ending it."""

    def __init__(self, mountpoint: Path, fd: int, state: SessionState, kept: bool):
        self.mountpoint = mountpoint
        self.fd = fd
        self.state = state
        self.kept = kept
        self.ops: Operations | None = None
        self.session: Session | None = None
        self.fusectl = mounting.connection_dir(mountpoint)  # what the kernel waits on
        self.ending = UNMOUNTED

    def serve_with(self, config: MountConfig, catalog: Catalog, readers: Readers, owner: tuple[int, int]) -> Session:
        """The operations and the session over this connection."""
        # The kernel checks the image files' owner and mode: only root and the image group read them.
        # Passthrough agreed by an earlier process but off now: its passthrough files stay so.
        state = self.state
        agreed = state.init is not None and state.init.passthrough
        backing = BackingFiles(self.fd, state, seal_new=config.passthrough) if config.passthrough or agreed else None
        self.ops = Operations(catalog, readers, block_size=config.chunk_size, image_owner=owner,
                              image_mode=config.image_mode, state=state, backing=backing)
        self.session = Session(self.fd, self.ops, state, passthrough=config.passthrough)
        if self.session.takeover and not self.session.kernel_resends:
            log.info("this kernel cannot resend the requests a previous process read and did not answer: "
                     "those it kept in the session's journal are served again (the kernel waits on %s "
                     "requests now, those queued for this process included)",
                     mounting.waiting(self.fusectl) if self.fusectl else "an unknown number of")
        return self.session

    def stop(self, why: str) -> None:
        """Hand the mount over (where it is kept), else unmount."""
        if self.kept:
            log.info("%s: handing the mount over to the next serving process", why)
            self.ending = HANDED_OVER
            self.session.stop()
        else:
            log.info("%s: unmounting", why)
            systemd.notify("STOPPING=1")
            try:
                mounting.unmount(self.mountpoint, lazy=True)
            except mounting.MountError as exc:
                log.error("%s", exc)
                self.session.stop()

    def restart(self, _req: dict) -> dict:
        """The control socket's ``restart``: hand over to a new process."""
        if not self.kept:
            raise ValueError("no service manager (keeper or systemd) holds this mount: a restart would end it")
        self.stop("restart requested")
        return {"pid": os.getpid()}

    def statistics(self) -> dict:
        if self.session is None:
            return {}
        return {**self.ops.statistics(), **self.session.statistics(), "kernel_waiting": mounting.waiting(self.fusectl)}


def connect(config: MountConfig, mountpoint: Path, inherited: dict[str, int],
            stack: contextlib.AsyncExitStack) -> Connection:
    """Take over ``inherited`` ("fuse", "session"), or mount now and store the descriptors with
    the service manager (where there is none, the mount ends with this process)."""
    if "fuse" in inherited:
        state = SessionState.load(inherited["session"]) if "session" in inherited else SessionState.create()
        if state.init is None:
            # The kernel will not send INIT again: go by what this daemon always asks for.
            log.warning("the mount's session state is missing; assuming this daemon's own FUSE settings")
            state.init = InitParams(minor=KERNEL_MINOR, flags=0, max_write=MAX_WRITE, max_pages=256)
        log.info("taking over the mount at %s", mountpoint)
        return Connection(mountpoint, inherited["fuse"], state, kept=True)
    try:
        fd = mounting.mount(mountpoint, allow_other=config.allow_other)
    except mounting.MountError as exc:
        raise ConfigError(f"cannot mount {mountpoint}: {exc}") from None
    stack.callback(os.close, fd)
    state = SessionState.create()
    stack.callback(os.close, state.fd)
    kept = systemd.store_fds({"fuse": fd, "session": state.fd})
    if not kept:
        log.info("no service manager keeps the mount: it ends with this process")
        stack.callback(unmount_quietly, mountpoint)
    return Connection(mountpoint, fd, state, kept)
