"""Many nodes read one image at once through their mounts: what Glance sends, how long it takes.

Each node is a daemon in its own network namespace with a tbf-shaped link; Glance (behind a
pass-through proxy that counts the bytes it sends: measured at Glance, not by the nodes) and the
tracker sit in the root namespace behind a link shaped the same way.  Runs, in one go:

  1. the one-time manifest build (the tracker streams the image from Glance once), on its own line;
  2. one node alone reading the whole image (the baseline time);
  3. N fresh nodes reading it at the same moment (nothing cached anywhere: the lone node is gone
     and forgotten by the tracker first).
Steps 2 and 3 run --runs times, on fresh nodes.

Prints Glance's egress for the reads against the image size (target <= 1.2), also with the
manifest's read counted once per run (what Glance sent in all for a first storm), and the slowest
node's time against the lone node's (target <= 1.5): medians and ranges over the runs.  All of it
shares this machine's 2 cores: say so with the figures.

Usage: .venv/bin/python benchmarks/p2p_bench.py [--nodes 8] [--size-mib 256] [--rate 100mbit] [--runs 3]
                                                [--json benchmarks/results/p2p.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness.fault_proxy import FaultProxy
from benchmarks.record import provenance, spread
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount
from harness.netns import Lan
from harness.tracker import LocalTracker

SECRET = b"p2p-bench-secret-0123456789abcdef"
MiB = 2**20


def read_all(path: Path) -> int:
    n, buf = 0, bytearray(MiB)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rate", default="100mbit", help="every node's link and Glance's link")
    ap.add_argument("--workdir", help="keep logs and caches here instead of a temporary directory")
    ap.add_argument("--runs", type=int, default=3, help="lone node + crowd, this many times")
    ap.add_argument("--json", type=Path, help="write the runs here")
    args = ap.parse_args()
    made = provenance()  # the code as the run starts
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="thunderfs-p2p-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        glance = LocalGlance(work / "glance")
        lan = Lan(prefix="10.204.0")
        mounts: list[Mount] = []
        proxy = tracker = None
        try:
            glance.start()
            img = work / "image.raw"
            with open(img, "wb") as f:
                for _ in range(args.size_mib // 64):
                    f.write(os.urandom(64 * MiB))
                f.write(os.urandom(size % (64 * MiB)))
            image_id = glance.upload("p2p", img)["id"]
            img.unlink()
            lan.up()
            lan.limit_root(args.rate)
            proxy = FaultProxy(glance.url, host=lan.root_addr).start()
            tracker = LocalTracker(work / "tracker", "--glance", proxy.url, "--heartbeat", "2", "--node-ttl", "5", secret=SECRET,
                                   host=lan.root_addr)
            tracker.start()
            secret = work / "secret"
            secret.write_bytes(SECRET)
            secret.chmod(0o600)

            def node(i: int) -> Mount:
                n = lan.add_node(rate=args.rate)
                m = Mount(work / f"mnt{i}", proxy.url, work / f"cache{i}", "--tracker", tracker.url,
                          "--peer-listen", f"{n.addr}:{free_port()}", "--node-id", f"node{i}",
                          "--location", f"zone/rack{i % 2}/node{i}", "--secret-file", str(secret),
                          "--cache-size", f"{2 * args.size_mib}M", prefix=n.exec_prefix())
                mounts.append(m)
                m.mount()
                return m

            print(f"image {args.size_mib} MiB; links {args.rate}; {args.nodes} nodes; all on 2 shared cores")
            # 1. The manifest, built once (the first node to open the image asks for it).
            first = node(0)
            t = time.perf_counter()
            with open(first.image(image_id), "rb") as f:
                f.read(1)
            manifest = tracker.dir / "manifests" / f"{image_id}-65536.json"
            while not manifest.exists():
                time.sleep(0.2)
            manifest_bytes, manifest_s = proxy.whole_bytes, time.perf_counter() - t
            print(f"  manifest: {manifest_bytes / MiB:.0f} MiB streamed from Glance once, "
                  f"{manifest_s:.1f}s (one-time, per image)")
            first.cleanup()
            mounts.remove(first)
            runs: list[dict] = []
            ids = iter(range(1, 1000))
            for run_no in range(args.runs):
                time.sleep(7)  # every node of before is forgotten by the tracker (node ttl 5 s)
                # 2. One node alone.
                lone = node(next(ids))
                before = proxy.range_bytes
                t = time.perf_counter()
                assert read_all(lone.image(image_id)) == size
                alone = time.perf_counter() - t
                print(f"  run {run_no + 1}: one node alone: {alone:.1f}s, Glance sent "
                      f"{(proxy.range_bytes - before) / MiB:.0f} MiB")
                lone.cleanup()
                mounts.remove(lone)
                # That node's copy is gone: the storm starts from nothing cached anywhere.
                time.sleep(7)
                # 3. N fresh nodes at once.
                crowd = [node(next(ids)) for _ in range(args.nodes)]
                before = proxy.range_bytes
                times: dict[int, float] = {}
                barrier = threading.Barrier(len(crowd))

                def run(i: int, m: Mount) -> None:
                    barrier.wait()
                    s = time.perf_counter()
                    assert read_all(m.image(image_id)) == size
                    times[i] = time.perf_counter() - s

                threads = [threading.Thread(target=run, args=(i, m), daemon=True) for i, m in enumerate(crowd)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                egress = proxy.range_bytes - before
                slowest = max(times.values())
                stats = [m.stats() for m in crowd]
                peers = sum(st["fetch"]["bytes_from_peers"] for st in stats)
                for i, st in enumerate(stats):
                    fe, pe = st["fetch"], st.get("peers", {})
                    print(f"    node {i + 1}: {times[i]:5.1f}s  from Glance {fe['bytes_from_origin'] / MiB:4.0f} MiB, "
                          f"from peers {fe['bytes_from_peers'] / MiB:4.0f} MiB; peer failures {pe.get('failures')}, "
                          f"slow {pe.get('slow')}, busy {pe.get('busy')}, claim waits {pe.get('claim_waits')}; "
                          f"claims {pe.get('claims')} (failed {pe.get('claim_failures')}), chunks granted "
                          f"{pe.get('granted_chunks')}, waited for but late {pe.get('claimed_chunks_late')}")
                print(f"  run {run_no + 1}: {len(crowd)} nodes at once: fastest {min(times.values()):.1f}s, slowest "
                      f"{slowest:.1f}s -> {slowest / alone:.2f} x one node alone (target <= 1.5); Glance egress "
                      f"{egress / MiB:.0f} MiB = {egress / size:.2f} x the image, {(egress + manifest_bytes) / size:.2f} x "
                      f"with the manifest's read (target <= 1.2); from peers {peers / MiB:.0f} MiB", flush=True)
                runs.append({"alone_s": alone, "slowest_s": slowest, "fastest_s": min(times.values()),
                             "slowest_ratio": slowest / alone, "egress_bytes": egress, "egress_ratio": egress / size,
                             "egress_with_manifest_ratio": (egress + manifest_bytes) / size, "peer_bytes": peers})
                for m in crowd:
                    m.cleanup()
                    mounts.remove(m)

            out = {**made, "nodes": args.nodes, "size_mib": args.size_mib, "rate": args.rate, "runs": args.runs,
                   "manifest_bytes": manifest_bytes, "manifest_s": manifest_s,
                   **{k: spread([r[k] for r in runs]) for k in ("alone_s", "slowest_s", "slowest_ratio", "egress_ratio",
                                             "egress_with_manifest_ratio")}}

            def fmt(x: dict) -> str:
                return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"

            print(f"over {args.runs} runs: slowest / one node alone {fmt(out['slowest_ratio'])} (target <= 1.5); "
                  f"Glance egress / image {fmt(out['egress_ratio'])}, with the manifest's read "
                  f"{fmt(out['egress_with_manifest_ratio'])} (target <= 1.2)")
            if args.json:
                args.json.write_text(json.dumps(out, indent=1) + "\n")
        finally:
            for m in mounts:
                m.cleanup()
            if tracker:
                tracker.stop()
            if proxy:
                proxy.stop()
            lan.down()
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
