"""A real thunderfs-tracker process on loopback for tests and benchmarks, stopped by its PID."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.local_glance import free_port
from harness.procs import stop_group


class LocalTracker:
    def __init__(self, state_dir: Path, *args: str, secret: bytes | None = None, host: str = "127.0.0.1",
                 check_quiet: float | None = 0):
        """``check_quiet``: the tracker's --check-quiet; 0 (the harness's default, not the
        tracker's) checks a new image as soon as a node asks, so that a test or a bench waiting
        for a built manifest does not wait for a quiet half minute; None: the tracker's default."""
        if check_quiet is not None and "--check-quiet" not in args:
            args = (*args, "--check-quiet", str(check_quiet))
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, free_port(host)
        self.args = list(args)
        self.secret = secret
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> None:
        cmd = [sys.executable, "-m", "thunderfs_tracker", "--listen", f"{self.host}:{self.port}",
               "--state-dir", str(self.dir), *self.args]
        if self.secret:
            secret_file = self.dir / "secret"
            secret_file.write_bytes(self.secret)
            secret_file.chmod(0o600)
            cmd += ["--secret-file", str(secret_file)]
        log = open(self.dir / "tracker.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tracker exited: {(self.dir / 'tracker.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("tracker did not come up")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=10)

    def log(self) -> str:
        return (self.dir / "tracker.log").read_text()
