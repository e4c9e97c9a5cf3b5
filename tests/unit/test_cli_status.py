"""``thunderfs status`` over every mount of the host: a record a dead daemon left is said, not fatal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from thunderfs.cli import status
from thunderfs.errors import ConfigError


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(mountpoint=kw.get("mountpoint"), json=True)


@pytest.fixture
def host(monkeypatch):
    """Two records: /mnt/live (a daemon answers) and /mnt/dead (its daemon was killed)."""
    def call(mountpoint: Path, op: str, **_kw) -> dict:
        if mountpoint == Path("/mnt/dead"):
            raise ConfigError(f"no thunderfs daemon is serving {mountpoint}")
        return {"mountpoint": str(mountpoint), "op": op}

    monkeypatch.setattr(status.control, "mountpoints", lambda: [Path("/mnt/dead"), Path("/mnt/live")])
    monkeypatch.setattr(status.control, "call", call)


def test_every_mount_lists_the_live_ones_and_says_which_record_is_dead(host, capsys):
    assert status.cmd_status(_args(), []) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"mountpoint": "/mnt/live", "op": "stats"}]
    assert "/mnt/dead" in err and "gone" in err


def test_a_dead_mount_named_is_an_error_and_so_is_no_live_mount(host, monkeypatch):
    with pytest.raises(ConfigError, match="/mnt/dead"):
        status.cmd_status(_args(mountpoint="/mnt/dead"), [])
    monkeypatch.setattr(status.control, "mountpoints", lambda: [Path("/mnt/dead")])
    with pytest.raises(ConfigError, match="no thunderfs mount is running"):
        status.cmd_status(_args(), [])
