"""Glance behind TLS, as clouds run it: nginx terminating HTTPS in front of a local Glance, with a
certificate for 127.0.0.1 signed by a throwaway CA (``harness.tls``; ``ca_file``: what a client
must trust)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness.local_glance import free_port
from harness.nginx import write_conf
from harness.tls import make_ca_and_server

SERVER = """    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""


class TLSProxy:
    def __init__(self, workdir: Path, upstream: str):
        self.dir = Path(workdir)
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file, self._cert, self._key = make_ca_and_server(self.dir)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        write_conf(self.dir, SERVER.format(port=self.port, cert=self._cert, key=self._key, upstream=self.upstream))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def __enter__(self) -> "TLSProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
