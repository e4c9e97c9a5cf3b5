"""PNG plots of boot-storm results (bootstorm.py's JSON) and the model's curves.

  boot-times-<run>.png      boot time of every node, by way
  sources-<run>.png         bytes by source over time during the thunderfs storm (and Glance's egress)
  egress-vs-nodes.png       Glance egress against N: measured points, the model to 10,000 nodes
  time-vs-nodes.png         storm completion against N: measured points, the model to 10,000 nodes

Usage: .venv/bin/python benchmarks/plots.py [RESULTS.json ...] [--out benchmarks/plots]
       (no RESULTS: the kept ones, benchmarks/results/bootstorm-*.json, as benchmarks/report.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import matplotlib
except ImportError:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    raise SystemExit("plots.py needs matplotlib: bash scripts/setup.sh --bench")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.storm_model import Params, curve  # noqa: E402

MiB = 2**20
COLORS = {"thunderfs": "tab:blue", "glance-only": "tab:orange", "nova": "tab:red"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_name(r: dict) -> str:
    return f"{r['mode']}-{r['nodes']}"


def boot_times(r: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ways = dict(r["ways"])
    if r.get("warm_storm"):
        ways = {"warm, all at once": r["warm_storm"], **ways}
    for k, (way, w) in enumerate(ways.items()):
        times = [t for t in w["times"] if t is not None]
        ax.scatter([k] * len(times), times, s=12, alpha=0.7, color=COLORS.get(way, "tab:green"),
                   label=f"{way} ({len(times)} nodes)")
    ax.axhline(r["alone"]["warm"], color="grey", linestyle="--", label="one node alone, warm cache")
    ax.set_xticks(range(len(ways)), list(ways), fontsize=8)
    ax.set_ylabel("boot time (s)")
    ax.set_title(f"Boot time per node, {r['mode']}, {r['nodes']} nodes, links {r['node_rate']}")
    ax.legend(fontsize=8)
    return _save(fig, out / f"boot-times-{run_name(r)}.png")


def sources(r: dict, out: Path) -> Path | None:
    tf = r["ways"].get("thunderfs")
    if not tf or not tf["timeline"]:
        return None
    tl = tf["timeline"]
    t = [s["t"] for s in tl]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("from_glance", "nodes' bytes from Glance"), ("from_peers", "from peers"),
                       ("from_cache", "served from their caches")):
        ax.plot(t, [s.get(key, 0) / MiB for s in tl], label=label)
    ax.plot(t, [s["glance"] / MiB for s in tl], "k--", label="Glance egress (at Glance)")
    ax.set_xlabel("seconds into the storm")
    ax.set_ylabel("MiB, cumulative, all nodes")
    ax.set_title(f"Bytes by source, thunderfs, {r['mode']}, {r['nodes']} nodes")
    ax.legend(fontsize=8)
    return _save(fig, out / f"sources-{run_name(r)}.png")


def versus_nodes(results: list[dict], out: Path) -> list[Path]:
    base = results[0]
    p = Params.from_results(base)
    paths = []
    for idx, (what, ylabel, fname) in enumerate(((1, "storm completion (s)", "time-vs-nodes.png"),
                                                 (2, "Glance egress (GiB)", "egress-vs-nodes.png"))):
        fig, ax = plt.subplots(figsize=(7, 4))
        for way in ("thunderfs", "glance-only", "nova"):
            pts = curve(way, p)
            scale = 1 if what == 1 else 1 / 2**30
            ax.plot([n for n, *_ in pts], [v[what] * scale for v in pts], color=COLORS[way], label=f"model: {way}")
            for r in results:
                w = r["ways"].get(way)
                if not w:
                    continue
                times = [t for t in w["times"] if t is not None]
                if not times:
                    continue
                y = max(times) if what == 1 else w["glance_egress"] / 2**30
                ax.scatter([len(w["times"])], [y], color=COLORS[way], marker="o", edgecolor="k", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes booting at once (dots: measured here; lines: the model)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{base['mode']}, links {base['node_rate']}, Glance {base['glance_rate']}")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / fname))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", help="bootstorm.py results (default: the kept ones, "
                    "benchmarks/results/bootstorm-*.json, which benchmarks/report.py reads too)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "plots"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = args.results or sorted(str(p) for p in (Path(__file__).resolve().parent / "results").glob("bootstorm-*.json"))
    if not paths:
        raise SystemExit("no results: run benchmarks/bootstorm.py (see benchmarks/report.py --commands)")
    results = [json.loads(Path(p).read_text()) for p in paths]
    made = []
    for r in results:
        made.append(boot_times(r, out))
        made.append(sources(r, out))
    made += versus_nodes(results, out)
    for p in made:
        if p:
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
