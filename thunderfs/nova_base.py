"""Nova's image cache kept pointing into the mount: one symbolic link per active image.

Nova's libvirt driver looks for an image in ``<instances_path>/_base/<sha1 of the image id>`` and
downloads it only when that file is missing.  A link there to ``MOUNT/images/<id>`` makes the
download never happen; the VM's qcow2 overlay is backed by the link, and a boot reads only what it
needs.  This module owns those links and nothing else in the directory:

- a link is made for every image in the listing whose name is free;
- a link of ours (one pointing into this mount) whose image left the listing is removed once no
  instance disk is backed by it (what Nova's own cache manager checks before it removes a base
  file), and kept while one is: the VM keeps its open file, and Nova sees its base still there;
- a link that someone removed (Nova's cache manager removes unused base files) is put back while
  its image is active;
- anything else (Nova's ephemeral and swap bases, an image Nova downloaded before thunderfs, a
  link somebody else made) is left alone and reported.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from thunderfs.errors import ThunderfsError

log = logging.getLogger(__name__)

# Nova's instance disks that may be backed by an image of the cache: the root disk (the name Nova's
# cache manager looks at) and the rescue disk.
_INSTANCE_DISKS = ("disk", "disk.rescue")
_QCOW2_MAGIC = b"QFI\xfb"
# A rollback's copies skip writing blocks of zeros of this size (sparse, like a download of a raw image).
_SPARSE_BLOCK = 64 * 2**10
_ZEROS = bytes(_SPARSE_BLOCK)


class NovaBaseError(ThunderfsError):
    """The image cache directory cannot be kept: missing, not a directory, not writable."""


def cache_name(image_id: str) -> str:
    """Nova's name for an image in its cache (``nova.virt.libvirt.imagecache.get_cache_fname``)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file named in a qcow2 header; None for a disk of another format or none."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset or not size or size > 4096:
            return None
        f.seek(offset)
        return os.fsdecode(f.read(size))


@dataclass
class SyncReport:
    linked: list[str] = field(default_factory=list)     # names linked in this pass
    restored: list[str] = field(default_factory=list)   # of those, links made before and removed since
    removed: list[str] = field(default_factory=list)    # links of images gone, no instance backed by them
    kept_in_use: list[str] = field(default_factory=list)  # links of images gone, an instance still backed
    foreign: dict[str, str] = field(default_factory=dict)  # name -> what is there instead of our link
    links: int = 0                                       # links of ours there after the pass

    def summary(self) -> str:
        parts = [f"{self.links} links", f"{len(self.linked)} made"]
        if self.restored:
            parts.append(f"{len(self.restored)} put back")
        parts.append(f"{len(self.removed)} removed")
        if self.kept_in_use:
            parts.append(f"{len(self.kept_in_use)} kept for instances (image gone)")
        if self.foreign:
            parts.append(f"{len(self.foreign)} left alone")
        return ", ".join(parts)


@dataclass
class RollbackReport:
    removed: list[str] = field(default_factory=list)      # links no instance was backed by
    copied: dict[str, int] = field(default_factory=dict)  # name -> bytes of data written in its place


class NovaBaseDir:
    """Links in ``base_dir`` (Nova's ``_base``) for the images under ``images_dir``."""

    def __init__(self, base_dir: Path, images_dir: Path, instances_path: Path | None = None):
        self.base_dir = Path(os.path.abspath(base_dir))
        self.images_dir = Path(images_dir)
        self.instances_path = Path(instances_path) if instances_path else self.base_dir.parent
        self._made: set[str] = set()  # names this object has linked: a missing one was removed
        self._foreign_seen: dict[str, str] = {}
        self.passes = 0
        self.linked_total = 0
        self.restored_total = 0
        self.removed_total = 0
        self.last: SyncReport | None = None
        self.last_error: str | None = None
        self.released = False
        self._pass_lock = trio.Lock()
        self.in_use_ids: set[str] = set()

    def target(self, image_id: str) -> str:
        return str(self.images_dir / image_id)

    def check(self) -> None:
        """Raises NovaBaseError unless links can be made in the directory (checked by making one)."""
        if not self.base_dir.is_dir():
            what = "does not exist" if not self.base_dir.exists() else "is not a directory"
            raise NovaBaseError(f"Nova's image cache directory {self.base_dir} {what} "
                                f"(it is <instances_path>/_base; create it as Nova's user)")
        probe = self.base_dir / f".thunderfs-probe-{os.getpid()}"
        try:
            os.symlink(self.images_dir, probe)
            os.unlink(probe)
        except OSError as exc:
            hint = (" (the thunderfs unit needs CAP_DAC_OVERRIDE for a directory of Nova's user: "
                    "systemd/thunderfs.service.d/nova.conf)" if exc.errno in (errno.EACCES, errno.EPERM) else "")
            raise NovaBaseError(f"cannot make links in {self.base_dir}: {exc.strerror}{hint}") from None

    def sync(self, image_ids: Iterable[str]) -> SyncReport:
        """One pass.  Raises NovaBaseError if a link cannot be made; the links made in this pass
        are then taken away again, so that a failed pass leaves the directory as it found it."""
        wanted = {cache_name(i): i for i in image_ids}
        report = SyncReport()
        try:
            present = set(os.listdir(self.base_dir))
        except OSError as exc:
            raise NovaBaseError(f"cannot list {self.base_dir}: {exc.strerror}") from None
        try:
            for name, image_id in sorted(wanted.items()):
                self._ensure(name, image_id, name in present, report)
        except OSError as exc:
            for name in report.linked:
                _unlink_quietly(self.base_dir / name)
                self._made.discard(name)
            raise NovaBaseError(f"cannot link {self.base_dir}: {exc.strerror} ({exc.filename}); "
                                f"the {len(report.linked)} links made in this pass were taken back") from None
        in_use = self.scan_in_use()
        stale = [n for n in present if n not in wanted and self._ours(self.base_dir / n)]
        if stale:
            for name in stale:
                if in_use is None or name in in_use:
                    report.kept_in_use.append(name)
                    report.links += 1
                    continue
                try:
                    os.unlink(self.base_dir / name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot remove the link %s of an image gone from Glance: %s",
                                self.base_dir / name, exc.strerror)
                    report.links += 1
                    continue
                self._made.discard(name)
                report.removed.append(name)
        self._account(report)
        return report

    def _ensure(self, name: str, image_id: str, present: bool, report: SyncReport) -> None:
        path = self.base_dir / name
        target = self.target(image_id)
        if present:
            try:
                current = os.readlink(path)
            except FileNotFoundError:
                present = False
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not a link
                    raise
                report.foreign[name] = f"a {_kind(path)} (an earlier download?) for image {image_id}"
                return
            else:
                if current == target:
                    report.links += 1
                    self._made.add(name)
                    return
                report.foreign[name] = f"a link to {current}, not {target}"
                return
        try:
            os.symlink(target, path)
        except FileExistsError:  # made meanwhile (Nova downloading it): look again next pass
            report.foreign[name] = f"made by someone else meanwhile, for image {image_id}"
            return
        if name in self._made:
            report.restored.append(name)
        self._made.add(name)
        report.linked.append(name)
        report.links += 1

    def _ours(self, path: Path) -> bool:
        try:
            return os.path.dirname(os.readlink(path)) == str(self.images_dir)
        except OSError:
            return False

    def scan_in_use(self) -> set[str] | None:
        """The names here that instance disks are backed by (None if unknown: an unreadable disk),
        and, in ``in_use_ids``, the images of those that are links of ours: the mount keeps them
        listed if Glance drops them, so that a link an instance is backed by never dangles."""
        names = self._backing_names()
        if names is None:
            return None
        ids = set()
        for name in names:
            path = self.base_dir / name
            if self._ours(path):
                try:
                    ids.add(os.path.basename(os.readlink(path)))
                except OSError:
                    continue
        self.in_use_ids = ids
        return names

    def _backing_names(self) -> set[str] | None:
        """Names in the cache that instance disks are backed by; None if some disk is unreadable
        (then nothing is in doubt removed)."""
        names: set[str] = set()
        try:
            entries = os.listdir(self.instances_path)
        except OSError as exc:
            log.warning("cannot list instances in %s (%s): keeping every link", self.instances_path, exc.strerror)
            return None
        for entry in entries:
            for disk in _INSTANCE_DISKS:
                path = self.instances_path / entry / disk
                try:
                    backing = qcow2_backing_file(path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    log.warning("cannot read the header of %s (%s): keeping every link", path, exc.strerror)
                    return None
                if backing:
                    names.add(os.path.basename(backing))
        return names

    def _account(self, report: SyncReport) -> None:
        self.passes += 1
        self.linked_total += len(report.linked)
        self.restored_total += len(report.restored)
        self.removed_total += len(report.removed)
        self.last, self.last_error = report, None
        for name in report.restored:
            log.info("put back the link %s, which someone removed (Nova's cache manager?)", self.base_dir / name)
        for name in report.linked:
            if name not in report.restored:
                log.info("linked %s", self.base_dir / name)
        for name in report.removed:
            log.info("removed the link %s: its image is gone and no instance is backed by it", name)
        for name, what in report.foreign.items():
            if self._foreign_seen.get(name) != what:
                log.warning("left alone in %s: %s is %s", self.base_dir, name, what)
        self._foreign_seen = dict(report.foreign)

    async def run(self, image_ids: Callable[[], Iterable[str]], interval: float, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sync every ``interval`` seconds, off the event loop (the directory may be on NFS)."""
        task_status.started()
        while not self.released:
            async with self._pass_lock:
                if self.released:
                    break
                try:
                    await trio.to_thread.run_sync(self.sync, list(image_ids()))
                except NovaBaseError as exc:
                    if str(exc) != self.last_error:
                        log.error("%s", exc)
                    self.last_error = str(exc)
            await trio.sleep(interval)

    async def release(self, _req: dict | None = None) -> dict:
        """Stop keeping the directory (for a rollback), once no pass is under way; the links stay."""
        self.released = True
        async with self._pass_lock:
            self.in_use_ids = set()  # the copies serve instances now: nothing to keep listed
        log.info("no longer keeping %s (released for a rollback); its links stay", self.base_dir)
        return {"base_dir": str(self.base_dir), "released": True}

    def rollback(self, copy_chunk: int = 4 * 2**20) -> RollbackReport:
        """Back to plain Nova: every link of ours goes.  One that an instance disk is backed by is
        first replaced by a full copy of its image, read through the mount (sparse: zero blocks
        are not written), renamed over the link, so that the instance's backing file stays; the
        copy is what Nova's own download would have left there.  Each step is atomic; on an error
        the links not yet handled stay, and a rerun carries on."""
        in_use = self._backing_names()
        if in_use is None:
            raise NovaBaseError("cannot tell which links instances are backed by (an instance disk is "
                                "unreadable, see the log); nothing was changed")
        report = RollbackReport()
        try:
            names = sorted(os.listdir(self.base_dir))
        except OSError as exc:
            raise NovaBaseError(f"cannot list {self.base_dir}: {exc.strerror}") from None
        for name in names:
            path = self.base_dir / name
            if not self._ours(path):
                continue
            if name in in_use:
                report.copied[name] = self._materialize(path, copy_chunk)
            else:
                _unlink_quietly(path)
                report.removed.append(name)
        return report

    def _materialize(self, link: Path, chunk: int) -> int:
        source = os.readlink(link)
        tmp = link.with_name(f".{link.name}.thunderfs-copy")
        written = 0
        try:
            with open(source, "rb", buffering=0) as src:
                # Root writing in a directory Nova's user owns: never through a name that user
                # made (a link planted there would aim this write anywhere).
                _unlink_quietly(tmp)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with open(fd, "wb") as dst:
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
                    owner = os.stat(self.base_dir)
                    try:  # Nova's own downloads belong to its user
                        os.fchown(dst.fileno(), owner.st_uid, owner.st_gid)
                    except PermissionError:
                        pass
                    os.fsync(dst.fileno())
            os.rename(tmp, link)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise NovaBaseError(f"cannot copy {source} to {link} for the instances backed by it: "
                                f"{exc.strerror}; the link stays") from None
        log.info("replaced the link %s by a copy of %s (%d bytes of data)", link, source, written)
        return written

    def statistics(self) -> dict:
        last = self.last
        return {
            "base_dir": str(self.base_dir),
            "passes": self.passes,
            "links": last.links if last else 0,
            "linked": self.linked_total,
            "restored": self.restored_total,
            "removed": self.removed_total,
            "kept_in_use": len(last.kept_in_use) if last else 0,
            "in_use": len(self.in_use_ids),
            "left_alone": dict(last.foreign) if last else {},
            "last_error": self.last_error,
            "released": self.released,
        }


def _kind(path: Path) -> str:
    try:
        st = path.lstat()
    except OSError:
        return "file"
    if stat.S_ISREG(st.st_mode):
        return f"regular file of {st.st_size} bytes"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    return "special file"


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
