"""Where the daemon's CPU per GiB goes on a whole-image read: the cold read split by reader, and
the warm read that is only the FUSE serving path.

  cold, buffered 1 MiB reads      dataplane_bench's cold step (the kernel's readahead fills the
                                  mount's page cache: the reply is copied into fresh pages)
  cold, O_DIRECT 1 MiB reads      the same without the mount's page cache (qemu's cache=none)
  cold, O_DIRECT 4 MiB reads      fewer, larger requests where the kernel allows them
                                  (/proc/sys/fs/fuse/max_pages_limit, 256 pages by default)
  warm, O_DIRECT 1 MiB reads      every chunk cached: reading back, checking, replying

Each on a fresh mount of a real Glance on loopback (a fresh cache for the cold ones), ``--runs``
times; the daemon's user and system CPU per GiB read, median and range.

Usage: .venv/bin/python benchmarks/cpu_split.py [--size-mib 512] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchmarks.record import provenance, spread
from harness.local_glance import LocalGlance
from harness.mounts import Mount
from benchmarks.read_bench import cpu_times, direct_read, make_image, seq_read

MiB, GiB = 2**20, 2**30


WAYS = {  # name -> (cold?, how the image is read)
    "cold, buffered 1 MiB": (True, seq_read),
    "cold, O_DIRECT 1 MiB": (True, lambda p: direct_read(p, MiB)),
    "cold, O_DIRECT 4 MiB": (True, lambda p: direct_read(p, 4 * MiB)),
    "warm, O_DIRECT 1 MiB": (False, lambda p: direct_read(p, MiB)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = args.size_mib * MiB
    rows: dict[str, dict[str, list[float]]] = {w: {"user": [], "system": [], "cpu": [], "mibs": []} for w in WAYS}
    pages = int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text()) if Path(
        "/proc/sys/fs/fuse/max_pages_limit").exists() else 256
    with tempfile.TemporaryDirectory(prefix="thunderfs-cpu-split-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        try:
            glance.start()
            native = work / "native.raw"
            make_image(native, size)
            image_id = glance.upload("cpu-split", native)["id"]
            native.unlink()
            print(f"image {args.size_mib} MiB of random bytes; real Glance on loopback; FUSE requests of at most "
                  f"{pages * 4} KiB (max_pages_limit)")
            for run in range(args.runs):
                for i, (way, (cold, read)) in enumerate(WAYS.items()):
                    m = Mount(work / f"mnt{run}-{i}", glance.url, work / f"cache{run}-{i}",
                              "--cache-size", f"{2 * args.size_mib}M")
                    try:
                        m.mount()
                        img = m.image(image_id)
                        img.stat()
                        if not cold:
                            direct_read(img, MiB)
                        u0, s0 = cpu_times(m.pid)
                        secs, n = read(img)
                        u1, s1 = cpu_times(m.pid)
                        assert n == size, (n, size)
                    finally:
                        m.cleanup()
                        shutil.rmtree(work / f"cache{run}-{i}", ignore_errors=True)
                    r = rows[way]
                    r["user"].append((u1 - u0) / (n / GiB))
                    r["system"].append((s1 - s0) / (n / GiB))
                    r["cpu"].append(r["user"][-1] + r["system"][-1])
                    r["mibs"].append(n / secs / MiB)
                    print(f"  run {run + 1}: {way:22s} {r['cpu'][-1]:.2f} CPU s/GiB (user {r['user'][-1]:.2f}, "
                          f"system {r['system'][-1]:.2f}), {r['mibs'][-1]:.0f} MiB/s", flush=True)
        finally:
            glance.stop()
    out = {w: {k: spread(v) for k, v in r.items()} for w, r in rows.items()}
    for w, r in out.items():
        print(f"{w:22s} CPU s per GiB {r['cpu']['median']:.2f} ({r['cpu']['min']:.2f}-{r['cpu']['max']:.2f}); "
              f"user {r['user']['median']:.2f}, system {r['system']['median']:.2f}; {r['mibs']['median']:.0f} MiB/s")
    if args.json:
        args.json.write_text(json.dumps({**provenance(), "size_mib": args.size_mib, "runs": args.runs,
                                         "max_pages_limit": pages, "ways": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
