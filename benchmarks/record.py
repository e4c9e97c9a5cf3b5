"""What every kept result (benchmarks/results/*.json) carries: where it comes from, and its figures
as the median and range of the runs (read back by benchmarks/report.py)."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# What a run executes: a change here that is not committed makes the commit a lie.
CODE = ("thunderfs", "thunderfs_common", "thunderfs_tracker", "harness", "benchmarks/*.py", "pyproject.toml")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()


def provenance(repo: Path = REPO) -> dict:
    """The date of the run and the commit it ran (``git rev-parse --short HEAD``), marked
    ``+dirty`` when the code it runs has changes not committed.  Call it when the run starts."""
    commit = git(repo, "rev-parse", "--short", "HEAD")
    if git(repo, "status", "--porcelain", "--", *CODE):
        commit += "+dirty"
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
