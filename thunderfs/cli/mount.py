"""``thunderfs mount`` and ``thunderfs umount``: settings in, the daemon started (in the
background unless ``--foreground``), and stopped."""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from thunderfs.service import control
from thunderfs.service import systemd
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
    for noisy in ("httpx", "httpcore", "pyfuse3"):
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

    import trio  # only the daemon needs it

    from thunderfs import daemon

    _setup_logging(config.log_file, config.debug)
    ready_fd = config.ready_fd

    def ready() -> None:
        nonlocal ready_fd
        systemd.notify(f"READY=1\nSTATUS=serving {config.mountpoint}\nMAINPID={os.getpid()}")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(daemon.run, config, keystone, ready)
    except ConfigError as exc:
        log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {exc}\n".encode())
        else:
            print(f"thunderfs: {exc}", file=sys.stderr)
        return 1
    return 0


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



def cmd_umount(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    try:
        pid = control.read_record(mp)["pid"]
    except ConfigError:
        pid = None
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"thunderfs: cannot unmount {mp}: {res.stderr.strip() or res.stdout.strip()}", file=sys.stderr)
        return 1
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            print(f"thunderfs: unmounted {mp}, but daemon {pid} is still finishing", file=sys.stderr)
            return 1
    return 0
