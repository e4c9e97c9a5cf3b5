"""10,000 simulated nodes against tracker replicas on one Redis: rates, latency, Redis memory.

A real redis-server and real tracker processes (``--store redis://``); a generator (asyncio,
aiohttp, every request signed as a daemon signs it) plays the nodes:

  1. join: every node announces itself and sends its full state.  What a node holds is what a
     boot reads: the chunks the recorded Debian boot touched (../shared/data/debian-boot-trace.txt,
     ~530 of 32,768 chunks of a 2 GiB image), of one of ``--images`` images (a fifth of the nodes
     hold two);
  2. steady state for ``--seconds``: heartbeats (each node every ``--heartbeat`` s, the daemon's
     default 10) as the daemon sends them: a full announce every ``FULL_EVERY``-th (the
     announcer's), light ones between (``--full-announces``: every one in full, as the daemon did
     before light heartbeats), deltas (every node has changes every heartbeat: a node's changes,
     batched) and lookups of 16-chunk windows, open loop at fixed rates, spread over the replicas
     as nodes spread themselves.  The deltas are the light heartbeats (``--deltas in-heartbeats``,
     the default: the daemon's announcer holds deltas nobody needs soon, which is every one while
     owners trade an image, until a heartbeat is due, and sends them as the light one, or after
     the full announce), or go beside light heartbeats (``--deltas apart``: the load this bench
     put before the announcer held deltas).

Prints requests per second achieved by kind, p50/p99 latency by kind (client included), and Redis
memory per node and per node-image held (used_memory_dataset after the join minus before,
divided: the data, not client buffers).  The
generator, Redis and the replicas share this machine's 2 cores: the generator's signing and
parsing cost CPU the trackers would have to themselves in a cloud.

Usage: .venv/bin/python benchmarks/tracker_load.py [--nodes 10000] [--replicas 1,2] [--seconds 30]
       [--heartbeat 10] [--full-announces] [--runs 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent

from benchmarks.read_bench import cpu_times
from benchmarks.record import provenance
from harness import boot_trace
from harness.local_redis import LocalRedis
from harness.tracker import LocalTracker
from thunderfs.p2p.announcer import FULL_EVERY
from thunderfs_common.tracker_protocol import ChunkUpdate, NodeInfo
from thunderfs_common.signing import sign

SECRET = b"tracker-load-secret-0123456789ab"
CHUNK = 64 * 1024
NCHUNKS = 2 * 2**30 // CHUNK


def boot_chunks() -> list[int]:
    try:
        reads = boot_trace.load()
    except SystemExit:  # no trace here: as many chunks, scattered the same way
        return sorted(random.Random(0).sample(range(NCHUNKS), 530))
    return sorted({c for r in reads for c in range(r.offset // CHUNK, (r.offset + r.size - 1) // CHUNK + 1)})


class Load:
    def __init__(self, urls: list[str], nodes: int, images: int):
        self.urls = urls
        self.nodes = nodes
        self.images = [f"{i:032x}" for i in range(1, images + 1)]
        self.held = boot_chunks()
        self.lat: dict[str, list[float]] = {"announce": [], "alive": [], "full": [], "delta": [], "lookup": []}
        self.errors: dict[str, int] = {}
        self.why: dict[str, str] = {}  # the first answer of each failing status
        self.session: aiohttp.ClientSession | None = None

    def url_of(self, i: int) -> str:
        return self.urls[i % len(self.urls)]

    def images_of(self, i: int) -> list[str]:
        first = self.images[i % len(self.images)]
        return [first, self.images[(i + 1) % len(self.images)]] if i % 5 == 0 else [first]

    async def call(self, kind: str, i: int, method: str, path: str, body: dict | None = None) -> None:
        node = f"n{i}"
        data = json.dumps(body).encode() if body is not None else b""
        headers = sign(SECRET, node, method, path, data)
        if body is not None:
            headers["Content-Type"] = "application/json"
        t = time.perf_counter()
        try:
            async with self.session.request(method, self.url_of(i) + path, data=data, headers=headers) as r:
                body = await r.read()
                status = str(r.status)
                if r.status != 200 and status not in self.why:
                    self.why[status] = body[:300].decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        if status == "200":
            self.lat[kind].append(time.perf_counter() - t)
        else:
            key = f"{kind} {status}"
            self.errors[key] = self.errors.get(key, 0) + 1

    def node_info(self, i: int) -> dict:
        return NodeInfo(f"n{i}", f"http://10.{i // 60000}.{i // 250 % 240}.{i % 250 + 1}:7000",
                        (f"z{i % 4}", f"r{i % 200}", f"n{i}"), instance=f"{i:016x}").to_json()

    async def join(self, concurrency: int = 64) -> float:
        bits = sum(1 << c for c in self.held)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await self.call("announce", i, "POST", f"/v1/nodes/n{i}/announce", self.node_info(i))
                ups = [ChunkUpdate(img, NCHUNKS, add=bits, full=True).to_json() for img in self.images_of(i)]
                await self.call("full", i, "POST", f"/v1/nodes/n{i}/chunks", {"full": True, "images": ups})

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(self.nodes)))
        return time.perf_counter() - t

    async def steady(self, seconds: float, lookups_per_s: float, heartbeat: float, full_every: int,
                     deltas_apart: bool) -> dict[str, float]:
        beats = self.nodes / heartbeat
        light = beats - beats / full_every
        rates = {"announce": beats / full_every, "alive": light if deltas_apart else 0.0, "delta": beats,
                 "lookup": lookups_per_s}
        rng = random.Random(1)
        tasks: set[asyncio.Task] = set()
        sent = dict.fromkeys(rates, 0)
        start = time.perf_counter()
        held = self.held

        def request(kind: str):
            i = rng.randrange(self.nodes)
            if kind == "announce":
                return self.call(kind, i, "POST", f"/v1/nodes/n{i}/announce", self.node_info(i))
            if kind == "alive":
                return self.call(kind, i, "POST", f"/v1/nodes/n{i}/alive", {"instance": f"{i:016x}"})
            img = rng.choice(self.images_of(i))
            if kind == "delta":
                c = rng.choice(held)
                return self.call(kind, i, "POST", f"/v1/nodes/n{i}/chunks", {"full": False, "images": [
                    {"content": img, "nchunks": NCHUNKS, "add": [[c, c]], "remove": []}]})
            c = rng.choice(held)
            first = min(c, NCHUNKS - 16)
            return self.call(kind, i, "GET", f"/v1/images/{img}/peers?first={first}&last={first + 15}")

        while (now := time.perf_counter() - start) < seconds:
            for kind, rate in rates.items():
                while sent[kind] < rate * now:
                    sent[kind] += 1
                    if len(tasks) < 2000:  # beyond that the generator is the bottleneck: counted as not sent
                        task = asyncio.create_task(request(kind))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        return {k: len(self.lat[k]) / (time.perf_counter() - start) for k in rates}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] * 1000


async def redis_memory(redis: LocalRedis) -> int:
    reader, writer = await asyncio.open_connection(redis.host, redis.port)
    writer.write(b"INFO memory\r\n")
    await writer.drain()
    header = await reader.readline()
    body = await reader.readexactly(int(header[1:]) + 2)
    writer.close()
    for line in body.decode().splitlines():
        if line.startswith("used_memory_dataset:"):  # the data, without connection buffers
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory_dataset in INFO")


async def run_one(work: Path, replicas: int, args) -> dict:
    redis = LocalRedis(work / f"redis-{replicas}").start()
    trackers = []
    try:
        for r in range(replicas):
            t = LocalTracker(work / f"tracker-{replicas}-{r}", "--store", redis.url, "--node-ttl", "60",
                             "--heartbeat", "10", secret=SECRET)
            t.start()
            trackers.append(t)
        load = Load([t.url for t in trackers], args.nodes, args.images)
        before = await redis_memory(redis)
        conn = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
            load.session = s
            join = await load.join()
            after = await redis_memory(redis)
            for k in load.lat:
                load.lat[k].clear()
            pids = {"replicas": [t.proc.pid for t in trackers], "redis": [redis.proc.pid], "generator": [os.getpid()]}
            cpu0 = {k: sum(sum(cpu_times(p)) for p in v) for k, v in pids.items()}
            t0 = time.perf_counter()
            achieved = await load.steady(args.seconds, args.lookups, args.heartbeat,
                                         1 if args.full_announces else FULL_EVERY, args.deltas == "apart")
            wall = time.perf_counter() - t0
            cpu = {k: sum(sum(cpu_times(p)) for p in v) - cpu0[k] for k, v in pids.items()}
        served = sum(len(v) for v in load.lat.values())
        pairs = sum(len(load.images_of(i)) for i in range(args.nodes))
        return {
            "replicas": replicas, "nodes": args.nodes, "join_seconds": join,
            "join_requests_per_s": 2 * args.nodes / join,
            "achieved_per_s": achieved,
            "p50_ms": {k: pct(v, 0.5) for k, v in load.lat.items() if v},
            "p99_ms": {k: pct(v, 0.99) for k, v in load.lat.items() if v},
            "errors": load.errors, "why": load.why,
            "redis_bytes_per_node": (after - before) / args.nodes,
            "redis_bytes_per_node_image": (after - before) / pairs,
            "chunks_held_per_node_image": len(load.held),
            # What bounds the figures on a shared machine: the replicas' CPU per request (theirs
            # to have on cores of their own), and how busy the whole machine was.
            "replica_cpu_ms_per_request": 1000 * cpu["replicas"] / max(served, 1),
            "cpu_s": cpu, "busy_share": sum(cpu.values()) / (wall * (os.cpu_count() or 1)),
        }
    finally:
        for t in trackers:
            t.stop()
        redis.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--lookups", type=float, default=200, help="lookups per second in the steady state")
    ap.add_argument("--heartbeat", type=float, default=10,
                    help="seconds between a node's announces (the daemon's default 10); as many deltas")
    ap.add_argument("--full-announces", action="store_true",
                    help="every heartbeat a full announce (the daemon before light heartbeats)")
    ap.add_argument("--deltas", choices=("in-heartbeats", "apart"), default="in-heartbeats",
                    help="a node's deltas are its light heartbeats (the daemon's announcer), or as many "
                         "again, each a request of its own (the load before it held deltas)")
    ap.add_argument("--runs", type=int, default=1, help="times the whole thing runs, fresh Redis and trackers each")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    made = provenance()  # the code as the run starts
    results = []
    with tempfile.TemporaryDirectory(prefix="thunderfs-load-") as tmp:
        for run, replicas in ((r, int(n)) for r in range(args.runs) for n in args.replicas.split(",")):
            res = {"run": run, **asyncio.run(run_one(Path(tmp) / f"run{run}", replicas, args))}
            results.append(res)
            a, p50, p99 = res["achieved_per_s"], res["p50_ms"], res["p99_ms"]
            print(f"run {run + 1}: {replicas} replica(s), {res['nodes']} nodes: join {res['join_seconds']:.0f}s "
                  f"({res['join_requests_per_s']:.0f} req/s)")
            for k in ("announce", "alive", "delta", "lookup"):
                if not a.get(k):
                    continue
                print(f"  {k:8s} {a[k]:6.0f}/s  p50 {p50.get(k, float('nan')):6.1f} ms  "
                      f"p99 {p99.get(k, float('nan')):7.1f} ms")
            print(f"  lookup p99 {p99.get('lookup', float('nan')):.1f} ms (target < 20); errors {res['errors'] or 0}")
            for status, why in res["why"].items():
                print(f"    {status}: {why}")
            print(f"  replicas' CPU {res['replica_cpu_ms_per_request']:.2f} ms per request; CPU s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_s"].items())
                  + f"; the machine {res['busy_share']:.0%} busy")
            print(f"  Redis: {res['redis_bytes_per_node']:.0f} B per node, {res['redis_bytes_per_node_image']:.0f} B "
                  f"per node-image held ({res['chunks_held_per_node_image']} chunks each; target < 1024)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**made, "nodes": args.nodes, "heartbeat": args.heartbeat,
                                         "heartbeats": "full" if args.full_announces else f"light, full every {FULL_EVERY}",
                                         "deltas": args.deltas,
                                         "seconds": args.seconds, "lookups_per_s": args.lookups,
                                         "by_replicas": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
