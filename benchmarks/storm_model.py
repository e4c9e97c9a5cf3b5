"""An analytic model of a boot storm: completion time and Glance egress for N nodes, three ways.

Fed with figures measured on this machine (a boot storm's results JSON from bootstorm.py):

  S      image size                      W   bytes one cold node fetches for one boot
  Bn     a node's link (bytes/s)         Bg  Glance's link (bytes/s)
  T0     one boot alone from a warm cache (its own pace: CPU for a TCG guest); for real VMs
         here, N of them booting at once from warm caches (they share the two cores)
  D      what a cold boot adds to T0 alone (one fetch latency per read that misses, in series)
  Dp     the same with peers and prefetch (startup: the profile, the first batches)
  q, R   tracker requests per node per boot, and requests/s the tracker serves
  k, C   Glance range requests one cold boot makes, and range requests/s Glance serves
  Cp, M  peer requests/s one host's CPU serves and receives (benchmarks/peer_serve_bench.py), and
         how many nodes share that host: all N here (two cores for every daemon), 1 in a cluster
  c, o   CPU seconds per node per boot that the daemons, and the rest that shares their cores
         (the tracker, Glance, the replaying readers), spent in the run (bootstorm.py's "cpu" and
         "machine"); P the cores the M nodes of a host share (2 here)
  Bg is the lesser of Glance's link and what one node measured getting from it (calibration).

  Nova's way     egress N*S;  time  max(S/Bn, N*S/Bg) + T0       (download, then boot locally)
  Glance only    egress N*W;  time  max(T0 + D, W/Bn + D, N*W/Bg + D, N*k/C)
  thunderfs      egress W;
      time  max(T0 + Dp, max(W/Bn, W/Bg) + Dp, k/C, N*q/R, M*(c + o)/P) + M*k/Cp
                 (Glance sends the working set once and nodes relay it, pipelined: each node's
                 own link and one pass through Glance's bound the time; N*q/R is the tracker
                 saturating; M*(c + o)/P the host's cores, when what its nodes and the rest
                 spend exceeds what its cores give in the boot's own time (a run without the
                 CPU figures leaves it out); M*k/Cp the peer transfers of the nodes sharing a
                 host's CPU, which hold up the boots on that host, where c was not measured:
                 c holds them)

``check`` compares it with the measured runs and prints the error; ``curve`` gives points for
N = 1..10,000 (benchmarks/plots.py draws them).

  thunderfs on a new image ("thunderfs-new": no manifest, no profile): as thunderfs, Glance
                 sending the working set once to the tracker (the seed), which the claims spread;
                 then the whole-image check reads S once, after the storm (a one-time cost,
                 reported apart, as a known image's manifest build is).  With no profile to
                 fetch ahead, a node's work follows its reads: in a paced boot it cannot start
                 before the boot reads, so the cores' term is max over t of t + f(t) M*(c + o)/P,
                 f(t) the share of the boot's chunks first read at or after t (the boot trace's
                 timeline, kept in the run's results as "first_reads": an input, as T0 is; the
                 recorded Debian boot reads 1 MiB in its first 10 s).  With a profile the prefetch takes the work up from the start.

Two inputs are not in a storm's results: the tracker's and a host's peer request rates. They are
read from kept results of their own benchmarks: R, the median rate two tracker replicas on Redis
took 10,000 nodes joining at (announces and full states, the heaviest requests:
benchmarks/tracker_load.py, results/tracker-load-heartbeat10.json), and Cp, the median rate of
signed 64 KiB peer requests one client and one server on this machine's two cores serve
(benchmarks/peer_serve_bench.py, results/peer-serve.json); --tracker-rps and --peer-rps override.

Usage: .venv/bin/python benchmarks/storm_model.py RESULTS.json [...] [--tracker-rps R] [--peer-rps CP]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


def tracker_rps(path: Path = RESULTS / "tracker-load-heartbeat10.json") -> float:
    """Requests/s the most replicas of a tracker_load.py run took nodes joining at (median)."""
    runs = json.loads(path.read_text())["by_replicas"]
    most = max(r["replicas"] for r in runs)
    rates = sorted(r["join_requests_per_s"] for r in runs if r["replicas"] == most)
    return rates[len(rates) // 2]


def peer_rps(path: Path = RESULTS / "peer-serve.json") -> float:
    """Signed 64 KiB peer requests/s one client and one server served (median)."""
    return json.loads(path.read_text())["client_64k"]["signed_requests_per_s"]["median"]


TRACKER_REQUESTS_PER_S = tracker_rps()  # --tracker-rps overrides
PEER_REQUESTS_PER_S = peer_rps()        # --peer-rps overrides


def rate(text: str) -> float:
    """tc rate (100mbit, 1gbit) -> bytes/s."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", text.lower())
    if not m:
        raise ValueError(f"rate {text!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


@dataclass
class Params:
    S: float
    W: float
    Bn: float
    Bg: float
    T0: float
    D: float
    Dp: float
    k: float = 600.0   # Glance range requests one cold boot makes
    C: float = 200.0   # range requests/s Glance serves
    q: float = 200.0
    R: float = TRACKER_REQUESTS_PER_S
    Cp: float = PEER_REQUESTS_PER_S
    shared_host: bool = False  # all nodes on one host (the runs here): M = N, else M = 1
    c: float = 0.0     # daemon CPU seconds per node per boot (0: not measured)
    o: float = 0.0     # CPU seconds per node per boot of the rest on the nodes' cores
    P: int = 2         # cores the nodes of one host share
    # (t, share of the boot's chunks first read at or after t) of a paced boot (``first_reads``):
    # when the work of a node that fetches as it reads can be done; () for a boot not paced.
    after: tuple[tuple[float, float], ...] = ()

    def with_cpu(self, way: dict, n: int) -> "Params":
        """These parameters with the CPU a way's run measured (none if it did not)."""
        cpu, machine = way.get("cpu") or {}, way.get("machine") or {}
        if not cpu.get("daemon_seconds_per_node"):
            return self
        others = sum(machine.get("cpu_seconds", {}).values()) / n
        return dataclasses.replace(self, c=cpu["daemon_seconds_per_node"], o=others, P=machine.get("cores", 2))

    def for_way(self, name: str, way: dict, n: int) -> "Params":
        """These parameters for one way of a run (``name``, its results ``way``, ``n`` nodes): a
        new image's own tracker requests per node, and the CPU the way measured."""
        q = way.get("tracker_requests_per_node") if name == "thunderfs-new" else None
        return (self if q is None else dataclasses.replace(self, q=q)).with_cpu(way, n)

    @classmethod
    def from_results(cls, r: dict) -> "Params":
        alone = r["alone"]
        W = r.get("alone_glance_bytes") or r["boot_bytes"]
        Dp = max(0.0, alone.get("prefetch", alone["cold"]) - alone["warm"])
        cal = r.get("calibration", {})
        Bg = min(rate(r["glance_rate"]), cal.get("glance_byte_rate", float("inf")))
        T0 = alone["warm"]
        warm_storm = r.get("warm_storm")
        if r.get("mode") == "vm" and warm_storm and any(warm_storm["times"]):
            # N TCG guests share this machine's two cores: their own pace is that of N warm boots at once.
            T0 = max(t for t in warm_storm["times"] if t is not None)
        return cls(S=r["image_bytes"], W=W, Bn=rate(r["node_rate"]), Bg=Bg,
                   k=r.get("alone_glance_requests", 600.0), C=cal.get("glance_request_rate", 200.0),
                   T0=T0, D=max(0.0, alone["cold"] - alone["warm"]), Dp=Dp,
                   q=r.get("tracker_requests_per_node")
                   or r["ways"].get("thunderfs-new", {}).get("tracker_requests_per_node", 200.0),
                   after=tuple(map(tuple, r.get("first_reads", ()))) if r.get("mode") == "replay-paced" else ())


def first_reads(reads, chunk: int = 64 * 2**10) -> tuple[tuple[float, float], ...]:
    """(t, share of the boot's chunks first read at or after t) for each chunk's first read of a
    boot's ``reads`` (``bootstorm.py`` keeps them in its results as ``first_reads``)."""
    seen: set[int] = set()
    firsts: list[float] = []
    for r in reads:
        for c in range(r.offset // chunk, (r.offset + r.size - 1) // chunk + 1):
            if c not in seen:
                seen.add(c)
                firsts.append(r.at)
    n = len(firsts)
    return tuple((t, (n - i) / n) for i, t in enumerate(firsts))


def predict(way: str, n: int, p: Params) -> tuple[float, float]:
    """(seconds until the slowest node has booted, bytes Glance sends)."""
    if way == "nova":
        return max(p.S / p.Bn, n * p.S / p.Bg) + p.T0, n * p.S
    if way == "glance-only":
        return max(p.T0 + p.D, p.W / p.Bn + p.D, n * p.W / p.Bg + p.D, n * p.k / p.C), n * p.W
    if way in ("thunderfs", "thunderfs-new"):
        m = n if p.shared_host else 1
        cores = m * (p.c + p.o) / p.P if p.shared_host else p.c  # a node of a cluster: its own core
        if way == "thunderfs-new" and p.after and cores:
            cores = max(t + share * cores for t, share in p.after)  # the work comes with the reads
        # The peer transfers' CPU is in c where it was measured: then not added again.
        transfers = 0.0 if p.c else m * p.k / p.Cp
        return max(p.T0 + p.Dp, max(p.W / p.Bn, p.W / p.Bg) + p.Dp, p.k / p.C, n * p.q / p.R, cores) + transfers, p.W
    raise ValueError(way)


def curve(way: str, p: Params, ns=(1, 2, 4, 8, 16, 32, 64, 100, 200, 500, 1000, 2000, 5000, 10000)
          ) -> list[tuple[int, float, float]]:
    return [(n, *predict(way, n, p)) for n in ns]


def check(results: dict, tracker_rps: float = TRACKER_REQUESTS_PER_S,
          peer_rps: float = PEER_REQUESTS_PER_S) -> list[tuple[str, int, float, float, float, float]]:
    """(way, N, measured time, predicted time, measured egress, predicted egress) per way."""
    p = Params.from_results(results)
    p.R, p.Cp = tracker_rps, peer_rps
    p.shared_host = True  # every node of a run here shares this machine's two cores
    rows = []
    for way, r in results["ways"].items():
        times = [t for t in r["times"] if t is not None]
        if not times:
            continue
        n = len(r["times"])
        t, e = predict(way, n, p.for_way(way, r, n))
        # A new image's egress: the tracker's seed reads included (its whole-image check after
        # the storm is a one-time cost, like a manifest's).
        rows.append((way, n, max(times), t, r.get("glance_egress_all", r["glance_egress"]), e))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bootstorm.py results JSON")
    ap.add_argument("--tracker-rps", type=float, default=TRACKER_REQUESTS_PER_S)
    ap.add_argument("--peer-rps", type=float, default=PEER_REQUESTS_PER_S)
    ap.add_argument("--project", type=int, metavar="N",
                    help="also project each way to N nodes on a cluster (each node its own CPU), from each file")
    args = ap.parse_args()
    print(f"tracker {args.tracker_rps:.0f} requests/s, a host's peer transfers {args.peer_rps:.0f}/s "
          f"(measured: results/tracker-load-heartbeat10.json, results/peer-serve.json)")
    worst = 0.0
    for path in args.results:
        results = json.loads(Path(path).read_text())
        p = Params.from_results(results)
        print(f"{path}: {results['mode']}, links {results['node_rate']}, Glance {results['glance_rate']}; "
              f"W {p.W / MiB:.1f} MiB, T0 {p.T0:.1f}s, D {p.D:.1f}s, Dp {p.Dp:.1f}s")
        print(f"  {'way':12s} {'N':>4s} {'time meas.':>10s} {'model':>7s} {'error':>6s} "
              f"{'egress meas.':>13s} {'model':>9s} {'error':>6s}")
        for way, n, t, tp, e, ep in check(results, args.tracker_rps, args.peer_rps):
            te, ee = (tp - t) / t, (ep - e) / e if e else 0.0
            worst = max(worst, abs(te), abs(ee))
            print(f"  {way:12s} {n:4d} {t:9.1f}s {tp:6.1f}s {te:+6.0%} {e / MiB:10.0f} MiB {ep / MiB:5.0f} MiB {ee:+6.0%}")
        if args.project:
            q = Params.from_results(results)
            q.R, q.Cp = args.tracker_rps, args.peer_rps
            n = args.project
            for way in ("nova", "glance-only", "thunderfs"):
                t, e = predict(way, n, q)
                load = f"; the tracker {n * q.q / t:,.0f} requests/s of {q.R:,.0f}" if way == "thunderfs" else ""
                once = f"; once per image: the manifest's (or a new image's check's) {q.S / 2**30:.1f} GiB" \
                    if way == "thunderfs" else ""
                print(f"  projected, {n} nodes, {way:12s}: slowest boot {t / 3600:7.2f} h, Glance sends "
                      f"{e / 2**30:10.2f} GiB{once}{load} (links {results['node_rate']}, Glance "
                      f"{q.Bg * 8 / 1e9:.2f} Gbit/s and {q.C:.0f} requests/s as calibrated, {q.q:.0f} tracker "
                      f"requests per node per boot)")
    print(f"largest error: {worst:.0%} (target: within 25%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
