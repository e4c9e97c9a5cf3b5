"""The fio jobs in benchmarks/fio/ against a thunderfs image, cold and warm, beside the same
image as a native file on local disk, in one run.

  native   the image copied to local disk (page cache dropped before each job)
  warm     the image fetched whole into a thunderfs cache first (``thunderfs warm``); the page
           cache of the daemon's cache file dropped before each job, like the native file's
  cold     a fresh, empty cache for each job: every chunk comes from Glance while fio runs

Each job file reads ${TARGET} (and runs ${RUNTIME} seconds if time based).  Prints bandwidth and
IOPS, and each thunderfs figure as a ratio of the native one.

Usage: .venv/bin/python benchmarks/fio_bench.py [--size-mib 1024] [--runtime 10] [--only seq1m,rand4k]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness.local_glance import LocalGlance
from harness.mounts import Mount, thunderfs
from harness.pagecache import drop_page_cache

JOBS = REPO / "benchmarks" / "fio"
MiB = 2**20


def fio(job: Path, target: Path, runtime: int, backing: Path | None = None) -> tuple[float, float]:
    """(MiB/s, IOPS) of one job run; the page cache of ``target`` (and of the cache file behind
    it, ``backing``) dropped first, so that every figure starts from the disk."""
    drop_page_cache(target)
    if backing is not None and backing.exists():
        drop_page_cache(backing)
    env = {**os.environ, "TARGET": str(target), "RUNTIME": str(runtime)}
    out = subprocess.run(["fio", "--output-format=json", str(job)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"fio {job.name} on {target}: {out.stderr.strip()[-500:]}")
    read = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    return read["bw_bytes"] / MiB, read["iops"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=10, help="seconds of each time-based (random) job")
    ap.add_argument("--only", default="", help="comma-separated prefixes of job names")
    args = ap.parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is not installed: scripts/setup.sh installs it")
    jobs = sorted(j for j in JOBS.glob("*.fio")
                  if not args.only or any(j.stem.startswith(p) for p in args.only.split(",")))
    with tempfile.TemporaryDirectory(prefix="thunderfs-fio-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        mounts: list[Mount] = []
        try:
            glance.start()
            native = work / "native.raw"
            with open(native, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(MiB))
            image_id = glance.upload("fio", native)["id"]
            warm = Mount(work / "mnt-warm", glance.url, work / "cache-warm", "--cache-size", f"{2 * args.size_mib}M")
            mounts.append(warm)
            warm.mount()
            res = thunderfs("warm", str(warm.path), image_id, "--quiet", timeout=900)
            if res.returncode:
                raise RuntimeError(f"warm failed: {res.stderr}")
            print(f"image {args.size_mib} MiB; real Glance on loopback; random jobs {args.runtime}s; 2 cores")
            print(f"  {'job':24s} {'native':>16s} {'thunderfs warm':>22s} {'thunderfs cold':>22s}")
            for job in jobs:
                n_bw, n_iops = fio(job, native, args.runtime)
                w_bw, w_iops = fio(job, warm.image(image_id), args.runtime, warm.data_file(image_id))
                cold = Mount(work / f"mnt-{job.stem}", glance.url, work / f"cache-{job.stem}",
                             "--cache-size", f"{2 * args.size_mib}M")
                mounts.append(cold)
                cold.mount()
                c_bw, c_iops = fio(job, cold.image(image_id), args.runtime)
                cold.cleanup()
                mounts.remove(cold)
                shutil.rmtree(work / f"cache-{job.stem}", ignore_errors=True)
                seq = job.stem.startswith("seq")
                fmt = (lambda bw, iops: f"{bw:8.0f} MiB/s") if seq else (lambda bw, iops: f"{iops:8.0f} IOPS ")
                ratio = (lambda bw, iops: (bw / n_bw) if seq else (iops / n_iops))
                print(f"  {job.stem:24s} {fmt(n_bw, n_iops):>16s} {fmt(w_bw, w_iops):>14s} {ratio(w_bw, w_iops):5.2f} x"
                      f" {fmt(c_bw, c_iops):>14s} {ratio(c_bw, c_iops):5.2f} x")
                time.sleep(0.5)
        finally:
            for m in mounts:
                m.cleanup()
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
