"""What a VM sees while the process serving its disk is killed and replaced (issue 18).

One real Glance, one node (``thunderfs mount``: the keeper and its serving process), one image
read from a cold cache by a reader doing random 64 KiB O_DIRECT reads (a ``cache=none`` guest),
every byte checked.  Side by side in one run:

  (a) baseline: the same reader for the same number of reads, nothing happening
  (b) faults:   ``--kills`` SIGKILLs of the serving process, ``--restarts`` ``thunderfs
                restart``s and ``--flips`` times bytes flipped in 8 cached chunks of the node's
                cache file (behind the daemon's back), in a random order, spaced by ``--spacing``
                reads each

It prints reads, errors, wrong bytes, the median, p99 and slowest read of each, and for every
fault the time until a new serving process answered (kill or restart to the new pid's first
answer on the control socket).  Target (issue 18): 0 errors, 0 wrong bytes, no read over 15 s.

Usage: .venv/bin/python benchmarks/takeover_bench.py [--work DIR] [--size-mib 64] [--kills 8]
       [--restarts 2] [--flips 2] [--spacing 200] [--json benchmarks/results/takeover.json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness.direct_reader import DirectReader
from benchmarks.record import provenance
from harness.local_glance import LocalGlance
from harness.mounts import Mount, thunderfs
from thunderfs.cache.holes import data_extents

CHUNK = 64 * 1024


def flip(path: Path, rng: random.Random, chunks: int = 8) -> int:
    """Flip a byte in each of ``chunks`` cached chunks of a cache data file; how many were flipped."""
    with open(path, "r+b") as f:
        cached = [c for start, end in data_extents(f.fileno()) for c in range(start // CHUNK, end // CHUNK)]
        picked = rng.sample(cached, min(chunks, len(cached)))
        for c in picked:
            at = c * CHUNK + rng.randrange(CHUNK)
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0xFF]))
    return len(picked)


def summary(reader: DirectReader) -> dict:
    lat = sorted(reader.latencies)
    return {"reads": reader.reads, "errors": reader.errors, "wrong": reader.wrong,
            "median_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
            "slowest_s": round(reader.slowest, 3)}


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="thunderfs-takeover-"))
    work.mkdir(parents=True, exist_ok=True)
    glance = LocalGlance(work / "glance")
    glance.start()
    try:
        data = random.Random(18).randbytes(args.size_mib * 2**20)
        image_id = glance.upload("takeover", data)["id"]
        out = {"size_mib": args.size_mib, "kills": args.kills, "restarts": args.restarts, "spacing": args.spacing}

        for case in ("baseline", "faults"):
            m = Mount(work / f"mnt-{case}", glance.url, work / f"cache-{case}")
            m.mount()
            reader = DirectReader(m.image(image_id), data, seed=7)
            rng = random.Random(2)
            events = []
            try:
                reader.start()
                plan = ["kill"] * args.kills + ["restart"] * args.restarts + ["flip"] * args.flips
                random.Random(1).shuffle(plan)
                for kind in plan if case == "faults" else [None] * len(plan):
                    reader.wait_reads(args.spacing, timeout=120)
                    if kind is None:
                        continue
                    old = m.pid
                    t = time.monotonic()
                    if kind == "flip":
                        n = flip(m.data_file(image_id), rng)
                        events.append({"kind": kind, "chunks": n})
                        continue
                    if kind == "kill":
                        m.signal_server(signal.SIGKILL)
                        m.wait_new_server(old)
                    else:
                        res = thunderfs("restart", str(m.path))
                        if res.returncode != 0:
                            raise SystemExit(f"thunderfs restart failed: {res.stderr}")
                        m.read_pids()
                    events.append({"kind": kind, "new_server_s": round(time.monotonic() - t, 3)})
                reader.wait_reads(args.spacing, timeout=120)
            finally:
                reader.stop()
                m.cleanup()
            out[case] = {**summary(reader), "events": events}
            # Every serving process logs each damaged chunk it caught (their counters die with them).
            out[case]["damaged_chunks_caught"] = m.log_tail(10_000_000).count("failed its checksum")
            if "Traceback" in m.log_tail(1_000_000):
                out[case]["traceback_in_log"] = True
        return out
    finally:
        glance.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--flips", type=int, default=2, help="times bytes are flipped in 8 cached chunks")
    p.add_argument("--spacing", type=int, default=200, help="reads between two faults")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    made = provenance()  # the code as the run starts
    out = run(args)
    out.update(made)
    for case in ("baseline", "faults"):
        r = out[case]
        print(f"{case:9s} reads {r['reads']:6d}  errors {r['errors']}  wrong {r['wrong']}  "
              f"median {r['median_ms']} ms  p99 {r['p99_ms']} ms  slowest {r['slowest_s']} s")
    gaps = [e["new_server_s"] for e in out["faults"]["events"] if "new_server_s" in e]
    for kind in ("kill", "restart"):
        g = [e["new_server_s"] for e in out["faults"]["events"] if e["kind"] == kind]
        if g:
            print(f"{kind:9s} x{len(g)}: new serving process after {min(g):.2f}-{max(g):.2f} s "
                  f"(median {statistics.median(g):.2f})")
    f = out["faults"]
    flipped = sum(e.get("chunks", 0) for e in f["events"])
    print(f"flips     x{args.flips}: {flipped} cached chunks damaged behind the daemon's back, "
          f"{f['damaged_chunks_caught']} caught on read (dropped, fetched again)")
    ok = f["errors"] == 0 and f["wrong"] == 0 and f["slowest_s"] < 15 and len(gaps) == args.kills + args.restarts
    print(f"target (0 errors, 0 wrong bytes, no read over 15 s): {'met' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
