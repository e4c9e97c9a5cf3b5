"""Back to plain Nova: every link of ours in the image cache goes; one that an instance disk is
backed by is first replaced by a full copy of its image."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from thunderfs.nova.base_dir import NovaBaseDir, NovaBaseError, unlink_quietly

log = logging.getLogger(__name__)

# A rollback's copies skip writing blocks of zeros of this size (sparse, like a download of a raw image).
_SPARSE_BLOCK = 64 * 2**10
_ZEROS = bytes(_SPARSE_BLOCK)


@dataclass
class RollbackReport:
    removed: list[str] = field(default_factory=list)      # links no instance was backed by
    copied: dict[str, int] = field(default_factory=dict)  # name -> bytes of data written in its place


def rollback(base: NovaBaseDir, copy_chunk: int = 4 * 2**20) -> RollbackReport:
    """Back to plain Nova: every link of ours goes.  One that an instance disk is backed by is
    first replaced by a full copy of its image, read through the mount (sparse: zero blocks
    are not written), renamed over the link, so that the instance's backing file stays; the
    copy is what Nova's own download would have left there.  Each step is atomic; on an error
    the links not yet handled stay, and a rerun carries on."""
    in_use = base.backing_names()
    if in_use is None:
        raise NovaBaseError("cannot tell which links instances are backed by (an instance disk is "
                            "unreadable, see the log); nothing was changed")
    report = RollbackReport()
    with base.opened() as fd:
        for name in sorted(base.list_names(fd)):
            if not base.ours(name, fd):
                continue
            if name in in_use:
                report.copied[name] = _materialize(base, name, fd, copy_chunk)
            else:
                unlink_quietly(name, fd)
                report.removed.append(name)
    return report


def _materialize(base: NovaBaseDir, name: str, fd: int, chunk: int) -> int:
    source = os.readlink(name, dir_fd=fd)
    link = base.base_dir / name
    tmp = f".{name}.thunderfs-copy"
    written = 0
    try:
        with open(source, "rb", buffering=0) as src:
            # Root writing in a directory Nova's user owns: never through a name that user
            # made (a link planted there would aim this write anywhere).
            unlink_quietly(tmp, fd)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                          dir_fd=fd)
            with open(out, "wb") as dst:
                while piece := src.read(chunk):
                    view = memoryview(piece)
                    for at in range(0, len(piece), _SPARSE_BLOCK):
                        block = view[at:at + _SPARSE_BLOCK]
                        if block == _ZEROS[:len(block)]:
                            dst.seek(len(block), os.SEEK_CUR)
                        else:
                            dst.write(block)
                            written += len(block)
                dst.truncate()
                dst.flush()
                os.fchmod(dst.fileno(), 0o644)  # whatever the umask: Nova and qemu read it
                owner = os.fstat(fd)
                try:  # Nova's own downloads belong to its user
                    os.fchown(dst.fileno(), owner.st_uid, owner.st_gid)
                except PermissionError:
                    pass
                os.fsync(dst.fileno())
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except OSError as exc:
        unlink_quietly(tmp, fd)
        raise NovaBaseError(f"cannot copy {source} to {link} for the instances backed by it: "
                            f"{exc.strerror}; the link stays") from None
    log.info("replaced the link %s by a copy of %s (%d bytes of data)", link, source, written)
    return written
