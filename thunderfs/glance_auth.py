"""Authenticating to Glance: not at all (a standalone Glance), or with a Keystone session.

Credentials are found the way the ``openstack`` client finds them: a named cloud in
``clouds.yaml`` (``--os-cloud`` or ``OS_CLOUD``; searched in ``OS_CLIENT_CONFIG_FILE``,
``./clouds.yaml``, ``~/.config/openstack/clouds.yaml``, ``/etc/openstack/clouds.yaml``), else the
``OS_*`` variables.  Any keystoneauth1 plugin works (password, v3applicationcredential, token...).

keystoneauth1 is synchronous (requests): its calls run in a worker thread, one at a time, and the
token is kept here and renewed ``RENEW_BEFORE`` seconds before it expires, so that no Glance
request waits on Keystone while a token is valid.  A 401 from Glance (a revoked token) drops it
and the request is sent once more with a new one.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from thunderfs.errors import ConfigError, OriginUnavailable

log = logging.getLogger(__name__)

CLOUDS_YAML = (Path("clouds.yaml"), Path.home() / ".config" / "openstack" / "clouds.yaml",
               Path("/etc/openstack/clouds.yaml"))


class GlanceAuthError(OriginUnavailable):
    """Keystone did not give a token (unreachable, or the credentials were refused)."""


@dataclass
class KeystoneSettings:
    auth_type: str
    auth: dict
    region_name: str | None = None
    interface: str = "public"
    verify: bool | str = True
    source: str = ""  # where they came from, for messages

    def session(self):
        """A keystoneauth1 Session (no network yet); ConfigError if the options do not fit the plugin."""
        from keystoneauth1 import exceptions, loading, session

        try:
            loader = loading.get_plugin_loader(self.auth_type)
        except exceptions.NoMatchingPlugin:
            raise ConfigError(f"{self.source}: no Keystone auth plugin {self.auth_type!r}") from None
        known = {o.dest for o in loader.get_options()}
        unknown = sorted(set(self.auth) - known)
        if unknown:
            raise ConfigError(f"{self.source}: {self.auth_type} auth does not take {', '.join(unknown)}")
        try:
            plugin = loader.load_from_options(**self.auth)
        except exceptions.MissingRequiredOptions as exc:
            raise ConfigError(f"{self.source}: {self.auth_type} auth needs "
                              f"{', '.join(o.dest for o in exc.options)}") from None
        return session.Session(auth=plugin, verify=self.verify)


def find_settings(cloud: str | None, environ: dict[str, str] | None = None) -> KeystoneSettings | None:
    """The Keystone settings of ``cloud`` (or ``OS_CLOUD``) from clouds.yaml, else of ``OS_*``,
    else None (no Keystone: a standalone Glance).  ConfigError if a named cloud is not found."""
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
            raise ConfigError(f"{path} does not parse: {exc}") from None
        clouds = doc.get("clouds") or {}
        if cloud not in clouds:
            raise ConfigError(f"{path} has no cloud {cloud!r} (it has: {', '.join(sorted(clouds)) or 'none'})")
        c = clouds[cloud] or {}
        auth = dict(c.get("auth") or {})
        auth_type = c.get("auth_type") or ("v3applicationcredential" if "application_credential_id" in auth
                                          else "password")
        verify = c.get("cacert") or (not c.get("insecure", False) if c.get("verify", True) else False)
        return KeystoneSettings(auth_type, auth, c.get("region_name"), c.get("interface") or "public", verify,
                                f"cloud {cloud!r} in {path}")
    raise ConfigError(f"no clouds.yaml with cloud {cloud!r} (looked in {', '.join(map(str, paths))})")


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


class KeystoneAuth(httpx.Auth):
    """httpx auth for Glance: an X-Auth-Token from a keystoneauth1 session, renewed ahead of expiry."""

    RENEW_BEFORE = 300.0

    def __init__(self, settings: KeystoneSettings):
        self.settings = settings
        self._session = settings.session()
        self._token: str | None = None
        self._renew_at = 0.0  # trio time
        self._lock = trio.Lock()
        self.renewals = 0

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or trio.current_time() >= self._renew_at:
                self._token, lifetime = await trio.to_thread.run_sync(self._fetch, self._token is not None)
                self._renew_at = trio.current_time() + max(lifetime - self.RENEW_BEFORE, lifetime / 2)
                self.renewals += 1
                log.info("Keystone token for Glance: valid for %.0fs, renewed in %.0fs", lifetime,
                         self._renew_at - trio.current_time())
            return self._token

    def _fetch(self, renew: bool) -> tuple[str, float]:
        from keystoneauth1 import exceptions

        plugin = self._session.auth
        try:
            if renew:
                plugin.invalidate()  # a new token now, not the old one until its last minutes
            access = plugin.get_access(self._session)
        except exceptions.ClientException as exc:
            raise GlanceAuthError(f"Keystone ({self.settings.source}) gave no token: {exc}") from None
        expires = access.expires
        lifetime = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() if expires else 3600.0
        return access.auth_token, max(1.0, lifetime)

    async def endpoint(self) -> str:
        """Glance's URL from the service catalog (type ``image``, the settings' interface and region)."""
        from keystoneauth1 import exceptions

        await self.token()

        def find() -> str | None:
            return self._session.get_endpoint(service_type="image", interface=self.settings.interface,
                                              region_name=self.settings.region_name)

        try:
            url = await trio.to_thread.run_sync(find)
        except exceptions.ClientException as exc:
            raise GlanceAuthError(f"no image endpoint in the catalog: {exc}") from None
        if not url:
            raise GlanceAuthError(f"the service catalog has no {self.settings.interface} image endpoint"
                                  + (f" in region {self.settings.region_name}" if self.settings.region_name else ""))
        return url

    def _drop(self, token: str) -> None:
        if self._token == token:
            self._renew_at = 0.0  # the next token() asks Keystone for a new one

    async def async_auth_flow(self, request: httpx.Request):
        token = await self.token()
        request.headers["X-Auth-Token"] = token
        response = yield request
        if response.status_code == 401:
            log.info("Glance refused the token (401): getting a new one")
            self._drop(token)
            request.headers["X-Auth-Token"] = await self.token()
            yield request
