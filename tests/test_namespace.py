"""MOUNT/images/<id>: what is listed, with what attributes, and that nothing can be written."""

from __future__ import annotations

import errno
import grp
import os
import subprocess
import stat
import time
from datetime import datetime

import pytest
import trio

from conftest import wait_for
from thunderfs_common.glance_client import GlanceClient


def kvm_or_root() -> int:
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return 0


def test_active_images_are_listed_with_glance_sizes_and_times(mount, glance, images):
    ids = [images.add(n, seed=20 + i) for i, n in enumerate((1, 65536, 65537, 300_001))]
    listed = set(os.listdir(mount.path / "images"))
    assert set(ids) <= listed
    assert os.listdir(mount.path) == ["images"]
    for image_id in ids:
        st = os.stat(mount.image(image_id))
        rec = glance.image(image_id)
        assert st.st_size == rec["size"] == len(images.data[image_id])
        # By default only root and the group qemu runs in (kvm here) may read an image.
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o440
        assert (st.st_uid, st.st_gid) == (0, kvm_or_root())
        updated = datetime.fromisoformat(rec["updated_at"].replace("Z", "+00:00")).timestamp()
        assert abs(st.st_mtime - updated) < 1


def test_images_that_are_not_active_are_not_listed(mount, glance, images):
    queued = glance.create_image("never-uploaded")
    deactivated = images.add(1000, seed=25)
    glance.deactivate(deactivated)
    fresh = images.add(500, seed=27)  # listed once the mount's listing is newer than the two above

    def listing_after_them():
        names = os.listdir(mount.path / "images")
        return names if fresh in names else None

    names = wait_for(listing_after_them, what="a listing made after the images were created")
    assert queued not in names
    assert not os.path.exists(mount.image(queued))


def test_hidden_images_are_listed(mount, glance, images):
    """Operators hide old images that instances still boot from; Nova boots them by id."""
    hidden = images.add(1000, seed=26)
    glance.hide(hidden)
    assert glance.image(hidden)["os_hidden"] is True
    assert hidden not in {i["id"] for i in glance.images()}  # Glance's own listing leaves it out
    wait_for(lambda: hidden in os.listdir(mount.path / "images"), what="the hidden image to be listed")
    with open(mount.image(hidden), "rb") as f:
        assert f.read() == images.data[hidden]


def test_unknown_image_is_enoent(mount):
    for name in ("0b9c2b84-0000-4000-8000-000000000000", "not an id", "../../etc"):
        with pytest.raises(FileNotFoundError):
            os.stat(mount.path / "images" / name)


def test_new_image_appears_without_remount(mount, images):
    os.listdir(mount.path / "images")
    image_id = images.add(70_000, seed=26)
    # Opened by name at once ...
    assert mount.image(image_id).read_bytes() == images.data[image_id]
    # ... and in the listing after the next refresh.
    other = images.add(1000, seed=27)
    deadline = time.monotonic() + 15
    while other not in os.listdir(mount.path / "images"):
        assert time.monotonic() < deadline, "new image never listed"
        time.sleep(0.5)


def test_deleted_image_leaves_listing_but_open_handles_keep_reading(glance, mounts, images):
    m = mounts(glance.url, "--listing-ttl", "1", "--readahead", "0", "--kernel-readahead", "0")
    m.mount()
    image_id = images.add(1024 * 1024, seed=28)
    data = images.data[image_id]
    with open(m.image(image_id), "rb", buffering=0) as f:
        assert f.read(128 * 1024) == data[:128 * 1024]
        glance.delete(image_id)
        deadline = time.monotonic() + 15
        # Gone from the listing, and (the kernel forgets its dentry asynchronously) from lookups.
        while image_id in os.listdir(m.path / "images") or os.path.exists(m.image(image_id)):
            assert time.monotonic() < deadline, "deleted image still listed"
            time.sleep(0.3)
        # The handle still reads what is cached, from its own page cache or our cache.
        f.seek(0)
        assert f.read(128 * 1024) == data[:128 * 1024]
        # What was never fetched is gone with the image: EIO, not wrong bytes.
        f.seek(900 * 1024)
        with pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO


def test_writes_and_creates_fail_with_erofs(mount, images):
    image_id = images.add(1000, seed=29)
    path = mount.image(image_id)
    attempts = [
        lambda: open(path, "r+b"),
        lambda: open(path, "wb"),
        lambda: os.truncate(path, 0),
        lambda: open(mount.path / "images" / "new", "wb"),
        lambda: os.mkdir(mount.path / "images" / "d"),
        lambda: os.unlink(path),
        lambda: os.rename(path, mount.path / "images" / "x"),
        lambda: os.symlink("/etc/passwd", mount.path / "images" / "l"),
        lambda: os.setxattr(path, "user.x", b"1"),
        lambda: os.chmod(path, 0o644),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), attempt
    # Root is not stopped by mode bits; our EROFS is what stops writes.
    with pytest.raises(OSError) as exc:
        open(path, "r+b")
    assert exc.value.errno == errno.EROFS
    assert path.read_bytes() == images.data[image_id]


def test_utime_is_kept_in_memory_and_changes_nothing_else(mount, images):
    """Nova touches its base files (os.utime) to mark them in use; an error other than EACCES
    would fail the boot (issue 9).  Times are accepted, kept by the daemon, never written."""
    image_id = images.add(3000, seed=33)
    path = mount.image(image_id)
    before = path.stat()
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000_000_000, 1_100_000_000_000_000_000)
    assert st.st_ctime_ns >= before.st_ctime_ns and st.st_size == before.st_size
    os.utime(path)  # "now", as Nova does
    assert abs(path.stat().st_mtime - time.time()) < 5
    assert path.read_bytes() == images.data[image_id]
    with pytest.raises(OSError) as exc:  # the size, mode and owner stay read-only
        os.truncate(path, 0)
    assert exc.value.errno == errno.EROFS
    # Another mount of the same image (a restart) starts again from Glance's times: memory only.
    mount.umount()
    mount.mount()
    assert mount.image(image_id).stat().st_mtime_ns == before.st_mtime_ns


def test_xattrs_name_the_image_and_its_hash(mount, glance, images):
    image_id = images.add(5000, seed=30)
    path = mount.image(image_id)
    assert os.getxattr(path, "user.thunderfs.image_id").decode() == image_id
    assert os.getxattr(path, "user.thunderfs.os_hash_value").decode() == glance.image(image_id)["os_hash_value"]


async def test_listing_follows_glance_pages(glance, images):
    """Glance pages its listing; every active image must be found across pages."""
    ids = {images.add(100, seed=40 + i) for i in range(5)}
    async with GlanceClient(glance.url, page_size=2) as origin:
        listed = {m.id for m in await origin.list_images()}
        requests = origin.statistics()["requests"]
    assert ids <= listed
    assert requests >= 3  # more than one page was followed
    await trio.lowlevel.checkpoint()


def test_a_local_user_outside_the_image_group_cannot_read_images(glance, images, mounts):
    """The kernel checks the files' owner and mode (default_permissions): the configured group
    reads, any other local user or service is refused."""
    image_id = images.add(5000, seed=29)
    m = mounts(glance.url, "--image-group", "nogroup", "--image-mode", "440")
    m.mount()
    path = str(m.image(image_id))
    # Let other users reach the mount point at all (pytest makes its directories 0700).
    for d in [*reversed(m.path.parents[:len(m.path.parents) - 2])]:
        if d.stat().st_mode & 0o711 != 0o711:
            d.chmod(d.stat().st_mode | 0o711)

    def cat_as(gid: int) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", "cat", path],
                              capture_output=True)

    inside = cat_as(grp.getgrnam("nogroup").gr_gid)
    assert inside.returncode == 0 and inside.stdout == images.data[image_id]
    outside = cat_as(grp.getgrnam("daemon").gr_gid)
    assert outside.returncode != 0 and b"Permission denied" in outside.stderr
    assert open(path, "rb").read() == images.data[image_id]  # root still reads
