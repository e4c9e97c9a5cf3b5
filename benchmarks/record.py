"""What every kept result (benchmarks/results/*.json) carries: where it comes from, and its figures
as the median and range of the runs (read back by benchmarks/report.py)."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def provenance() -> dict:
    """The date of the run and the commit it ran (``git rev-parse --short HEAD``)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
