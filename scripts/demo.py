"""The embedded default: a real local Glance holding a generated image, mounted through thunderfs.

1. boot-like scattered reads (the recorded Debian boot's reads that fall inside the image):
   only the chunks read cross the network;
2. the whole image read through the mount and checked against Glance's sha512;
3. Glance stopped, the mount restarted: the image is still read, from the cache alone;
4. two nodes, each in a network namespace of its own, and a tracker: the image read through the
   first node, then through the second, which takes most of its bytes from the first.

Prints where the bytes came from at each step (and the second node's ``thunderfs status``) and
tears everything down (mounts, daemons, namespaces, Glance).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness.fault_proxy import FaultProxy
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount, thunderfs
from harness.netns import Lan
from harness.tracker import LocalTracker
from thunderfs_common.units import format_size

TRACE = REPO.parent / "shared" / "data" / "debian-boot-trace.txt"


def make_image(path: Path, size: int, seed: int = 7) -> None:
    """A disk-like image: runs of random data between runs of zeros."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, rng.choice([64, 256, 1024]) * 1024)
            f.write(rng.randbytes(n) if rng.random() < 0.6 else bytes(n))
            left -= n


def boot_reads(size: int) -> list[tuple[int, int]]:
    out = []
    if TRACE.exists():
        for line in TRACE.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            _, off, n = line.split()
            off, n = int(off), int(n)
            if off + n <= size:
                out.append((off, n))
    return out or [(i * 7919 * 4096 % (size - 65536), 16384) for i in range(200)]


STEPS: list[tuple[str, float, str]] = []  # (step, seconds, where its bytes came from): the summary


def line(label: str, stats: dict, since: dict | None = None) -> str:
    g, c = stats["glance"], stats["cache"]
    g0 = since["glance"] if since else {"bytes": 0, "range_requests": 0}
    c0 = since["cache"] if since else {"bytes_read_disk": 0}
    where = (f"from Glance {format_size(g['bytes'] - g0['bytes'])} in {g['range_requests'] - g0['range_requests']} "
             f"requests, from the local cache {format_size(c['bytes_read_disk'] - c0['bytes_read_disk'])}")
    print(f"  {label:<34} {where}")
    return where


def step(name: str, started: float, where: str = "") -> None:
    STEPS.append((name, time.monotonic() - started, where))


def summary() -> None:
    setup = os.environ.get("THUNDERFS_SETUP_SECONDS")
    print("\nSummary")
    if setup:
        print(f"  {'scripts/setup.sh (installs what is missing)':<44} {float(setup):6.1f} s")
    for name, secs, where in STEPS:
        print(f"  {name:<44} {secs:6.1f} s  {where}")
    print("All of it is torn down as the demo exits.  Next: mount your Glance (README, \"Using it\"),\n"
          "then `thunderfs status` shows what the daemon did (per image: bytes from Glance, from peers, from\n"
          "the cache); docs/operating.md runs it for real (config, systemd, Keystone, Nova);\n"
          "bash scripts/test.sh runs the tests.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default=256, type=int, help="image size in MiB (default 256)")
    ap.add_argument("--workdir", help="keep everything here instead of a temporary directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="thunderfs-demo-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        glance = LocalGlance(work / "glance")
        mount = Mount(work / "mnt", "", work / "cache", "--cache-size", "1G")
        try:
            print(f"starting a real Glance on loopback ({work / 'glance'})")
            t = time.monotonic()
            glance.start()
            mount.glance_url = glance.url
            img = work / "image.raw"
            make_image(img, args.size * 2**20)
            meta = glance.upload("thunderfs-demo", img)
            image_id = meta["id"]
            print(f"uploaded a {format_size(meta['size'])} image {image_id}")
            step(f"start Glance, upload a {format_size(meta['size'])} image", t)
            t = time.monotonic()
            mount.mount()
            step("mount thunderfs", t)
            path = mount.image(image_id)
            print(f"mounted {mount.path}; the image is {path}")
            s0 = mount.stats()
            reads = boot_reads(meta["size"])
            t = time.monotonic()
            with open(path, "rb", buffering=0) as f:
                for off, n in reads:
                    f.seek(off)
                    f.read(n)
            read = sum(n for _, n in reads)
            print(f"1. {len(reads)} boot-like reads ({format_size(read)}) in {time.monotonic() - t:.2f}s:")
            s1 = mount.stats()
            step(f"1. {len(reads)} boot-like reads ({format_size(read)})", t, line("", s1, s0))

            t = time.monotonic()
            res = thunderfs("verify", str(mount.path), image_id)
            print(f"2. whole image through the mount: {res.stdout.strip() or res.stderr.strip()}")
            s2 = mount.stats()
            step("2. whole image, checked against Glance", t, line("", s2, s1))
            if res.returncode:
                return 1

            t = time.monotonic()
            mount.umount()
            glance.stop()
            print("3. Glance stopped; mounting again from the cache alone")
            mount.mount()
            res = thunderfs("verify", str(mount.path), image_id)
            print(f"   {res.stdout.strip() or res.stderr.strip()}")
            step("3. Glance down: remount, read from the cache", t, line("", mount.stats()))
            if res.returncode:
                return 1
            mount.cleanup()
            glance.start()
            rc = two_nodes(work, glance, image_id)
            if rc == 0:
                summary()
            return rc
        finally:
            mount.cleanup()
            glance.stop()


def two_nodes(work: Path, glance: LocalGlance, image_id: str) -> int:
    """Step 4: a tracker and two nodes in namespaces; the second reads mostly from the first."""
    secret = work / "secret"
    secret.write_bytes(random.randbytes(32))
    secret.chmod(0o600)
    lan = Lan().up()
    proxy = tracker = None
    nodes: list[Mount] = []
    try:
        proxy = FaultProxy(glance.url, host=lan.root_addr).start()  # Glance as the namespaces reach it
        tracker = LocalTracker(work / "tracker", "--glance", glance.url, "--secret-file", str(secret),
                               host=lan.root_addr)
        tracker.start()
        print(f"4. a tracker at {tracker.url}; two nodes, each in a network namespace of its own")
        for i, name in enumerate(("node-a", "node-b")):
            t = time.monotonic()
            n = lan.add_node()
            m = Mount(work / f"mnt-{name}", proxy.url, work / f"cache-{name}", "--cache-size", "1G",
                      "--tracker", tracker.url, "--peer-listen", f"{n.addr}:{free_port()}", "--node-id", name,
                      "--location", f"zone1/rack1/{name}", "--secret-file", str(secret), prefix=n.exec_prefix())
            nodes.append(m)
            m.mount()
            before = m.stats()
            res = thunderfs("verify", str(m.path), image_id, prefix=n.exec_prefix())
            print(f"   {name}: {res.stdout.strip() or res.stderr.strip()}")
            if res.returncode:
                return 1
            f = m.stats()["fetch"]
            where = (f"from Glance {format_size(f['bytes_from_origin'] - before['fetch']['bytes_from_origin'])}, "
                     f"from peers {format_size(f['bytes_from_peers'] - before['fetch']['bytes_from_peers'])}")
            print(f"   {name}: {where}")
            step(f"4. {name}, its own namespace, reads it all", t, where)
        print()
        print(thunderfs("status", str(nodes[1].path)).stdout)
        f = nodes[1].stats()["fetch"]
        if f["bytes_from_peers"] <= f["bytes_from_origin"]:
            print("the second node took less from its peer than from Glance: something is wrong", file=sys.stderr)
            return 1
        return 0
    finally:
        for m in nodes:
            m.cleanup()
        if tracker:
            tracker.stop()
        if proxy:
            proxy.stop()
        lan.down()


if __name__ == "__main__":
    raise SystemExit(main())
