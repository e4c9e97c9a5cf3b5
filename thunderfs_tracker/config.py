"""The tracker's settings: each option declared once (``thunderfs_common.options``), and what
the CLI derives from them (the secret, Glance's URL and tokens), frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from thunderfs_common.hostport import parse_host_port
from thunderfs_common.keystone import AsyncTokens
from thunderfs_common.manifest_proof import ManifestProof
from thunderfs_common.options import http_url, not_negative, option, positive, size


def _listen(value) -> tuple[str, int]:
    return parse_host_port(str(value), "--listen")


def _store(value: str) -> str:
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    raise ValueError(f"{value!r} is neither memory nor a redis:// URL")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackerConfig:
    listen: tuple[str, int] = option(help="HOST:PORT to serve on", parse=_listen)
    state_dir: Path = option(help="where the tracker keeps its state")
    glance: str | None = option(None, "Glance API URL: the tracker builds chunk manifests from Glance's bytes "
                                "(default, with Keystone: the catalog's image endpoint)", check=http_url)
    os_cloud: str | None = option(None, "read Glance with a Keystone token of this cloud of clouds.yaml (default: "
                                  "OS_CLOUD, else the OS_* variables, else no authentication)")
    secret_file: Path | None = option(None, "the cluster's shared secret: only signed requests of members are answered")
    manifest_key: Path | None = option(None, "an Ed25519 private key (PEM) that signs every manifest: nodes given its "
                                       "public key (--tracker-public-key) take no manifest it did not sign (default: "
                                       "manifests proven with a MAC under the secret)")
    seed_cache: int = option(256 * 2**20, "memory for chunks of images not yet checked, served to the nodes that "
                             "fetch them first (the tracker seeds a new image, reading each chunk from Glance "
                             "once); 0: no seed, a manifest is built from the whole image before peers trade it",
                             parse=size, check=not_negative)
    check_quiet: float = option(30.0, "seconds without a seed read of a new image before its whole-image check "
                                "starts (a storm's reads are not slowed by it)", check=not_negative)
    check_rate: int = option(64 * 2**20, "bytes/s at most for a new image's whole-image check", parse=size,
                             check=positive)
    store: str = option("memory", "where peer state and boot profiles live: memory (one tracker) or "
                        "redis://HOST:PORT/DB (shared by tracker replicas)", parse=_store)
    node_ttl: float = option(30.0, "seconds after which a silent node expires", check=positive)
    heartbeat: float = option(10.0, "seconds between a node's announces", check=positive)
    debug: bool = option(False, "log at DEBUG")
    # not options: what the CLI derives (the secret file's secret, Glance's URL and its tokens, the key)
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    glance_url: str | None = None
    glance_auth: AsyncTokens | None = dataclasses.field(default=None, repr=False)
    manifest_proof: ManifestProof | None = dataclasses.field(default=None, repr=False)  # from manifest_key
    # fixed policy
    max_peers: int = 20
    suspect_seconds: float = 600.0
    claim_seconds: float = 30.0
    watch_interval: float = 0.5  # at most one event per watch per this many seconds
    watch_seconds: float = 60.0  # a watch ends then (its node asks again if it still wants to know)
    watch_peers: int = 64  # holders a watch names at most

    def __post_init__(self) -> None:
        if self.node_ttl <= self.heartbeat:
            raise ValueError("--node-ttl must be longer than --heartbeat")
