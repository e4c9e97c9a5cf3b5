"""Mounting and unmounting through the CLI, and its refusals."""

from __future__ import annotations

import os
import signal
import subprocess

from harness.local_glance import free_port
from harness.mounts import thunderfs


def test_mount_returns_when_ready_and_umount_waits_for_the_daemon(glance, mounts, images):
    image_id = images.add(100_000, seed=11)
    m = mounts(glance.url)
    res = m.mount()
    assert "mounted" in res.stdout
    # The mount is usable the moment the command returns.
    assert image_id in os.listdir(m.path / "images")
    pid = m.pid
    assert m.umount().returncode == 0
    assert not m.is_mounted()
    # umount returned only after the daemon finished.
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split(") ")[1][:1]


def test_missing_mount_point_is_refused(glance, tmp_path):
    res = thunderfs("mount", str(tmp_path / "nope"), "--glance", glance.url, "--cache-dir", str(tmp_path / "c"))
    assert res.returncode != 0
    assert "does not exist" in res.stderr


def test_mount_point_that_is_a_file_is_refused(glance, tmp_path):
    (tmp_path / "f").write_text("x")
    res = thunderfs("mount", str(tmp_path / "f"), "--glance", glance.url, "--cache-dir", str(tmp_path / "c"))
    assert res.returncode != 0
    assert "not a directory" in res.stderr


def test_busy_mount_point_is_refused(mount, glance, tmp_path):
    res = thunderfs("mount", str(mount.path), "--glance", glance.url, "--cache-dir", str(tmp_path / "other"))
    assert res.returncode != 0
    assert "already a mount point" in res.stderr


def test_cache_dir_in_use_is_refused(mount, glance, tmp_path):
    other = tmp_path / "other-mnt"
    other.mkdir()
    res = thunderfs("mount", str(other), "--glance", glance.url, "--cache-dir", str(mount.cache_dir))
    assert res.returncode != 0
    assert "in use" in res.stderr
    assert not os.path.ismount(other)


def test_unreachable_glance_with_empty_cache_is_refused(mounts):
    m = mounts(f"http://127.0.0.1:{free_port()}", "--connect-timeout", "1")
    res = m.try_mount()
    assert res.returncode != 0
    assert "unreachable" in res.stderr and "empty" in res.stderr
    assert not m.is_mounted()


def test_bad_options_are_refused(glance, tmp_path):
    (tmp_path / "mnt").mkdir()
    base = ["mount", str(tmp_path / "mnt"), "--glance", glance.url, "--cache-dir", str(tmp_path / "c")]
    for extra, words in [
        (["--chunk-size", "100K"], "power of two"),
        (["--cache-size", "lots"], "not a size"),
        (["--cache-size", "1K"], "smaller than one chunk"),
        (["--fetch-timeout", "0"], "must be positive"),
    ]:
        res = thunderfs(*base, *extra)
        assert res.returncode != 0, extra
        assert words in res.stderr, (extra, res.stderr)
    res = thunderfs("mount", str(tmp_path / "mnt"), "--glance", "glance:9292", "--cache-dir", str(tmp_path / "c"))
    assert "http(s) URL" in res.stderr


def test_other_chunk_size_on_an_existing_cache_is_refused(mount, glance, images):
    image_id = images.add(200_000, seed=12)
    mount.image(image_id).read_bytes()
    assert mount.umount().returncode == 0
    res = mount.try_mount("--chunk-size", "128K")
    assert res.returncode != 0
    assert "65536-byte chunks" in res.stderr


def test_sigterm_and_sigint_unmount_cleanly(mounts, glance, images):
    image_id = images.add(300_000, seed=13)
    for sig in (signal.SIGTERM, signal.SIGINT):
        m = mounts(glance.url, name=sig.name)
        m.mount()
        assert m.image(image_id).read_bytes() == images.data[image_id]
        m.signal(sig)
        assert m.wait_exit(30), f"daemon ignored {sig.name}"
        assert not m.is_mounted()
        assert "unmounting" in m.log_tail()
        # Its cache was committed on the way out: the next mount serves it with no Glance request.
        m.mount()
        before = m.stats()["glance"]["range_requests"]
        assert m.image(image_id).read_bytes() == images.data[image_id]
        assert m.stats()["glance"]["range_requests"] == before
        m.umount()


def test_umount_of_a_busy_mount_fails_and_keeps_it(mount, images):
    image_id = images.add(100_000, seed=14)
    with open(mount.image(image_id), "rb"):
        res = mount.umount()
        assert res.returncode != 0
        assert "busy" in res.stderr.lower()
        assert mount.is_mounted()
    assert mount.umount().returncode == 0


def test_foreground_mount_reports_errors_on_stderr(glance, tmp_path):
    res = subprocess.run(
        [os.sys.executable, "-m", "thunderfs", "mount", str(tmp_path / "absent"), "--glance", glance.url,
         "--cache-dir", str(tmp_path / "c"), "--foreground"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "does not exist" in res.stderr
