"""``thunderfs mount``, ``umount`` and ``restart``: settings in, the daemon started (in the
background unless ``--foreground``), replaced, and stopped.

Who runs what: under systemd (``NOTIFY_SOCKET`` set) ``mount --foreground`` serves the mount
itself and keeps its descriptor in systemd's store.  Anywhere else it runs the keeper
(``service/keeper.py``), which starts the serving process (this same command, under the keeper's
``NOTIFY_SOCKET``) and starts it again whenever it dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from thunderfs.fuse import mounting
from thunderfs.service import control
from thunderfs.service import systemd
from thunderfs.service.keeper import RESTART_EXIT, Keeper, serving_command
from thunderfs.config import MountConfig
from thunderfs.errors import ConfigError
from thunderfs.glance.auth import find_settings
from thunderfs_common import options

DEFAULT_CONFIG = Path("/etc/thunderfs/thunderfs.toml")

log = logging.getLogger(__name__)


def add_parsers(sub) -> None:
    m = sub.add_parser("mount", help="mount Glance's images at MOUNTPOINT/images/<image-id>",
                       description="Every option may also be set in the config file (TOML): the option's "
                                   "name with underscores, e.g. cache_size = \"20G\"; flags win.")
    m.add_argument("--config", help=f"settings file (default {DEFAULT_CONFIG} if it exists)")
    options.add_arguments(m, MountConfig)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon (default 60)")
    u.set_defaults(func=cmd_umount)

    r = sub.add_parser("restart", help="replace the serving process with one started from the code installed now; "
                                       "the mount and its open files stay")
    r.add_argument("mountpoint")
    r.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the new process to serve (default 120)")
    r.set_defaults(func=cmd_restart)


def load_config(args: argparse.Namespace) -> MountConfig:
    """The mount's settings: defaults, the config file (--config, else the default one if it
    exists), the flags."""
    return options.load(MountConfig, args, options.config_file(args.config, DEFAULT_CONFIG))


def _setup_logging(log_file: Path | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    if log_file is None and systemd.under_journal():
        handler.setFormatter(systemd.JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_mount(args, argv: list[str]) -> int:
    config = load_config(args)
    if missing := config.missing_files():
        raise ConfigError("; ".join(missing))
    keystone = find_settings(config.os_cloud)
    if config.glance is None and keystone is None:
        raise ConfigError("--glance is needed (or Keystone credentials, whose catalog names Glance)")
    if not config.foreground:
        return _spawn_daemon(config, argv)
    inherited = systemd.listen_fds()
    _setup_logging(config.log_file, config.debug)
    if inherited or os.environ.get("NOTIFY_SOCKET"):
        return _serve(config, keystone, inherited)
    return _keep(config, argv)


def _serve(config: MountConfig, keystone, inherited: dict[str, int]) -> int:
    """Serve the mount in this process: 0 once unmounted, ``RESTART_EXIT`` once handed over."""
    import trio  # only the daemon needs it

    from thunderfs import daemon

    ready_fd = config.ready_fd

    def ready() -> None:
        nonlocal ready_fd
        systemd.notify(f"READY=1\nSTATUS=serving {config.mountpoint}\nMAINPID={os.getpid()}")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        how = trio.run(daemon.run, config, keystone, ready, inherited)
    except ConfigError as exc:
        log.error("%s", exc)
        systemd.notify(f"STATUS=error: {exc}")
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {exc}\n".encode())
        elif not os.environ.get("NOTIFY_SOCKET"):
            print(f"thunderfs: {exc}", file=sys.stderr)
        return 1
    if how == daemon.HANDED_OVER:
        return RESTART_EXIT
    systemd.notify("STOPPING=1")
    return 0


def _keep(config: MountConfig, argv: list[str]) -> int:
    """Run the keeper: it starts the serving process and starts it again whenever it dies."""
    ready_fd = config.ready_fd

    def on_ready(answer: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, answer.encode() + b"\n")
            os.close(ready_fd)
            ready_fd = None
        elif answer.startswith("ERROR "):
            print(f"thunderfs: {answer[6:]}", file=sys.stderr)

    def on_stop() -> None:
        mounting.unmount(control.canonical(config.mountpoint), lazy=True)

    keeper = Keeper(serving_command(_without_ready_fd(argv)), on_ready=on_ready, on_stop=on_stop)
    return keeper.run()


def _without_ready_fd(argv: list[str]) -> list[str]:
    """The serving process reports to the keeper, not to whoever waits on the keeper."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ready-fd":
            skip = True
        elif not arg.startswith("--ready-fd="):
            out.append(arg)
    return out


def _spawn_daemon(config: MountConfig, argv: list[str]) -> int:
    """Start the daemon in the background; return once it has mounted (0) or failed (1)."""
    log_file = config.log_file or (config.cache_dir / "thunderfs.log")
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "thunderfs", *argv, "--foreground", "--ready-fd", str(w),
           "--log-file", str(log_file)]
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True)
    os.close(w)
    answer = b""
    deadline = time.monotonic() + 120
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                piece = pipe.read(4096)
                if not piece:
                    break
                answer += piece
            elif proc.poll() is not None:
                break
    text = answer.decode(errors="replace").strip()
    if text == "READY":
        print(f"thunderfs: mounted {config.mountpoint} (pid {proc.pid}, log {log_file})")
        return 0
    if text.startswith("ERROR "):
        print(f"thunderfs: cannot mount {config.mountpoint}: {text[6:]}", file=sys.stderr)
    else:
        print(f"thunderfs: the daemon exited before mounting {config.mountpoint}; see {log_file}",
              file=sys.stderr)
    if proc.poll() is None:
        proc.terminate()
    return 1



def _running(pid: int) -> bool:
    """Alive and not a zombie (a process that exited but nobody reaped yet is done)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cmd_umount(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    try:
        record = control.read_record(mp)
    except ConfigError:
        record = {}
    try:
        fstype = mounting.mounted_type(mp)
    except mounting.MountError as exc:
        print(f"thunderfs: {exc}", file=sys.stderr)
        return 1
    if fstype is None:
        control.remove_record(mp)
        print(f"thunderfs: {mp} is not mounted", file=sys.stderr)
        return 1
    if fstype.startswith("fuse") and mounting.is_dead(mp):
        # Its daemon is gone: nothing can serve it again, and a plain unmount of it may hang.
        try:
            mounting.unmount(mp, lazy=True)
        except mounting.MountError as exc:
            print(f"thunderfs: cannot detach the dead mount {mp}: {exc}", file=sys.stderr)
            return 1
        control.remove_record(mp)
        print(f"thunderfs: detached the dead mount {mp} (its daemon was gone)")
        return 0
    try:
        mounting.unmount(mp)
    except mounting.MountError as exc:
        print(f"thunderfs: cannot unmount {mp}: {exc}", file=sys.stderr)
        return 1
    pids = [p for p in (record.get("pid"), record.get("keeper")) if p]
    if not _wait_gone(pids, args.timeout):
        print(f"thunderfs: unmounted {mp}, but its daemon ({', '.join(map(str, pids))}) is still finishing",
              file=sys.stderr)
        return 1
    return 0


def cmd_restart(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    old = control.call(mp, "restart")["pid"]
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            new = control.call(mp, "stats", timeout=5)["pid"]
        except (ConfigError, OSError, ValueError):
            new = old
        if new != old:
            print(f"thunderfs: {mp} is served by process {new} (was {old})")
            return 0
        time.sleep(0.1)
    print(f"thunderfs: no new process serves {mp} after {args.timeout:g}s; see its log", file=sys.stderr)
    return 1
