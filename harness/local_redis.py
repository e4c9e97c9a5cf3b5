"""A real redis-server (the Debian package) on loopback, with its own port and directory, for
tests and benchmarks; stopped by its PID.  No persistence: a restart comes back empty, as a
Redis that lost its data does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness.local_glance import free_port
from harness.procs import stop_group


class LocalRedis:
    def __init__(self, workdir: Path, host: str = "127.0.0.1"):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10) -> "LocalRedis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is missing (apt: redis-server; scripts/setup.sh installs it)")
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen([exe, "--bind", self.host, "--port", str(self.port), "--dir", str(self.dir),
                                      "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-1000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not come up")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=10)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
