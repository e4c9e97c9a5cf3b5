"""The headline tables in docs/status.md and benchmarks/README.md are what the kept results say
(benchmarks/report.py renders them from benchmarks/results/*.json)."""

from __future__ import annotations

import json
import shutil

from benchmarks import report


def test_the_readmes_tables_agree_with_the_kept_results():
    rows = report.headlines()
    for path, render in report.TARGETS.items():
        text = path.read_text()
        assert report.splice(text, render(rows), path) == text, (
            f"{path}: its headline table differs from benchmarks/results/; run benchmarks/report.py --write")


def test_every_kept_result_names_its_date_and_commit_and_each_headline_its_command():
    for row in report.headlines():
        assert row.command.startswith(".venv/bin/python benchmarks/")
        if row.verdict != "not run":
            dates, commit = row.source.split(", ")
            # Runs of one set may span midnight: "2026-12-05 / 2026-12-06".
            assert all(len(d) == 10 and d[4] == d[7] == "-" for d in dates.split(" / ")), row
            assert commit not in ("", "?"), row


def test_a_verdict_follows_the_figure_and_a_missing_result_says_not_run(tmp_path):
    shutil.copy(report.RESULTS / "dataplane.json", tmp_path)
    r = json.loads((tmp_path / "dataplane.json").read_text())
    r["cold"]["ratio_null"] = {"median": 0.6, "min": 0.5, "max": 0.7, "runs": [0.5, 0.6, 0.7]}
    (tmp_path / "dataplane.json").write_text(json.dumps(r))
    rows = {row.what: row for row in report.headlines(tmp_path)}
    cold = rows["cold whole-image read / curl > /dev/null"]
    assert cold.verdict == "met" and cold.ratio == "0.60 (0.50-0.70)"
    assert rows["same: Glance egress / one boot's reads"].verdict == "not run"
