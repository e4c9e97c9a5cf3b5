"""What runs inside the guest of ``guest_kernel`` (another kernel): a mount of a host Glance's image
under an O_DIRECT reader, ``thunderfs restart``s, then a SIGKILL of the serving process; prints
one ``RESULT`` line of JSON with what happened.

    python -m harness.guest_restarts --glance URL --image ID --size N --seed S [--restarts 2] [--kills 2]

Each restart, then each SIGKILL, under four fresh O_DIRECT readers: whether every reader goes on
within ``--stuck-after`` seconds, their errors, wrong bytes and slowest read, and fusectl's
``waiting`` once they stopped; for a SIGKILL, how many requests the new process answered from the
dead one's journal.  Should a reader stay stuck (a request lost), the connection is aborted, which
frees it (the mount is dead then), and that is reported too.
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
    ap.add_argument("--kills", type=int, default=2)
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
        restarts, kills = [], []
        for i in range(args.restarts):
            def restart() -> dict:
                t = time.monotonic()
                res = thunderfs("restart", str(m.path), timeout=300)
                m.read_pids()
                return {"rc": res.returncode, "seconds": round(time.monotonic() - t, 2), "stderr": res.stderr[-300:]}
            restarts.append(_round(m, conn, args.image, data, 10 * i, restart, args.stuck_after))
        out["restarts"] = restarts
        out["drains"] = re.findall(r"the (\d+) in progress were answered first", m.log_tail(10**7))
        for i in range(args.kills):
            def kill() -> dict:
                old = m.pid
                os.kill(old, signal.SIGKILL)
                new = m.wait_new_server(old, timeout=300)
                return {"new_server": new != old, "replayed": m.stats()["fs"]["replayed"]}
            kills.append(_round(m, conn, args.image, data, 100 + 10 * i, kill, args.stuck_after))
            if kills[-1]["readers_stuck"]:  # the kernel waits on a read nobody will answer: the abort
                r = kills[-1]
                (conn / "abort").write_text("1")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and r["_readers"] and any(t.is_alive() for t in r["_readers"]):
                    time.sleep(0.2)
                r["abort"] = {"readers_freed": sum(not t.is_alive() for t in r["_readers"]),
                              "then": "every read fails: the mount is dead until it is made again"}
                break
        for r in restarts + kills:
            r.pop("_readers", None)
        out["kills"] = kills
    finally:
        print("RESULT " + json.dumps(out), flush=True)
        m.cleanup()
    return 0


def _round(m: Mount, conn: Path | None, image: str, data: bytes, seed: int, event, stuck_after: float) -> dict:
    """Four fresh O_DIRECT readers (so that the event finds reads in the daemon's hands), the
    event, then whether every reader goes on within ``stuck_after`` s; then the readers stop and
    fusectl's ``waiting`` is read once it settles (0 unless the kernel waits on a lost request)."""
    readers = [DirectReader(m.image(image), data, seed=seed + j) for j in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        r.wait_reads(3, timeout=300)
    result = event()
    before = [r.reads + r.errors for r in readers]
    deadline = time.monotonic() + stuck_after
    while time.monotonic() < deadline and not all(r.reads + r.errors > b + 3 for r, b in zip(readers, before)):
        time.sleep(0.2)
    stuck = sum(r.reads + r.errors <= b + 3 for r, b in zip(readers, before))
    for r in readers:
        r.halt()
    for r in readers:
        r.join(5 if stuck else 60)
    result.update({"readers_stuck": stuck, "reads": sum(r.reads for r in readers),
                   "errors": sum(r.errors for r in readers), "wrong": sum(r.wrong for r in readers),
                   "slowest_s": round(max(r.slowest for r in readers), 2),
                   "failures": [f for r in readers for f in r.failures][:3],
                   # With a reader stuck it cannot settle: what the kernel waits on now.
                   "waiting": mounting.waiting(conn) if stuck else _settled(conn)})
    if stuck:
        result["_readers"] = readers
    return result


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
