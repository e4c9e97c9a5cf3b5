"""The daemon's settings, checked once; nothing below the daemon reads options."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from thunderfs.errors import ConfigError
from thunderfs.glance_auth import KeystoneSettings, find_settings
from thunderfs.units import format_size

log = logging.getLogger(__name__)

MIN_CHUNK, MAX_CHUNK = 4096, 16 * 2**20


@dataclass
class MountConfig:
    mountpoint: Path
    glance_url: str | None  # None: from Keystone's service catalog
    cache_dir: Path
    cache_size: int = 10 * 2**30
    chunk_size: int = 64 * 2**10
    max_request: int = 16 * 2**20
    origin_concurrency: int = 8
    fetch_timeout: float = 20.0
    connect_timeout: float = 3.0
    listing_ttl: float = 10.0
    readahead: int = 64 * 2**20
    kernel_readahead: int = 1024 * 2**10
    allow_other: bool = True
    log_file: Path | None = None
    origin_rate: int = 0
    # peers (all unset: Glance only)
    tracker_url: str | None = None
    peer_listen: str | None = None
    peer_url: str | None = None
    location: str = ""
    node_id: str = field(default_factory=socket.gethostname)
    secret_file: Path | None = None
    max_uploads: int = 8
    upload_rate: int = 0
    peer_timeout: float = 2.0
    # boot access profiles (need the tracker)
    record_window: float = 60.0
    record_idle: float = 20.0
    prefetch_flights: int = 3
    prefetch_idle: float = 30.0
    # Nova's image cache kept linked into the mount (unset: none)
    nova_base_dir: Path | None = None
    nova_instances_path: Path | None = None  # default: the parent of nova_base_dir
    # Prometheus (unset: none)
    metrics_listen: str | None = None
    # Keystone: a cloud of clouds.yaml (else OS_CLOUD, else OS_* variables, else no auth)
    os_cloud: str | None = None
    keystone: "KeystoneSettings | None" = field(default=None, repr=False)

    def peer_address(self) -> tuple[str, int]:
        return _host_port("--peer-listen", self.peer_listen)

    def metrics_address(self) -> tuple[str, int]:
        return _host_port("--metrics-listen", self.metrics_listen)

    def validate(self) -> None:
        cs = self.chunk_size
        if cs < MIN_CHUNK or cs > MAX_CHUNK or cs & (cs - 1):
            raise ConfigError(f"--chunk-size must be a power of two from {format_size(MIN_CHUNK)} "
                              f"to {format_size(MAX_CHUNK)}, not {cs}")
        if self.cache_size < cs:
            raise ConfigError(f"--cache-size ({self.cache_size}) is smaller than one chunk ({cs})")
        if self.max_request < cs:
            raise ConfigError(f"--max-request ({self.max_request}) is smaller than one chunk ({cs})")
        if self.readahead < 0 or self.kernel_readahead < 0:
            raise ConfigError("--readahead and --kernel-readahead must not be negative")
        if self.origin_concurrency < 1:
            raise ConfigError("--origin-concurrency must be at least 1")
        for name in ("fetch_timeout", "connect_timeout", "listing_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if bool(self.tracker_url) != bool(self.peer_listen):
            raise ConfigError("--tracker and --peer-listen go together: a node that takes from peers also serves them")
        if self.tracker_url:
            for url in self.tracker_url.split(","):
                if not url.strip().startswith(("http://", "https://")):
                    raise ConfigError(f"--tracker must be http(s) URLs (replicas separated by commas), "
                                      f"not {url.strip()!r}")
            host, port = self.peer_address()
            if self.peer_url is None:
                if host in ("0.0.0.0", "::"):
                    raise ConfigError("--peer-listen on a wildcard address needs --peer-url (how peers reach us)")
                self.peer_url = f"http://{host}:{port}"
            if self.secret_file is not None and not self.secret_file.is_file():
                raise ConfigError(f"--secret-file {self.secret_file} does not exist")
            if self.max_uploads < 1 or self.peer_timeout <= 0:
                raise ConfigError("--max-uploads must be at least 1 and --peer-timeout positive")
        if self.record_window < 0 or self.record_idle <= 0 or self.prefetch_flights < 0 or self.prefetch_idle <= 0:
            raise ConfigError("--record-window and --prefetch-flights must not be negative, "
                              "--record-idle and --prefetch-idle must be positive")
        if self.metrics_listen is not None:
            self.metrics_address()
        self.keystone = find_settings(self.os_cloud)
        if self.glance_url is None and self.keystone is None:
            raise ConfigError("--glance is needed (or Keystone credentials, whose catalog names Glance)")
        if self.glance_url is not None and not self.glance_url.startswith(("http://", "https://")):
            raise ConfigError(f"--glance must be an http(s) URL, not {self.glance_url!r}")
        mp = self.mountpoint
        if not mp.exists():
            raise ConfigError(f"mount point {mp} does not exist")
        if not mp.is_dir():
            raise ConfigError(f"mount point {mp} is not a directory")
        if mp.is_mount():
            raise ConfigError(f"mount point {mp} is already a mount point (busy)")


def _host_port(flag: str, text: str | None) -> tuple[str, int]:
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{flag} must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
