"""Keystone credentials for reading Glance, found the way the ``openstack`` client finds them.

A named cloud in ``clouds.yaml`` (``--os-cloud`` or ``OS_CLOUD``; searched in
``OS_CLIENT_CONFIG_FILE``, ``./clouds.yaml``, ``~/.config/openstack/clouds.yaml``,
``/etc/openstack/clouds.yaml``), else the ``OS_*`` variables.  Any keystoneauth1 plugin works
(password, v3applicationcredential, token...).  Blocking (keystoneauth1 uses requests): the daemon
(trio, ``thunderfs.glance.auth``) and the tracker (asyncio, ``manifests``) call it from a worker
thread.  Shared by both, like ``signing``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class KeystoneConfigError(ValueError):
    """The settings cannot work: a cloud clouds.yaml lacks, options the plugin does not take."""


class KeystoneTokenError(Exception):
    """Keystone gave no token (unreachable, or the credentials were refused), or no endpoint."""


class KeystoneUnreachable(KeystoneTokenError):
    """Keystone did not answer (connection refused, timed out, or it failed with a 5xx)."""


CLOUDS_YAML = (Path("clouds.yaml"), Path.home() / ".config" / "openstack" / "clouds.yaml",
               Path("/etc/openstack/clouds.yaml"))


@dataclass
class KeystoneSettings:
    auth_type: str
    auth: dict
    region_name: str | None = None
    interface: str = "public"
    verify: bool | str = True
    source: str = ""  # where they came from, for messages

    def session(self):
        """A keystoneauth1 Session (no network yet); KeystoneConfigError if the options do not fit the plugin."""
        from keystoneauth1 import exceptions, loading, session

        try:
            loader = loading.get_plugin_loader(self.auth_type)
        except exceptions.NoMatchingPlugin:
            raise KeystoneConfigError(f"{self.source}: no Keystone auth plugin {self.auth_type!r}") from None
        known = {o.dest for o in loader.get_options()}
        unknown = sorted(set(self.auth) - known)
        if unknown:
            raise KeystoneConfigError(f"{self.source}: {self.auth_type} auth does not take {', '.join(unknown)}")
        try:
            plugin = loader.load_from_options(**self.auth)
        except exceptions.MissingRequiredOptions as exc:
            raise KeystoneConfigError(f"{self.source}: {self.auth_type} auth needs "
                              f"{', '.join(o.dest for o in exc.options)}") from None
        return session.Session(auth=plugin, verify=self.verify)


def find_settings(cloud: str | None, environ: dict[str, str] | None = None) -> KeystoneSettings | None:
    """The Keystone settings of ``cloud`` (or ``OS_CLOUD``) from clouds.yaml, else of ``OS_*``,
    else None (no Keystone: a standalone Glance).  KeystoneConfigError if a named cloud is not found."""
    env = os.environ if environ is None else environ
    cloud = cloud or env.get("OS_CLOUD")
    if cloud:
        return _from_clouds_yaml(cloud, env)
    if env.get("OS_AUTH_URL"):
        return _from_environment(env)
    return None


def _from_clouds_yaml(cloud: str, env) -> KeystoneSettings:
    import yaml

    paths = ([Path(env["OS_CLIENT_CONFIG_FILE"])] if env.get("OS_CLIENT_CONFIG_FILE") else []) + list(CLOUDS_YAML)
    for path in paths:
        if not path.is_file():
            continue
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KeystoneConfigError(f"{path} does not parse: {exc}") from None
        clouds = doc.get("clouds") or {}
        if cloud not in clouds:
            raise KeystoneConfigError(f"{path} has no cloud {cloud!r} (it has: {', '.join(sorted(clouds)) or 'none'})")
        c = clouds[cloud] or {}
        auth = dict(c.get("auth") or {})
        auth_type = c.get("auth_type") or ("v3applicationcredential" if "application_credential_id" in auth
                                          else "password")
        verify = c.get("cacert") or (not c.get("insecure", False) if c.get("verify", True) else False)
        return KeystoneSettings(auth_type, auth, c.get("region_name"), c.get("interface") or "public", verify,
                                f"cloud {cloud!r} in {path}")
    raise KeystoneConfigError(f"no clouds.yaml with cloud {cloud!r} (looked in {', '.join(map(str, paths))})")


def _from_environment(env) -> KeystoneSettings:
    """``OS_AUTH_URL``, ``OS_USERNAME``... -> the plugin's options (names lower-cased, prefix off)."""
    special = {"OS_AUTH_TYPE", "OS_REGION_NAME", "OS_INTERFACE", "OS_CACERT", "OS_INSECURE", "OS_CLOUD",
               "OS_CLIENT_CONFIG_FILE", "OS_IDENTITY_API_VERSION"}
    auth = {k[3:].lower(): v for k, v in env.items() if k.startswith("OS_") and k not in special and v}
    auth_type = env.get("OS_AUTH_TYPE") or ("v3applicationcredential" if "application_credential_id" in auth
                                            else "token" if "token" in auth else "password")
    verify = env.get("OS_CACERT") or env.get("OS_INSECURE", "").lower() not in ("1", "true", "yes")
    return KeystoneSettings(auth_type, auth, env.get("OS_REGION_NAME"), env.get("OS_INTERFACE") or "public",
                            verify, "the OS_* environment")


class TokenSource:
    """A keystoneauth1 session: tokens with their lifetimes, and the catalog's image endpoint."""

    def __init__(self, settings: KeystoneSettings):
        self.settings = settings
        self._session = settings.session()

    def token(self, renew: bool = False) -> tuple[str, float]:
        """(token, seconds it is still valid); ``renew`` asks for a new one."""
        from keystoneauth1 import exceptions

        plugin = self._session.auth
        try:
            if renew:
                plugin.invalidate()  # a new token now, not the old one until its last minutes
            access = plugin.get_access(self._session)
        except (exceptions.ConnectionError, exceptions.DiscoveryFailure) as exc:
            raise KeystoneUnreachable(f"Keystone ({self.settings.source}) is unreachable: {exc}") from None
        except exceptions.HttpError as exc:
            if exc.http_status >= 500:
                raise KeystoneUnreachable(f"Keystone ({self.settings.source}) failed: {exc}") from None
            raise KeystoneTokenError(f"Keystone ({self.settings.source}) gave no token: {exc}") from None
        except exceptions.ClientException as exc:
            raise KeystoneTokenError(f"Keystone ({self.settings.source}) gave no token: {exc}") from None
        expires = access.expires
        lifetime = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() if expires else 3600.0
        return access.auth_token, max(1.0, lifetime)

    def image_endpoint(self) -> str:
        from keystoneauth1 import exceptions

        s = self.settings
        try:
            url = self._session.get_endpoint(service_type="image", interface=s.interface, region_name=s.region_name)
        except exceptions.ClientException as exc:
            raise KeystoneTokenError(f"no image endpoint in the catalog: {exc}") from None
        if not url:
            raise KeystoneTokenError(f"the service catalog has no {s.interface} image endpoint"
                                     + (f" in region {s.region_name}" if s.region_name else ""))
        return url


def renew_in(lifetime: float, before: float = 300.0) -> float:
    """Seconds until a token valid for ``lifetime`` should be renewed: ``before`` ahead of its
    expiry, or at half its life if it is shorter."""
    return max(lifetime - before, lifetime / 2)


class AsyncTokens(httpx.Auth):
    """The tracker's side (asyncio), as httpx auth for its Glance client: an X-Auth-Token, renewed
    ahead of expiry in a thread; a 401 (a revoked token) gets a new one and the request once more."""

    def __init__(self, source: TokenSource):
        self._source = source
        self._token: str | None = None
        self._renew_at = 0.0  # loop time
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._token is None or loop.time() >= self._renew_at:
                self._token, lifetime = await loop.run_in_executor(None, self._source.token, self._token is not None)
                self._renew_at = loop.time() + renew_in(lifetime)
                log.info("Keystone token for Glance: valid for %.0fs", lifetime)
            return self._token

    def drop(self) -> None:
        """Glance refused the token (401): the next ``token()`` gets a new one."""
        self._renew_at = 0.0

    async def async_auth_flow(self, request: httpx.Request):
        request.headers["X-Auth-Token"] = await self.token()
        response = yield request
        if response.status_code == 401:
            log.info("Glance refused the token (401): getting a new one")
            self.drop()
            request.headers["X-Auth-Token"] = await self.token()
            yield request
