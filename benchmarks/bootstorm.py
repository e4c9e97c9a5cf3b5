"""The boot storm: N compute nodes boot one image at once, three ways, measured at Glance.

Every node is a thunderfs daemon in its own network namespace, its link shaped with tbf;
Glance (behind a pass-through proxy that counts what it sends: measured at Glance, not by the
nodes) and the tracker sit behind a link shaped too.  The image is the Debian disk of
``benchmarks/debian_image.sh`` in a real Glance.  Ways, in one run:

  thunderfs    peers and prefetch: a profile recorded once beforehand by a node that then leaves
               (its Glance bytes reported apart, like the manifest), then N fresh nodes
  thunderfs-new  N fresh nodes boot an image nobody has read (uploaded for the run: no manifest,
               no profile): the tracker seeds it; Glance egress counts the tracker's reads, and
               its whole-image check, after the storm, is reported apart
  glance-only  thunderfs without a tracker: every node fetches its own chunks from Glance
  nova         each node downloads the whole image from Glance, then boots from its local copy

What a boot is (--mode):
  replay-paced  the recorded boot's reads (../shared/data/debian-boot-trace.txt) replayed through
                the node's mount at the recorded pace: a TCG guest's boot, I/O side only
  replay-fast   the same reads as fast as they complete: a KVM guest, where I/O sets the pace
  vm            real qemu VMs (TCG), a qcow2 overlay backed by the node's mount path; two cores
                hold few of them at once, say so with the figures

Prints per way: each boot's time, the slowest against one node booting alone from a warm cache,
Glance's egress against the bytes one boot reads, bytes by source; writes everything (with a
timeline of bytes by source) to --out as JSON for ``benchmarks/plots.py`` and the model.
Cleans up (namespaces, tc, mounts, qemu) also when interrupted.

Usage: .venv/bin/python benchmarks/bootstorm.py [--nodes 32] [--mode replay-paced]
       [--ways thunderfs,thunderfs-new,glance-only,nova] [--nova-nodes 4] [--node-rate 1gbit] [--glance-rate 1gbit]
       [--out /var/tmp/thunderfs-bench/results/bootstorm-replay-paced-32.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness import boot_trace
from benchmarks import storm_model
from benchmarks.record import provenance
from harness.fault_proxy import FaultProxy
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount, thunderfs
from harness.netns import Lan
from harness.pagecache import drop_page_cache
from harness.local_redis import LocalRedis
from harness.tracker import LocalTracker
from thunderfs_common.signing import sign

SECRET = b"bootstorm-secret-0123456789abcdef"
MiB = 2**20


def check_prerequisites(mode: str) -> None:
    missing = [tool for tool in ("ip", "tc", "nsenter", "curl", "debootstrap", "mke2fs") if not shutil.which(tool)]
    if mode == "vm":
        missing += [t for t in ("qemu-system-x86_64", "qemu-img") if not shutil.which(t)]
    if os.geteuid() != 0:
        raise SystemExit("bootstorm needs root (network namespaces, tc, FUSE mounts)")
    if missing:
        raise SystemExit(f"bootstorm needs {', '.join(missing)}: run scripts/setup.sh --bench")
    if not boot_trace.TRACE.exists():
        raise SystemExit(f"the boot trace {boot_trace.TRACE} is missing")


class Storm:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.glance = LocalGlance(work / "glance")
        self.lan = Lan(prefix="10.205.0")
        self.proxy: FaultProxy | None = None
        self.trackers: list[LocalTracker] = []  # replicas on one Redis when --replicas > 1
        self.redis: LocalRedis | None = None
        self.nodes = []
        self.mounts: list[Mount] = []
        self.vms: list[subprocess.Popen] = []
        self.reads = boot_trace.load()
        self.boot_bytes = sum(r.size for r in self.reads)
        self.node_ttl = 2.5 * args.heartbeat

    # --- set-up and tear-down ------------------------------------------------------------------

    def up(self, disk: Path) -> None:
        self.glance.start()
        self.image_id = self.glance.upload("bootstorm", disk)["id"]
        self.size = disk.stat().st_size
        self.lan.up()
        self.lan.limit_root(self.args.glance_rate)
        self.proxy = FaultProxy(self.glance.url, host=self.lan.root_addr).start()
        self.proxy.rtt = self.args.glance_rtt / 1000  # the distance to Glance (issue 27, item 4)
        store = []
        if self.args.replicas > 1:
            self.redis = LocalRedis(self.work / "redis").start()
            store = ["--store", self.redis.url]
        for r in range(self.args.replicas):
            # The tracker's own --check-quiet: a new image is checked once its storm is over.
            t = LocalTracker(self.work / f"tracker{r}", "--glance", self.proxy.url,
                             "--heartbeat", str(self.args.heartbeat), "--node-ttl", str(self.node_ttl),
                             *store, secret=SECRET, host=self.lan.root_addr, check_quiet=None)
            t.start()
            self.trackers.append(t)
        # In a cloud Glance and the tracker have machines of their own; here they share two cores
        # with N daemons, and the scheduler would give each process 1/(N+2) of them: a tracker
        # that slow times out every node's claims into fetches from Glance.  Their weight stands
        # for their own machines (nice -10, whole process groups: gunicorn's workers too).
        for proc in (self.glance.proc, *(t.proc for t in self.trackers), *([self.redis.proc] if self.redis else [])):
            os.setpriority(os.PRIO_PGRP, proc.pid, -10)
        self.secret = self.work / "secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        for _ in range(max(self.args.nodes, 1)):
            self.nodes.append(self.lan.add_node(rate=self.args.node_rate))

    def down(self) -> None:
        for vm in self.vms:
            if vm.poll() is None:
                os.killpg(vm.pid, signal.SIGKILL)
                vm.wait()
        for m in self.mounts:
            m.cleanup()
        for t in self.trackers:
            t.stop()
        if self.redis:
            self.redis.stop()
        if self.proxy:
            self.proxy.stop()
        self.lan.down()
        self.glance.stop()

    def upload_new(self, disk: Path) -> str:
        """The same disk with its last 4 KiB made random (no boot reads them): bytes nobody has
        seen, so no manifest, no profile and no cached chunk anywhere is theirs."""
        new = self.work / "new-image.raw"
        subprocess.run(["cp", "--sparse=always", str(disk), str(new)], check=True)
        with open(new, "r+b") as f:
            f.seek(self.size - 4096)
            f.write(os.urandom(4096))
        image_id = self.glance.upload("bootstorm-new", new)["id"]
        new.unlink()
        return image_id

    def wait_manifest(self, image_id: str, timeout: float = 600) -> float:
        """Until the first tracker has the image's manifest on disk; the seconds it took."""
        path = self.trackers[0].dir / "manifests" / f"{image_id}-{64 * 1024}.json"
        started = time.monotonic()
        while not path.exists():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the manifest of {image_id} was not built in {timeout:.0f}s")
            time.sleep(0.5)
        return time.monotonic() - started

    def kill_replica(self) -> None:
        """SIGKILL the first tracker replica (its nodes move to the next)."""
        t = self.trackers[0]
        os.killpg(t.proc.pid, signal.SIGKILL)
        t.proc.wait()
        t.proc = None
        print(f"  killed tracker replica {t.url}", flush=True)

    def mount(self, i: int, name: str, peers: bool, *extra: str) -> Mount:
        n = self.nodes[i]
        args = ["--cache-size", "4G", *extra]
        if peers:
            args += ["--tracker", ",".join(t.url for t in self.trackers), "--peer-listen", f"{n.addr}:{free_port()}", "--node-id", name,
                     "--location", f"zone/rack{i % 4}/{name}", "--secret-file", str(self.secret)]
        m = Mount(self.work / f"mnt-{name}", self.proxy.url, self.work / f"cache-{name}", *args,
                  prefix=n.exec_prefix())
        self.mounts.append(m)
        m.mount()
        return m

    def calibrate(self) -> dict:
        """Glance as a node sees it, through its link and the proxy: bytes/s of one large read,
        and range requests/s of one chunk each, 8 at a time (the model's inputs)."""
        prefix = self.nodes[0].exec_prefix()
        url = f"{self.proxy.url}/v2/images/{self.image_id}/file"
        n = 256 * MiB
        t = time.perf_counter()
        subprocess.run([*prefix, "curl", "-sSf", "-o", "/dev/null", "-r", f"0-{n - 1}", url], check=True)
        byte_rate = n / (time.perf_counter() - t)
        count, chunk = 400, 64 * 1024
        offsets = [(i * 7919) % (self.size // chunk) * chunk for i in range(count)]  # scattered
        cfg = self.work / "calibrate.curl"
        cfg.write_text("next\n".join(f'url = "{url}"\nrange = "{o}-{o + chunk - 1}"\noutput = "/dev/null"\n'
                                      for o in offsets))
        t = time.perf_counter()
        subprocess.run([*prefix, "curl", "-sSf", "--no-progress-meter", "-Z", "--parallel-max", "8", "-K",
                        str(cfg)], check=True, stdout=subprocess.DEVNULL)
        return {"glance_byte_rate": byte_rate, "glance_request_rate": count / (time.perf_counter() - t)}

    def tracker_stats(self) -> dict:
        path = "/v1/stats"
        live = next(t for t in reversed(self.trackers) if t.proc is not None)
        req = urllib.request.Request(live.url + path, headers=sign(SECRET, "bootstorm", "GET", path))
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    def unmount(self, m: Mount) -> None:
        m.cleanup()
        self.mounts.remove(m)
        if self.args.keep:  # the daemon's log, for a look at what each node did
            (self.work / "logs").mkdir(exist_ok=True)
            shutil.copyfile(m.log_file, self.work / "logs" / f"{m.path.name.removeprefix('mnt-')}.log")
        shutil.rmtree(m.cache_dir, ignore_errors=True)

    # --- one boot --------------------------------------------------------------------------------

    def boot(self, path: Path, name: str) -> float:
        if self.args.mode == "vm":
            return self.boot_vm(path, name)
        return boot_trace.replay(path, self.reads, paced=self.args.mode == "replay-paced")

    def boot_vm(self, path: Path, name: str) -> float:
        from boot_bench import boot

        return boot(path, self.work, name, on_start=self.vms.append)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of what shares the nodes' two cores: the tracker (its replicas),
        Glance (its process groups: gunicorn's workers) and this process (the replaying readers
        and the proxy that counts Glance's bytes).  The daemons' own are counted by the caller."""
        t = os.times()
        return {"tracker": sum(group_cpu(tr.proc.pid) for tr in self.trackers if tr.proc is not None),
                "glance": group_cpu(self.glance.proc.pid) if self.glance.proc is not None else 0.0,
                "bench": t.user + t.system}

    # --- the storm -------------------------------------------------------------------------------

    def storm(self, way: str, targets: list[Path], prepare=None, stats=None, progress=None) -> dict:
        """Boot every target at the same moment; times, egress at Glance, a timeline."""
        n = len(targets)
        times: list[float | None] = [None] * n
        errors: list[str] = []
        barrier = threading.Barrier(n + 1)
        before, whole_before, ranges_before = self.proxy.range_bytes, self.proxy.whole_bytes, len(self.proxy.ranges)

        def run(i: int) -> None:
            try:
                barrier.wait()
                t = time.perf_counter()
                if prepare:
                    prepare(i)
                self.boot(targets[i], f"{way}-{i}")
                times[i] = time.perf_counter() - t
            except Exception as exc:  # a boot that fails is reported, and the others go on
                errors.append(f"node {i}: {exc}")
            finally:
                if progress:
                    progress()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        timeline = []
        barrier.wait()
        start = time.perf_counter()
        machine_start = last = machine_jiffies()
        procs_start = self.cpu_by_process()
        while any(th.is_alive() for th in threads):
            now = machine_jiffies()
            sample = {"t": round(time.perf_counter() - start, 2),
                      "glance": self.proxy.range_bytes + self.proxy.whole_bytes - before - whole_before,
                      # Of both cores, since the last sample (none for the first: no time yet).
                      "busy": busy_share(last, now) if timeline else None}
            last = now
            if stats:
                sample.update(stats())
            timeline.append(sample)
            time.sleep(1.0)
        end, seconds = machine_jiffies(), time.perf_counter() - start
        procs = {k: round(v - procs_start[k], 2) for k, v in self.cpu_by_process().items()}
        busy = busy_share(machine_start, end)
        return {"times": times, "errors": errors, "glance_egress": self.proxy.range_bytes - before,
                # How busy the machine's cores were from the start to the last boot's end (every
                # process and the kernel's network work): near 1, the machine bounds the storm.
                "machine": {"busy": busy, "softirq": share(machine_start, end, "softirq"),
                            "cores": os.cpu_count(), "seconds": round(seconds, 2),
                            "busy_seconds": round(busy * seconds * os.cpu_count(), 1) if busy is not None else None,
                            "cpu_seconds": procs},
                # Of that, bytes Glance sent once (the rest it sent again: the same range twice
                # or more), from the Range headers of the storm's requests.
                "glance_distinct": distinct_bytes(self.proxy.ranges[ranges_before:], self.size),
                "glance_whole": self.proxy.whole_bytes - whole_before, "timeline": timeline}


# /proc/stat's cpu line, in order; idle and iowait are the cores' idle time.
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_jiffies() -> dict[str, int]:
    """The machine's CPU time so far, by kind, in clock ticks (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:1 + len(_CPU_FIELDS)]
    return dict(zip(_CPU_FIELDS, map(int, fields)))


def share(a: dict[str, int], b: dict[str, int], *kinds: str) -> float | None:
    """The share of all cores' time between two ``machine_jiffies`` that went to ``kinds``."""
    total = sum(b.values()) - sum(a.values())
    return round(sum(b[k] - a[k] for k in kinds) / total, 3) if total > 0 else None


def busy_share(a: dict[str, int], b: dict[str, int]) -> float | None:
    return share(a, b, *(k for k in _CPU_FIELDS if k not in ("idle", "iowait")))


def distinct_bytes(ranges: list[str], size: int) -> int:
    """How many bytes of the image the Range headers ``bytes=A-B`` cover, each byte once."""
    spans = []
    for header in ranges:
        for part in header.removeprefix("bytes=").split(","):
            a, _, b = part.strip().partition("-")
            if a.isdigit():
                spans.append((int(a), min(int(b) if b.isdigit() else size - 1, size - 1)))
    total, end = 0, -1
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end + 1) + 1
            end = b
    return total


def _interrupted(*_) -> None:
    raise KeyboardInterrupt


def requests_by_route(before: dict, tracker_stats: dict, nodes: int) -> dict[str, float]:
    """Every request of the storm's nodes that passed membership, by route, per node: the
    tracker's counts now less ``before`` (its counts as the nodes were mounted)."""
    return {k: (v - before.get(k, 0)) / nodes for k, v in tracker_stats.get("requests", {}).items()
            if not k.endswith("/stats") and v > before.get(k, 0)}


def all_stats(mounts: list[Mount]) -> list[dict]:
    """Every node's statistics, one control call each, for the timeline: a node that does not
    answer this second is left out of it."""
    out = []
    for m in mounts:
        try:
            out.append(m.stats())
        except Exception:
            continue
    return out


def prefetch_counters(stats: list[dict], image_id: str) -> dict:
    """Summed over the nodes: chunks prefetched, later read, never read; reads that waited."""
    out = dict.fromkeys(("prefetched", "hits", "waste", "demand_waits", "reads"), 0)
    for s in stats:
        for a in s["profiles"].values():
            if a["image_id"] == image_id:
                for k in out:
                    out[k] += a[k]
    return out


def counters(stats: list[dict]) -> dict:
    """The fetchers' and peer clients' counters summed over the nodes: where the bytes came from
    and why (claims late, lookups or claims that failed, peers slow or busy)."""
    out: dict[str, int] = {}
    for s in stats:
        for section in ("fetch", "peers", "announcer"):
            for k, v in s.get(section, {}).items():
                if isinstance(v, int):
                    out[f"{section}.{k}"] = out.get(f"{section}.{k}", 0) + v
    return out


def node_sources(stats: list[dict]) -> dict:
    out = {"from_glance": 0, "from_peers": 0, "from_seed": 0, "from_cache": 0}
    for s in stats:
        out["from_glance"] += s["fetch"]["bytes_from_origin"]
        out["from_peers"] += s["fetch"].get("bytes_from_peers", 0)  # no tracker: no peer source
        out["from_seed"] += s["fetch"].get("bytes_from_seed", 0)
        out["from_cache"] += s["cache"]["bytes_read_disk"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--mode", choices=("replay-paced", "replay-fast", "vm"), default="replay-paced")
    ap.add_argument("--ways", default="thunderfs,thunderfs-new,glance-only,nova")
    ap.add_argument("--nova-nodes", type=int, default=4,
                    help="nodes for Nova's way (each stores a 2 GiB copy; the model takes it further)")
    ap.add_argument("--node-rate", default="1gbit")
    ap.add_argument("--glance-rate", default="1gbit")
    ap.add_argument("--glance-rtt", type=float, default=0.0, metavar="MS",
                    help="a round trip added to every request to Glance (the proxy in front of it delays each "
                         "answer; the tracker's reads pay it too); 0: loopback's")
    ap.add_argument("--work", default="/var/tmp/thunderfs-bench")
    ap.add_argument("--replicas", type=int, default=1,
                    help="tracker replicas on one Redis (default 1: one tracker, peer state in memory)")
    ap.add_argument("--kill-replica", type=float, metavar="SECONDS",
                    help="SIGKILL the first replica this long into the thunderfs storm (needs --replicas 2+)")
    ap.add_argument("--heartbeat", type=float, default=10,
                    help="the tracker's heartbeat, seconds (its default; before issue 27 the storms ran at 2)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (daemon logs) under --work")
    ap.add_argument("--out", help="results JSON (default WORK/results/bootstorm-MODE-N.json)")
    args = ap.parse_args()
    check_prerequisites(args.mode)
    ways = [w for w in args.ways.split(",") if w]
    work_root = Path(args.work)
    out = Path(args.out or work_root / "results" / f"bootstorm-{args.mode}-{args.nodes}.json")
    disk = Path(subprocess.run(["bash", str(REPO / "benchmarks" / "debian_image.sh"), str(work_root / "debian")],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    signal.signal(signal.SIGTERM, _interrupted)  # cleaned up like ^C

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with (contextlib.nullcontext(tempfile.mkdtemp(prefix="bootstorm-", dir=work_root)) if args.keep
          else tempfile.TemporaryDirectory(prefix="bootstorm-", dir=work_root)) as tmp:
        storm = Storm(args, Path(tmp))
        results = {**provenance(),
                   "mode": args.mode, "nodes": args.nodes, "node_rate": args.node_rate,
                   "glance_rate": args.glance_rate, "glance_rtt_ms": args.glance_rtt, "replicas": args.replicas,
                   "kill_replica": args.kill_replica, "heartbeat": args.heartbeat, "ways": {}}
        try:
            storm.up(disk)
            results.update(image_bytes=storm.size, boot_bytes=storm.boot_bytes,
                           # When the boot first reads each chunk: the storm model's input (a
                           # node that fetches as it reads works when the reads come).
                           first_reads=[[round(t, 3), round(f, 5)] for t, f in storm_model.first_reads(storm.reads)])
            print(f"boot storm: {args.mode}, {args.nodes} nodes, links {args.node_rate}, Glance {args.glance_rate}"
                  f"{f' and {args.glance_rtt:g} ms round trip' if args.glance_rtt else ''}; "
                  f"image {storm.size / MiB:.0f} MiB, one boot reads {storm.boot_bytes / MiB:.1f} MiB; 2 cores")
            with Progress(TextColumn("{task.description:28s}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn()) as bar:
                # One node alone, cold then warm (its page cache dropped): the baseline.
                task = bar.add_task("one node alone", total=2)
                results["calibration"] = storm.calibrate()
                m = storm.mount(0, "alone", False)
                g0, r0 = storm.proxy.range_bytes, storm.proxy.range_requests
                cold = storm.boot(m.image(storm.image_id), "alone-cold")
                results["alone_glance_bytes"] = storm.proxy.range_bytes - g0
                results["alone_glance_requests"] = storm.proxy.range_requests - r0
                bar.advance(task)
                warm = storm.boot(m.image(storm.image_id), "alone-warm")
                bar.advance(task)
                storm.unmount(m)
                results["alone"] = {"cold": cold, "warm": warm}

                if "thunderfs" in ways:
                    # The profile, recorded once by a node that then leaves (reported apart).
                    task = bar.add_task("thunderfs: recording profile", total=1)
                    g0, w0 = storm.proxy.range_bytes, storm.proxy.whole_bytes
                    # (The default --record-idle: the boot pauses for 10 s; a shorter one would
                    # record only what comes before the pause.)
                    rec = storm.mount(0, "recorder", True)
                    storm.boot(rec.image(storm.image_id), "recorder")
                    deadline = time.monotonic() + 120
                    while (shown := thunderfs("profile", "show", storm.image_id, "--mountpoint", str(rec.path),
                                              "--json")).returncode:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the recorder's profile never reached the tracker")
                        time.sleep(1)
                    results["profile_chunks"] = len(json.loads(shown.stdout)["chunks"])
                    storm.unmount(rec)
                    # A known image: its manifest built (once the recording boot was over).
                    storm.wait_manifest(storm.image_id)
                    results["setup"] = {"recording_glance_bytes": storm.proxy.range_bytes - g0,
                                        "manifest_glance_bytes": storm.proxy.whole_bytes - w0}
                    # One node alone with the profile (for the model: what prefetch leaves of a cold start).
                    solo = storm.mount(0, "solo", True)
                    results["alone"]["prefetch"] = storm.boot(solo.image(storm.image_id), "solo")
                    storm.unmount(solo)
                    time.sleep(storm.node_ttl + 2)  # the tracker expires them: nobody holds anything
                    bar.advance(task)
                    task = bar.add_task("thunderfs: peers + prefetch", total=args.nodes)
                    ms = [storm.mount(i, f"tf{i}", True) for i in range(args.nodes)]
                    before = storm.tracker_stats()
                    requests_before, events_before = before.get("requests", {}), before.get("watch_events", 0)
                    if args.kill_replica:
                        threading.Timer(args.kill_replica, storm.kill_replica).start()
                    cpu_before = sum(cpu_seconds(m.pid) for m in ms)
                    r = storm.storm("thunderfs", [m.image(storm.image_id) for m in ms],
                                    stats=lambda: node_sources(all_stats(ms)), progress=lambda: bar.advance(task))
                    cpu = sum(cpu_seconds(m.pid) for m in ms) - cpu_before
                    final = [m.stats() for m in ms]  # every node answers once the storm is over
                    r["sources"] = node_sources(final)
                    # What 32 daemons on two cores cost: their CPU seconds per GiB they received
                    # (from Glance and peers) and served to peers (as much as peers received).
                    moved = r["sources"]["from_glance"] + 2 * r["sources"]["from_peers"]
                    r["cpu"] = {"daemon_seconds_per_node": cpu / len(ms),
                                "daemon_seconds_per_gib_moved": cpu / (moved / 2**30) if moved else None}
                    r["prefetch"] = prefetch_counters(final, storm.image_id)
                    r["counters"] = counters(final)
                    tracker_stats = storm.tracker_stats()
                    # Every request of the storm's nodes that passed membership, by route (from mounting to the end of the
                    # storm; a replica killed mid-storm takes its counts along), and lookups and
                    # claims alone (the figure kept runs before issue 27 give).
                    by_route = requests_by_route(requests_before, tracker_stats, args.nodes)
                    results["tracker_requests_by_route_per_node"] = by_route
                    results["tracker_requests_per_node"] = sum(by_route.values())
                    results["tracker_lookups_claims_per_node"] = (
                        tracker_stats["lookups"] + tracker_stats["claims"]) / args.nodes
                    # What the watches pushed instead of lookups: events on their streams.
                    results["tracker_watch_events_per_node"] = (
                        tracker_stats.get("watch_events", 0) - events_before) / args.nodes
                    results["ways"]["thunderfs"] = r
                    # The same nodes again, caches warm, all at once: what sharing this machine's
                    # CPU costs the boots by itself (for VMs, the fair baseline of a storm here).
                    task = bar.add_task("thunderfs: warm, all at once", total=args.nodes)
                    for m in ms:
                        drop_page_cache(m.image(storm.image_id))
                    r = storm.storm("warm", [m.image(storm.image_id) for m in ms], progress=lambda: bar.advance(task))
                    results["warm_storm"] = r
                    for m in ms:
                        storm.unmount(m)

                if "thunderfs-new" in ways:
                    task = bar.add_task("thunderfs: a new image", total=args.nodes)
                    new_id = storm.upload_new(disk)
                    ms = [storm.mount(i, f"new{i}", True) for i in range(args.nodes)]
                    before = storm.tracker_stats()
                    requests_before, events_before = before.get("requests", {}), before.get("watch_events", 0)
                    cpu_before = sum(cpu_seconds(m.pid) for m in ms)
                    r = storm.storm("thunderfs-new", [m.image(new_id) for m in ms],
                                    stats=lambda: node_sources(all_stats(ms)), progress=lambda: bar.advance(task))
                    cpu = sum(cpu_seconds(m.pid) for m in ms) - cpu_before
                    final = [m.stats() for m in ms]
                    r["sources"] = node_sources(final)
                    moved = r["sources"]["from_glance"] + r["sources"]["from_seed"] + 2 * r["sources"]["from_peers"]
                    r["cpu"] = {"daemon_seconds_per_node": cpu / len(ms),
                                "daemon_seconds_per_gib_moved": cpu / (moved / 2**30) if moved else None}
                    r["counters"] = counters(final)
                    tracker_stats = storm.tracker_stats()
                    r["seed"] = tracker_stats.get("seed", {})
                    r["tracker_requests_by_route_per_node"] = requests_by_route(requests_before, tracker_stats, args.nodes)
                    r["tracker_requests_per_node"] = sum(r["tracker_requests_by_route_per_node"].values())
                    r["tracker_watch_events_per_node"] = (
                        tracker_stats.get("watch_events", 0) - events_before) / args.nodes
                    # Egress at Glance during the storm, the tracker's reads included (and the
                    # whole-image check's, had it started before the storm's end).
                    r["glance_egress_all"] = r["glance_egress"] + r["glance_whole"]
                    # The check, once the image is quiet: its bytes reported apart, like a manifest's.
                    w0 = storm.proxy.whole_bytes
                    r["check_seconds_after_storm"] = storm.wait_manifest(new_id)
                    r["check_glance_bytes"] = storm.proxy.whole_bytes - w0 + r["glance_whole"]
                    results["ways"]["thunderfs-new"] = r
                    for m in ms:
                        storm.unmount(m)

                if "glance-only" in ways:
                    task = bar.add_task("thunderfs: Glance only", total=args.nodes)
                    ms = [storm.mount(i, f"go{i}", False) for i in range(args.nodes)]
                    r = storm.storm("glance-only", [m.image(storm.image_id) for m in ms],
                                    stats=lambda: node_sources(all_stats(ms)), progress=lambda: bar.advance(task))
                    r["sources"] = node_sources([m.stats() for m in ms])
                    results["ways"]["glance-only"] = r
                    for m in ms:
                        storm.unmount(m)

                if "nova" in ways:
                    k = min(args.nova_nodes, args.nodes)
                    task = bar.add_task(f"Nova's way ({k} nodes)", total=k)
                    copies = [storm.work / f"nova{i}.raw" for i in range(k)]
                    url = f"{storm.proxy.url}/v2/images/{storm.image_id}/file"

                    def download(i: int) -> None:
                        # In the node's namespace, through its link; zeros kept sparse on disk.
                        subprocess.run(["bash", "-c", f"{' '.join(storm.nodes[i].exec_prefix())} curl -sSf {url} | "
                                        f"dd of={copies[i]} bs=1M conv=sparse status=none"], check=True)

                    r = storm.storm("nova", copies, prepare=download, progress=lambda: bar.advance(task))
                    r["glance_egress"] = r["glance_whole"]  # whole-image downloads
                    r["nodes"] = k
                    results["ways"]["nova"] = r
                    for c in copies:
                        c.unlink(missing_ok=True)
        finally:
            storm.down()

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    report(results)
    print(f"results in {out}")
    return 0


def report(results: dict) -> None:
    boot, alone = results["boot_bytes"], results["alone"]
    warm_storm = results.get("warm_storm")
    warm_all = max((t for t in warm_storm["times"] if t is not None), default=None) if warm_storm else None
    print(f"  one node alone: cold {alone['cold']:.2f}s, warm {alone['warm']:.2f}s"
          + (f", cold with the profile {alone['prefetch']:.2f}s" if "prefetch" in alone else "")
          + f"; a cold boot fetched {results.get('alone_glance_bytes', 0) / MiB:.1f} MiB from Glance")
    if "setup" in results:
        s = results["setup"]
        print(f"  one-time: manifest {s['manifest_glance_bytes'] / MiB:.0f} MiB from Glance; "
              f"recording boot {s['recording_glance_bytes'] / MiB:.0f} MiB; "
              f"profile {results.get('profile_chunks', '?')} chunks")
    for way, r in results["ways"].items():
        times = [t for t in r["times"] if t is not None]
        if not times:
            print(f"  {way}: every boot failed: {r['errors'][:3]}")
            continue
        n = len(r["times"])
        line = (f"  {way:12s} {n:3d} nodes: boot {min(times):6.1f}..{max(times):6.1f}s, slowest "
                f"{max(times) / alone['warm']:5.2f} x alone warm; Glance egress {r['glance_egress'] / MiB:7.0f} MiB "
                f"= {r['glance_egress'] / boot:6.2f} x one boot's reads")
        if "glance_distinct" in r and r["glance_egress"]:
            line += f" ({r['glance_distinct'] / MiB:.0f} MiB of the image, each byte once)"
        if r["errors"]:
            line += f"; {len(r['errors'])} FAILED: {r['errors'][0]}"
        print(line)
        if warm_all:
            print(f"  {'':12s} slowest {max(times) / warm_all:5.2f} x the slowest of {len(warm_storm['times'])} "
                  f"nodes booting at once from warm caches ({warm_all:.1f}s: this machine's CPU shared)")
        if "prefetch" in r:
            pf = r["prefetch"]
            print(f"  {'':12s} prefetched {pf['prefetched']} chunks, {pf['hits']} then read, {pf['waste']} never read; "
                  f"{pf['demand_waits']} of {pf['reads']} reads waited for a fetch")
        if "sources" in r:
            src = r["sources"]
            print(f"  {'':12s} bytes by source: Glance {src['from_glance'] / MiB:.0f} MiB, "
                  f"peers {src['from_peers'] / MiB:.0f} MiB, "
                  + (f"the tracker's seed {src['from_seed'] / MiB:.0f} MiB, " if src.get("from_seed") else "")
                  + f"cache {src['from_cache'] / MiB:.0f} MiB")
        if "check_glance_bytes" in r:
            print(f"  {'':12s} Glance egress with the tracker's reads: {r['glance_egress_all'] / MiB:.0f} MiB = "
                  f"{r['glance_egress_all'] / boot:.2f} x one boot's reads (target <= 1.5); slowest "
                  f"{max(times) / alone['cold']:.2f} x one node alone cold (target <= 1.3); then the "
                  f"whole-image check: {r['check_glance_bytes'] / MiB:.0f} MiB, built "
                  f"{r['check_seconds_after_storm']:.0f} s after the storm; tracker requests per node "
                  f"{r['tracker_requests_per_node']:.1f}"
                  + (": " + ", ".join(f"{route_name(k)} {v:.1f}" for k, v in sorted(by.items()))
                     if (by := r.get("tracker_requests_by_route_per_node")) else ""))
        if r.get("counters"):
            print(f"  {'':12s} counters: " + ", ".join(f"{k} {v}" for k, v in sorted(r["counters"].items()) if v))
        if r.get("cpu"):
            c = r["cpu"]
            print(f"  {'':12s} daemon CPU: {c['daemon_seconds_per_node']:.1f} s per node, "
                  f"{c['daemon_seconds_per_gib_moved'] or 0:.1f} s per GiB received and served")
        if r.get("machine") and r["machine"]["busy"] is not None:
            mc = r["machine"]
            full = sum(1 for s in r["timeline"] if (s.get("busy") or 0) >= 0.95)
            by = mc.get("cpu_seconds", {})
            daemons = r["cpu"]["daemon_seconds_per_node"] * n if r.get("cpu") else None
            print(f"  {'':12s} the machine's {mc['cores']} cores {mc['busy']:.0%} busy through the storm "
                  f"({mc['softirq']:.0%} the kernel's network work); {full} of {len(r['timeline'])} seconds at 95 % "
                  f"or more; CPU s: {mc.get('busy_seconds') or 0:.0f} busy"
                  + (f", daemons {daemons:.0f}" if daemons is not None else "")
                  + "".join(f", {k} {v:.0f}" for k, v in by.items()))
        if way == "thunderfs" and "tracker_requests_per_node" in results:
            by = results.get("tracker_requests_by_route_per_node", {})
            print(f"  {'':12s} tracker requests per node per boot: {results['tracker_requests_per_node']:.1f} "
                  f"(heartbeat {results.get('heartbeat', 2):g} s; target <= 30)"
                  + (": " + ", ".join(f"{route_name(k)} {v:.1f}" for k, v in sorted(by.items())) if by else "")
                  + (f"; and {results['tracker_watch_events_per_node']:.0f} events on the watches"
                     if "tracker_watch_events_per_node" in results else ""))


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command's name (None: no such process now)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds of a process so far (its threads included)."""
    fields = _stat(pid) if pid is not None else None
    return _cpu(fields) if fields else 0.0


def group_cpu(pgid: int) -> float:
    """User and system CPU seconds so far of every live process in a process group."""
    return sum(_cpu(fields) for entry in Path("/proc").iterdir()
               if entry.name.isdigit() and (fields := _stat(entry.name)) and int(fields[2]) == pgid)


def route_name(canonical: str) -> str:
    """``/v1/nodes/{node}/announce`` -> ``nodes/announce``."""
    return "/".join(p for p in canonical.removeprefix("/v1/").split("/") if not p.startswith("{"))


if __name__ == "__main__":
    raise SystemExit(main())
