"""Authenticating the daemon to Glance with a Keystone session (``thunderfs_common.keystone``
finds the credentials and talks to Keystone; this is the trio and httpx side).

The token is kept here and renewed ahead of its expiry in a worker thread, one renewal at a
time, so that no Glance request waits on Keystone while a token is valid.  A 401 from Glance (a
revoked token) drops it, and the request is sent once more with a new one.
"""

from __future__ import annotations

import logging

import httpx
import trio

from thunderfs.errors import ConfigError
from thunderfs_common.glance_client import GlanceUnavailable
from thunderfs_common.keystone import (KeystoneConfigError, KeystoneSettings, KeystoneTokenError,
                                        KeystoneUnreachable, TokenSource, find_settings as _find_settings, renew_in)

log = logging.getLogger(__name__)


class GlanceAuthError(GlanceUnavailable):
    """Keystone did not give a token (unreachable, or the credentials were refused)."""


class KeystoneDown(GlanceAuthError):
    """Keystone did not answer: the credentials may well be good."""


def find_settings(cloud: str | None) -> KeystoneSettings | None:
    """The Keystone settings to use (None: a standalone Glance); ConfigError if they cannot work."""
    try:
        settings = _find_settings(cloud)
        if settings is not None:
            settings.session()  # the plugin's options checked now, before any mount
        return settings
    except KeystoneConfigError as exc:
        raise ConfigError(str(exc)) from None


class KeystoneAuth(httpx.Auth):
    """httpx auth for Glance: an X-Auth-Token from a keystoneauth1 session, renewed ahead of expiry."""

    def __init__(self, settings: KeystoneSettings):
        self.settings = settings
        self._source = TokenSource(settings)
        self._token: str | None = None
        self._renew_at = 0.0  # trio time
        self._lock = trio.Lock()
        self.renewals = 0

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or trio.current_time() >= self._renew_at:
                try:
                    self._token, lifetime = await trio.to_thread.run_sync(self._source.token, self._token is not None)
                except KeystoneUnreachable as exc:
                    raise KeystoneDown(str(exc)) from None
                except KeystoneTokenError as exc:
                    raise GlanceAuthError(str(exc)) from None
                self._renew_at = trio.current_time() + renew_in(lifetime)
                self.renewals += 1
                log.info("Keystone token for Glance: valid for %.0fs, renewed in %.0fs", lifetime, renew_in(lifetime))
            return self._token

    async def endpoint(self) -> str:
        """Glance's URL from the service catalog (type ``image``, the settings' interface and region)."""
        await self.token()
        try:
            return await trio.to_thread.run_sync(self._source.image_endpoint)
        except KeystoneUnreachable as exc:
            raise KeystoneDown(str(exc)) from None
        except KeystoneTokenError as exc:
            raise GlanceAuthError(str(exc)) from None

    def drop(self, token: str) -> None:
        """Glance refused ``token``: the next ``token()`` asks Keystone for a new one."""
        if self._token == token:
            self._renew_at = 0.0  # the next token() asks Keystone for a new one

    async def async_auth_flow(self, request: httpx.Request):
        token = await self.token()
        request.headers["X-Auth-Token"] = token
        response = yield request
        if response.status_code == 401:
            log.info("Glance refused the token (401): getting a new one")
            self.drop(token)
            request.headers["X-Auth-Token"] = await self.token()
            yield request
