"""The map of docs/design.md holds: the import-linter contracts in pyproject.toml (rooms import
only rooms below them, type-checking imports included; pyfuse3 nowhere, the FUSE layer speaks
the kernel's protocol itself; nothing below the daemon reads the config; from the tracker the
daemon takes only its client and protocol; shared code owns nothing of either program)."""

from __future__ import annotations

from pathlib import Path

from importlinter import configuration
from importlinter.application import use_cases

REPO = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold(capsys):
    configuration.configure()  # what the lint-imports command does, without its logging set-up
    passed = use_cases.lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert passed, out
    assert "0 broken" in out
