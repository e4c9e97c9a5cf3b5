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

import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from thunderfs.errors import ThunderfsError
from thunderfs.nova.qcow2 import qcow2_backing_file

log = logging.getLogger(__name__)

# Nova's instance disks that may be backed by an image of the cache: the root disk (the name Nova's
# cache manager looks at) and the rescue disk.
_INSTANCE_DISKS = ("disk", "disk.rescue")


class NovaBaseError(ThunderfsError):
    """The image cache directory cannot be kept: missing, not a directory, not writable."""


def cache_name(image_id: str) -> str:
    """Nova's name for an image in its cache (``nova.virt.libvirt.imagecache.get_cache_fname``)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


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
        self.released = False  # released for a rollback: no more passes (service.NovaService)
        self.stopped = False  # the passes have stopped (after a release)
        self.in_use_ids: set[str] = set()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of base_dir when checked

    def target(self, image_id: str) -> str:
        return str(self.images_dir / image_id)

    def check(self) -> None:
        """Raises NovaBaseError unless links can be made in the directory (checked by making one)."""
        if not self.base_dir.is_dir():
            what = "does not exist" if not self.base_dir.exists() else "is not a directory"
            raise NovaBaseError(f"Nova's image cache directory {self.base_dir} {what} "
                                f"(it is <instances_path>/_base; create it as Nova's user)")
        probe = f".thunderfs-probe-{os.getpid()}"
        try:
            with self.opened() as fd:
                os.symlink(self.images_dir, probe, dir_fd=fd)
                os.unlink(probe, dir_fd=fd)
                st = os.fstat(fd)
                self._identity = (st.st_dev, st.st_ino)
        except OSError as exc:
            hint = (" (the thunderfs unit needs CAP_DAC_OVERRIDE for a directory of Nova's user: "
                    "systemd/thunderfs.service.d/nova.conf)" if exc.errno in (errno.EACCES, errno.EPERM) else "")
            raise NovaBaseError(f"cannot make links in {self.base_dir}: {exc.strerror}{hint}") from None

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """A descriptor of the directory, which every operation goes through, so that a directory
        put in its place (Nova's user owns the parent; this runs as root) is noticed, not written."""
        try:
            fd = os.open(self.base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise NovaBaseError(f"cannot open {self.base_dir}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
                raise NovaBaseError(f"{self.base_dir} is no longer the directory thunderfs checked (it was "
                                    f"replaced); nothing is written there until thunderfs is restarted")
            yield fd
        finally:
            os.close(fd)

    def list_names(self, fd: int) -> list[str]:
        try:
            return os.listdir(fd)
        except OSError as exc:
            raise NovaBaseError(f"cannot list {self.base_dir}: {exc.strerror}") from None

    def sync(self, image_ids: Iterable[str]) -> SyncReport:
        """One pass.  Raises NovaBaseError if a link cannot be made; the links made in this pass
        are then taken away again, so that a failed pass leaves the directory as it found it."""
        wanted = {cache_name(i): i for i in image_ids}
        report = SyncReport()
        with self.opened() as fd:
            present = set(self.list_names(fd))
            try:
                for name, image_id in sorted(wanted.items()):
                    self._ensure(fd, name, image_id, name in present, report)
            except OSError as exc:
                for name in report.linked:
                    if self.ours(name, fd):  # not a download Nova renamed over it meanwhile
                        unlink_quietly(name, fd)
                    self._made.discard(name)
                raise NovaBaseError(f"cannot link {self.base_dir}: {exc.strerror} ({exc.filename}); "
                                    f"the {len(report.linked)} links made in this pass were taken back") from None
            in_use = self._scan_in_use(fd)
            for name in (n for n in present if n not in wanted and self.ours(n, fd)):
                if in_use is None or name in in_use:
                    report.kept_in_use.append(name)
                    report.links += 1
                    continue
                try:
                    os.unlink(name, dir_fd=fd)
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

    def _ensure(self, fd: int, name: str, image_id: str, present: bool, report: SyncReport) -> None:
        target = self.target(image_id)
        if present:
            try:
                current = os.readlink(name, dir_fd=fd)
            except FileNotFoundError:
                present = False
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not a link
                    raise
                report.foreign[name] = f"a {_kind(name, fd)} (an earlier download?) for image {image_id}"
                return
            else:
                if current == target:
                    report.links += 1
                    self._made.add(name)
                    return
                report.foreign[name] = f"a link to {current}, not {target}"
                return
        try:
            os.symlink(target, name, dir_fd=fd)
        except FileExistsError:  # made meanwhile (Nova downloading it): look again next pass
            report.foreign[name] = f"made by someone else meanwhile, for image {image_id}"
            return
        if name in self._made:
            report.restored.append(name)
        self._made.add(name)
        report.linked.append(name)
        report.links += 1

    def ours(self, name: str, fd: int) -> bool:
        try:
            return os.path.dirname(os.readlink(name, dir_fd=fd)) == str(self.images_dir)
        except OSError:
            return False

    def scan_in_use(self) -> None:
        """Notes, in ``in_use_ids``, the images whose links instance disks are backed by: the mount
        keeps them listed if Glance drops them, so that a link an instance needs never dangles."""
        with self.opened() as fd:
            self._scan_in_use(fd)

    def _scan_in_use(self, fd: int) -> set[str] | None:
        """The names here that instance disks are backed by (None if unknown: an unreadable disk);
        updates ``in_use_ids``."""
        names = self.backing_names()
        if names is None:
            return None
        ids = set()
        for name in names:
            if self.ours(name, fd):
                try:
                    ids.add(os.path.basename(os.readlink(name, dir_fd=fd)))
                except OSError:
                    continue
        self.in_use_ids = ids
        return names

    def backing_names(self) -> set[str] | None:
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
                    if exc.errno == errno.ELOOP:  # a link where Nova keeps a disk file: not Nova's
                        continue
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
            "stopped": self.stopped,
        }


def _kind(name: str, fd: int) -> str:
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return "file"
    if stat.S_ISREG(st.st_mode):
        return f"regular file of {st.st_size} bytes"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    return "special file"


def unlink_quietly(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass
