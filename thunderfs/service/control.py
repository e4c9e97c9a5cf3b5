"""The daemon's control socket: a JSON line in, a JSON line out.

Each mount has a small record in the runtime directory (pid, cache dir, Glance URL, socket
path), found from its mount point, so that ``thunderfs umount/verify/status`` need only the
mount point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from thunderfs.errors import ConfigError

log = logging.getLogger(__name__)

Handler = Callable[[dict], Awaitable[dict] | dict]


def runtime_dir() -> Path:
    env = os.environ.get("THUNDERFS_RUN_DIR")
    if env:
        return Path(env)
    return Path("/run/thunderfs") if os.geteuid() == 0 else Path(f"/tmp/thunderfs-{os.getuid()}")


def canonical(mountpoint: Path) -> Path:
    """The mount point's real path, found without a stat of the mount point itself (which would
    hang on a hung mount, and deadlock the daemon on its own mount)."""
    path = Path(os.path.abspath(mountpoint))
    return Path(os.path.realpath(path.parent)) / path.name


def _key(mountpoint: Path) -> str:
    return hashlib.sha1(os.fsencode(canonical(mountpoint))).hexdigest()[:16]


def record_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"mount-{_key(mountpoint)}.json"


def socket_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"mount-{_key(mountpoint)}.sock"


def write_record(mountpoint: Path, record: dict) -> None:
    path = record_path(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def read_record(mountpoint: Path) -> dict:
    try:
        return json.loads(record_path(mountpoint).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no thunderfs daemon is serving {mountpoint}") from None


def mountpoints() -> list[Path]:
    """The mount points of the daemons running on this host (from their records)."""
    out = []
    for path in sorted(runtime_dir().glob("mount-*.json")):
        try:
            out.append(Path(json.loads(path.read_text())["mountpoint"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


def remove_record(mountpoint: Path) -> None:
    for p in (record_path(mountpoint), socket_path(mountpoint)):
        p.unlink(missing_ok=True)


async def serve(path: Path, handlers: dict[str, Handler], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            with trio.move_on_after(10):
                while not buf.endswith(b"\n"):
                    piece = await stream.receive_some(65536)
                    if not piece:
                        return
                    buf += piece
                    if len(buf) > 65536:
                        return
            try:
                req = json.loads(buf)
                handler = handlers[req["op"]]
                result = handler(req)
                if hasattr(result, "__await__"):
                    result = await result
                reply = {"ok": True, "result": result}
            except KeyError as exc:
                reply = {"ok": False, "error": f"unknown request {exc}"}
            except ValueError as exc:  # the request cannot be done: the handler says why
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the answer to one bad request, not a daemon failure
                log.exception("control request failed")
                reply = {"ok": False, "error": str(exc)}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    task_status.started()
    await trio.serve_listeners(handle, [listener])


def call(mountpoint: Path, op: str, timeout: float = 30.0, **args) -> dict:
    """Ask the daemon serving ``mountpoint``; raises ConfigError if there is none."""
    path = socket_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                piece = s.recv(1 << 20)
                if not piece:
                    break
                buf += piece
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(f"no thunderfs daemon is serving {mountpoint}") from None
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ConfigError(f"daemon refused {op}: {reply.get('error')}")
    return reply["result"]
