"""The daemon on the kernel a compute node runs, not this machine's: Debian 12's 6.1 (no
``FUSE_NOTIFY_RESEND``, no passthrough) in a qemu guest (TCG) that runs this machine's own file
system over 9p (``harness/guest_kernel.py``), against this machine's Glance.

Planned restarts under four O_DIRECT readers must lose nothing: the old process answers the
reads it had taken before it hands over (the drain), so no read fails, none is wrong, none takes
over 15 s, and fusectl's ``waiting`` is back at 0.  A SIGKILL there is measured, not mended (the
kernel cannot resend what the dead process had read): the readers in those reads stay stuck
until the connection is aborted, which frees every one of them (the mount is dead then).
``docs/operating.md`` states both."""

from __future__ import annotations

import json
import re
import sys

from harness import guest_kernel
from conftest import image_bytes


def test_restarts_on_debians_6_1_kernel_lose_no_read_and_a_sigkill_is_as_documented(glance, tmp_path):
    size, seed = 8 * 2**20, 29
    image_id = glance.upload("old-kernel", image_bytes(size, seed))["id"]
    port = glance.url.rsplit(":", 1)[1]
    rc, console = guest_kernel.run(
        f"{sys.executable} -m harness.guest_restarts --glance http://{guest_kernel.HOST}:{port} "
        f"--image {image_id} --size {size} --seed {seed} --restarts 2 --kills 3", tmp_path / "guest",
        cwd=str(guest_kernel.REPO), timeout=1200)
    found = re.search(r"RESULT (\{.*\})", console)
    assert rc == 0 and found, console[-3000:]
    r = json.loads(found.group(1))
    assert r["kernel"].startswith("6.1.") and r["kernel_resends"] is False
    assert [x["rc"] for x in r["restarts"]] == [0, 0], r["restarts"]
    readers = r["readers"]
    assert (readers["errors"], readers["wrong"]) == (0, 0), readers["failures"]
    assert readers["slowest_s"] < 15, readers
    assert r["waiting_after_restarts"] == 0
    assert len(r["drains"]) == 2  # each restart answered what it had taken (a count each: r["drains"])
    # The SIGKILL: readers stuck in reads the dead process had taken, or none in its hands at
    # the time (then the next kill); stuck ones are freed by the abort, every one.
    assert r["kills"] and all(k["new_server"] for k in r["kills"])
    if r["kills"][-1]["readers_stuck"]:
        assert r["abort"]["readers_freed"] == 4
    assert r["wrong_after_kills"] == 0
