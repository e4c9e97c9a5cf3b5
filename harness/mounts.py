"""Real thunderfs daemons for tests, demo and benchmarks, started through the CLI.

Each ``Mount`` runs ``thunderfs mount`` (which backgrounds the keeper, which starts the serving
process, and returns once mounted), remembers both PIDs from the control record, and on cleanup
unmounts, or kills the keeper's process group and detaches the mount if it must.  Nothing else
is ever killed.  ``pid`` is the serving process (which the keeper replaces when it dies),
``keeper`` the node's daemon as a whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from thunderfs.errors import ConfigError
from thunderfs.service import control


def thunderfs(*args: str, check: bool = False, timeout: float = 180, prefix: list[str] | None = None,
              **kw) -> subprocess.CompletedProcess:
    """Run the CLI; ``prefix`` runs it inside something (``ip netns exec NS``)."""
    return subprocess.run([*(prefix or []), sys.executable, "-m", "thunderfs", *args], capture_output=True,
                          text=True, check=check, timeout=timeout, **kw)


class Mount:
    def __init__(self, mountpoint: Path, glance_url: str, cache_dir: Path, *args: str,
                 prefix: list[str] | None = None):
        self.prefix = prefix
        self.path = Path(mountpoint)
        self.glance_url = glance_url
        self.cache_dir = Path(cache_dir)
        self.args = list(args)
        self.pid: int | None = None
        self.keeper: int | None = None
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def log_file(self) -> Path:
        return self.cache_dir / "thunderfs.log"

    def mount(self, *extra: str) -> subprocess.CompletedProcess:
        """Mount; raises with the CLI's message if it fails (use ``try_mount`` to see failures)."""
        res = self.try_mount(*extra)
        if res.returncode != 0:
            raise RuntimeError(f"thunderfs mount failed ({res.returncode}): {res.stderr}\n{self.log_tail()}")
        return res

    def try_mount(self, *extra: str) -> subprocess.CompletedProcess:
        res = thunderfs("mount", str(self.path), "--glance", self.glance_url, "--cache-dir", str(self.cache_dir),
                        *self.args, *extra, prefix=self.prefix)
        if res.returncode == 0:
            self.read_pids()
        return res

    def read_pids(self) -> None:
        record = control.read_record(self.path)
        self.pid, self.keeper = record["pid"], record.get("keeper")

    def image(self, image_id: str) -> Path:
        return self.path / "images" / image_id

    def data_file(self, image_id: str) -> Path:
        """The cache file holding an image's chunks (tests alter it behind the daemon's back)."""
        key = os.getxattr(self.image(image_id), "user.thunderfs.content_key").decode()
        return self.cache_dir / "data" / f"{key}.data"

    def stats(self) -> dict:
        return control.call(self.path, "stats")

    def alive(self) -> bool:
        """Whether the node's daemon (the keeper, else the serving process) is alive."""
        return any(_alive(p) for p in (self.keeper, self.pid))

    def wait_exit(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return False

    def umount(self) -> subprocess.CompletedProcess:
        res = thunderfs("umount", str(self.path), prefix=self.prefix)
        if res.returncode == 0:
            self.pid = self.keeper = None
        return res

    def signal(self, sig: int) -> None:
        """Signal the node's daemon: the keeper (SIGTERM unmounts), else the serving process."""
        target = self.keeper or self.pid
        assert target is not None
        os.kill(target, sig)

    def signal_server(self, sig: int) -> int:
        """Signal the serving process (SIGKILL: a crash the keeper recovers from); its pid."""
        assert self.pid is not None
        pid = self.pid
        os.kill(pid, sig)
        return pid

    def wait_new_server(self, old: int, timeout: float = 60) -> int:
        """Wait until a process other than ``old`` serves the mount (its record says so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = control.read_record(self.path)
                if record["pid"] != old and _alive(record["pid"]):
                    control.call(self.path, "stats", timeout=5)
                    self.read_pids()
                    return self.pid
            except (ConfigError, OSError, KeyError, ValueError):
                pass  # between two serving processes
            time.sleep(0.05)
        raise TimeoutError(f"no new serving process for {self.path} after {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the node's daemon, keeper and serving process (a crash of the node), and detach
        the dead mount so that it can be mounted again."""
        if self.keeper is not None and _alive(self.keeper):
            os.killpg(self.keeper, signal.SIGKILL)  # the keeper leads its process group
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(10)
        self.pid = self.keeper = None
        self._detach()

    def _detach(self) -> None:
        if self.is_mounted():
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def is_mounted(self) -> bool:
        target = str(control.canonical(self.path))
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_file.read_text()[-n:]
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        if self.alive():
            if self.umount().returncode != 0:
                self.kill9()
        self._detach()

    def __enter__(self) -> "Mount":
        self.mount()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def status_json(mount: Mount) -> dict:
    return json.loads(thunderfs("status", str(mount.path), "--json", check=True).stdout)
