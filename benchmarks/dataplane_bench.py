"""Issue 19's targets, each beside its baseline in the same run, with the daemon's CPU per GiB.

  cold   the whole image read cold through a fresh mount, 1 MiB reads (buffered, or O_DIRECT with
         ``--reader direct``; the peer step reads the same way)  vs  curl from the same
         Glance to /dev/null, and to a local file then ``sync`` (what Nova's download does).
         Beside them, what bounds the daemon: its own Glance client (httpx on trio) receiving
         the image and dropping it, in one request and in requests of the size the daemon made
         in the same run, one after another; and the same requests written into a ChunkStore
         as the daemon writes them (no FUSE, no reader).
  warm   fio jobs (benchmarks/fio/) through a warm mount  vs  the same jobs on the image as a
         local file; the page cache of both (the daemon's cache file included) dropped first.
         ``--passthrough`` adds a second warm mount with ``--passthrough`` (complete images
         served by the kernel from the cache file).
  boot   the recorded Debian boot's reads (../shared/data/debian-boot-trace.txt, 668 reads of a
         2 GiB disk) replayed with O_DIRECT, as fast as they complete, through a cold mount with
         no profile and no peer  vs  httpdirfs (C, FUSE, 8 MiB segments, disk cache; Debian's)
         over nginx serving Glance's own copy of the same bytes; and what Glance sent per byte
         read (target <= 1.5).
  memory 64 readers at once, each its own part of a cold image (64 FUSE requests in flight):
         the daemon's peak resident memory, from Glance and from a peer (reader and holder).

CPU per GiB is the serving process's user+system time over the step, per GiB it served.  Each
step runs ``--runs`` times, interleaved with its baseline; every ratio is the median of the
per-run ratios, given with its range.

Usage: .venv/bin/python benchmarks/dataplane_bench.py [--size-mib 512] [--runs 3] [--only cold,peer,warm,boot,memory]
                          [--passthrough] [--reader buffered|direct] [--json benchmarks/results/dataplane.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness import boot_trace
from benchmarks.record import provenance, spread
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount, thunderfs
from harness.nginx import write_conf
from harness.pagecache import drop_page_cache
from thunderfs_common import chunk_digest
from benchmarks.read_bench import cpu_times, direct_read, make_image, peak_rss, seq_read

MiB, GiB = 2**20, 2**30
JOBS = REPO / "benchmarks" / "fio"
WARM_JOBS = {  # job -> (what the ratio is of, target ratio or None)
    "rand4k-libaio-direct": ("iops", 0.2),
    "seq1m-libaio-direct": ("bw", 0.6),
    "rand4k-psync-direct": ("iops", 0.6),
    "seq1m-psync-direct": ("bw", 1.0),
}


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def fio(job: str, target: Path, runtime: int, *backing: Path) -> dict:
    drop_page_cache(target)
    for b in backing:
        drop_page_cache(b)
    env = {**os.environ, "TARGET": str(target), "RUNTIME": str(runtime)}
    out = subprocess.run(["fio", "--output-format=json", str(JOBS / f"{job}.fio")], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"fio {job} on {target}: {out.stderr.strip()[-500:]}")
    read = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    return {"bw": read["bw_bytes"] / MiB, "iops": read["iops"], "bytes": read["io_bytes"]}


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def curl(url: str, out: str) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", out, url], check=True)
    if out != "/dev/null":
        subprocess.run(["sync", out], check=True)
    return time.perf_counter() - t


def client_read(glance: LocalGlance, image_id: str, size: int, request: int, concurrency: int = 1,
                store=None) -> float:
    """Seconds the daemon's Glance client (``GlanceSource.read_range``, the lean receive path)
    takes to read the image in requests of ``request`` bytes, ``concurrency`` at a time; with
    ``store``, every piece staged into it as the daemon does, and committed."""
    import trio

    from thunderfs.config import MountConfig
    from thunderfs.fetch.glance_source import GlanceSource
    from thunderfs_common.glance_client import GlanceClient

    cs = MountConfig.__dataclass_fields__["chunk_size"].default  # the daemon's default chunk

    async def run() -> float:
        async with GlanceClient(glance.url) as origin:
            src = GlanceSource(origin, chunk_size=cs, max_chunks=request // cs, fetch_timeout=30,
                               concurrency=concurrency)
            img = store.image(b"floor", size) if store else None

            def on_piece(offset: int, view, buffer=None) -> None:
                if store is not None and not store.stage(img, offset // cs, view):
                    raise RuntimeError("the floor's cache refused a piece")

            todo = list(range(0, size, request))

            async def worker() -> None:
                while todo:
                    a = todo.pop(0)
                    await src.read_range(image_id, a, min(size, a + request), on_piece)

            t = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
            if store is not None:
                await store.commit()
            elapsed = time.perf_counter() - t
            await src.aclose()
            return elapsed

    return trio.run(run)


def client_floor(glance: LocalGlance, image_id: str, size: int, request: int, work: Path) -> dict:
    """Seconds the daemon's Glance client takes to receive the image (nothing done with the
    bytes): in one request (``whole``), in requests of ``request`` bytes (``sized``); and in
    those requests with every piece staged into a ChunkStore and committed (``cached``)."""
    from thunderfs.cache.index import ChunkIndex
    from thunderfs.cache.store import ChunkStore
    from thunderfs.config import MountConfig

    cs = MountConfig.__dataclass_fields__["chunk_size"].default
    out = {"whole": client_read(glance, image_id, size, size), "sized": client_read(glance, image_id, size, request)}
    root = work / "floor-cache"
    store = ChunkStore(root, ChunkIndex(root / "index"), cs, 2 * size)
    try:
        out["cached"] = client_read(glance, image_id, size, request, store=store)
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def glance_cpu(glance: LocalGlance) -> float:
    """CPU seconds of Glance's processes (gunicorn and its workers) so far."""
    pid = glance.proc.pid
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(cpu_seconds(int(p)) for p in [pid, *kids])


def request_sweep(glance: LocalGlance, image_id: str, size: int) -> dict:
    """The daemon's Glance client alone (no cache) reading the image in requests of each size,
    one or four at a time: the rate, and Glance's own CPU per GiB (its fixed cost per request is
    what larger requests save), so that the best size is measured."""
    out = {}
    for request in (4 * MiB, 16 * MiB, 64 * MiB):
        for concurrency in (1, 4):
            g0 = glance_cpu(glance)
            secs = client_read(glance, image_id, size, request, concurrency)
            gcpu = glance_cpu(glance) - g0
            key = f"{request // MiB}MiB_x{concurrency}"
            out[key] = {"mibs": size / secs / MiB, "glance_cpu_s_per_gib": gcpu / (size / GiB)}
            print(f"  requests of {request // MiB:2d} MiB, {concurrency} at a time: {size / secs / MiB:5.0f} MiB/s, "
                  f"Glance {gcpu / (size / GiB):.2f} CPU s/GiB", flush=True)
    best = max(out, key=lambda k: out[k]["mibs"])
    print(f"cold: the best request size here: {best.replace('_x', ', ')} at a time")
    return out


def cold_step(work: Path, glance: LocalGlance, image_id: str, size: int, runs: int, extra: list[str],
              read=seq_read) -> dict:
    url = f"{glance.url}/v2/images/{image_id}/file"
    rows: dict[str, list[float]] = {k: [] for k in ("null_mibs", "file_mibs", "tfs_mibs", "ratio_null",
                                                    "ratio_file", "cpu_s_per_gib", "request_mib",
                                                    "client_whole_mibs", "client_sized_mibs",
                                                    "client_cached_mibs", "client_whole_ratio_null",
                                                    "client_sized_ratio_null", "client_cached_ratio_null")}
    for i in range(runs):
        null = curl(url, "/dev/null")
        copy = work / "copy.raw"
        to_file = curl(url, str(copy))
        copy.unlink()
        m = Mount(work / f"mnt-cold{i}", glance.url, work / f"cache-cold{i}", "--cache-size",
                  f"{2 * size // MiB}M", *extra)
        try:
            m.mount()
            img = m.image(image_id)
            img.stat()  # the listing, not the read
            cpu0 = cpu_seconds(m.pid)
            secs, n = read(img)
            cpu = cpu_seconds(m.pid) - cpu0
            assert n == size, (n, size)
            requests = m.stats()["glance"]["range_requests"]
        finally:
            m.cleanup()
            shutil.rmtree(work / f"cache-cold{i}", ignore_errors=True)
        rows["null_mibs"].append(size / null / MiB)
        rows["file_mibs"].append(size / to_file / MiB)
        rows["tfs_mibs"].append(size / secs / MiB)
        rows["ratio_null"].append(null / secs)
        rows["ratio_file"].append(to_file / secs)
        rows["cpu_s_per_gib"].append(cpu / (size / GiB))
        request = -(-size // max(1, requests) // MiB) * MiB  # the daemon's mean request, whole MiB
        floor = client_floor(glance, image_id, size, request, work)
        rows["request_mib"].append(request / MiB)
        for k, v in floor.items():
            rows[f"client_{k}_mibs"].append(size / v / MiB)
            rows[f"client_{k}_ratio_null"].append(null / v)
        print(f"  run {i + 1}: curl>/dev/null {size / null / MiB:.0f} MiB/s, curl>file+sync "
              f"{size / to_file / MiB:.0f} MiB/s, thunderfs {size / secs / MiB:.0f} MiB/s "
              f"({cpu / (size / GiB):.2f} CPU s/GiB, {requests} Glance requests); its Glance client "
              f"alone: {size / floor['whole'] / MiB:.0f} MiB/s in one request, "
              f"{size / floor['sized'] / MiB:.0f} in {request // MiB} MiB requests, "
              f"{size / floor['cached'] / MiB:.0f} writing them to a cache", flush=True)
    out = {k: spread(v) for k, v in rows.items()}
    print(f"cold: thunderfs / curl>/dev/null {fmt(out['ratio_null'])} (target >= 0.5), "
          f"/ curl>file+sync {fmt(out['ratio_file'])} (target >= 1.5); CPU {fmt(out['cpu_s_per_gib'])} s/GiB")
    print(f"cold: the daemon's Glance client alone / curl>/dev/null: {fmt(out['client_whole_ratio_null'])} "
          f"in one request, {fmt(out['client_sized_ratio_null'])} in the daemon's requests, "
          f"{fmt(out['client_cached_ratio_null'])} writing them to a cache")
    return out


def warm_step(work: Path, glance: LocalGlance, image_id: str, native: Path, size: int, runs: int,
              runtime: int, variants: dict[str, list[str]]) -> dict:
    mounts = {}
    for name, extra in variants.items():
        m = Mount(work / f"mnt-{name}", glance.url, work / f"cache-{name}", "--cache-size",
                  f"{2 * size // MiB}M", *extra)
        m.mount()
        mounts[name] = m
        res = thunderfs("warm", str(m.path), image_id, "--quiet", timeout=900)
        if res.returncode:
            raise RuntimeError(f"warm failed: {res.stderr}")
    out: dict = {}
    if "passthrough" in mounts:
        # The first passthrough open checks the whole image (later ones within 60 s reuse it).
        drop_page_cache(mounts["passthrough"].data_file(image_id))
        t = time.perf_counter()
        os.close(os.open(mounts["passthrough"].image(image_id), os.O_RDONLY))
        out["passthrough_first_open_s"] = time.perf_counter() - t
        print(f"  first passthrough open (checks all {size // MiB} MiB): {out['passthrough_first_open_s']:.2f} s")
    try:
        for job, (key, target) in WARM_JOBS.items():
            ratios: dict[str, list[float]] = {name: [] for name in mounts}
            cpus: dict[str, list[float]] = {name: [] for name in mounts}
            natives = []
            for i in range(runs):
                nat = fio(job, native, runtime)
                natives.append(nat[key])
                line = [f"native {nat[key]:.0f}"]
                for name, m in mounts.items():
                    cpu0 = cpu_seconds(m.pid)
                    r = fio(job, m.image(image_id), runtime, m.data_file(image_id))
                    cpus[name].append((cpu_seconds(m.pid) - cpu0) / max(r["bytes"] / GiB, 1e-9))
                    ratios[name].append(r[key] / nat[key])
                    line.append(f"{name} {r[key]:.0f} ({r[key] / nat[key]:.2f} x, {cpus[name][-1]:.2f} CPU s/GiB)")
                print(f"  {job} run {i + 1} ({'MiB/s' if key == 'bw' else 'IOPS'}): " + ", ".join(line), flush=True)
            out[job] = {"unit": "MiB/s" if key == "bw" else "IOPS", "target": target,
                        "native": spread(natives),
                        **{name: {"ratio": spread(ratios[name]), "cpu_s_per_gib": spread(cpus[name])}
                           for name in mounts}}
            print(f"{job}: " + "; ".join(f"{name} {fmt(out[job][name]['ratio'])} x native" for name in mounts)
                  + f" (target >= {target})", flush=True)
    finally:
        for m in mounts.values():
            m.cleanup()
    return out


@contextlib.contextmanager
def _cluster(work: Path, glance: LocalGlance, image_id: str, size: int):
    """A tracker and a holder that has the whole image cached (read cold from Glance) and told
    the tracker so, in a cluster with a secret (every request signed); yields ``node(name)``,
    which mounts another member, and the holder."""
    from harness.tracker import LocalTracker
    secret = work / "peer-secret"
    secret.write_bytes(b"dataplane-bench-secret-0123456789")
    secret.chmod(0o600)
    tracker = LocalTracker(work / "peer-tracker", "--glance", glance.url, secret=secret.read_bytes())
    mounts: list[Mount] = []

    def node(name: str) -> Mount:
        m = Mount(work / f"mnt-{name}", glance.url, work / f"cache-{name}", "--tracker", tracker.url, "--node-id", name,
                  "--peer-listen", f"127.0.0.1:{free_port()}", "--secret-file", str(secret),
                  "--cache-size", f"{2 * size // MiB}M")
        m.mount()
        mounts.append(m)
        return m

    try:
        tracker.start()
        holder = node("holder")
        seq_read(holder.image(image_id))  # cold, from Glance: now it holds every chunk
        deadline = time.monotonic() + 60
        while not holder.stats()["announcer"]["in_sync"]:  # the tracker knows it holds them
            if time.monotonic() > deadline:
                raise RuntimeError("the holder never told the tracker what it holds")
            time.sleep(0.2)
        yield node, holder
    finally:
        for m in mounts:
            m.cleanup()
        tracker.stop()


def peer_step(work: Path, glance: LocalGlance, image_id: str, size: int, runs: int, read=seq_read) -> dict:
    """A node reads the whole image through its mount from a peer that has it cached (both in a
    cluster with a secret, every request signed): the reader's CPU per GiB received from the peer
    (every chunk's digest checked), the holder's per GiB served, and the rate."""
    rows: dict[str, list[float]] = {k: [] for k in ("mibs", "cpu_s_per_gib_received", "cpu_s_per_gib_served",
                                                    "peer_share")}
    with _cluster(work, glance, image_id, size) as (node, holder):
        for i in range(runs):
            reader = node(f"reader{i}")
            img = reader.image(image_id)
            img.stat()
            served0 = holder.stats()["peer_server"]["served_bytes"]
            cpu_r, cpu_h = cpu_seconds(reader.pid), cpu_seconds(holder.pid)
            secs, n = read(img)
            cpu_r, cpu_h = cpu_seconds(reader.pid) - cpu_r, cpu_seconds(holder.pid) - cpu_h
            assert n == size, (n, size)
            fetch = reader.stats()["fetch"]
            if os.environ.get("DEBUG_PEER"):
                print(json.dumps(reader.stats()["peers"])[:3000], json.dumps(holder.stats()["announcer"]), fetch)
            served = holder.stats()["peer_server"]["served_bytes"] - served0
            rows["mibs"].append(size / secs / MiB)
            rows["cpu_s_per_gib_received"].append(cpu_r / (size / GiB))
            rows["cpu_s_per_gib_served"].append(cpu_h / max(served / GiB, 1e-9))
            rows["peer_share"].append(fetch.get("bytes_from_peers", 0) / size)
            print(f"  run {i + 1}: from a peer {size / secs / MiB:.0f} MiB/s, {100 * rows['peer_share'][-1]:.0f} % "
                  f"of the bytes from the peer; reader {rows['cpu_s_per_gib_received'][-1]:.2f} CPU s per GiB "
                  f"received, holder {rows['cpu_s_per_gib_served'][-1]:.2f} per GiB served", flush=True)
            reader.cleanup()
            shutil.rmtree(work / f"cache-reader{i}", ignore_errors=True)
    out = {k: spread(v) for k, v in rows.items()}
    print(f"peer: reader {fmt(out['cpu_s_per_gib_received'])} CPU s per GiB received (target <= 0.8), holder "
          f"{fmt(out['cpu_s_per_gib_served'])} per GiB served (target <= 0.4); {fmt(out['mibs'], 0)} MiB/s")
    return out


READERS = 64  # concurrent readers of the memory step


def _peak_rss_reset(pid: int) -> int:
    """The process's resident memory now; its peak (VmHWM) is reset to it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss(pid)


def _concurrent_read(path: Path, size: int, readers: int = READERS) -> float:
    """``readers`` threads each read their own part of the image at once, 1 MiB O_DIRECT reads
    (each one FUSE request): as many requests in flight as readers.  Seconds."""
    import mmap
    import threading

    part = size // readers // MiB * MiB
    errors: list[BaseException] = []

    def read(k: int) -> None:
        buf = mmap.mmap(-1, MiB)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for off in range(k * part, (k + 1) * part, MiB):
                if os.preadv(fd, [buf], off) != MiB:
                    raise RuntimeError(f"short read at {off}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)
            buf.close()

    threads = [threading.Thread(target=read, args=(k,)) for k in range(readers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t


def memory_step(work: Path, glance: LocalGlance, image_id: str, size: int) -> dict:
    """Peak resident memory of the daemons while 64 readers read a cold image at once (64 FUSE
    requests in flight): from Glance (its ranges land in the receive pool, ``--receive-memory``),
    and from a peer (the reader, and the holder serving it).  The rise of each peak
    over the process's resident memory just before."""
    from thunderfs.config import MountConfig

    from thunderfs.p2p.peer_client import PeerClient
    out: dict = {"readers": READERS, "glance_pool_mib": MountConfig.__dataclass_fields__["receive_memory"].default / MiB,
                 "peer_answers_mib": PeerClient.ANSWER_BYTES / MiB,
                 "peer_memory_kept_mib": PeerClient.KEPT_ANSWER_BYTES / MiB}
    m = Mount(work / "mnt-memory", glance.url, work / "cache-memory", "--cache-size", f"{2 * size // MiB}M")
    try:
        m.mount()
        img = m.image(image_id)
        img.stat()
        before = _peak_rss_reset(m.pid)
        secs = _concurrent_read(img, size)
        out["glance"] = {"rss_mib": before / MiB, "peak_mib": peak_rss(m.pid) / MiB,
                         "rise_mib": (peak_rss(m.pid) - before) / MiB, "mibs": size / secs / MiB}
    finally:
        m.cleanup()
        shutil.rmtree(work / "cache-memory", ignore_errors=True)
    with _cluster(work, glance, image_id, size) as (node, holder):
        reader = node("reader-memory")
        img = reader.image(image_id)
        img.stat()
        before_r, before_h = _peak_rss_reset(reader.pid), _peak_rss_reset(holder.pid)
        secs = _concurrent_read(img, size)
        fetch = reader.stats()["fetch"]
        out["peer"] = {"reader_rss_mib": before_r / MiB, "reader_peak_mib": peak_rss(reader.pid) / MiB,
                       "reader_rise_mib": (peak_rss(reader.pid) - before_r) / MiB,
                       "holder_rss_mib": before_h / MiB, "holder_peak_mib": peak_rss(holder.pid) / MiB,
                       "holder_rise_mib": (peak_rss(holder.pid) - before_h) / MiB, "mibs": size / secs / MiB,
                       "peer_share": fetch.get("bytes_from_peers", 0) / size}
    g, p = out["glance"], out["peer"]
    print(f"memory, {READERS} readers at once: from Glance the daemon's peak RSS {g['peak_mib']:.0f} MiB "
          f"(+{g['rise_mib']:.0f} over {g['rss_mib']:.0f}; receive pool {out['glance_pool_mib']} MiB); from a peer "
          f"({100 * p['peer_share']:.0f} % of the bytes) the reader's {p['reader_peak_mib']:.0f} MiB "
          f"(+{p['reader_rise_mib']:.0f}), the holder's {p['holder_peak_mib']:.0f} MiB (+{p['holder_rise_mib']:.0f})")
    return out


def _index_updates(size: int, cs: int, batch: int = 1024) -> None:
    """The cache index's work for ``size`` bytes of chunks: each put once (cached) and touched
    once (read), in durable commits of ``batch`` as the committer makes them."""
    from thunderfs.cache.index import ChunkIndex, Put

    with tempfile.TemporaryDirectory(prefix="thunderfs-stages-index-", dir="/var/tmp") as tmp:
        index = ChunkIndex(Path(tmp))
        try:
            index.check_layout(cs)
            content, n = os.urandom(16), size // cs
            for first in range(0, n, batch):
                index.commit(puts=[Put(content, c, cs, c, 1) for c in range(first, min(n, first + batch))])
            for first in range(0, n, batch):
                index.commit(touches=[(content, c, 2) for c in range(first, min(n, first + batch))])
        finally:
            index.close()


def stage_costs(size: int = 256 * MiB) -> dict:
    """CPU per GiB of each stage of the data path on its own, in this process, on buffers that are
    reused as the daemon's are: what the whole is made of (the rest is FUSE, Python and the loop)."""
    import mmap
    import resource

    import xxhash

    def cpu(fn) -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (size / GiB)

    cs, piece = 64 * 1024, MiB
    buf = mmap.mmap(-1, piece)
    buf.write(os.urandom(piece))
    view = memoryview(buf)
    path = Path(tempfile.mkdtemp(prefix="thunderfs-stages-", dir="/var/tmp")) / "data"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    os.ftruncate(fd, size)
    try:
        out = {
            "xxh3 (cache check, twice a chunk)": 2 * cpu(lambda: [xxhash.xxh3_64_intdigest(view[i:i + cs])
                                                                    for _ in range(size // piece)
                                                                    for i in range(0, piece, cs)]),
            "BLAKE3 (a peer's chunks: the manifest's digest)": cpu(lambda: [chunk_digest.digest(view[i:i + cs])
                                                                           for _ in range(size // piece)
                                                                           for i in range(0, piece, cs)]),
            "sha256 (the manifest's digest before)": cpu(lambda: [hashlib.sha256(view[i:i + cs]).digest()
                                                                  for _ in range(size // piece)
                                                                  for i in range(0, piece, cs)]),
            "cache write, O_DIRECT": cpu(lambda: [os.pwrite(dfd, view, o) for o in range(0, size, piece)]),
            "read back, O_DIRECT": cpu(lambda: [os.preadv(dfd, [view], o) for o in range(0, size, piece)]),
        }
        out["index update (a put and a touch per chunk, 1,024 a commit)"] = cpu(lambda: _index_updates(size, cs))
        os.close(dfd)
        dfd = -1
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        out["cache write, page cache (for comparison)"] = cpu(
            lambda: [os.pwrite(fd, view, o) for o in range(0, size, piece)] and os.fdatasync(fd))
    finally:
        if dfd >= 0:
            os.close(dfd)
        os.close(fd)
        shutil.rmtree(path.parent, ignore_errors=True)
    for k, v in out.items():
        print(f"  stage: {k:42s} {v:.2f} CPU s/GiB")
    return out


def boot_step(work: Path, glance: LocalGlance, runs: int) -> dict:
    """The boot trace cold: thunderfs (no profile, no peer) vs httpdirfs over nginx."""
    for tool in ("nginx", "httpdirfs"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is not installed: scripts/setup.sh --bench installs it")
    reads = boot_trace.load()
    wanted = sum(r.size for r in reads)
    disk = work / "boot.raw"
    make_image(disk, 2 * GiB)
    boot_id = glance.upload("boot", disk)["id"]
    disk.unlink()
    root = work / "www"
    root.mkdir()
    (root / "disk.raw").symlink_to(glance.dir / "images" / boot_id)
    port = free_port()
    write_conf(work, f"    server {{ listen 127.0.0.1:{port}; root {root}; autoindex on; }}")
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(work / "nginx.conf"),
                              "-p", str(work)], start_new_session=True)
    rows: dict[str, list[float]] = {k: [] for k in ("tfs_s", "httpdirfs_s", "ratio", "glance_per_read",
                                                    "glance_requests", "cpu_s_per_gib_read", "daemon_cpu_s",
                                                    "glance_request_ms", "glance_share", "read_back_mib")}
    try:
        for i in range(runs):
            hmnt, hcache = work / f"h{i}", work / f"hcache{i}"
            hmnt.mkdir()
            hcache.mkdir()
            h = subprocess.Popen(["httpdirfs", "-f", "--no-range-check", "--cache", "--cache-location", str(hcache), "--dl-seg-size", "8",
                                  f"http://127.0.0.1:{port}/", str(hmnt)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                deadline = time.monotonic() + 30
                while not (hmnt / "disk.raw").exists():
                    if time.monotonic() > deadline or h.poll() is not None:
                        raise RuntimeError("httpdirfs did not mount")
                    time.sleep(0.1)
                h_secs = boot_trace.replay(hmnt / "disk.raw", reads)
            finally:
                subprocess.run(["fusermount3", "-u", str(hmnt)], capture_output=True)
                h.wait(30)
                shutil.rmtree(hcache, ignore_errors=True)
            m = Mount(work / f"mnt-boot{i}", glance.url, work / f"cache-boot{i}")
            try:
                m.mount()
                img = m.image(boot_id)
                img.stat()
                before = m.stats()["glance"]
                cpu0 = cpu_seconds(m.pid)
                t_secs = boot_trace.replay(img, reads)
                cpu = cpu_seconds(m.pid) - cpu0
                stats = m.stats()
                after = stats["glance"]
                sent = after["bytes"] - before["bytes"]
                requests = after["range_requests"] - before["range_requests"]
                # What a Glance request took (the daemon's moving average), and what the cache
                # read back from its file (and checked) rather than serve from a receive buffer.
                request_ms = stats["fetch"]["origin_request_ms"] or 0.0
                read_back = stats["cache"]["bytes_checked"]
            finally:
                m.cleanup()
                shutil.rmtree(work / f"cache-boot{i}", ignore_errors=True)
            rows["tfs_s"].append(t_secs)
            rows["httpdirfs_s"].append(h_secs)
            rows["ratio"].append(t_secs / h_secs)
            rows["glance_per_read"].append(sent / wanted)
            rows["glance_requests"].append(requests)
            rows["cpu_s_per_gib_read"].append(cpu / (wanted / GiB))
            rows["daemon_cpu_s"].append(cpu)
            rows["glance_request_ms"].append(request_ms)
            rows["glance_share"].append(requests * request_ms / 1000 / t_secs)  # the replay waits on each in turn
            rows["read_back_mib"].append(read_back / MiB)
            print(f"  run {i + 1}: httpdirfs {h_secs:.2f} s, thunderfs {t_secs:.2f} s ({t_secs / h_secs:.2f} x), "
                  f"Glance sent {sent / MiB:.1f} MiB for {wanted / MiB:.1f} MiB read ({sent / wanted:.2f}) "
                  f"in {requests} requests of about {request_ms:.1f} ms each; the daemon {cpu:.2f} CPU s, "
                  f"{read_back / MiB:.1f} MiB read back from its cache file",
                  flush=True)
    finally:
        nginx.terminate()
        nginx.wait(30)
    out = {k: spread(v) for k, v in rows.items()}
    print(f"boot trace cold, no profile: thunderfs / httpdirfs {fmt(out['ratio'])} (target <= 1.0); "
          f"Glance bytes per byte read {fmt(out['glance_per_read'])} (target <= 1.5); Glance's requests, "
          f"one after the other, {fmt(out['glance_share'])} of thunderfs's time")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds of each time-based fio job")
    ap.add_argument("--only", default="cold,peer,warm,boot,memory")
    ap.add_argument("--passthrough", action="store_true", help="also a warm mount with --passthrough")
    ap.add_argument("--reader", choices=("buffered", "direct"), default="buffered",
                    help="how the cold and peer steps read the image: buffered 1 MiB reads (the kernel "
                         "fills the mount's page cache: the headline) or O_DIRECT ones (qemu's cache=none, "
                         "Nova's default: the reply lands in the reader's own buffer)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict = {**provenance(), "size_mib": args.size_mib,
                     "runs": args.runs, "reader": args.reader}
    read = seq_read if args.reader == "buffered" else direct_read
    with tempfile.TemporaryDirectory(prefix="thunderfs-dataplane-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        glance = LocalGlance(work / "glance")
        try:
            glance.start()
            native = work / "native.raw"
            make_image(native, args.size_mib * MiB)
            image_id = glance.upload("dataplane", native)["id"]
            size = native.stat().st_size
            print(f"image {args.size_mib} MiB of random bytes; real Glance on loopback; commit {results['commit']}; "
                  f"{args.reader} 1 MiB reads")
            if "cold" in only:
                results["cold"] = cold_step(work, glance, image_id, size, args.runs, [], read)
                results["stages"] = stage_costs()
                results["request_sizes"] = request_sweep(glance, image_id, size)
            if "peer" in only:
                results["peer"] = peer_step(work, glance, image_id, size, args.runs, read)
            if "warm" in only:
                variants = {"thunderfs": []}
                if args.passthrough:
                    variants["passthrough"] = ["--passthrough"]
                results["warm"] = warm_step(work, glance, image_id, native, size, args.runs, args.runtime, variants)
            if "boot" in only:
                results["boot"] = boot_step(work, glance, args.runs)
            if "memory" in only:
                results["memory"] = memory_step(work, glance, image_id, size)
        finally:
            glance.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
