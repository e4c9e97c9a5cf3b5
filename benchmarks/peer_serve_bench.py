"""The peer serving path (h11 on trio, in the daemon): what one node can give its peers, with and
without membership (signed requests), side by side.

Two daemons on loopback with the same image fully cached: one in a cluster with a secret (every
request signed and checked), one without.  In one run:

  glance   curl of the whole image from the real Glance (the baseline a node would otherwise use)
  curl     curl fetching the image from the peer server in 16 MiB requests (one curl process,
           the server's throughput without a Python client in the way)
  client   the daemon's own peer client (httpx on trio, each chunk's digest checked against the manifest, as
           PeerSource does it), 4 requests at a time, at 64 KiB (one chunk) and 1 MiB requests,
           signed to the daemon with the secret and unsigned to the other, in alternating rounds

Usage: .venv/bin/python benchmarks/peer_serve_bench.py [--size-mib 256] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent

from benchmarks.record import provenance, spread
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount
from harness.tracker import LocalTracker
from thunderfs_common import chunk_digest
from thunderfs_common.signing import sign

SECRET = b"peer-serve-bench-secret-0123456789"
MiB = 2**20
CHUNK = 64 * 2**10


def curl_rate(args: list[str], nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", *args], check=True)
    return nbytes / MiB / (time.perf_counter() - t)


async def client_rate(base: str, content: str, nchunks: int, per_request: int, digests: list[bytes],
                      secret: bytes | None, concurrency: int = 4) -> tuple[float, float]:
    """MiB/s and requests/s fetching every chunk, ``per_request`` chunks a request, verified."""
    todo = list(range(0, nchunks, per_request))
    done = 0
    async with httpx.AsyncClient(timeout=30) as http:
        async def worker():
            nonlocal done
            while todo:
                first = todo.pop()
                count = min(per_request, nchunks - first)
                path = f"/v1/chunks/{content}/{first}/{count}"
                resp = await http.get(base + path, headers=sign(secret, "bench", "GET", path) if secret else {})
                resp.raise_for_status()
                view = memoryview(resp.content)
                for i in range(count):
                    assert chunk_digest.digest(view[i * CHUNK:(i + 1) * CHUNK]) == digests[first + i]
                done += len(view)

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - t
    return done / MiB / elapsed, -(-nchunks // per_request) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the client runs")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    out: dict = {**provenance(), "size_mib": args.size_mib, "rounds": args.rounds}
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="thunderfs-serve-") as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        trackers, mounts = [], []
        try:
            glance.start()
            data = os.urandom(size)
            digests = chunk_digest.digests(data, CHUNK)
            (work / "image.raw").write_bytes(data)
            image_id = glance.upload("serve", work / "image.raw")["id"]
            (work / "image.raw").unlink()
            del data
            secret = work / "secret"
            secret.write_bytes(SECRET)
            secret.chmod(0o600)
            bases, contents = {}, {}
            for kind, key in (("signed", SECRET), ("open", None)):
                tracker = LocalTracker(work / f"tracker-{kind}", "--glance", glance.url, secret=key)
                tracker.start()
                trackers.append(tracker)
                port = free_port()
                mount = Mount(work / f"mnt-{kind}", glance.url, work / f"cache-{kind}", "--tracker", tracker.url,
                              "--peer-listen", f"127.0.0.1:{port}", *(["--secret-file", str(secret)] if key else []),
                              "--cache-size", f"{2 * args.size_mib}M")
                mount.mount()
                mounts.append(mount)
                with open(mount.image(image_id), "rb") as f:
                    while f.read(MiB):
                        pass
                contents[kind] = os.getxattr(mount.image(image_id), "user.thunderfs.content_key").decode()
                bases[kind] = f"http://127.0.0.1:{port}"
            content, base = contents["signed"], bases["signed"]
            nchunks = size // CHUNK

            print(f"image {args.size_mib} MiB, cached on two daemons (one with a secret, one without); loopback; "
                  f"2 cores")
            glance_rate = curl_rate([f"{glance.url}/v2/images/{image_id}/file"], size)
            print(f"  glance  curl whole image from Glance            {glance_rate:8.0f} MiB/s   1.00 x")
            out["glance_curl_mibs"] = glance_rate
            per = 16 * MiB // CHUNK
            cfg = []
            for first in range(0, nchunks, per):
                path = f"/v1/chunks/{content}/{first}/{min(per, nchunks - first)}"
                cfg.append(f'url = "{base}{path}"\noutput = "/dev/null"\n' + "".join(
                    f'header = "{k}: {v}"\n' for k, v in sign(SECRET, "bench", "GET", path).items()))
            (work / "curl.cfg").write_text("next\n".join(cfg))
            rate = curl_rate(["-K", str(work / "curl.cfg")], size)
            print(f"  curl    peer server, 16 MiB requests            {rate:8.0f} MiB/s  {rate / glance_rate:5.2f} x")
            out["peer_curl_mibs"] = rate
            for per_request in (1, 16):
                rates: dict[str, list[tuple[float, float]]] = {"signed": [], "open": []}
                for _ in range(args.rounds):  # alternating, so that the machine's drift falls on both
                    for kind, key in (("signed", SECRET), ("open", None)):
                        rates[kind].append(trio.run(client_rate, bases[kind], contents[kind], nchunks, per_request,
                                                    digests, key))
                label = f"{per_request * CHUNK // 1024} KiB requests, verified"
                med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
                for kind in ("signed", "open"):
                    mibs, rps = med[kind]
                    each = ", ".join(f"{m:.0f}" for m, _ in rates[kind])
                    print(f"  client  {kind:6s} peer server, {label:27s} {mibs:8.0f} MiB/s  {mibs / glance_rate:5.2f} x"
                          f"   {rps:6.0f} requests/s   (median of {args.rounds}: {each})")
                ratio = med["signed"][0] / med["open"][0]
                print(f"          signed / open at {per_request * CHUNK // 1024} KiB: {ratio:.2f} x "
                      f"(target >= 0.8 x: {'met' if ratio >= 0.8 else 'MISSED'})")
                out[f"client_{per_request * CHUNK // 1024}k"] = {
                    **{f"{kind}_mibs": spread([m for m, _ in rates[kind]]) for kind in rates},
                    **{f"{kind}_requests_per_s": spread([r for _, r in rates[kind]]) for kind in rates},
                    "signed_over_open": ratio}
            for kind, m in zip(("signed", "open"), mounts):
                served = m.stats()["peer_server"]
                print(f"  peer server ({kind}): {served['requests']} requests, "
                      f"{served['served_bytes'] / MiB:.0f} MiB served, {served['busy']} busy, {served['refused']} refused")
        finally:
            for m in mounts:
                m.cleanup()
            for t in trackers:
                t.stop()
            glance.stop()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
