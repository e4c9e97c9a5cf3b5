"""Nova boots through thunderfs with no patch: its image cache (``_base``) holds links into the mount.

Nova's own code runs here, from a real ``nova`` installed in a venv of its own
(``.venv-nova``, made by scripts/setup.sh): its naming of base files, its format inspection and
utime of a base file, its qcow2 instance disk, its image cache manager.  The disks it makes are
booted under qemu (TCG).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for

from harness import nova_probe, tiny_vm
from harness.mounts import thunderfs
from thunderfs.nova.base_dir import NovaBaseDir, NovaBaseError, cache_name

GiB = 2**30


def nova(*args: str) -> dict:
    """Nova's own code, through harness/nova_probe.py in the Nova venv (a failure fails the test)."""
    return nova_probe.run(*args, timeout=300)


@pytest.fixture
def nova_dirs(tmp_path):
    instances = tmp_path / "instances"
    base = instances / "_base"
    base.mkdir(parents=True)
    return instances, base


def test_our_names_are_novas(images):
    ids = [images.add(1000, seed=91), "3f0c1e2a-0000-4000-8000-000000000000", "an-id-of-another-shape"]
    for image_id in ids:
        assert cache_name(image_id) == nova("name", image_id)["cache_name"]


def test_nova_sync_links_every_image_and_leaves_the_rest_alone(glance, mounts, images, nova_dirs):
    instances, base = nova_dirs
    a, b = images.add(300_000, seed=92), images.add(200_000, seed=93)
    m = mounts(glance.url)
    m.mount()
    # What Nova keeps there of its own, and image b downloaded by Nova before thunderfs.
    own = {"ephemeral_10_40d1d2c": b"e" * 100, "swap_512": b"s" * 100, cache_name(b): b"downloaded"}
    for name, data in own.items():
        (base / name).write_bytes(data)

    res = thunderfs("nova-sync", str(m.path), "--base-dir", str(base))
    assert res.returncode == 0, res.stderr
    assert f"left alone: {cache_name(b)}: a regular file of 10 bytes" in res.stdout
    link = base / cache_name(a)
    assert os.readlink(link) == str(m.path / "images" / a)
    with open(link, "rb") as f:
        assert f.read() == images.data[a]
    for name, data in own.items():
        assert not (base / name).is_symlink() and (base / name).read_bytes() == data
    every = {cache_name(i) for i in os.listdir(m.path / "images")}
    assert {n for n in os.listdir(base) if (base / n).is_symlink()} == every - {cache_name(b)}

    # A second pass changes nothing; a link someone removed is made again.
    os.unlink(link)
    res = thunderfs("nova-sync", str(m.path), "--base-dir", str(base))
    assert res.returncode == 0 and "1 made" in res.stdout, res.stdout
    assert os.readlink(link) == str(m.path / "images" / a)
    # --watch does it again and again, until stopped.
    watch = subprocess.Popen([sys.executable, "-m", "thunderfs", "nova-sync", str(m.path), "--base-dir", str(base),
                              "--watch", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            os.unlink(link)
            wait_for(lambda: link.is_symlink(), timeout=10, what="--watch to put the link back")
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=10)
    assert "Traceback" not in err, err


def test_nova_sync_refuses_what_it_cannot_do_and_links_nothing(glance, mounts, images, tmp_path, nova_dirs):
    instances, base = nova_dirs
    images.add(1000, seed=94)
    m = mounts(glance.url)
    # The mount is not up: its empty mount point must not read as "no images".
    res = thunderfs("nova-sync", str(m.path), "--base-dir", str(base))
    assert res.returncode == 1 and "no thunderfs daemon is serving" in res.stderr, res.stderr
    m.mount()
    missing = tmp_path / "nowhere" / "_base"
    res = thunderfs("nova-sync", str(m.path), "--base-dir", str(missing))
    assert res.returncode == 1 and f"{missing} does not exist" in res.stderr, res.stderr
    assert not missing.exists()
    # Not writable: a read-only file system (root may write anywhere else).
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        res = thunderfs("nova-sync", str(m.path), "--base-dir", str(ro))
        assert res.returncode == 1 and f"cannot make links in {ro}" in res.stderr, res.stderr
        assert os.listdir(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    # A pass that fails midway (a file system out of inodes after two links) takes back what it made.
    for seed in range(100, 104):
        images.add(1000, seed=seed)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=3", "tmpfs", str(full)], check=True)
    try:
        res = thunderfs("nova-sync", str(m.path), "--base-dir", str(full))
        assert res.returncode == 1 and "links made in this pass were taken back" in res.stderr, res.stderr
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert os.listdir(base) == []
    # The daemon option checks the same before it mounts.
    other = mounts(glance.url, name="n2")
    res = other.try_mount("--nova-base-dir", str(missing))
    assert res.returncode != 0 and "does not exist" in res.stderr, res.stderr
    assert not other.is_mounted()


def test_mount_keeps_the_image_cache_beside_novas_cache_manager(glance, mounts, images, nova_dirs):
    instances, base = nova_dirs
    kept, used, unused = (images.add(1 << 20, seed=s) for s in (95, 96, 97))
    m = mounts(glance.url, "--listing-ttl", "1", "--nova-base-dir", str(base))
    m.mount()
    for i in (kept, used, unused):
        wait_for(lambda i=i: (base / cache_name(i)).is_symlink(), what=f"link of {i}")
    # A new image gets its link within a listing.
    new = images.add(1000, seed=98)
    wait_for(lambda: (base / cache_name(new)).is_symlink(), what="link of a new image")

    # An instance whose root disk Nova made on image `used`.
    booted = nova("boot", "--instances-path", str(instances), "--image-id", used, "--instance", "inst-1",
                  "--size", str(GiB))
    assert booted["downloads"] == [] and booted["warnings"] == [], booted

    # Nova's cache manager: `used` is in use; the others are unused and old enough, so it removes
    # them (it removes the links, not the images); the mount puts them back.
    mgr = nova("manager", "--instances-path", str(instances), "--in-use", used, "--instance", "inst-1")
    assert cache_name(used) in mgr["active"]
    assert {cache_name(kept), cache_name(unused)} <= set(mgr["removed"]), mgr
    assert cache_name(used) not in mgr["removed"]
    for i in (kept, unused):
        wait_for(lambda i=i: (base / cache_name(i)).is_symlink(), what=f"link of {i} put back")
    wait_for(lambda: m.stats()["nova"]["restored"] >= 2, what="restored count")

    # `used` and `unused` deleted from Glance.  `unused` leaves the listing and its link goes.
    # `used` stays listed while an instance disk is backed by its link, so the link never
    # dangles: Nova's manager still sees the base in use, and Nova can make another instance (or
    # hard-reboot this one) from what is cached.
    glance.delete(used)
    glance.delete(unused)
    images_dir = m.path / "images"
    wait_for(lambda: unused not in os.listdir(images_dir), what="deleted image out of the listing")
    wait_for(lambda: not (base / cache_name(unused)).is_symlink(), what="link of a deleted image removed")
    stats = wait_for(lambda: (s := m.stats()["nova"])["kept_in_use"] == 1 and s, what="in-use link kept")
    assert used in os.listdir(images_dir) and os.path.exists(base / cache_name(used))
    mgr = nova("manager", "--instances-path", str(instances), "--instance", "inst-1")
    assert cache_name(used) in mgr["active"] and cache_name(used) not in mgr["removed"]
    again = nova("boot", "--instances-path", str(instances), "--image-id", used, "--instance", "inst-2",
                 "--size", str(GiB))
    assert again["downloads"] == [] and again["warnings"] == [], again
    # So across a restart of the daemon (from its saved listing and the instance disks).
    assert m.umount().returncode == 0
    m.mount()
    assert used in os.listdir(images_dir) and os.path.exists(base / cache_name(used))
    # The instances are deleted (Nova removes their directories): the link goes, and the image
    # leaves the listing.
    subprocess.run(["rm", "-rf", str(instances / "inst-1"), str(instances / "inst-2")], check=True)
    wait_for(lambda: not (base / cache_name(used)).is_symlink(), what="link removed after the instance")
    wait_for(lambda: used not in os.listdir(images_dir), what="image gone once no instance needs it")
    assert (base / cache_name(kept)).is_symlink()
    assert m.stats()["nova"]["removed"] >= 1 and stats["last_error"] is None  # counted since the restart
    shown = thunderfs("status", str(m.path)).stdout
    assert f"Nova image cache {base}: kept;" in shown and "put back" in shown, shown


@pytest.mark.parametrize("disk_format", ["raw", "qcow2"])
def test_nova_boots_an_instance_through_the_mount(glance, mounts, images, tmp_path, nova_dirs, disk_format):
    instances, base = nova_dirs
    other = cache_name(images.add(1000, seed=99))  # an image no instance uses
    disk = tiny_vm.build(tmp_path / "disk")
    upload = disk.raw if disk_format == "raw" else tiny_vm.to_qcow2(disk.raw, tmp_path / "disk" / "tiny.qcow2")
    image = glance.upload(f"tiny-{disk_format}", upload, disk_format=disk_format)
    image_id = image["id"]
    m = mounts(glance.url, "--nova-base-dir", str(base), "--listing-ttl", "1.5")
    m.mount()
    link = wait_for(lambda: (p := base / cache_name(image_id)).is_symlink() and p, what="link")
    fetched0 = m.stats()["glance"]["bytes"]
    before = time.time()

    # What nova-compute does for the root disk (images_type=qcow2): finds the base file (no
    # download), inspects its format, marks it in use (utime), makes the qcow2 disk on it.
    booted = nova("boot", "--instances-path", str(instances), "--image-id", image_id, "--instance", "inst-1",
                  "--size", str(GiB))
    assert booted["downloads"] == [], "Nova downloaded the image"
    assert booted["warnings"] == [], booted["warnings"]
    assert booted["format"] == disk_format
    assert booted["backing_file"] == str(link)
    assert booted["base_mtime"] >= before - 1  # the utime reached the mount (kept in memory there)
    inspected = m.stats()["glance"]["bytes"] - fetched0
    assert inspected <= 4 * 2**20, f"Nova's inspection fetched {inspected} bytes"

    # The VM boots from Nova's disk, reading through the link and the mount.
    assert tiny_vm.boot(Path(booted["disk"])) == disk.payload_md5
    fetched = m.stats()["glance"]["bytes"] - fetched0
    assert fetched < image["size"] / 2, f"the boot fetched {fetched} of {image['size']} bytes"
    print(f"{disk_format}: inspection fetched {inspected} B, boot {fetched} B of {image['size']} B",
          file=sys.stderr)

    # Rollback to plain Nova: the link the instance is backed by becomes a full copy, the mount
    # stops keeping the directory, and the instance boots with thunderfs unmounted.
    assert (base / other).is_symlink()
    res = thunderfs("nova-sync", str(m.path), "--base-dir", str(base), "--rollback")
    assert res.returncode == 0, res.stderr
    assert "1 replaced by copies" in res.stdout, res.stdout
    assert not (base / other).exists() and not link.is_symlink()
    with open(link, "rb") as f, open(upload, "rb") as g:
        assert f.read() == g.read()
    assert link.stat().st_mode & 0o777 == 0o644
    if disk_format == "raw":  # sparse: the unused space of the raw disk (most of it) is not written
        assert link.stat().st_blocks * 512 < image["size"] / 2
    assert m.stats()["nova"]["released"] is True
    wait_for(lambda: m.stats()["nova"]["stopped"], what="the mount's passes over _base to stop")
    assert not (base / other).exists(), "the mount put a link back after the rollback"
    assert m.umount().returncode == 0
    assert tiny_vm.boot(Path(booted["disk"])) == disk.payload_md5


def test_nova_base_dir_is_not_written_once_replaced_and_instance_disks_are_read_safely(tmp_path):
    """Nova's user owns _base and the instance directories, and thunderfs writes there as root:
    a directory swapped in for _base is refused, and an instance 'disk' that is a FIFO or a link
    elsewhere is neither waited on nor followed.  (No mount needed: the links' target is a path.)"""
    instances = tmp_path / "instances"
    base = instances / "_base"
    base.mkdir(parents=True)
    images_dir = tmp_path / "mnt" / "images"
    for name, make in (("fifo", lambda p: os.mkfifo(p)), ("link", lambda p: os.symlink("/etc/hostname", p))):
        (instances / name).mkdir()
        make(instances / name / "disk")
    nb = NovaBaseDir(base, images_dir)
    nb.check()
    report = nb.sync(["img-a", "img-b"])
    assert sorted(report.linked) == sorted(cache_name(i) for i in ("img-a", "img-b"))
    assert os.readlink(base / cache_name("img-a")) == str(images_dir / "img-a")
    report = nb.sync(["img-a"])  # img-b gone, and no instance disk is backed by it
    assert report.removed == [cache_name("img-b")] and report.kept_in_use == []

    base.rename(instances / "_base.old")
    base.mkdir()
    with pytest.raises(NovaBaseError, match="no longer the directory thunderfs checked"):
        nb.sync(["img-a", "img-c"])
    assert os.listdir(base) == []
