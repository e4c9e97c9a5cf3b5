"""Mounting and unmounting a FUSE connection, and telling a dead mount from a live one.

As root the mount is made with mount(2) on a ``/dev/fuse`` descriptor this process opened (the
descriptor is the connection: whoever holds it can serve the mount).  Otherwise ``fusermount3``
mounts and hands the descriptor back over a socket, as libfuse does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import threading
from pathlib import Path

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class MountError(Exception):
    """The mount or unmount failed; the message says why."""


def _options(allow_other: bool, fd: int | None = None) -> str:
    opts = ["rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}", "default_permissions"]
    if fd is not None:
        opts.insert(0, f"fd={fd}")
    if allow_other:
        opts.append("allow_other")
    return ",".join(opts)


def mount(mountpoint: Path, *, fsname: str = "thunderfs", subtype: str = "thunderfs",
          allow_other: bool = False) -> int:
    """Mount a new FUSE connection at ``mountpoint``; returns its ``/dev/fuse`` descriptor."""
    if os.geteuid() != 0:
        return _fusermount(mountpoint, fsname, subtype, allow_other)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    rc = _libc.mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
                     MS_NOSUID | MS_NODEV, _options(allow_other, fd).encode())
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def _fusermount(mountpoint: Path, fsname: str, subtype: str, allow_other: bool) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        res = subprocess.run(["fusermount3", "-o", f"fsname={fsname},subtype={subtype},{_options(allow_other)}",
                              "--", str(mountpoint)], env=env, pass_fds=(theirs.fileno(),),
                             capture_output=True, text=True)
        theirs.close()
        if res.returncode != 0:
            raise MountError(f"mount {mountpoint}: {res.stderr.strip() or 'fusermount3 failed'}")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
    if not fds:
        raise MountError(f"mount {mountpoint}: fusermount3 sent no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount; ``lazy`` detaches it now even if files are open (they fail from then on)."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise MountError(f"unmount {mountpoint}: {os.strerror(err)}")
        return
    res = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise MountError(f"unmount {mountpoint}: {res.stderr.strip() or res.stdout.strip()}")


def mounted_type(mountpoint: Path) -> str | None:
    """The file system type mounted at ``mountpoint`` (the topmost), or None.  Read from
    mountinfo: a stat of a hung mount would hang.  ``MountError`` if mountinfo cannot be read."""
    target = str(mountpoint)
    found = None
    for fields in _mountinfo():
        if fields[4] == target:
            found = fields[fields.index("-") + 1]
    return found


def _mountinfo() -> list[list[str]]:
    """This process's mounts, split; none where /proc is not mounted (a bare chroot)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return [line.split() for line in f]
    except OSError as exc:
        raise MountError(f"cannot read /proc/self/mountinfo ({exc.strerror}): is /proc mounted?") from None


def is_dead(mountpoint: Path, timeout: float = 2.0) -> bool:
    """Whether the mount at ``mountpoint`` has lost its connection (ENOTCONN): nobody will ever
    serve it again.  A mount that does not answer within ``timeout`` counts as alive (busy)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.stat(mountpoint)
            result.append(False)
        except OSError as exc:
            result.append(exc.errno in (errno.ENOTCONN, errno.ECONNABORTED))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


FUSECTL = Path("/sys/fs/fuse/connections")


def connection_dir(mountpoint: Path) -> Path | None:
    """The connection's directory in fusectl (``waiting``, ``abort``, ``max_background``...), or
    None (not mounted here, or fusectl is not available).  As root, fusectl is mounted if it is
    not yet (systemd mounts it at boot; a bare container may not).  Found through mountinfo, never
    by a stat of the mount point (this process may be the one that serves it)."""
    target, dev = str(mountpoint), None
    try:
        mounts = _mountinfo()
    except MountError:
        return None
    for fields in mounts:
        if fields[4] == target and fields[fields.index("-") + 1].startswith("fuse"):
            dev = fields[2]  # major:minor of the superblock
    if dev is None:
        return None
    major, minor = (int(x) for x in dev.split(":"))
    path = FUSECTL / str(major << 20 | minor)  # the kernel's own dev_t, as fusectl names it
    if not path.exists() and os.geteuid() == 0 and FUSECTL.is_dir() and not any(FUSECTL.iterdir()):
        _libc.mount(b"fusectl", os.fsencode(FUSECTL), b"fusectl", 0, None)  # failing: no fusectl, None below
    return path if path.is_dir() else None


def waiting(conn: Path | None) -> int | None:
    """Requests the kernel has sent on the connection and waits to see answered (fusectl's
    ``waiting``: read by a process, or still queued for one); None where it cannot be read."""
    if conn is None:
        return None
    try:
        return int((conn / "waiting").read_text())
    except (OSError, ValueError):
        return None


def set_readahead(mountpoint: Path, kb: int) -> str | None:
    """Let the kernel send reads of up to ``kb`` KiB on this mount (FUSE's default is 128 KiB):
    fewer, larger requests.  Found through mountinfo, not stat, which would ask the very daemon
    that serves the mount, perhaps before it serves.  None, or why it could not."""
    target = str(mountpoint)
    try:
        mounts = _mountinfo()
    except MountError as exc:
        return str(exc)
    for fields in mounts:
        if fields[4] == target and "-" in fields and fields[fields.index("-") + 1].startswith("fuse"):
            try:
                (Path("/sys/class/bdi") / fields[2] / "read_ahead_kb").write_text(str(kb))
            except OSError as exc:
                return str(exc)
            return None
    return "not mounted"
