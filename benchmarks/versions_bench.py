"""Two versions of the Debian image (issue 31): what v2 costs a node, a crowd and a cache that
already hold v1.

v1 is the boot benchmarks' Debian disk (``benchmarks/debian_image.sh``); v2 is v1 with its package
lists updated and a few packages installed (``benchmarks/debian_v2.sh``).  Both go to a real
Glance, as raw and as qcow2 (``qemu-img convert``), behind a proxy that counts what Glance sends;
a real tracker builds their manifests first (that whole-image read per image is a one-time cost,
reported apart, as the boot benchmarks report it).  Then, each on fresh daemons:

  (1) the chunks: the share of v2's 64 KiB chunks whose digest v1 has, and of zero chunks;
  (2) a cold whole-image read of v1 raw: bytes fetched against its non-zero chunks' bytes;
  (3) the same node reads v2 raw whole: its cache against v1's and v2's unique non-zero bytes;
  (4) one node boots v1, then v2 (qemu TCG, a qcow2 overlay on the mount, Nova's way), raw and
      then qcow2: the bytes v2's boot fetched against the bytes of v2's boot working set (the
      chunks its profile recorded) whose digest v1 does not have;
  (5) a storm: N nodes replay v1's boot (its recorded profile, at its pace), then v2's: Glance's
      egress during v2's storm against v2's unique boot bytes;
  (6) across nodes: N/2 nodes replay v1's boot, then N/2 other nodes, with empty caches, replay
      v2's: they take what v2 shares with v1 from the first ones (the tracker's lookups by
      digest), and Glance's egress is against the same measure.

Targets (issue 31): (2) fetched = non-zero chunks; (3) at most unique non-zero + 5 %; (4) at most
1.2 x; (5) at most 1.5 x.

Usage: .venv/bin/python benchmarks/versions_bench.py [--work /var/tmp/thunderfs-bench] [--nodes 16]
       [--json benchmarks/results/versions.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.boot_bench import boot_disk
from benchmarks.record import provenance
from harness.boot_trace import Read, replay
from thunderfs.cache.holes import data_extents
from harness.fault_proxy import FaultProxy
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount, thunderfs
from harness.tracker import LocalTracker
from thunderfs_common import chunk_digest

REPO = Path(__file__).resolve().parent.parent
SECRET = b"versions-bench-secret-0123456789ab"
CS = 64 * 1024
MiB = 2**20
NODE_TTL = 5
ZERO = chunk_digest.digest(bytes(CS))


def digests(path: Path) -> list[bytes]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return [chunk_digest.digest(m[i:i + CS]) for i in range(0, len(m), CS)]


def chunk_stats(d1: list[bytes], d2: list[bytes]) -> dict:
    in_v1 = set(d1)
    nonzero = {d for d in d1 + d2 if d != ZERO}
    return {"chunks": [len(d1), len(d2)],
            "shared_fraction": sum(d in in_v1 for d in d2) / len(d2),
            "zero_fraction": [sum(d == ZERO for d in d) / len(d) for d in (d1, d2)],
            "nonzero_bytes": [sum(d != ZERO for d in d) * CS for d in (d1, d2)],
            "unique_nonzero_bytes": len(nonzero) * CS,
            "v2_not_in_v1_bytes": sum(d not in in_v1 for d in d2) * CS}


def build(work: Path) -> tuple[Path, Path]:
    v1 = subprocess.run(["bash", str(REPO / "benchmarks" / "debian_image.sh"), str(work / "debian")],
                        check=True, capture_output=True, text=True).stdout.split()[-1]
    v2 = subprocess.run(["bash", str(REPO / "benchmarks" / "debian_v2.sh"), v1, str(work / "debian-v2")],
                        check=True, capture_output=True, text=True).stdout.split()[-1]
    return Path(v1), Path(v2)


def qcow2_of(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    if not out.exists():
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out) + ".tmp"],
                       check=True)
        Path(str(out) + ".tmp").rename(out)
    return out


class Bench:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.glance = LocalGlance(tmp / "glance")
        self.glance.start()
        self.proxy = FaultProxy(self.glance.url).start()
        self.tracker = LocalTracker(tmp / "tracker", "--glance", self.proxy.url, "--heartbeat", "1",
                                    "--node-ttl", str(NODE_TTL), secret=SECRET)
        self.tracker.start()
        self.secret = tmp / "secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        self.mounts: list[Mount] = []

    def node(self, name: str, *args: str) -> Mount:
        m = Mount(self.tmp / f"mnt-{name}", self.proxy.url, self.tmp / f"cache-{name}", "--tracker", self.tracker.url,
                  "--peer-listen", f"127.0.0.1:{free_port()}", "--node-id", name, "--secret-file", str(self.secret),
                  "--cache-size", "8G", *args)
        self.mounts.append(m)
        m.mount()
        return m

    def gone(self, *ms: Mount) -> None:
        for m in ms:
            m.cleanup()
            self.mounts.remove(m)
        time.sleep(NODE_TTL + 2)  # the tracker forgets them: no peer holds anything of theirs

    def stop(self) -> None:
        for m in list(self.mounts):
            m.cleanup()
        self.tracker.stop()
        self.proxy.stop()
        self.glance.stop()

    def manifests(self, ids: list[str]) -> float:
        """Have the tracker build every image's manifest (a first read asks for it); the seconds."""
        t = time.perf_counter()
        m = self.node("manifests", "--record-window", "0")  # its 4 KiB reads are no boot's profile
        for image_id in ids:
            with open(m.image(image_id), "rb") as f:
                f.read(4096)
        for image_id in ids:
            while not (self.tracker.dir / "manifests" / f"{image_id}-{CS}.json").exists():
                if time.perf_counter() - t > 900:
                    raise RuntimeError(f"no manifest of {image_id} after 900 s")
                time.sleep(1)
        self.gone(m)
        return time.perf_counter() - t

    def profile(self, m: Mount, image_id: str) -> list[tuple[int, int]]:
        """(chunk, ms of its first read) of the boot ``m`` recorded, once the tracker has it."""
        t = time.perf_counter()
        while time.perf_counter() - t < 180:
            res = thunderfs("profile", "show", image_id, "--mountpoint", str(m.path), "--json")
            if res.returncode == 0:
                return [tuple(c) for c in json.loads(res.stdout)["chunks"]]
            time.sleep(1)
        raise RuntimeError(f"no profile of {image_id} after 180 s")


def per_image(m: Mount, image_id: str) -> dict:
    return next(i for i in m.stats()["per_image"] if i["id"] == image_id)


def fetched(m: Mount, image_id: str) -> int:
    i = per_image(m, image_id)
    return i["bytes_from_origin"] + i["bytes_from_peers"] + i["bytes_from_seed"]


def boot_image(m: Mount, image_id: str, fmt: str, tmp: Path, name: str) -> float:
    overlay = tmp / f"{name}.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(m.image(image_id)), "-F", fmt, "-u",
                    str(overlay), "2G"], check=True)
    try:
        return boot_disk(overlay, tmp, name)
    finally:
        overlay.unlink(missing_ok=True)


def unique_bytes(chunks: list[int], d2: list[bytes], in_v1: set[bytes]) -> int:
    return sum(1 for c in chunks if d2[c] not in in_v1) * CS


def held_digests(m: Mount, image_id: str, d: list[bytes]) -> set[bytes]:
    """The digests of the chunks the node holds of an image (its cache file's data: shared and
    zero chunks are holes there), and the zero digest."""
    held = {ZERO}
    with open(m.data_file(image_id), "rb") as f:
        for start, end in data_extents(f.fileno()):
            held.update(d[c] for c in range(start // CS, -(-end // CS)))
    return held


def one_node(b: Bench, ids: dict, fmt: str, d: dict) -> dict:
    """(4): one node boots v1, then v2, in format ``fmt``."""
    m = b.node(f"one-{fmt}")
    t1 = boot_image(m, ids[fmt][0], fmt, b.tmp, f"v1-{fmt}")
    p1 = b.profile(m, ids[fmt][0])
    before = b.proxy.range_bytes
    t2 = boot_image(m, ids[fmt][1], fmt, b.tmp, f"v2-{fmt}")
    glance = b.proxy.range_bytes - before
    p2 = b.profile(m, ids[fmt][1])
    chunks = [c for c, _ in p2]
    unique = unique_bytes(chunks, d[fmt][1], set(d[fmt][0]))
    got = fetched(m, ids[fmt][1])
    # Beside the target's measure: v2's boot bytes the node did not hold (v1's boot left it only
    # what that boot read, and some of v2's boot reads are in v1 but were not read by its boot).
    held = held_digests(m, ids[fmt][0], d[fmt][0])
    not_held = unique_bytes(chunks, d[fmt][1], held)
    # Which those are: (v2's chunk, v1's first chunk of the same digest), for reading by hand.
    first_in_v1 = {}
    for j, dig in enumerate(d[fmt][0]):
        first_in_v1.setdefault(dig, j)
    in_v1_not_held = [[c, first_in_v1[d[fmt][1][c]]] for c in sorted(chunks)
                      if d[fmt][1][c] in first_in_v1 and d[fmt][1][c] not in held]
    out = {"boot_seconds": [t1, t2], "v1_profile_chunks": len(p1), "v2_profile_chunks": len(chunks),
           "v2_boot_bytes": len(chunks) * CS, "v2_unique_boot_bytes": unique, "v2_fetched": got,
           "v2_boot_not_held_bytes": not_held, "ratio_not_held": got / not_held if not_held else None,
           "v2_glance_bytes": glance, "ratio": got / unique if unique else None,
           "v2_boot_in_v1_not_held": in_v1_not_held[:256],
           "v2_status": per_image(m, ids[fmt][1])}
    b.gone(m)
    return out, p1, p2


def storm(b: Bench, ids: dict, n: int, p1, p2, d: dict) -> dict:
    """(5): ``n`` nodes replay v1's boot profile at its pace, then v2's."""
    ms = [b.node(f"s{i}") for i in range(n)]
    out = {}
    for version, (image_id, profile) in enumerate(((ids["raw"][0], p1), (ids["raw"][1], p2))):
        reads = [Read(ms_ / 1000, c * CS, CS) for c, ms_ in sorted(profile, key=lambda x: x[1])]
        before = (b.proxy.range_bytes, b.proxy.whole_bytes)
        took: list[float] = []
        errors: list[str] = []

        def one(m: Mount) -> None:
            try:
                took.append(replay(m.image(image_id), reads, paced=True))
            except OSError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=one, args=(m,)) for m in ms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"storm reads failed: {errors[:3]}")
        egress = b.proxy.range_bytes - before[0] + b.proxy.whole_bytes - before[1]
        out[f"v{version + 1}"] = {"glance_bytes": egress, "slowest": max(took), "fastest": min(took),
                                  "boot_bytes": len(reads) * CS,
                                  "fetched": sum(fetched(m, image_id) for m in ms)}
    unique = unique_bytes([c for c, _ in p2], d["raw"][1], set(d["raw"][0]))
    out["v2_unique_boot_bytes"] = unique
    out["ratio"] = out["v2"]["glance_bytes"] / unique if unique else None
    b.gone(*ms)
    return out


def across(b: Bench, ids: dict, n: int, p1, p2, d: dict) -> dict:
    """(6): ``n`` nodes replay v1's boot, then ``n`` others, empty, replay v2's."""
    def replay_all(ms: list[Mount], image_id: str, profile) -> list[float]:
        reads = [Read(ms_ / 1000, c * CS, CS) for c, ms_ in sorted(profile, key=lambda x: x[1])]
        took: list[float] = []
        threads = [threading.Thread(target=lambda m=m: took.append(replay(m.image(image_id), reads, paced=True)))
                   for m in ms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(took) != len(ms):
            raise RuntimeError("a replay failed")
        return took

    olds = [b.node(f"old{i}") for i in range(n)]
    replay_all(olds, ids["raw"][0], p1)
    news = [b.node(f"new{i}") for i in range(n)]
    before = b.proxy.range_bytes + b.proxy.whole_bytes
    took = replay_all(news, ids["raw"][1], p2)
    egress = b.proxy.range_bytes + b.proxy.whole_bytes - before
    unique = unique_bytes([c for c, _ in p2], d["raw"][1], set(d["raw"][0]))
    alike = sum(m.stats()["peers"]["alike_chunks"] for m in news)
    out = {"nodes": n, "glance_bytes": egress, "slowest": max(took), "v2_unique_boot_bytes": unique,
           "alike_chunks": alike, "ratio": egress / unique if unique else None}
    b.gone(*olds, *news)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/thunderfs-bench")
    ap.add_argument("--nodes", type=int, default=16, help="nodes of the storm (5)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    made = provenance()
    work = Path(args.work)
    v1, v2 = build(work)
    disks = {"raw": (v1, v2), "qcow2": (qcow2_of(v1), qcow2_of(v2))}
    d = {fmt: (digests(a), digests(c)) for fmt, (a, c) in disks.items()}
    result: dict = {**made, "chunk_size": CS, "nodes": args.nodes,
                    "chunks": {fmt: chunk_stats(*d[fmt]) for fmt in d}}
    for fmt, s in result["chunks"].items():
        print(f"{fmt}: {s['shared_fraction']:.1%} of v2's chunks are v1's; zero chunks {s['zero_fraction'][0]:.1%} "
              f"(v1), {s['zero_fraction'][1]:.1%} (v2); v2 not in v1: {s['v2_not_in_v1_bytes'] / MiB:.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="thunderfs-versions-", dir=work) as tmp:
        b = Bench(Path(tmp))
        try:
            ids = {fmt: [b.glance.upload(f"debian-{fmt}-v{i + 1}", p, disk_format=fmt)["id"]
                         for i, p in enumerate(disks[fmt])] for fmt in disks}
            before = b.proxy.whole_bytes
            result["manifest_seconds"] = b.manifests(ids["raw"] + ids["qcow2"])
            result["manifest_bytes"] = b.proxy.whole_bytes - before
            print(f"manifests of the 4 images: {result['manifest_bytes'] / MiB:.0f} MiB read by the tracker in "
                  f"{result['manifest_seconds']:.0f} s (one-time, apart from what follows)")

            # (2) and (3): one node reads v1 raw whole, cold, then v2.
            c = b.node("whole", "--record-window", "0")  # whole reads are no boot's profile
            s = result["chunks"]["raw"]
            for i, image_id in enumerate(ids["raw"]):
                t = time.perf_counter()
                subprocess.run(["dd", f"if={c.image(image_id)}", "of=/dev/null", "bs=4M", "status=none"], check=True)
                result[f"whole_v{i + 1}"] = {"seconds": time.perf_counter() - t, "fetched": fetched(c, image_id),
                                             "nonzero_bytes": s["nonzero_bytes"][i]}
            w = result["whole_v1"]
            print(f"(2) cold whole read of v1 raw: fetched {w['fetched'] / MiB:.1f} MiB for "
                  f"{w['nonzero_bytes'] / MiB:.1f} MiB of non-zero chunks ({w['fetched'] / w['nonzero_bytes']:.3f} x; "
                  f"target 1.0) in {w['seconds']:.1f} s")
            while c.stats()["cache"]["uncommitted"]:
                time.sleep(0.2)
            used = c.stats()["cache"]["used"]
            result["cache"] = {"used": used, "unique_nonzero_bytes": s["unique_nonzero_bytes"],
                               "ratio": used / s["unique_nonzero_bytes"]}
            print(f"(3) v1 and v2 raw cached whole: {used / MiB:.1f} MiB for {s['unique_nonzero_bytes'] / MiB:.1f} "
                  f"MiB of unique non-zero chunks ({result['cache']['ratio']:.3f} x; target <= 1.05)")
            b.gone(c)

            profiles = {}
            for fmt in ("raw", "qcow2"):
                r, p1, p2 = one_node(b, ids, fmt, d)
                result[f"one_node_{fmt}"] = r
                profiles[fmt] = (p1, p2)
                print(f"(4) {fmt}: one node booted v1 ({r['boot_seconds'][0]:.0f} s) then v2 "
                      f"({r['boot_seconds'][1]:.0f} s): v2 fetched {r['v2_fetched'] / MiB:.2f} MiB for "
                      f"{r['v2_unique_boot_bytes'] / MiB:.2f} MiB of its {r['v2_boot_bytes'] / MiB:.1f} MiB boot "
                      f"not in v1 ({r['ratio'] or float('nan'):.2f} x; target <= 1.2); "
                      f"{r['v2_boot_not_held_bytes'] / MiB:.2f} MiB not held by the node "
                      f"({r['ratio_not_held'] or float('nan'):.2f} x)")
            r = storm(b, ids, args.nodes, *profiles["raw"], d)
            result["storm"] = r
            print(f"(5) {args.nodes} nodes replayed v1's boot (slowest {r['v1']['slowest']:.1f} s, Glance "
                  f"{r['v1']['glance_bytes'] / MiB:.1f} MiB), then v2's (slowest {r['v2']['slowest']:.1f} s): Glance "
                  f"sent {r['v2']['glance_bytes'] / MiB:.2f} MiB for {r['v2_unique_boot_bytes'] / MiB:.2f} MiB of "
                  f"v2's boot not in v1 ({r['ratio']:.2f} x; target <= 1.5; the manifests' read above, apart)")
            r = across(b, ids, args.nodes // 2, *profiles["raw"], d)
            result["across"] = r
            print(f"(6) {r['nodes']} nodes replayed v1's boot, then {r['nodes']} others, empty, v2's: they took "
                  f"{r['alike_chunks']} chunks as v1's from the first ones; Glance sent {r['glance_bytes'] / MiB:.2f} "
                  f"MiB for {r['v2_unique_boot_bytes'] / MiB:.2f} MiB of v2's boot not in v1 ({r['ratio']:.2f} x)")
        finally:
            b.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
