"""Tracker lookups under many announcing nodes, with and without authentication, side by side.

Two real tracker processes with the same N simulated nodes: one with the cluster's secret (every
request signed, every answer signed and checked by the client, as the daemon does), one without.
Each simulated node announces itself and the full chunk state of one image (a random half of its
chunks); then heartbeats and deltas keep coming to both while lookups of 16-chunk windows are
timed from one client, in alternating rounds (so that the machine's drift falls on both).  All on
this 2-core machine with the trackers (they share its cores).

Usage: .venv/bin/python benchmarks/tracker_bench.py [--nodes 1000] [--lookups 2000] [--rounds 8] [--runs 3]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

from benchmarks.record import provenance, spread
from harness.tracker import LocalTracker
from thunderfs_common.signing import H_NONCE, reply_is_signed, sign
from thunderfs_common.tracker_protocol import ChunkUpdate, NodeInfo

SECRET = b"tracker-bench-secret-0123456789"
IMG = "00112233445566778899aabbccddeeff"
NCHUNKS = 16384  # a 1 GiB image in 64 KiB chunks


def send(h: httpx.Client, secret: bytes | None, node: str, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else b""
    headers = sign(secret, node, method, path, data) if secret else {}
    r = h.request(method, path, content=data, headers=headers)
    if secret is not None:  # the daemon acts on no answer whose signature fails
        assert reply_is_signed(secret, headers[H_NONCE], r.status_code, r.content, r.headers)
    r.raise_for_status()
    return r


def populate(h: httpx.Client, secret: bytes | None, nodes: int) -> float:
    t0 = time.perf_counter()
    for i in range(nodes):
        name = f"n{i}"
        node = NodeInfo(name, f"http://10.1.{i // 250}.{i % 250 + 1}:7000", (f"z{i % 4}", f"r{i % 40}", name), i % 3)
        send(h, secret, name, "POST", f"/v1/nodes/{name}/announce", node.to_json())
        bits = random.Random(i).getrandbits(NCHUNKS)
        send(h, secret, name, "POST", f"/v1/nodes/{name}/chunks",
             {"full": True, "images": [ChunkUpdate(IMG, NCHUNKS, add=bits, full=True).to_json()]})
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--lookups", type=int, default=2000, help="per tracker")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1, help="whole runs, fresh trackers each")
    ap.add_argument("--json", type=Path, help="write the runs and their median and range here")
    args = ap.parse_args()
    made = provenance()  # the code as the run starts
    runs = [one_run(args) for _ in range(args.runs)]
    out = {**made, "nodes": args.nodes, "lookups": args.lookups, "runs": runs,
           **{k: spread([r[k] for r in runs]) for k in runs[0]}}
    if args.runs > 1:
        print(f"{args.runs} runs: authenticated / open speed, p50 {out['ratio_p50']['median']:.2f} x "
              f"({out['ratio_p50']['min']:.2f}-{out['ratio_p50']['max']:.2f}), p99 {out['ratio_p99']['median']:.2f} x "
              f"({out['ratio_p99']['min']:.2f}-{out['ratio_p99']['max']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def one_run(args) -> dict:
    """One run: fresh trackers, the nodes announced, the lookups timed; the figures of the run."""
    kinds = {"authenticated": SECRET, "open": None}
    with tempfile.TemporaryDirectory() as tmp:
        trackers = {}
        try:
            for kind, secret in kinds.items():
                t = LocalTracker(Path(tmp) / kind, "--node-ttl", "120", "--heartbeat", "30", secret=secret)
                t.start()
                trackers[kind] = t
            clients = {kind: httpx.Client(base_url=t.url) for kind, t in trackers.items()}
            for kind, h in clients.items():
                setup = populate(h, kinds[kind], args.nodes)
                print(f"{kind:13s}: {args.nodes} nodes announced full state in {setup:.1f}s "
                      f"({2 * args.nodes / setup:.0f} requests/s)")
            stop = threading.Event()

            def churn(kind: str):  # heartbeats and deltas, as daemons send them, during the lookups
                rng = random.Random(1)
                with httpx.Client(base_url=trackers[kind].url) as hc:
                    while not stop.is_set():
                        i = rng.randrange(args.nodes)
                        c = rng.randrange(NCHUNKS - 16)
                        send(hc, kinds[kind], f"n{i}", "POST", f"/v1/nodes/n{i}/chunks", {"full": False, "images": [
                            {"content": IMG, "nchunks": NCHUNKS, "add": [[c, c + 15]], "remove": []}]})
                        time.sleep(0.002)

            threads = [threading.Thread(target=churn, args=(k,)) for k in kinds]
            for th in threads:
                th.start()
            lat: dict[str, list[float]] = {k: [] for k in kinds}
            rng = random.Random(2)
            per_round = max(1, args.lookups // args.rounds)
            for _ in range(args.rounds):
                for kind, h in clients.items():
                    for _ in range(per_round):
                        first = rng.randrange(NCHUNKS - 16)
                        s = time.perf_counter()
                        r = send(h, kinds[kind], "n0", "GET", f"/v1/images/{IMG}/peers?first={first}&last={first + 15}")
                        lat[kind].append(time.perf_counter() - s)
                        assert r.json()["peers"]
            stop.set()
            for th in threads:
                th.join()
            for h in clients.values():
                h.close()
        finally:
            for t in trackers.values():
                t.stop()
    q = {}
    for kind, xs in lat.items():
        xs.sort()
        p = lambda f: xs[int(f * (len(xs) - 1))] * 1000  # noqa: E731
        q[kind] = (p(0.5), p(0.99))
        print(f"{kind:13s}: {len(xs)} lookups (client included, with concurrent deltas): p50 {p(0.5):.2f} ms, "
              f"p99 {p(0.99):.2f} ms, max {xs[-1] * 1000:.2f} ms, mean {statistics.mean(xs) * 1000:.2f} ms")
    ratio50, ratio99 = q["open"][0] / q["authenticated"][0], q["open"][1] / q["authenticated"][1]
    print(f"authenticated speed vs open (open latency / authenticated latency): p50 {ratio50:.2f} x, "
          f"p99 {ratio99:.2f} x (target >= 0.8 x: {'met' if min(ratio50, ratio99) >= 0.8 else 'MISSED'})")
    return {"auth_p50_ms": q["authenticated"][0], "auth_p99_ms": q["authenticated"][1], "open_p50_ms": q["open"][0],
            "open_p99_ms": q["open"][1], "ratio_p50": ratio50, "ratio_p99": ratio99}


if __name__ == "__main__":
    raise SystemExit(main())
