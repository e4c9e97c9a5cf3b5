"""Tracker lookups under many announcing nodes: a real tracker process, N simulated nodes.

Each simulated node announces itself and the full chunk state of one image (a random half of
its chunks), then keeps sending heartbeats and deltas while lookups of 16-chunk windows are timed
from one client.  Both run on this 2-core machine with the tracker (they share its cores).

Usage: .venv/bin/python benchmarks/tracker_bench.py [--nodes 1000] [--lookups 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.tracker import LocalTracker  # noqa: E402
from thunderfs_tracker.protocol import ChunkUpdate, NodeInfo  # noqa: E402
from thunderfs_common.signing import sign  # noqa: E402

SECRET = b"tracker-bench-secret-0123456789"
IMG = "00112233445566778899aabbccddeeff"
NCHUNKS = 16384  # a 1 GiB image in 64 KiB chunks


def post(h: httpx.Client, node: str, path: str, body: dict) -> None:
    data = json.dumps(body).encode()
    r = h.post(path, content=data, headers=sign(SECRET, node, "POST", path, data))
    r.raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--lookups", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = LocalTracker(Path(tmp), "--node-ttl", "120", "--heartbeat", "30", secret=SECRET)
        t.start()
        try:
            with httpx.Client(base_url=t.url) as h:
                t0 = time.perf_counter()
                for i in range(args.nodes):
                    name = f"n{i}"
                    node = NodeInfo(name, f"http://10.1.{i // 250}.{i % 250 + 1}:7000",
                                    (f"z{i % 4}", f"r{i % 40}", name), i % 3)
                    post(h, name, f"/v1/nodes/{name}/announce", node.to_json())
                    bits = random.Random(i).getrandbits(NCHUNKS)
                    post(h, name, f"/v1/nodes/{name}/chunks",
                         {"full": True, "images": [ChunkUpdate(IMG, NCHUNKS, add=bits, full=True).to_json()]})
                setup = time.perf_counter() - t0
                print(f"{args.nodes} nodes announced full state in {setup:.1f}s "
                      f"({2 * args.nodes / setup:.0f} requests/s)")

                stop = threading.Event()

                def churn():  # heartbeats and deltas, as daemons send them, during the lookups
                    rng = random.Random(1)
                    with httpx.Client(base_url=t.url) as hc:
                        while not stop.is_set():
                            i = rng.randrange(args.nodes)
                            c = rng.randrange(NCHUNKS - 16)
                            post(hc, f"n{i}", f"/v1/nodes/n{i}/chunks", {"full": False, "images": [
                                {"content": IMG, "nchunks": NCHUNKS, "add": [[c, c + 15]], "remove": []}]})

                th = threading.Thread(target=churn)
                th.start()
                lat = []
                rng = random.Random(2)
                for _ in range(args.lookups):
                    first = rng.randrange(NCHUNKS - 16)
                    path = f"/v1/images/{IMG}/peers?first={first}&last={first + 15}"
                    s = time.perf_counter()
                    r = h.get(path, headers=sign(SECRET, "n0", "GET", path))
                    lat.append(time.perf_counter() - s)
                    assert r.status_code == 200 and r.json()["peers"]
                stop.set()
                th.join()
            lat.sort()
            p = lambda q: lat[int(q * (len(lat) - 1))] * 1000  # noqa: E731
            print(f"lookup latency over {len(lat)} lookups (client included, with concurrent deltas): "
                  f"p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {lat[-1] * 1000:.2f} ms, "
                  f"mean {statistics.mean(lat) * 1000:.2f} ms (target p99 < 10 ms)")
        finally:
            t.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
