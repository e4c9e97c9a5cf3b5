"""nginx as the harness runs it: in the foreground, one worker, logs and pid in its own directory,
as root (Glance's copy of an image lies in a directory only root reads); ``server`` is the one
``server { ... }`` block that says what it does (plain files, or TLS in front of Glance)."""

from __future__ import annotations

from pathlib import Path

HEAD = """daemon off;
user root;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
{server}
}}
"""


def write_conf(directory: Path, server: str) -> Path:
    path = directory / "nginx.conf"
    path.write_text(HEAD.format(dir=directory, server=server))
    return path
