"""The mount outlives the process serving it: SIGKILL of the serving process, ``thunderfs restart``,
the systemd file descriptor store (this test plays systemd), and a dead mount point.

A reader keeps reading through each event with O_DIRECT (every read goes to the daemon), and
must see no error and no wrong byte.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import assert_kernel_waits_on_nothing, wait_for
from harness.direct_reader import BLOCK, DirectReader
from harness.mounts import thunderfs
from thunderfs.fuse import mounting


def test_sigkill_of_the_serving_process_is_recovered_with_no_failed_read(glance, mounts, images):
    image_id = images.add(24 * 2**20, seed=81)
    m = mounts(glance.url)
    m.mount()
    reader = DirectReader(m.image(image_id), images.data[image_id])
    reader.start()
    try:
        pids = [m.pid]
        for _ in range(3):
            reader.wait_reads(20)
            old = m.signal_server(signal.SIGKILL)
            new = m.wait_new_server(old)
            assert new != old and new not in pids
            pids.append(new)
        reader.wait_reads(20)
    finally:
        reader.stop()
    assert (reader.errors, reader.wrong) == (0, 0), reader.failures[:5]
    assert reader.slowest < 15
    assert_kernel_waits_on_nothing(m)
    status = m.stats()
    assert status["pid"] == pids[-1]
    assert status["fs"]["takeover"] is True
    # The reads the killed processes had taken were resent, or the handles reopened: either way
    # the new process answered them.
    assert status["fs"]["handles_reopened"] >= 1
    assert "was killed by SIGKILL" in m.log_tail(100_000)


def test_restart_replaces_the_serving_process_and_keeps_open_files(glance, mounts, images):
    image_id = images.add(8 * 2**20, seed=82)
    m = mounts(glance.url)
    m.mount()
    reader = DirectReader(m.image(image_id), images.data[image_id], seed=2)
    reader.start()
    try:
        for _ in range(2):
            reader.wait_reads(20)
            old = m.pid
            res = thunderfs("restart", str(m.path))
            assert res.returncode == 0, res.stderr + m.log_tail()
            m.read_pids()
            assert m.pid != old and f"served by process {m.pid}" in res.stdout
        reader.wait_reads(20)
    finally:
        reader.stop()
    assert (reader.errors, reader.wrong) == (0, 0), reader.failures[:5]
    assert_kernel_waits_on_nothing(m)
    # The whole image reads back through the new process, and the mount unmounts cleanly.
    assert m.image(image_id).read_bytes() == images.data[image_id]
    assert m.umount().returncode == 0
    assert not m.is_mounted()


def _spawn_with_fds(argv: list[str], fds: list[int], names: list[str], env: dict, log) -> int:
    """Start ``argv`` as systemd starts a service with a file descriptor store: the descriptors at
    3, 4, ... and LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES naming them."""
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)
            child_env = dict(env)
            if fds:
                child_env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                                 LISTEN_FDNAMES=":".join(names))
            os.execve(argv[0], argv, child_env)
        finally:
            os._exit(127)
    return pid


def _notifications(sock: socket.socket, until: str, timeout: float = 60) -> tuple[list[str], dict[str, int]]:
    """What the service sent to its NOTIFY_SOCKET until a message containing ``until``."""
    sock.settimeout(timeout)
    messages, stored = [], {}
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 8)
        text = msg.decode()
        messages.append(text)
        fields = dict(line.split("=", 1) for line in text.splitlines())
        if fields.get("FDSTORE") == "1":
            stored[fields["FDNAME"]] = fds[0]
        if until in text:
            return messages, stored


def test_systemd_fd_store_keeps_the_mount_across_restarts(glance, images, tmp_path):
    """This test is systemd: it gives the daemon a NOTIFY_SOCKET and a store ($FDSTORE), keeps the
    descriptors it stores, and starts it again with them, after a SIGTERM (``systemctl restart``) and after a SIGKILL
    (``Restart=on-failure``)."""
    image_id = images.add(4 * 2**20, seed=83)
    data = images.data[image_id]
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    mp.mkdir()
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "FDSTORE": "4"}  # FileDescriptorStoreMax=4
    argv = [sys.executable, "-m", "thunderfs", "mount", str(mp), "--foreground", "--glance", glance.url,
            "--cache-dir", str(cache)]
    log = open(tmp_path / "daemon.log", "ab")
    pids = []
    try:
        pids.append(_spawn_with_fds(argv, [], [], env, log))
        messages, stored = _notifications(sock, "READY=1")
        assert set(stored) == {"fuse", "session"}
        assert any(f"MAINPID={pids[0]}" in m for m in messages)
        f = open(mp / "images" / image_id, "rb", buffering=0)
        assert f.read(BLOCK) == data[:BLOCK]

        # systemctl restart: SIGTERM; the daemon hands over (exit 75) and leaves the mount.
        os.kill(pids[0], signal.SIGTERM)
        _, status = os.waitpid(pids[0], 0)
        assert os.waitstatus_to_exitcode(status) == 75
        assert mounting.mounted_type(mp) == "fuse.thunderfs"
        fds = [stored["fuse"], stored["session"]]
        # A read while nobody serves waits for the next process instead of failing.
        result = {}
        t = threading.Thread(target=lambda: result.update(data=os.pread(f.fileno(), BLOCK, 2 * BLOCK)))
        t.start()
        pids.append(_spawn_with_fds(argv, fds, ["fuse", "session"], env, log))
        _notifications(sock, "READY=1")
        t.join(30)
        assert result.get("data") == data[2 * BLOCK:3 * BLOCK]

        # Restart=on-failure after a SIGKILL.
        os.kill(pids[1], signal.SIGKILL)
        os.waitpid(pids[1], 0)
        pids.append(_spawn_with_fds(argv, fds, ["fuse", "session"], env, log))
        _notifications(sock, "READY=1")
        f.seek(0)
        assert f.read() == data
        f.close()

        # thunderfs umount ends it for good: the process says STOPPING=1 and exits 0.
        assert thunderfs("umount", str(mp)).returncode == 0
        _notifications(sock, "STOPPING=1")
        _, status = os.waitpid(pids[2], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert mounting.mounted_type(mp) is None
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            except ProcessLookupError:
                pass
        if mounting.mounted_type(mp):
            mounting.unmount(mp, lazy=True)
        log.close()
        sock.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "taking over the mount" in text


def test_a_dead_mount_point_is_detached_by_umount_and_by_mount(glance, mounts, images):
    image_id = images.add(300_000, seed=84)
    m = mounts(glance.url)
    m.mount()
    # The whole node dies: keeper and serving process.  Nobody holds the connection: ENOTCONN;
    # or ECONNABORTED, for a stat that the kernel took while it was aborting the connection as
    # the last descriptor closed (CI saw it once); both are a dead mount (mounting.is_dead).
    os.killpg(m.keeper, signal.SIGKILL)
    assert m.wait_exit(10)
    with pytest.raises(OSError) as info:
        os.stat(m.path)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    started = time.monotonic()
    res = thunderfs("umount", str(m.path), timeout=30)
    assert res.returncode == 0 and "detached the dead mount" in res.stdout, res.stderr
    assert time.monotonic() - started < 10
    assert not m.is_mounted()

    # Again, and now mount on the dead mount point directly: it is detached, with one log line.
    m.mount()
    os.killpg(m.keeper, signal.SIGKILL)
    assert m.wait_exit(10)
    res = m.try_mount()
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert m.image(image_id).read_bytes() == images.data[image_id]
    assert m.log_tail(100_000).count("detached the dead mount") == 1


def test_sigterm_of_the_keeper_unmounts(glance, mounts, images):
    image_id = images.add(300_000, seed=85)
    m = mounts(glance.url)
    m.mount()
    assert m.image(image_id).read_bytes() == images.data[image_id]
    server = m.pid
    m.signal(signal.SIGTERM)  # the keeper
    assert m.wait_exit(30)
    assert not m.is_mounted()
    assert not os.path.exists(f"/proc/{server}")


def test_a_vm_keeps_running_through_a_kill_and_a_restart(glance, mounts, tmp_path):
    """A qemu guest (TCG, cache=none as Nova's) booting from a qcow2 overlay on the mount: the
    serving process is killed with SIGKILL while the guest runs, then replaced with ``thunderfs
    restart``; the guest reaches its marker with its payload intact."""
    from harness import tiny_vm

    disk = tiny_vm.build(tmp_path / "disk")
    image_id = glance.upload("tiny-takeover", disk.raw)["id"]
    m = mounts(glance.url)
    m.mount()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(m.image(image_id)), "-F", "raw", "-u",
                    str(overlay), str(256 * 2**20)], check=True)
    result = {}
    guest = threading.Thread(target=lambda: result.update(md5=_boot(overlay)))
    guest.start()
    # The guest reads its root through the mount: kill the serving process once reads arrive.
    wait_for(lambda: m.stats()["fs"]["read_requests"] > 0, 60, "the guest's first reads")
    assert guest.is_alive()
    new = m.wait_new_server(m.signal_server(signal.SIGKILL))
    wait_for(lambda: m.stats()["fs"]["read_requests"] > 0 or not guest.is_alive(), 60, "reads after the kill")
    assert guest.is_alive(), "the guest finished before the restart: the test needs a longer boot"
    res = thunderfs("restart", str(m.path))
    assert res.returncode == 0, res.stderr
    m.read_pids()
    assert m.pid != new
    guest.join(180)
    assert result.get("md5") == disk.payload_md5, result


def _boot(overlay) -> str:
    from harness import tiny_vm
    try:
        return tiny_vm.boot(overlay)
    except tiny_vm.TinyVmError as exc:
        return str(exc)
