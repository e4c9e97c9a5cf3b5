"""What runs inside the guest of ``guest_kernel`` (another kernel): a mount of a host Glance's image
under an O_DIRECT reader, ``thunderfs restart``s, then a SIGKILL of the serving process; prints
one ``RESULT`` line of JSON with what happened.

    python -m harness.guest_restarts --glance URL --image ID --size N --seed S [--restarts 2]

After the restarts: the reader's errors, wrong bytes and slowest read, and fusectl's ``waiting``
once it stopped.  After the SIGKILL (a second reader, on a fresh start): whether the reader goes
on within ``--stuck-after`` seconds, and what the kernel waits on; a reader stuck in a read the
dead process had taken is freed by aborting the connection (the only way on a kernel without
``FUSE_NOTIFY_RESEND``), which is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

from harness.direct_reader import DirectReader
from harness.mounts import Mount, thunderfs
from thunderfs.fuse import mounting


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--glance", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--stuck-after", type=float, default=30.0)
    args = ap.parse_args()
    data = random.Random(args.seed).randbytes(args.size)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "guest"  # the guest's tmpfs
    work.mkdir(parents=True, exist_ok=True)
    os.environ["THUNDERFS_RUN_DIR"] = str(work / "run")
    out: dict = {"kernel": os.uname().release}
    m = Mount(work / "mnt", args.glance, work / "cache")
    m.mount()
    conn = mounting.connection_dir(m.path)
    try:
        out["kernel_resends"] = m.stats()["fs"]["kernel_resends"]
        # Four readers, so that a restart finds reads in the daemon's hands to answer first.
        readers = [DirectReader(m.image(args.image), data, seed=i) for i in range(4)]
        for r in readers:
            r.start()
        restarts = []
        try:
            for _ in range(args.restarts):
                for r in readers:
                    r.wait_reads(3, timeout=300)
                t = time.monotonic()
                res = thunderfs("restart", str(m.path), timeout=300)
                restarts.append({"rc": res.returncode, "seconds": round(time.monotonic() - t, 2),
                                 "stderr": res.stderr[-300:]})
                m.read_pids()
            for r in readers:
                r.wait_reads(3, timeout=300)
        finally:
            for r in readers:
                r.stop()
        out["restarts"] = restarts
        out["readers"] = {"reads": sum(r.reads for r in readers), "errors": sum(r.errors for r in readers),
                          "wrong": sum(r.wrong for r in readers),
                          "slowest_s": round(max(r.slowest for r in readers), 2),
                          "failures": [f for r in readers for f in r.failures][:3]}
        out["waiting_after_restarts"] = _settled(conn)
        log = m.log_tail(10**7)
        out["drains"] = re.findall(r"the (\d+) in progress were answered first", log)  # one per restart

        # SIGKILLs under four readers (so that some read is in the daemon's hands): what happens
        # on this kernel.
        readers = [DirectReader(m.image(args.image), data, seed=10 + i) for i in range(4)]  # fresh
        for r in readers:
            r.start()
        kills = []
        for _ in range(args.kills):
            for r in readers:
                r.wait_reads(3, timeout=300)
            old = m.pid
            os.kill(old, signal.SIGKILL)
            new = m.wait_new_server(old, timeout=300)
            before = [r.reads for r in readers]
            deadline = time.monotonic() + args.stuck_after
            while time.monotonic() < deadline and not all(r.reads > b + 3 for r, b in zip(readers, before)):
                time.sleep(0.5)
            stuck = sum(r.reads <= b + 3 for r, b in zip(readers, before))
            kills.append({"new_server": new != old, "readers_stuck": stuck, "waiting": mounting.waiting(conn)})
            if stuck:  # in reads the dead process had taken: nothing but an abort frees them
                break
        out["kills"] = kills
        if kills and kills[-1]["readers_stuck"]:
            moved = [r.reads + r.errors for r in readers]
            (conn / "abort").write_text("1")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(r.reads + r.errors > x for r, x in zip(readers, moved)):
                time.sleep(0.2)
            out["abort"] = {"readers_freed": sum(r.reads + r.errors > x for r, x in zip(readers, moved)),
                            "then": "every read fails: the mount is dead until it is made again"}
        for r in readers:
            r.stop()
        out["wrong_after_kills"] = sum(r.wrong for r in readers)
    finally:
        print("RESULT " + json.dumps(out), flush=True)
        m.cleanup()
    return 0


def _settled(conn: Path | None, timeout: float = 30.0) -> int | None:
    """fusectl's ``waiting`` once it stops falling (the reader stopped: 0 unless requests were lost)."""
    deadline = time.monotonic() + timeout
    value = mounting.waiting(conn)
    while value and time.monotonic() < deadline:
        time.sleep(0.5)
        value = mounting.waiting(conn)
    return value


if __name__ == "__main__":
    sys.exit(main())
