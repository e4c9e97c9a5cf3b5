"""A real redis-server (the Debian package) on loopback, with its own port and directory, for
tests and benchmarks; stopped by its PID.  No persistence: a restart comes back empty, as a
Redis that lost its data does."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from harness.local_glance import free_port
from harness.procs import stop_group
from harness.tls import make_ca_and_server


class LocalRedis:
    """``password``: started with ``requirepass``, as operators run it; ``url`` carries it.
    ``tls``: TLS only (a throwaway CA, ``harness.tls``); ``url`` is ``rediss://`` with the CA file."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", password: str | None = None, tls: bool = False):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, free_port(host)
        self.password = password
        self.tls = make_ca_and_server(self.dir / "tls", host) if tls else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10) -> "LocalRedis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is missing (apt: redis-server; scripts/setup.sh installs it)")
        log = open(self.dir / "redis.log", "ab")
        ports = ["--port", str(self.port)]
        if self.tls:
            ca, cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen([exe, "--bind", self.host, *ports, "--dir", str(self.dir),
                                      "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                      *(["--requirepass", self.password] if self.password else [])],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-1000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as raw:
                    s = ssl.create_default_context(cafile=str(self.tls[0])).wrap_socket(
                        raw, server_hostname=self.host) if self.tls else raw
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (and asking for the password)
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
