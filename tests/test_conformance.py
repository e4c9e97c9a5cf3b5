"""The mount under tools nobody here wrote (issue 29, item 4): fio reads its own crc32c verify
pattern back through the mount with every engine a guest's qemu or a tool might use (the
synchronous ones through the page cache, libaio and io_uring with O_DIRECT at depth 32), also
through two SIGKILLs of the serving process; ``qemu-img compare`` finds the image identical to
Glance's bytes; qemu boots a guest from an overlay on the mount with ``aio=io_uring`` and with
``cache=writeback``; and the kernel waits on no request at the end of each."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import pytest

from conftest import assert_kernel_waits_on_nothing

SIZE = 16 * 2**20
ENGINES = [("psync", {}), ("sync", {}), ("pvsync2", {}), ("mmap", {}), ("splice", {}),
           ("libaio", {"direct": 1, "iodepth": 32}), ("io_uring", {"direct": 1, "iodepth": 32})]


def _fio(path, engine: str, extra: dict) -> dict:
    """fio's verify of the whole image (its reads and their checks, fio's own)."""
    args = ["fio", "--name=verify", f"--filename={path}", f"--size={SIZE}", "--rw=read", "--bs=64k",
            "--verify=crc32c", "--verify_only=1", f"--ioengine={engine}",
            "--output-format=json", *(f"--{k}={v}" for k, v in extra.items())]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"fio {engine}: {res.stdout[-1500:]} {res.stderr[-1500:]}"
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    return {"error": job["error"], "bytes": job["read"]["io_bytes"]}


@pytest.fixture(scope="module")
def verify_image(glance, tmp_path_factory):
    """An image holding fio's own verify pattern, written by fio to a local file first."""
    local = tmp_path_factory.mktemp("fio") / "pattern.raw"
    subprocess.run(["fio", "--name=write", f"--filename={local}", f"--size={SIZE}", "--rw=write", "--bs=64k",
                    "--verify=crc32c", "--do_verify=0", "--verify_state_save=0", "--output-format=terse"],
                   check=True, capture_output=True, cwd=local.parent)
    return glance.upload("fio-verify", local.read_bytes())["id"], local


@pytest.mark.parametrize("engine,extra", ENGINES, ids=[e for e, _ in ENGINES])
def test_fio_reads_its_verify_pattern_back_with_every_engine(glance, mounts, verify_image, engine, extra):
    image_id, _ = verify_image
    m = mounts(glance.url)
    m.mount()
    assert _fio(m.image(image_id), engine, extra) == {"error": 0, "bytes": SIZE}
    assert_kernel_waits_on_nothing(m)


def test_fio_verifies_through_two_sigkills_and_qemu_img_compare_finds_the_image_identical(
        glance, mounts, verify_image):
    image_id, local = verify_image
    m = mounts(glance.url)
    m.mount()
    done = threading.Event()
    kills = []

    def killer():
        for _ in range(2):
            if done.wait(0.7):
                return
            old = m.signal_server(signal.SIGKILL)
            kills.append(m.wait_new_server(old))

    t = threading.Thread(target=killer)
    t.start()
    runs = 0
    try:
        while len(kills) < 2 and t.is_alive():  # fio after fio, O_DIRECT: every read to the daemon
            assert _fio(m.image(image_id), "io_uring", {"direct": 1, "iodepth": 32}) == {"error": 0, "bytes": SIZE}
            runs += 1
        assert _fio(m.image(image_id), "io_uring", {"direct": 1, "iodepth": 32}) == {"error": 0, "bytes": SIZE}
    finally:
        done.set()
        t.join(120)
    assert len(kills) == 2 and runs >= 2, (kills, runs)
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(m.image(image_id)), str(local)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_kernel_waits_on_nothing(m)


@pytest.mark.parametrize("cache,aio", [("none", "io_uring"), ("writeback", "threads")])
def test_a_guest_boots_from_an_overlay_on_the_mount_with_qemus_other_ways_to_read(glance, mounts, tmp_path,
                                                                                  cache, aio):
    """qemu (TCG) boots from a qcow2 overlay whose backing file is an image on the mount: with
    ``aio=io_uring`` under ``cache=none`` (O_DIRECT), and with ``cache=writeback`` (the host's page
    cache); the guest checks its payload and prints its md5; the kernel then waits on nothing."""
    from harness import tiny_vm

    disk = tiny_vm.build(tmp_path / "disk")
    image_id = glance.upload(f"tiny-{cache}-{aio}", disk.raw)["id"]
    m = mounts(glance.url)
    m.mount()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(m.image(image_id)), "-F", "raw", "-u",
                    str(overlay), str(256 * 2**20)], check=True)
    assert tiny_vm.boot(overlay, cache=cache, aio=aio) == disk.payload_md5
    assert m.stats()["fs"]["read_requests"] > 0  # it read through the mount
    assert_kernel_waits_on_nothing(m)
