"""Glance, the root of trust, reached (with Keystone's tokens where configured), and what the
mount lists from it: the catalog, and Nova's links where this node runs Nova."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from thunderfs.cache.index import ChunkIndex
from thunderfs.config import MountConfig
from thunderfs.errors import ConfigError
from thunderfs.glance.auth import GlanceAuthError, KeystoneAuth, KeystoneDown
from thunderfs.glance.catalog import Catalog
from thunderfs.nova.base_dir import NovaBaseDir, NovaBaseError
from thunderfs.nova.sync_loop import NovaService
from thunderfs_common.glance_client import GlanceClient, GlanceError
from thunderfs_common.keystone import KeystoneSettings

log = logging.getLogger(__name__)


@dataclass
class Origin:
    url: str
    client: GlanceClient
    auth: KeystoneAuth | None


@dataclass
class Listing:
    catalog: Catalog
    nova: NovaBaseDir | None
    nova_service: NovaService | None


async def connect_glance(config: MountConfig, keystone: KeystoneSettings | None, index: ChunkIndex,
                         stack: contextlib.AsyncExitStack) -> Origin:
    """Glance's client.  Credentials that Keystone refuses, or a catalog without Glance: a clean
    start-up error.  Keystone not answering: the endpoint its catalog named at the last start, and
    the cache served meanwhile (tokens are asked for again on every Glance request)."""
    auth = None
    url = config.glance
    if keystone is not None:
        auth = KeystoneAuth(keystone)
        try:
            await auth.token()
            url = url or await auth.endpoint()
            index.save_note("glance_endpoint", url)
        except KeystoneDown as exc:
            url = url or index.load_note("glance_endpoint")
            if url is None:
                raise ConfigError(f"{exc}, and no Glance endpoint is known from an earlier start") from None
            log.warning("%s; serving the cache with Glance %s (from the last start) and authenticating "
                        "once Keystone answers", exc, url)
        except GlanceAuthError as exc:
            raise ConfigError(str(exc)) from None
        log.info("Glance %s with Keystone tokens (%s)", url, keystone.source)
    if url is None:
        raise ConfigError("--glance is needed (or Keystone credentials, whose catalog names Glance)")
    client = await stack.enter_async_context(GlanceClient(
        url, connect_timeout=config.connect_timeout, request_timeout=config.fetch_timeout,
        concurrency=config.origin_concurrency, auth=auth))
    return Origin(url, client, auth)


async def list_images(config: MountConfig, origin: Origin, index: ChunkIndex, mountpoint: Path) -> Listing:
    """The catalog, listed once (an unreachable Glance is an error only with nothing to serve),
    and Nova's base directory checked and scanned where configured."""
    catalog = Catalog(origin.client, index, ttl=config.listing_ttl, timeout=config.connect_timeout + 2)
    saved = catalog.load_saved()
    nova = nova_service = None
    if config.nova_base_dir is not None:
        nova = NovaBaseDir(config.nova_base_dir, mountpoint / "images", config.nova_instances_path)
        try:
            nova.check()
        except NovaBaseError as exc:
            raise ConfigError(str(exc)) from None
        # Before the first listing: an image that left Glance while this daemon was down stays
        # listed if an instance disk is backed by its link.
        nova.scan_in_use()
        catalog.retain = lambda: nova.in_use_ids
        nova_service = NovaService(nova)
    try:
        await catalog.refresh()
    except GlanceError as exc:
        if not saved and not index.used_bytes():
            raise ConfigError(f"Glance at {origin.url} is unreachable ({exc}) and the cache "
                              f"at {config.cache_dir} is empty: nothing to serve") from None
    return Listing(catalog, nova, nova_service)
