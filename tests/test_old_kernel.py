"""The daemon on the kernels compute nodes run, not this machine's: Debian 12's 6.1, Ubuntu
22.04's 5.15 and 24.04's 6.8 (no ``FUSE_NOTIFY_RESEND``, no passthrough; 5.15 also no
``INIT_EXT``) in a qemu guest
(TCG) that runs this machine's own file system over 9p (``harness/guest_kernel.py``), against
this machine's Glance.

Two planned restarts, then two SIGKILLs, each under four fresh O_DIRECT readers, must lose
nothing: a restart answers the reads it had taken before it hands over (the drain), and the
process after a SIGKILL answers those the dead one had taken from the session's journal.  No read
fails, none is wrong, no reader stays stuck, and fusectl's ``waiting`` is back at 0 after each.
``docs/operating.md`` states the same; how long a read waits across a restart (at most 15 s, issue
29's target) is ``benchmarks/old_kernel.py``'s to measure."""

from __future__ import annotations

import json
import re
import sys

import pytest

from harness import guest_kernel
from conftest import image_bytes


@pytest.mark.parametrize("kernel,release", [("debian-6.1", "6.1."), ("ubuntu-22.04", "5.15."),
                                            ("ubuntu-24.04", "6.8.")])
def test_restarts_and_sigkills_on_an_older_kernel_lose_no_read(glance, tmp_path, kernel, release):
    size, seed = 8 * 2**20, 29
    image_id = glance.upload(f"old-kernel-{kernel}", image_bytes(size, seed))["id"]
    port = glance.url.rsplit(":", 1)[1]
    rc, console = guest_kernel.run(
        f"{sys.executable} -m harness.guest_restarts --glance http://{guest_kernel.HOST}:{port} "
        f"--image {image_id} --size {size} --seed {seed} --restarts 2 --kills 2", tmp_path / "guest",
        cwd=str(guest_kernel.REPO), timeout=1200, kernel_name=kernel)
    found = re.search(r"RESULT (\{.*\})", console)
    assert rc == 0 and found, console[-3000:]
    r = json.loads(found.group(1))
    assert r["kernel"].startswith(release) and r["kernel_resends"] is False
    assert len(r["restarts"]) == 2 and len(r["kills"]) == 2, (r["restarts"], r["kills"])
    for event in r["restarts"] + r["kills"]:
        assert (event["readers_stuck"], event["errors"], event["wrong"]) == (0, 0, 0), event
        assert event["waiting"] == 0, event
    assert [x["rc"] for x in r["restarts"]] == [0, 0], r["restarts"]
    # How long a read waits across a restart is the TCG guest's speed (the new process's start,
    # its imports over 9p), measured by benchmarks/old_kernel.py (kept: 7.6-9.7 s), not asserted
    # here: with the host loaded by the suite one restart's slowest read passed 15 s (8a71176).
    assert len(r["drains"]) == 2  # each restart answered what it had taken (a count each: r["drains"])
    assert all(x["new_server"] for x in r["kills"])
    # Four readers keep a read in the daemon's hands nearly always: the journal answered some.
    assert sum(x["replayed"] for x in r["kills"]) >= 1, r["kills"]
