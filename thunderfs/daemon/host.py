"""What the daemon checks and takes on this host before it builds anything: the mount point, the
cache directory's lock, the image files' owner."""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import pwd
from pathlib import Path

from thunderfs.config import MountConfig
from thunderfs.errors import CacheLayoutError, ConfigError
from thunderfs.fuse import mounting

log = logging.getLogger(__name__)


def lock_cache_dir(cache_dir: Path) -> int:
    """The cache directory, this daemon's alone (a lock held while the descriptor is open)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheLayoutError(f"cache dir {cache_dir} is in use by another thunderfs daemon") from None
    return fd


def image_owner(config: MountConfig) -> tuple[int, int]:
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


def check_mountpoint(mp: Path) -> None:
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


def unmount_quietly(mountpoint: Path) -> None:
    """On the way out of a process nobody takes over from: the mount must not stay behind dead."""
    try:
        mounting.unmount(mountpoint, lazy=True)
    except mounting.MountError:
        pass  # unmounted already
