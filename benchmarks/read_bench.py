"""Read benchmarks of one thunderfs mount against its baselines, side by side in one run.

  cold     whole image read through a cold mount   vs  curl of the same image from the same Glance
  seq      warm-cache 1 MiB sequential reads: thunderfs (kernel page cache dropped, so the daemon
           serves every request)  vs  a minimal pyfuse3 passthrough  vs  native reads; and
           thunderfs with the kernel page cache warm
  rand     warm-cache 4 KiB random reads, O_DIRECT (fio, psync): thunderfs vs the passthrough
  boot     the recorded Debian boot (../shared/data/debian-boot-trace.txt) replayed with O_DIRECT
           through a cold mount as fast as it can go: time, bytes from Glance / bytes read; vs
           downloading the whole image first (Nova's way)
  memory   the daemon's peak RSS over the run (VmHWM)

  memory   (opt-in) the daemon's peak RSS with 20 GiB cached from 10 open 2 GiB images

Usage: .venv/bin/python benchmarks/read_bench.py [--size-mib 1024] [--only cold,seq,rand,boot,memory]
       [--json FILE]   (every line printed, and the memory section's figures as numbers)
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchmarks.record import provenance
from harness import boot_trace
from harness.local_glance import LocalGlance
from harness.mounts import Mount
from harness.pagecache import drop_page_cache

MiB = 2**20


def seq_read(path: Path, bs: int = MiB) -> tuple[float, int]:
    buf = bytearray(bs)
    total = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return time.perf_counter() - t, total


def direct_read(path: Path, bs: int = MiB) -> tuple[float, int]:
    """As ``seq_read``, with O_DIRECT reads of ``bs`` into one page-aligned buffer (no page cache
    of the file's: each read one request to its file system)."""
    buf = mmap.mmap(-1, bs)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    pos = 0
    t = time.perf_counter()
    try:
        while n := os.preadv(fd, [buf], pos):
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return time.perf_counter() - t, pos


def cpu_times(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def fio_randread(path: Path, seconds: int) -> float:
    out = subprocess.run(
        ["fio", "--name=rand", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
         "--ioengine=psync", "--numjobs=2", "--group_reporting", f"--runtime={seconds}", "--time_based",
         "--readonly", "--output-format=json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


def replay_trace(path: Path) -> tuple[float, int]:
    reads = boot_trace.load()
    return boot_trace.replay(path, reads), sum(r.size for r in reads)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_image(path: Path, size: int) -> None:
    """Random bytes, so nothing compresses or dedups along the way."""
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.write(os.urandom(size % (64 * MiB)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--only", default="cold,seq,rand,boot")
    ap.add_argument("--fio-seconds", type=int, default=8)
    ap.add_argument("--workdir")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    made = provenance()  # the code as the run starts
    only = set(args.only.split(","))
    results: list[tuple[str, str, str]] = []
    figures: dict = {}

    def report(name: str, value: str, note: str = "") -> None:
        results.append((name, value, note))
        print(f"  {name:<58} {value:>16}  {note}", flush=True)

    with tempfile.TemporaryDirectory(prefix="thunderfs-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        mounts: list[Mount] = []
        passthrough = None
        try:
            glance.start()
            native = work / "image.raw"
            make_image(native, args.size_mib * MiB)
            image_id = glance.upload("bench", native)["id"]
            size = native.stat().st_size
            print(f"image: {size / MiB:.0f} MiB, Glance {glance.url}")

            m = Mount(work / "mnt", glance.url, work / "cache", "--cache-size", "40G")
            mounts.append(m)
            m.mount()
            img = m.image(image_id)

            if "cold" in only:
                t = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{glance.url}/v2/images/{image_id}/file"],
                               check=True)
                curl = time.perf_counter() - t
                copy = work / "copy.raw"
                t = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", str(copy), f"{glance.url}/v2/images/{image_id}/file"],
                               check=True)
                subprocess.run(["sync", str(copy)], check=True)
                curl_disk = time.perf_counter() - t
                copy.unlink()
                secs, n = seq_read(img)
                assert n == size
                fs = m.stats()["fs"]
                print("cold read of the whole image")
                report("curl from Glance to /dev/null", f"{size / curl / MiB:.0f} MiB/s")
                report("curl from Glance to a local file + sync (Nova)", f"{size / curl_disk / MiB:.0f} MiB/s")
                report("thunderfs cold, 1 MiB reads", f"{size / secs / MiB:.0f} MiB/s",
                       f"ratio to curl {curl / secs:.2f} (target >= 1.0), to curl+sync {curl_disk / secs:.2f}; "
                       f"kernel sent {fs['read_request_bytes'] // max(1, fs['read_requests']) // 1024} KiB requests")

            if "seq" in only or "rand" in only:
                seq_read(img)  # make sure every chunk is in thunderfs's cache
                seq_read(native)
                pt_mnt = work / "pt"
                pt_mnt.mkdir()
                passthrough = subprocess.Popen(
                    [sys.executable, str(REPO / "benchmarks" / "passthroughfs.py"), str(native), str(pt_mnt)],
                    stdout=subprocess.PIPE, text=True, start_new_session=True)
                assert passthrough.stdout.readline().strip() == "READY"
                pt = pt_mnt / "file"

            if "seq" in only:
                print("warm-cache sequential 1 MiB reads (best of 3)")
                nat = min(seq_read(native)[0] for _ in range(3))

                def through_daemon(path):
                    drop_page_cache(path)
                    return seq_read(path)[0]

                ptt = min(through_daemon(pt) for _ in range(3))
                tfs = min(through_daemon(img) for _ in range(3))
                seq_read(img)
                tfs_kc = min(seq_read(img)[0] for _ in range(3))
                report("native read (page cache)", f"{size / nat / MiB:.0f} MiB/s")
                report("pyfuse3 passthrough (kernel cache dropped)", f"{size / ptt / MiB:.0f} MiB/s")
                report("thunderfs (kernel cache dropped)", f"{size / tfs / MiB:.0f} MiB/s",
                       f"ratio to passthrough {ptt / tfs:.2f} (target >= 0.8)")
                report("thunderfs (kernel cache warm)", f"{size / tfs_kc / MiB:.0f} MiB/s",
                       f"ratio to native {nat / tfs_kc:.2f}")

            if "rand" in only:
                print(f"warm-cache 4 KiB random reads, O_DIRECT, fio psync x2, {args.fio_seconds}s")
                pti = fio_randread(pt, args.fio_seconds)
                tfi = fio_randread(img, args.fio_seconds)
                report("pyfuse3 passthrough", f"{pti:.0f} IOPS")
                report("thunderfs", f"{tfi:.0f} IOPS", f"ratio {tfi / pti:.2f} (target >= 15000 IOPS)")

            if "boot" in only:
                boot_size = 2 * 1024 * MiB
                boot_img = work / "boot.raw"
                make_image(boot_img, boot_size)
                boot_id = glance.upload("boot", boot_img)["id"]
                boot_img.unlink()
                t = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", str(work / "copy.raw"), f"{glance.url}/v2/images/{boot_id}/file"],
                               check=True)
                full = time.perf_counter() - t
                (work / "copy.raw").unlink()
                b = Mount(work / "mnt-boot", glance.url, work / "cache-boot")
                mounts.append(b)
                b.mount()
                before = b.stats()["glance"]["bytes"]
                secs, read = replay_trace(b.image(boot_id))
                fetched = b.stats()["glance"]["bytes"] - before
                print("Debian boot trace replayed through a cold mount, O_DIRECT, as fast as it goes")
                report("full copy of the 2 GiB image first (Nova's way)", f"{full:.2f} s")
                report("boot trace through thunderfs, cold", f"{secs:.2f} s",
                       f"{full / secs:.1f}x faster than the copy alone")
                report("bytes from Glance / bytes read", f"{fetched / read:.2f}",
                       f"{fetched / MiB:.1f} of {read / MiB:.1f} MiB (target <= 1.5)")
                report("daemon peak RSS (boot mount)", f"{peak_rss(b.pid) / MiB:.0f} MiB")

            report("daemon peak RSS (main mount)", f"{peak_rss(m.pid) / MiB:.0f} MiB")

            if "memory" in only:
                # Ten 2 GiB images with distinct bytes (one random base, a distinct first block
                # each), all read whole through one mount and held open: 20 GiB cached.
                base = work / "mem.raw"
                make_image(base, 2048 * MiB)
                ids = []
                for i in range(10):
                    with open(base, "r+b") as f:
                        f.write(i.to_bytes(8, "big") * 512)
                    ids.append(glance.upload(f"mem{i}", base)["id"])
                base.unlink()
                mm = Mount(work / "mnt-mem", glance.url, work / "cache-mem", "--cache-size", "21G")
                mounts.append(mm)
                mm.mount()
                handles = [open(mm.image(i), "rb", buffering=0) for i in ids]
                t = time.perf_counter()
                for h in handles:
                    while h.read(MiB):
                        pass
                secs = time.perf_counter() - t
                cache = mm.stats()["cache"]
                print("20 GiB cache, 10 open images")
                report("cached", f"{cache['used'] / 2**30:.1f} GiB", f"read cold in {secs:.0f}s")
                rss = peak_rss(mm.pid)
                report("daemon peak RSS", f"{rss / MiB:.0f} MiB", "target <= 200 MB")
                figures["memory"] = {"images": len(ids), "cached_bytes": cache["used"], "read_s": secs,
                                     "peak_rss_bytes": rss}
                for h in handles:
                    h.close()
        finally:
            if passthrough is not None:
                passthrough.terminate()
                passthrough.wait(30)
            for mm in mounts:
                mm.cleanup()
            glance.stop()
    if args.json:
        args.json.write_text(json.dumps({**made, "size_mib": args.size_mib, "only": sorted(only), **figures,
                                         "lines": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
