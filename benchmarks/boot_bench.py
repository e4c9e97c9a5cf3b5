"""Boot a real Debian VM (qemu, TCG) from a thunderfs image, cold, cold with a profile, warm, and
from a local copy, in one run.

The disk is a 2 GiB raw ext4 Debian bookworm root (``benchmarks/debian_image.sh``, built once and
kept under --work), uploaded to a real Glance.  Each boot is qemu with the host's kernel and
initrd, its root a qcow2 overlay whose backing file is the image (Nova's way); it ends when the
guest prints its marker on the serial console once multi-user is reached.  A real tracker, and
one daemon per "node" with its own cache, all on loopback:

  (a) node A, empty cache, no profile yet: A records the boot's reads and sends them
  (b) node B, empty cache, the profile recorded on A: B prefetches along it while booting
  (c) node B again, warm cache (the kernel's page cache of the image dropped first)
  (d) the image copied to local disk first (the copy timed apart), the overlay backed by it
  (e) node B's warm cache with Glance stopped and node A unmounted (no peer either): a boot
      during an outage; misses fail at once once Glance is known down (issue 18's breaker)

Targets (issue 4): (b) within 1.1 x of (c); prefetched chunks the boot never read at most 20%
of the profile.  Issue 18: (e) within 1.1 x of (d).

Usage: .venv/bin/python benchmarks/boot_bench.py [--work /var/tmp/thunderfs-bench] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import tiny_vm  # noqa: E402
from harness.local_glance import LocalGlance, free_port  # noqa: E402
from harness.mounts import Mount, thunderfs  # noqa: E402
from harness.pagecache import drop_page_cache  # noqa: E402
from harness.tracker import LocalTracker  # noqa: E402

MARKER = "THUNDERFS-BOOT-DONE"
SECRET = b"boot-bench-secret-0123456789abcdef"
MiB = 2**20


def kernel_and_initrd() -> tuple[str, str]:
    try:
        return tuple(map(str, tiny_vm.kernel()))
    except tiny_vm.TinyVmError as exc:
        raise SystemExit(str(exc)) from None


def boot(backing: Path, work: Path, name: str, timeout: float = 300, on_start=None) -> float:
    """Seconds from qemu's start to the guest's marker, booting a fresh qcow2 overlay on
    ``backing``.  ``on_start(proc)`` sees the qemu process as soon as it runs (a harness that
    boots from threads kills it if interrupted)."""
    overlay = work / f"{name}.qcow2"
    overlay.unlink(missing_ok=True)
    # -u: do not open the backing file now (that open would start the image's recording early).
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", "-u",
                    str(overlay), "2G"], check=True)
    try:
        return boot_disk(overlay, work, name, timeout=timeout, on_start=on_start)
    finally:
        overlay.unlink(missing_ok=True)


def boot_disk(disk: Path, work: Path, name: str, cache: str = "writeback", timeout: float = 300,
              on_start=None) -> float:
    """Seconds from qemu's start to the guest's marker, booting the qcow2 ``disk`` as it is."""
    kernel, initrd = kernel_and_initrd()
    cmd = ["qemu-system-x86_64", "-m", "512", "-smp", "1", "-display", "none", "-monitor", "none",
           "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
           "-append", "console=ttyS0 root=/dev/vda rw quiet panic=-1",
           "-drive", f"file={disk},format=qcow2,if=virtio,cache={cache}"]
    console = open(work / f"{name}.console", "w")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=console, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", start_new_session=True)
    if on_start is not None:
        on_start(proc)
    took = None
    try:
        deadline = t + timeout
        for line in proc.stdout:
            console.write(line)
            if MARKER in line:
                took = time.perf_counter() - t
                break
            if time.perf_counter() > deadline:
                break
        if took is None:
            raise RuntimeError(f"boot {name} did not reach the marker; console in {work / (name + '.console')}")
        proc.wait(60)  # the guest powers off
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        console.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/thunderfs-bench", help="where the Debian disk is built and kept")
    ap.add_argument("--runs", type=int, default=1, help="boots (b) and (c) on this many fresh nodes")
    args = ap.parse_args()
    work = Path(args.work)
    disk = Path(subprocess.run(["bash", str(REPO / "benchmarks" / "debian_image.sh"), str(work / "debian")],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    size = disk.stat().st_size
    with tempfile.TemporaryDirectory(prefix="thunderfs-boot-", dir=work) as tmp:
        tmp = Path(tmp)
        glance = LocalGlance(tmp / "glance")
        tracker = None
        mounts: list[Mount] = []
        try:
            glance.start()
            t = time.perf_counter()
            image_id = glance.upload("debian-boot", disk)["id"]
            print(f"Debian disk {size / MiB:.0f} MiB uploaded to Glance in {time.perf_counter() - t:.0f}s; "
                  f"qemu TCG, 1 vCPU, 512 MiB; loopback; 2 cores")
            tracker = LocalTracker(tmp / "tracker", "--glance", glance.url, secret=SECRET)
            tracker.start()
            secret = tmp / "secret"
            secret.write_bytes(SECRET)
            secret.chmod(0o600)

            def node(name: str) -> Mount:
                m = Mount(tmp / f"mnt-{name}", glance.url, tmp / f"cache-{name}", "--tracker", tracker.url,
                          "--peer-listen", f"127.0.0.1:{free_port()}", "--node-id", name,
                          "--secret-file", str(secret), "--cache-size", "4G")
                mounts.append(m)
                m.mount()
                return m

            def activity(m: Mount) -> dict:
                return next(a for a in m.stats()["profiles"].values() if a["image_id"] == image_id)

            rows = []
            a = node("a")
            took = boot(a.image(image_id), tmp, "a")
            rows.append(("(a) empty cache, no profile (records it)", took))
            t = time.perf_counter()
            profile = None
            while time.perf_counter() - t < 120:
                res = thunderfs("profile", "show", image_id, "--mountpoint", str(a.path), "--json")
                if res.returncode == 0:
                    profile = json.loads(res.stdout)
                    break
                time.sleep(1)
            if profile is None:
                raise RuntimeError("node a's recording never reached the tracker")
            nprof = len(profile["chunks"])
            print(f"  profile recorded on node a: {nprof} chunks = {nprof * profile['chunk_size'] / MiB:.1f} MiB, "
                  f"first touches over {profile['chunks'][-1][1] / 1000:.0f}s")
            cold, warm, waste = [], [], []
            for i in range(args.runs):
                b = node(f"b{i}")
                cold.append(boot(b.image(image_id), tmp, f"b{i}"))
                s = activity(b)
                waste.append((s["prefetched"], s["hits"], s["waste"], s["demand_waits"]))
                drop_page_cache(b.image(image_id))
                warm.append(boot(b.image(image_id), tmp, f"b{i}-warm"))
                if i < args.runs - 1:
                    b.cleanup()
                    mounts.remove(b)
            rows.append(("(b) empty cache, profile from node a", sum(cold) / len(cold)))
            rows.append(("(c) warm cache", sum(warm) / len(warm)))
            local = tmp / "local.raw"
            t = time.perf_counter()
            subprocess.run(["curl", "-sSf", "-o", str(local), f"{glance.url}/v2/images/{image_id}/file"], check=True)
            copy = time.perf_counter() - t
            drop_page_cache(local)
            rows.append((f"(d) local copy (the copy itself: {copy:.1f}s more)", boot(local, tmp, "local")))
            local.unlink()
            # (e): the last warm node, alone (node a, which holds the whole boot, unmounted), Glance down.
            a.cleanup()
            mounts.remove(a)
            glance.stop()
            drop_page_cache(b.image(image_id))
            rows.append(("(e) warm cache, Glance stopped, no peer", boot(b.image(image_id), tmp, "b-outage")))
            fetch = b.stats()["fetch"]
            breaker = fetch["origin_breaker"]

            c = rows[2][1]
            print(f"  {'boot to multi-user':48s} {'seconds':>8s} {'vs (c)':>7s}")
            for label, secs in rows:
                print(f"  {label:48s} {secs:8.1f} {secs / c:7.2f}")
            if args.runs > 1:
                print(f"  runs of (b): {', '.join(f'{x:.1f}' for x in cold)}; of (c): {', '.join(f'{x:.1f}' for x in warm)}")
            pre, hits, wasted, waits = (sum(x[i] for x in waste) / len(waste) for i in range(4))
            print(f"  (b)/(c) = {rows[1][1] / c:.2f} (target <= 1.1)")
            print(f"  (e)/(d) = {rows[4][1] / rows[3][1]:.2f} (target <= 1.1); during (e) Glance was found down "
                  f"{breaker['opened']} time(s), {breaker['failed_fast']} fetches failed at once")
            print(f"  prefetched {pre:.0f} chunks, {hits:.0f} then read by the boot, {wasted:.0f} never read "
                  f"= {wasted / max(1, nprof):.0%} of the profile (target <= 20%); {waits:.0f} boot reads waited for a fetch")
        finally:
            for m in mounts:
                m.cleanup()
            if tracker:
                tracker.stop()
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
