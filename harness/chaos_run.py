"""The chaos run: nodes read images through their mounts while faults are injected on a schedule.

Everything is real: a Glance (gunicorn), a tracker, one thunderfs daemon per node, each node in a
network namespace of its own on a bridge with a shaped link.  Two fault injectors stand in for
what this kernel or a real part cannot do on demand, and are named as such: a delaying TCP proxy
in front of Glance and the tracker (``harness.delay_proxy``; there is no netem) and nftables rules
that drop packets.  The lying peer is a real daemon whose cache is made wrong and consistent (data
file and index altered alike, ``harness.liar``): it serves wrong bytes with a straight face.

Faults (``FAULTS``): a peer killed with SIGKILL (keeper and serving process: the node's whole
daemon) and started again on its cache; a node's serving process killed with SIGKILL (its keeper
starts another, which takes the mount over) and replaced with ``thunderfs restart``: its own
reader reads on through both and must see no error; a peer's serving process stopped with
SIGSTOP (a slow peer) and continued; the tracker killed with SIGKILL and started again (its peer
state is in memory: lost); Glance stopped for ``glance_outage`` seconds; 10 % packet loss on a
node's link; 100 ms of latency each way to Glance and the tracker; the liar's chunks altered.

Every byte read through every mount is compared with the image's bytes, whose sha512 was checked
against Glance's ``os_hash_value`` at upload.  A read is a *hang* if it takes longer than the
daemon's fetch timeout plus 5 s (one FUSE request per read: reads are at most 1 MiB, O_DIRECT).
An error is excused only if the read overlapped a Glance outage (which, for a node, ends when its
probe finds Glance back, at most one probe interval later).  A node's reader pauses while its
own daemon is killed or stopped (a dead mount's ENOTCONN is not news); everybody else reads on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from harness.delay_proxy import DelayProxy
from harness.liar import alter
from thunderfs.fetch.breaker import Breaker
from harness.local_glance import LocalGlance, free_port
from harness.mounts import Mount, thunderfs
from harness.netns import Lan
from harness.tracker import LocalTracker

log = logging.getLogger(__name__)

MiB = 2**20
SECRET = b"chaos-run-secret-0123456789abcdef"
FAULTS = ("latency", "loss", "peer_stop", "peer_kill", "server_kill", "server_restart", "liar", "tracker_kill",
          "glance_stop")
HANG_MARGIN = 5.0
PROBE_MAX = Breaker("").max_interval + 0.5


@dataclass
class Settings:
    workdir: Path
    nodes: int = 4                      # reading nodes; one more is the liar
    duration: float | None = None       # None: the short form, every fault once
    seed: int = 1
    image_sizes: tuple[int, ...] = (24 * MiB + 4097, 16 * MiB + 11, 8 * MiB)
    cache_size: int = 32 * MiB          # below the images' total: eviction runs all along
    rate: str = "200mbit"
    glance_outage: float = 30.0
    fetch_timeout: float = 20.0
    gap: float = 5.0                    # quiet seconds between faults (the short form)
    faults: tuple[str, ...] = FAULTS    # the short form's schedule, in order
    prefix: str = "10.207.0"


@dataclass
class Report:
    faults: Counter = field(default_factory=Counter)
    reads: int = 0
    bytes_checked: int = 0
    wrong_reads: int = 0
    wrong_bytes: int = 0
    hangs: int = 0
    errors_glance_up: int = 0
    errors_glance_down: int = 0         # allowed: the read needed Glance while it was stopped
    errors_by_kind: Counter = field(default_factory=Counter)
    slowest_read: float = 0.0
    final_images_checked: int = 0
    final_images_wrong: int = 0
    final_seconds: float = 0.0  # the whole-image reads after the faults
    final_slowest: float = 0.0  # the slowest of them
    altered_chunks: int = 0
    bad_chunks_caught: int = 0          # by readers' verification against the manifest
    restart_failures: int = 0
    tracebacks: int = 0
    kernel_waiting: int = 0  # requests the kernel still waited on at the end, all mounts (fusectl)
    pins_left: int = 0  # cache pins still held at the end, all daemons (every read had ended)
    seconds: float = 0.0
    events: list = field(default_factory=list)
    daemons: dict = field(default_factory=dict)

    def ok(self) -> bool:
        return (self.wrong_bytes == 0 and self.wrong_reads == 0 and self.hangs == 0
                and self.errors_glance_up == 0 and self.final_images_wrong == 0 and self.restart_failures == 0
                and self.tracebacks == 0 and self.final_images_checked > 0 and self.kernel_waiting == 0
                and self.pins_left == 0)

    def to_json(self) -> dict:
        # (not dataclasses.asdict: it rebuilds a Counter from its items, counting the pairs)
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        return [
            f"faults injected: {sum(self.faults.values())} ({faults})",
            f"reads: {self.reads}, {self.bytes_checked / MiB:.0f} MiB compared with Glance's bytes; "
            f"slowest read {self.slowest_read:.1f}s",
            f"wrong bytes: {self.wrong_bytes} (in {self.wrong_reads} reads)",
            f"hangs (reads past the fetch timeout + {HANG_MARGIN:.0f}s): {self.hangs}",
            f"errors while Glance was up: {self.errors_glance_up}; during its outages: "
            f"{self.errors_glance_down} {dict(self.errors_by_kind)}",
            f"liar: {self.altered_chunks} chunks altered on its disk, {self.bad_chunks_caught} bad chunks caught "
            "by readers",
            f"after the faults: {self.final_images_checked} whole images read back on every node in "
            f"{self.final_seconds:.0f}s (slowest {self.final_slowest:.1f}s), "
            f"{self.final_images_wrong} wrong; daemon restarts failed: {self.restart_failures}; "
            f"tracebacks logged: {self.tracebacks}",
            f"requests the kernel still waited on at the end (fusectl, all mounts): {self.kernel_waiting}; "
            f"cache pins left: {self.pins_left}",
            f"{'PASS' if self.ok() else 'FAIL'} in {self.seconds:.0f}s",
        ]


class _Node:
    def __init__(self, name: str, mount: Mount, lan_node, reads: bool):
        self.name = name
        self.mount = mount
        self.lan_node = lan_node
        self.reads = reads
        self.gate = threading.Lock()  # held by the reader per operation, by a fault on this node


class ChaosRun:
    def __init__(self, settings: Settings):
        self.s = settings
        self.work = Path(settings.workdir)
        self.rng = random.Random(settings.seed)
        self.report = Report()
        self.images: dict[str, bytes] = {}
        self.outages: list[list[float]] = []  # [start, end] of each Glance outage (end inf while down)
        self.nodes: list[_Node] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.glance = self.lan = self.tracker = self.glance_proxy = self.tracker_proxy = None
        self.started = time.monotonic()

    # --- the cluster -----------------------------------------------------------------------

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.glance = LocalGlance(self.work / "glance")
        self.glance.start()
        for i, size in enumerate(self.s.image_sizes):
            data = random.Random(self.s.seed * 1000 + i).randbytes(size)
            image_id = self.glance.upload(f"chaos-{i}", data)["id"]
            if hashlib.sha512(data).hexdigest() != self.glance.image(image_id)["os_hash_value"]:
                raise RuntimeError(f"Glance's sha512 of {image_id} is not the uploaded bytes'")
            self.images[image_id] = data
        self.lan = Lan(prefix=self.s.prefix).up()
        self.tracker = LocalTracker(self.work / "tracker", "--glance", self.glance.url, "--heartbeat", "1",
                                    "--node-ttl", "5", secret=SECRET)
        self.tracker.start()
        self.glance_proxy = DelayProxy("127.0.0.1", self.glance.port, host=self.lan.root_addr).start()
        self.tracker_proxy = DelayProxy("127.0.0.1", self.tracker.port, host=self.lan.root_addr).start()
        secret = self.work / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        total = sum(self.s.image_sizes)
        for i in range(self.s.nodes + 1):
            liar = i == self.s.nodes
            name = "liar" if liar else f"node{i}"
            n = self.lan.add_node(rate=self.s.rate)
            m = Mount(self.work / f"mnt-{name}", self.glance_proxy.url, self.work / f"cache-{name}",
                      "--tracker", self.tracker_proxy.url, "--peer-listen", f"{n.addr}:{free_port()}",
                      "--node-id", name, "--location", f"z1/r{i % 2}/{name}", "--secret-file", str(secret),
                      "--cache-size", str(2 * total if liar else self.s.cache_size), "--peer-timeout", "1",
                      "--fetch-timeout", str(self.s.fetch_timeout), prefix=n.exec_prefix())
            m.mount()
            self.nodes.append(_Node(name, m, n, reads=not liar))
        # The liar holds every chunk of every image before anyone reads (it will lie about some).
        liar = self.nodes[-1]
        for image_id, data in self.images.items():
            if liar.mount.image(image_id).read_bytes() != data:
                raise RuntimeError("the liar read wrong bytes before it was altered")

    def teardown(self) -> None:
        for n in self.nodes:
            n.mount.cleanup()
        for p in (self.tracker_proxy, self.glance_proxy):
            if p:
                p.stop()
        if self.tracker:
            self.tracker.stop()
        if self.lan:
            self.lan.down()
        if self.glance:
            self.glance.stop()

    # --- readers ---------------------------------------------------------------------------

    def _reader(self, node: _Node) -> None:
        rng = random.Random(f"{self.s.seed}-{node.name}")
        buf = mmap.mmap(-1, MiB)
        view = memoryview(buf)
        ids = list(self.images)
        try:
            while not self._stop.is_set():
                image_id = rng.choice(ids)
                data = self.images[image_id]
                with node.gate:
                    if self._stop.is_set():
                        break
                    if rng.random() < 0.03:
                        thunderfs("evict", str(node.mount.path), image_id)
                    try:
                        fd = os.open(node.mount.image(image_id), os.O_RDONLY | os.O_DIRECT)
                    except OSError as exc:
                        self._record_error(node, time.monotonic(), time.monotonic(), exc)
                        continue
                    try:
                        if rng.random() < 0.3:  # a sequential stretch, 1 MiB reads
                            start = rng.randrange(0, len(data), 4096)
                            spans = [(off, MiB) for off in range(start, min(len(data), start + 8 * MiB), MiB)]
                        else:  # scattered reads, 4 KiB to 1 MiB
                            spans = [(rng.randrange(0, len(data), 4096), rng.choice((4096, 65536, 262144, MiB)))
                                     for _ in range(8)]
                        for off, size in spans:
                            self._one_read(node, fd, view, image_id, off, size)
                    finally:
                        os.close(fd)
                time.sleep(rng.random() * 0.05)
        finally:
            view.release()
            buf.close()

    def _one_read(self, node: _Node, fd: int, view: memoryview, image_id: str, off: int, size: int) -> None:
        data = self.images[image_id]
        t0 = time.monotonic()
        try:
            n = os.preadv(fd, [view[:size]], off)
        except OSError as exc:
            self._record_error(node, t0, time.monotonic(), exc)
            return
        t1 = time.monotonic()
        want = data[off:off + size]
        got = view[:n]
        with self._lock:
            r = self.report
            r.reads += 1
            r.bytes_checked += n
            r.slowest_read = max(r.slowest_read, t1 - t0)
            if t1 - t0 > self.s.fetch_timeout + HANG_MARGIN:
                r.hangs += 1
                self._event("hang", node.name, f"{t1 - t0:.1f}s at {off}+{size}")
            if got != want:
                r.wrong_reads += 1
                r.wrong_bytes += sum(a != b for a, b in zip(got, want)) + abs(n - len(want))
                chunk = 64 * 1024
                bad = [i for i in range(0, n, chunk) if got[i:i + chunk] != want[i:i + chunk]]
                zeros = sum(not any(got[i:i + chunk]) for i in bad)
                bad = [(off + i) // chunk for i in bad]
                self._event("wrong", node.name, f"{image_id} {off}+{size}: {n} bytes; chunks {bad} ({zeros} zeros)")

    def _record_error(self, node: _Node, t0: float, t1: float, exc: OSError) -> None:
        with self._lock:
            # An outage lasts, for a reader, until the node's probe has found Glance back
            # (thunderfs.fetch.breaker: at most its longest probe interval after Glance returns).
            during_outage = any(a <= t1 and t0 <= b + PROBE_MAX for a, b in self.outages)
            kind = errno.errorcode.get(exc.errno, str(exc.errno))
            what = f"{kind} after {t1 - t0:.1f}s, read from {t0 - self.started:.1f}s"
            if during_outage:
                self.report.errors_glance_down += 1
                self.report.errors_by_kind[kind] += 1
            else:
                self.report.errors_glance_up += 1
                self.report.errors_by_kind[kind] += 1
                self._event("error", node.name, what)
            if t1 - t0 > self.s.fetch_timeout + HANG_MARGIN:
                self.report.hangs += 1
                self._event("hang", node.name, what + (" (Glance down)" if during_outage else ""))

    def _event(self, kind: str, target: str, detail: str = "") -> None:
        self.report.events.append((round(time.monotonic() - self.started, 1), kind, target, detail))
        log.info("%6.1fs %s %s %s", time.monotonic() - self.started, kind, target, detail)

    # --- faults ----------------------------------------------------------------------------

    def _fault(self, kind: str) -> None:
        readers = [n for n in self.nodes if n.reads]
        target = self.rng.choice(readers)
        with self._lock:
            self.report.faults[kind] += 1
            self._event(kind, "glance" if kind == "glance_stop" else "tracker" if kind == "tracker_kill"
                        else "liar" if kind == "liar" else "glance+tracker" if kind == "latency" else target.name)
        getattr(self, f"_fault_{kind}")(target)

    def _fault_latency(self, node: _Node) -> None:
        self.glance_proxy.delay = self.tracker_proxy.delay = 0.1
        time.sleep(15)
        self.glance_proxy.delay = self.tracker_proxy.delay = 0.0

    def _fault_loss(self, node: _Node) -> None:
        self.lan.lose(node.lan_node, 10)
        try:
            time.sleep(15)
        finally:
            self.lan.unlose(node.lan_node)

    def _fault_peer_stop(self, node: _Node) -> None:
        with node.gate:
            node.mount.signal_server(signal.SIGSTOP)
            try:
                time.sleep(8)
            finally:
                node.mount.signal_server(signal.SIGCONT)

    def _fault_server_kill(self, node: _Node) -> None:
        # No gate: the node's own reader reads on, and the mount must hold.
        old = node.mount.signal_server(signal.SIGKILL)
        self._wait_new_server(node, old)

    def _fault_server_restart(self, node: _Node) -> None:
        old = node.mount.pid
        res = thunderfs("restart", str(node.mount.path), prefix=node.mount.prefix)
        if res.returncode != 0:
            with self._lock:
                self.report.restart_failures += 1
                self._event("restart_failed", node.name, res.stderr[-500:])
            return
        self._wait_new_server(node, old)

    def _wait_new_server(self, node: _Node, old: int) -> None:
        try:
            node.mount.wait_new_server(old)
        except TimeoutError as exc:
            with self._lock:
                self.report.restart_failures += 1
                self._event("restart_failed", node.name, str(exc)[-500:])

    def _fault_peer_kill(self, node: _Node) -> None:
        with node.gate:
            node.mount.kill9()
            time.sleep(1)
            self._restart(node)

    def _restart(self, node: _Node) -> None:
        res = node.mount.try_mount()
        if res.returncode != 0:
            with self._lock:
                self.report.restart_failures += 1
                self._event("restart_failed", node.name, res.stderr[-500:])

    def _fault_tracker_kill(self, node: _Node) -> None:
        os.killpg(self.tracker.proc.pid, signal.SIGKILL)
        self.tracker.proc.wait()
        self.tracker.proc = None
        time.sleep(5)
        self.tracker.start()

    def _fault_glance_stop(self, node: _Node) -> None:
        with self._lock:
            self.outages.append([time.monotonic(), float("inf")])
        self.glance.stop()
        time.sleep(self.s.glance_outage)
        self.glance.start()
        with self._lock:
            self.outages[-1][1] = time.monotonic()

    def _fault_liar(self, node: _Node) -> None:
        """Make the liar's cache wrong and consistent (``harness.liar``): up to 8 cached chunks of
        every image altered, data and index alike, while it is unmounted; then mounted again."""
        liar = self.nodes[-1].mount
        keys = [os.getxattr(liar.image(i), "user.thunderfs.content_key").decode() for i in self.images]
        if liar.umount().returncode != 0:
            liar.kill9()
        altered = sum(len(alter(liar.cache_dir, key, self.rng)) for key in keys)
        self._restart(self.nodes[-1])
        with self._lock:
            self.report.altered_chunks += altered

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        self.started = time.monotonic()
        try:
            self.setup()
            readers = [threading.Thread(target=self._reader, args=(n,), daemon=True, name=n.name)
                       for n in self.nodes if n.reads]
            for t in readers:
                t.start()
            time.sleep(self.s.gap)
            if self.s.duration is None:
                for kind in self.s.faults:
                    self._fault(kind)
                    time.sleep(self.s.gap)
            else:
                self._long_form()
            self._stop.set()
            for t in readers:
                t.join(self.s.fetch_timeout * 3)
                if t.is_alive():
                    with self._lock:
                        self.report.hangs += 1
                        self._event("hang", t.name, "reader did not finish")
            self._final_check()
            self._collect()
        finally:
            self._stop.set()
            self.report.seconds = time.monotonic() - self.started
            self.teardown()
            self._count_tracebacks()
        return self.report

    def _long_form(self) -> None:
        end = time.monotonic() + self.s.duration
        last_outage = -1e9
        liar_done = False
        while time.monotonic() < end:
            kinds = [k for k in self.s.faults if not (k == "liar" and liar_done)
                     and not (k == "glance_stop" and time.monotonic() - last_outage < 300)]
            kind = self.rng.choice(kinds)
            if kind == "glance_stop":
                last_outage = time.monotonic()
            liar_done |= kind == "liar"
            self._fault(kind)
            time.sleep(self.rng.uniform(self.s.gap, 4 * self.s.gap))

    def _final_check(self) -> None:
        started = time.monotonic()
        for node in self.nodes:
            if not node.reads:
                continue
            for image_id, data in self.images.items():
                path = node.mount.image(image_id)
                image_started = time.monotonic()
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    h, pos, buf = hashlib.sha512(), 0, mmap.mmap(-1, MiB)
                    try:
                        while n := os.preadv(fd, [buf], pos):
                            h.update(memoryview(buf)[:n])
                            pos += n
                    finally:
                        os.close(fd)
                        buf.close()
                    ok = h.hexdigest() == hashlib.sha512(data).hexdigest()
                except OSError as exc:
                    ok = False
                    self._event("final_error", node.name, str(exc))
                self.report.final_images_checked += 1
                self.report.final_slowest = max(self.report.final_slowest, time.monotonic() - image_started)
                if not ok:
                    self.report.final_images_wrong += 1
                    self._event("final_wrong", node.name, image_id)
        self.report.final_seconds = time.monotonic() - started

    def _collect(self) -> None:
        for node in self.nodes:
            try:
                st = node.mount.stats()
            except Exception as exc:  # a daemon that does not answer is in the report, not fatal here
                self.report.daemons[node.name] = {"error": str(exc)}
                continue
            peers = st.get("peers", {})
            self.report.bad_chunks_caught += peers.get("bad_chunks", 0)
            waiting = st["fs"].get("kernel_waiting")
            self.report.kernel_waiting += waiting if waiting is not None else 1  # unknown counts as not 0
            self.report.pins_left += st["cache"]["pins"]
            self.report.daemons[node.name] = {
                "from_peers": st["fetch"]["bytes_from_peers"], "from_glance": st["fetch"]["bytes_from_origin"],
                "peer_failures": peers.get("failures"), "bad_chunks": peers.get("bad_chunks"),
                "corrupt_dropped": st["cache"]["corrupt_dropped"], "evictions": st["cache"]["evictions"],
                "served_chunks": st.get("peer_server", {}).get("served_chunks"),
                "claim_waits": peers.get("claim_waits"), "claimed_chunks_late": peers.get("claimed_chunks_late"),
            }

    def _count_tracebacks(self) -> None:
        logs = [n.mount.log_tail(10**8) for n in self.nodes]
        if self.tracker:
            logs.append(self.tracker.log())
        self.report.tracebacks = sum(text.count("Traceback") for text in logs)


def run(settings: Settings) -> Report:
    return ChaosRun(settings).run()


def save(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1, default=str))
