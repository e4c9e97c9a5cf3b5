"""The peer serving path (h11 on trio, in the daemon): what one node can give its peers.

One daemon on loopback with an image fully cached; every request signed, as in a cluster.
Side by side, in one run:

  glance   curl of the whole image from the real Glance (the baseline a node would otherwise use)
  curl     curl fetching the image from the peer server in 16 MiB requests (one curl process,
           the server's throughput without a Python client in the way)
  client   the daemon's own peer client (httpx on trio, sha256 checked against the manifest, as
           PeerSource does it), 4 requests at a time, at 64 KiB (one chunk) and 1 MiB requests

Usage: .venv/bin/python benchmarks/peer_serve_bench.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.local_glance import LocalGlance, free_port  # noqa: E402
from harness.mounts import Mount  # noqa: E402
from harness.tracker import LocalTracker  # noqa: E402
from thunderfs_common.signing import sign  # noqa: E402

SECRET = b"peer-serve-bench-secret-0123456789"
MiB = 2**20
CHUNK = 64 * 2**10


def curl_rate(args: list[str], nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", *args], check=True)
    return nbytes / MiB / (time.perf_counter() - t)


async def client_rate(base: str, content: str, nchunks: int, per_request: int, digests: list[bytes],
                      concurrency: int = 4) -> tuple[float, float]:
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
                resp = await http.get(base + path, headers=sign(SECRET, "bench", "GET", path))
                resp.raise_for_status()
                view = memoryview(resp.content)
                for i in range(count):
                    assert hashlib.sha256(view[i * CHUNK:(i + 1) * CHUNK]).digest() == digests[first + i]
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
    args = ap.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="thunderfs-serve-") as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        tracker = mount = None
        try:
            glance.start()
            data = os.urandom(size)
            digests = [hashlib.sha256(data[i:i + CHUNK]).digest() for i in range(0, size, CHUNK)]
            (work / "image.raw").write_bytes(data)
            image_id = glance.upload("serve", work / "image.raw")["id"]
            (work / "image.raw").unlink()
            del data
            tracker = LocalTracker(work / "tracker", "--glance", glance.url, secret=SECRET)
            tracker.start()
            secret = work / "secret"
            secret.write_bytes(SECRET)
            secret.chmod(0o600)
            port = free_port()
            mount = Mount(work / "mnt", glance.url, work / "cache", "--tracker", tracker.url,
                          "--peer-listen", f"127.0.0.1:{port}", "--secret-file", str(secret),
                          "--cache-size", f"{2 * args.size_mib}M")
            mount.mount()
            with open(mount.image(image_id), "rb") as f:
                while f.read(MiB):
                    pass
            content = os.getxattr(mount.image(image_id), "user.thunderfs.content_key").decode()
            base = f"http://127.0.0.1:{port}"
            nchunks = size // CHUNK

            print(f"image {args.size_mib} MiB, cached on one daemon; loopback; 2 cores")
            glance_rate = curl_rate([f"{glance.url}/v2/images/{image_id}/file"], size)
            print(f"  glance  curl whole image from Glance            {glance_rate:8.0f} MiB/s   1.00 x")
            per = 16 * MiB // CHUNK
            cfg = []
            for first in range(0, nchunks, per):
                path = f"/v1/chunks/{content}/{first}/{min(per, nchunks - first)}"
                cfg.append(f'url = "{base}{path}"\noutput = "/dev/null"\n' + "".join(
                    f'header = "{k}: {v}"\n' for k, v in sign(SECRET, "bench", "GET", path).items()))
            (work / "curl.cfg").write_text("next\n".join(cfg))
            rate = curl_rate(["-K", str(work / "curl.cfg")], size)
            print(f"  curl    peer server, 16 MiB requests            {rate:8.0f} MiB/s  {rate / glance_rate:5.2f} x")
            for per_request in (1, 16):
                mibs, rps = trio.run(client_rate, base, content, nchunks, per_request, digests)
                label = f"{per_request * CHUNK // 1024} KiB requests, verified"
                print(f"  client  peer server, {label:27s} {mibs:8.0f} MiB/s  {mibs / glance_rate:5.2f} x"
                      f"   {rps:6.0f} requests/s")
            served = mount.stats()["peer_server"]
            print(f"  peer server: {served['requests']} requests, {served['served_bytes'] / MiB:.0f} MiB served, "
                  f"{served['busy']} busy")
        finally:
            if mount:
                mount.cleanup()
            if tracker:
                tracker.stop()
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
