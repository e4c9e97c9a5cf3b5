"""A real Keystone on loopback for the tests: sqlite, fernet tokens, bootstrapped admin.

Keystone runs from its own venv (``.venv-keystone`` beside the project, or
``$THUNDERFS_KEYSTONE_VENV``) under gunicorn.  ``token_seconds`` makes its tokens short-lived so
that renewal can be seen within a test.  The process group is tracked by PID and stopped by it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.local_glance import REPO, free_port
from harness.procs import stop_group

CONFIG = """\
[DEFAULT]
log_file = {dir}/keystone.log
[database]
connection = sqlite:///{dir}/keystone.sqlite
[token]
provider = fernet
expiration = {token_seconds}
[fernet_tokens]
key_repository = {dir}/fernet-keys
[credential]
key_repository = {dir}/credential-keys
"""

ADMIN_PASSWORD = "thunderfs-test-admin"


class KeystoneSetupError(RuntimeError):
    pass


def keystone_venv() -> Path:
    return Path(os.environ.get("THUNDERFS_KEYSTONE_VENV", REPO / ".venv-keystone"))


class LocalKeystone:
    admin_password = ADMIN_PASSWORD  # what a Glance that checks tokens here logs in with

    def __init__(self, workdir: Path, *, token_seconds: int = 3600, host: str = "127.0.0.1"):
        self.dir = Path(workdir)
        self.host, self.port = host, free_port(host)
        self.token_seconds = token_seconds
        self.venv = keystone_venv()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v3"

    def _manage(self, *args: str) -> None:
        res = subprocess.run([str(self.venv / "bin" / "keystone-manage"), "--config-file",
                              str(self.dir / "keystone.conf"), *args], capture_output=True, text=True)
        if res.returncode:
            raise KeystoneSetupError(f"keystone-manage {args[0]} failed:\n{res.stderr[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        if not (self.venv / "bin" / "keystone-manage").exists():
            raise KeystoneSetupError(f"no Keystone venv at {self.venv} (run scripts/setup.sh)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "keystone.conf").write_text(CONFIG.format(dir=self.dir, token_seconds=self.token_seconds))
        self._manage("db_sync")
        self._manage("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
        self._manage("bootstrap", "--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-region-id", "RegionOne",
                     "--bootstrap-admin-url", self.url, "--bootstrap-public-url", self.url,
                     "--bootstrap-internal-url", self.url)
        self.resume(timeout)

    def resume(self, timeout: float = 60.0) -> None:
        """Serve again after ``stop()``, with the same database and keys (an outage that ends)."""
        env = dict(os.environ, OS_KEYSTONE_CONFIG_FILES=str(self.dir / "keystone.conf"))
        logf = open(self.dir / "gunicorn.log", "ab")
        # Keystone parses the process's command line as its own options: the worker forgets
        # gunicorn's before it loads the app.
        (self.dir / "gunicorn.conf.py").write_text(
            f"import sys\nbind = '{self.host}:{self.port}'\nworkers = 1\nthreads = 4\n"
            "wsgi_app = 'keystone.wsgi.api:application'\n\n"
            "def post_fork(server, worker):\n    del sys.argv[1:]\n")
        self.proc = subprocess.Popen([str(self.venv / "bin" / "gunicorn"), "-c", str(self.dir / "gunicorn.conf.py")],
                                     env=env, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise KeystoneSetupError("Keystone exited at start:\n"
                                         + (self.dir / "gunicorn.log").read_text()[-2000:])
            try:
                urllib.request.urlopen(self.url, timeout=2).read()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.3)
        self.stop()
        raise KeystoneSetupError(f"Keystone did not answer on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc)

    # --- the admin's view ------------------------------------------------------------------

    def admin_auth(self) -> dict:
        """The ``auth`` of a clouds.yaml entry for the bootstrapped admin."""
        return {"auth_url": self.url, "username": "admin", "password": ADMIN_PASSWORD, "project_name": "admin",
                "user_domain_name": "Default", "project_domain_name": "Default"}

    def admin_token(self) -> str:
        a = self.admin_auth()
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": a["username"], "password": a["password"], "domain": {"name": "Default"}}}},
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}}
        req = urllib.request.Request(f"{self.url}/auth/tokens", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.headers["X-Subject-Token"]

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "X-Auth-Token": self.admin_token()})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def add_image_service(self, glance_url: str, interface: str = "public") -> None:
        service = self._admin("POST", "/services", {"service": {"type": "image", "name": "glance"}})["service"]
        self._admin("POST", "/endpoints", {"endpoint": {"service_id": service["id"], "interface": interface,
                                                        "url": glance_url, "region_id": "RegionOne"}})

    def application_credential(self, name: str) -> tuple[str, str]:
        """(id, secret) of a new application credential of the admin."""
        me = self._admin("GET", "/users?name=admin")["users"][0]["id"]
        cred = self._admin("POST", f"/users/{me}/application_credentials",
                           {"application_credential": {"name": name}})["application_credential"]
        return cred["id"], cred["secret"]
