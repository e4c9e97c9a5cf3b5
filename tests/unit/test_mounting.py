"""Mount-table reading where /proc is not mounted (a bare chroot, as the guest's init had it): a
clear error naming it, not a traceback; fusectl lookups give up quietly."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from thunderfs.daemon import host
from thunderfs.errors import ConfigError
from thunderfs.fuse import mounting


def test_no_mountinfo_is_a_clear_error_and_no_connection(monkeypatch, tmp_path):
    real = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/self/mountinfo":
            raise FileNotFoundError(2, "No such file or directory")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_proc)
    with pytest.raises(mounting.MountError, match="is /proc mounted"):
        mounting.mounted_type(tmp_path)
    assert mounting.connection_dir(tmp_path) is None and mounting.waiting(None) is None
    assert "is /proc mounted" in mounting.set_readahead(tmp_path, 1024)
    with pytest.raises(ConfigError, match="is /proc mounted"):
        host.check_mountpoint(Path(tmp_path))
