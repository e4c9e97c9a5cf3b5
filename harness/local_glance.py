"""A real Glance on loopback for the demo, the tests and the benchmarks.

Glance runs from its own venv (``.venv-glance`` beside the project, or
``$THUNDERFS_GLANCE_VENV``) under gunicorn with a sqlite database and a file
store, no Keystone: the configuration of ``shared/notes/glance.md``.  The
process group is tracked by PID and stopped by it; nothing else is killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.procs import stop_group

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
[DEFAULT]
bind_host = 127.0.0.1
bind_port = {port}
enabled_backends = fs:file
log_file = {dir}/api.log
[database]
connection = sqlite:///{dir}/glance.sqlite
[paste_deploy]
flavor = {flavor}
config_file = {venv}/etc/glance/glance-api-paste.ini
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {dir}/images
[os_glance_tasks_store]
filesystem_store_datadir = {dir}/tasks
[os_glance_staging_store]
filesystem_store_datadir = {dir}/staging
[oslo_policy]
enforce_new_defaults = false
enforce_scope = false
"""

# With a Keystone: tokens checked by keystonemiddleware (installed with Glance), as in a cloud.
KEYSTONE_AUTHTOKEN = """[keystone_authtoken]
www_authenticate_uri = {url}
auth_url = {url}
auth_type = password
username = admin
password = {password}
project_name = admin
user_domain_name = Default
project_domain_name = Default
"""


class GlanceSetupError(RuntimeError):
    pass


def glance_venv() -> Path:
    return Path(os.environ.get("THUNDERFS_GLANCE_VENV", REPO / ".venv-glance"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalGlance:
    """One Glance API process; ``start()``/``stop()`` may be repeated (same port, same data)."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1", workers: int = 1,
                 keystone=None):
        self.dir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.workers = workers
        self.venv = glance_venv()
        self.proc: subprocess.Popen | None = None
        self._configured = False
        self.keystone = keystone  # a harness.local_keystone.LocalKeystone, or None: no auth

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _configure(self) -> None:
        if not (self.venv / "bin" / "gunicorn").exists():
            raise GlanceSetupError(
                f"no Glance venv at {self.venv} (run scripts/setup.sh, or set THUNDERFS_GLANCE_VENV)"
            )
        for sub in ("images", "tasks", "staging"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = CONFIG.format(port=self.port, dir=self.dir, venv=self.venv,
                             flavor="keystone" if self.keystone else "")
        if self.keystone:
            conf += KEYSTONE_AUTHTOKEN.format(url=self.keystone.url, password=self.keystone.admin_password)
        (self.dir / "glance-api.conf").write_text(conf)
        subprocess.run(
            [str(self.venv / "bin" / "glance-manage"), "--config-file", str(self.dir / "glance-api.conf"), "db_sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._configured = True

    def start(self, timeout: float = 60.0, netns: str | None = None) -> None:
        if self.proc is not None:
            return
        if not self._configured:
            self._configure()
        cmd = [
            str(self.venv / "bin" / "gunicorn"),
            "-b", f"{self.host}:{self.port}",
            "-w", str(self.workers),
            "--threads", "8",
            "--timeout", "300",
            "glance.wsgi.api:application",
        ]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=str(self.dir))
        logf = open(self.dir / "gunicorn.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "gunicorn.log").read_text()[-2000:]
                self.proc = None
                raise GlanceSetupError(f"Glance exited at start:\n{tail}")
            try:
                self.request("GET", "/v2/images?limit=1")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise GlanceSetupError(f"Glance did not answer on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc)

    def pause(self) -> None:
        """SIGSTOP the whole group: the port stays bound but nothing answers (a hung Glance)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    # --- API -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 300.0):
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={**self._auth_headers(), **(headers or {})})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            if resp.headers.get("Content-Type", "").startswith("application/json") and data:
                return json.loads(data)
            return data

    def _auth_headers(self) -> dict:
        return {"X-Auth-Token": self.keystone.admin_token()} if self.keystone else {}

    def create_image(self, name: str, disk_format: str = "raw") -> str:
        meta = self.request(
            "POST", "/v2/images",
            json.dumps({"name": name, "disk_format": disk_format, "container_format": "bare"}).encode(),
            {"Content-Type": "application/json"},
        )
        return meta["id"]

    def upload(self, name: str, data: bytes | Path, disk_format: str = "raw") -> dict:
        """Create an image, upload its bytes (from memory or a file), return Glance's record once active."""
        image_id = self.create_image(name, disk_format)
        if isinstance(data, Path):
            with open(data, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                req = urllib.request.Request(
                    f"{self.url}/v2/images/{image_id}/file", data=f, method="PUT",
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size),
                             **self._auth_headers()},
                )
                urllib.request.urlopen(req, timeout=600).read()
        else:
            self.request("PUT", f"/v2/images/{image_id}/file", data,
                         {"Content-Type": "application/octet-stream"}, timeout=600)
        meta = self.image(image_id)
        if meta["status"] != "active":
            raise GlanceSetupError(f"image {image_id} is {meta['status']} after upload")
        return meta

    def image(self, image_id: str) -> dict:
        return self.request("GET", f"/v2/images/{image_id}")

    def delete(self, image_id: str) -> None:
        self.request("DELETE", f"/v2/images/{image_id}")

    def hide(self, image_id: str) -> None:
        """os_hidden: Glance's listings leave the image out unless asked; it stays usable by id."""
        self.request("PATCH", f"/v2/images/{image_id}",
                     json.dumps([{"op": "replace", "path": "/os_hidden", "value": True}]).encode(),
                     {"Content-Type": "application/openstack-images-v2.1-json-patch"})

    def deactivate(self, image_id: str) -> None:
        self.request("POST", f"/v2/images/{image_id}/actions/deactivate")

    def images(self) -> list[dict]:
        out, path = [], "/v2/images?limit=100"
        while path:
            page = self.request("GET", path)
            out.extend(page["images"])
            path = page.get("next")
        return out

    def __enter__(self) -> "LocalGlance":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
