"""The chaos run (harness/chaos_run.py): nodes read through their mounts while faults are injected.

Short form (every fault once, about 3 minutes; the test suite runs it too):
    .venv/bin/python benchmarks/chaos.py
At length (faults drawn at random, a Glance outage at most every 5 minutes):
    .venv/bin/python benchmarks/chaos.py --duration 1800 --json /var/tmp/thunderfs-bench/results/chaos-1800.json

Prints faults injected, bytes compared, wrong bytes, hangs and errors; exits 1 unless all pass.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from harness.chaos_run import FAULTS, Settings, run, save


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4, help="reading nodes (one more is the liar)")
    ap.add_argument("--duration", type=float, help="seconds of random faults (default: each fault once)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS), help="the short form's schedule, in order")
    ap.add_argument("--workdir", help="keep logs and caches here instead of a temporary directory")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every fault and incident as it happens")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="thunderfs-chaos-") as tmp:
        report = run(Settings(workdir=Path(args.workdir or tmp), nodes=args.nodes, duration=args.duration,
                              seed=args.seed, faults=tuple(args.faults.split(","))))
    for line in report.lines():
        print(line)
    for name, d in report.daemons.items():
        print(f"  {name}: {d}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save(report, args.json)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
