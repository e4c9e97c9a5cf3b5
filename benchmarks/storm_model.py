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
  Bg is the lesser of Glance's link and what one node measured getting from it (calibration).

  Nova's way     egress N*S;  time  max(S/Bn, N*S/Bg) + T0       (download, then boot locally)
  Glance only    egress N*W;  time  max(T0 + D, W/Bn + D, N*W/Bg + D, N*k/C)
  thunderfs      egress W;
      time  max(T0 + Dp, max(W/Bn, W/Bg) + Dp, k/C, N*q/R) + M*k/Cp
                 (Glance sends the working set once and nodes relay it, pipelined: each node's
                 own link and one pass through Glance's bound the time; N*q/R is the tracker
                 saturating; M*k/Cp the peer transfers of the nodes sharing a host's CPU, which
                 hold up the boots on that host)

``check`` compares it with the measured runs and prints the error; ``curve`` gives points for
N = 1..10,000 (benchmarks/plots.py draws them).

Two inputs are not in a storm's results: the tracker's and a host's peer request rates. Their
defaults are ASSUMPTIONS carried from earlier runs of benchmarks/tracker_bench.py (1,600
requests/s: announces and full states, 1,000 nodes) and benchmarks/peer_serve_bench.py (1,671
64 KiB requests/s, client and server on 2 cores); pass what those print on your machine.

Usage: .venv/bin/python benchmarks/storm_model.py RESULTS.json [...] [--tracker-rps R] [--peer-rps CP]
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
TRACKER_REQUESTS_PER_S = 1600.0  # an assumption (see the docstring): --tracker-rps
PEER_REQUESTS_PER_S = 1671.0     # an assumption (see the docstring): --peer-rps


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
                   q=r.get("tracker_requests_per_node", 200.0))


def predict(way: str, n: int, p: Params) -> tuple[float, float]:
    """(seconds until the slowest node has booted, bytes Glance sends)."""
    if way == "nova":
        return max(p.S / p.Bn, n * p.S / p.Bg) + p.T0, n * p.S
    if way == "glance-only":
        return max(p.T0 + p.D, p.W / p.Bn + p.D, n * p.W / p.Bg + p.D, n * p.k / p.C), n * p.W
    if way == "thunderfs":
        m = n if p.shared_host else 1
        return max(p.T0 + p.Dp, max(p.W / p.Bn, p.W / p.Bg) + p.Dp, p.k / p.C, n * p.q / p.R) + m * p.k / p.Cp, p.W
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
        t, e = predict(way, n, p)
        rows.append((way, n, max(times), t, r["glance_egress"], e))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bootstorm.py results JSON")
    ap.add_argument("--tracker-rps", type=float, default=TRACKER_REQUESTS_PER_S)
    ap.add_argument("--peer-rps", type=float, default=PEER_REQUESTS_PER_S)
    ap.add_argument("--project", type=int, metavar="N",
                    help="also project each way to N nodes on a cluster (each node its own CPU), from each file")
    args = ap.parse_args()
    print(f"assumed: tracker {args.tracker_rps:.0f} requests/s, a host's peer transfers {args.peer_rps:.0f}/s")
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
            for way in ("nova", "glance-only", "thunderfs"):
                t, e = predict(way, args.project, q)
                print(f"  projected, {args.project} nodes, {way:12s}: slowest boot {t / 3600:7.2f} h, Glance sends "
                      f"{e / 2**30:10.2f} GiB (links {results['node_rate']}, Glance {q.Bg * 8 / 1e9:.2f} Gbit/s and "
                      f"{q.C:.0f} requests/s as calibrated, {q.q:.0f} tracker requests per node per boot)")
    print(f"largest error: {worst:.0%} (target: within 25%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
