"""A kept result names the commit it ran, and says so when the code it ran was not committed."""

from __future__ import annotations

import subprocess

from benchmarks.record import provenance


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_a_run_on_uncommitted_code_is_marked_dirty_and_a_docs_change_is_not(tmp_path):
    (tmp_path / "thunderfs").mkdir()
    (tmp_path / "thunderfs" / "fs.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("figures\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance(tmp_path)["commit"] == head
    (tmp_path / "README.md").write_text("other figures\n")
    assert provenance(tmp_path)["commit"] == head  # the docs are not what a run executes
    (tmp_path / "thunderfs" / "fs.py").write_text("x = 2\n")
    assert provenance(tmp_path)["commit"] == f"{head}+dirty"
