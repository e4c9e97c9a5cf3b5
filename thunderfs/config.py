"""The daemon's settings: each option declared once (``thunderfs_common.options``), parsed and
checked once, then frozen.  Nothing below the daemon reads them: parts take plain values."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from thunderfs_common.hostport import parse_host_port
from thunderfs_common.options import at_least, http_url, not_negative, option, positive, size
from thunderfs_common.units import format_size
from thunderfs_common.tracker_protocol import ProtocolError, check_node_id, parse_location

MIN_CHUNK, MAX_CHUNK = 4096, 16 * 2**20

PEERS = "peers: chunk exchange with other nodes (all unset: Glance only)"
PROFILES = "boot profiles: record what readers touch first; prefetch it (needs --tracker)"
NOVA = "Nova: keep Nova's image cache linked to the images (see thunderfs nova-sync)"


def _chunk_size(value: int) -> str | None:
    if MIN_CHUNK <= value <= MAX_CHUNK and not value & (value - 1):
        return None
    return f"must be a power of two from {format_size(MIN_CHUNK)} to {format_size(MAX_CHUNK)}, not {value}"


def _host_port(flag: str):
    def check(value: str) -> str | None:
        try:
            parse_host_port(value, flag)
        except ValueError as exc:
            return str(exc).removeprefix(flag + " ")
        return None
    return check


def _urls(value: str) -> str | None:
    for url in value.split(","):
        if not url.strip().startswith(("http://", "https://")):
            return f"must be http(s) URLs (replicas separated by commas), not {url.strip()!r}"
    return None


def _protocol(check):
    """The protocol's own check of a value, as an option's: "node id must match ..." -> "must match ..."."""
    def run(value: str) -> str | None:
        try:
            check(value)
        except ProtocolError as exc:
            text = str(exc)
            return text[text.index("must"):] if "must" in text else text
        return None
    return run


def _octal(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(str(value), 8)


def _read_only(value: int) -> str | None:
    return None if 0 <= value <= 0o444 and not value & ~0o444 else f"must have read bits only (like 440), not {value:o}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MountConfig:
    mountpoint: Path = option(help="where Glance's images appear, as MOUNTPOINT/images/<image-id>", positional=True)
    glance: str | None = option(None, "Glance API URL, e.g. http://glance:9292 (default, with Keystone: the "
                                "catalog's image endpoint)", check=http_url)
    os_cloud: str | None = option(None, "authenticate to Glance with this cloud of clouds.yaml (default: OS_CLOUD, "
                                  "else the OS_* variables, else no authentication)")
    cache_dir: Path = option(help="where cached chunks and their index live", parse=lambda v: Path(v).resolve())
    cache_size: int = option(10 * 2**30, "bound of the cache", parse=size, check=positive)
    chunk_size: int = option(64 * 2**10, "unit of caching and verification (see benchmarks/README.md)",
                             parse=size, check=_chunk_size)
    max_request: int = option(16 * 2**20, "largest Range request to Glance (each costs ~7 ms fixed)", parse=size)
    origin_concurrency: int = option(8, "parallel requests to Glance", check=at_least(1))
    receive_memory: int = option(64 * 2**20, "memory for chunks received from Glance: the buffers they arrive "
                                 "in, which serve them until written to the cache and read", parse=size,
                                 check=positive)
    fetch_timeout: float = option(20.0, "seconds a read may wait for an uncached chunk before EIO", check=positive)
    connect_timeout: float = option(3.0, "seconds to connect to Glance", check=positive)
    listing_ttl: float = option(10.0, "seconds between image listings", check=positive)
    readahead: int = option(64 * 2**20, "largest window fetched ahead of a sequential reader; 0: nothing is "
                                        "fetched beyond what is read",
                            parse=size, check=not_negative)
    kernel_readahead: int = option(2**20, "the kernel's readahead on the mount: the size of its read requests",
                                   parse=size, check=not_negative)
    passthrough: bool = option(False, "let the kernel read complete images from the cache file itself (FUSE "
                               "passthrough, Linux 6.9+, root): checked whole at open, not on every read")
    origin_rate: int = option(0, "bandwidth cap on Glance, bytes/s (e.g. 100M; 0: none)", parse=size)
    # peers
    tracker: str | None = option(None, "tracker URL, e.g. http://tracker:7070; replicas separated by commas "
                                 "(each node uses one, the next when it fails)", check=_urls, group=PEERS)
    peer_listen: str | None = option(None, "HOST:PORT to serve cached chunks to other members on",
                                     check=_host_port("--peer-listen"), group=PEERS)
    peer_url: str | None = option(None, "how peers reach this node (default http://<peer-listen>)", group=PEERS)
    location: str = option("", "where this node is, e.g. zone1/rack7/host3", check=_protocol(parse_location),
                           group=PEERS)
    node_id: str = option(help="this node's name in the cluster (default: the host name)",
                          default_factory=socket.gethostname, check=_protocol(check_node_id), group=PEERS)
    secret_file: Path | None = option(None, "the cluster's shared secret; peers and tracker answer only members",
                                      group=PEERS)
    tracker_public_key: Path | None = option(None, "the tracker's Ed25519 public key (PEM): manifests it did not "
                                             "sign are refused (the tracker's --manifest-key)", group=PEERS)
    max_uploads: int = option(8, "chunk uploads served at once", check=at_least(1), group=PEERS)
    upload_rate: int = option(0, "bandwidth cap on uploads to peers, bytes/s (0: none)", parse=size, group=PEERS)
    peer_timeout: float = option(2.0, "seconds a peer may take", check=positive, group=PEERS)
    # boot access profiles
    record_window: float = option(60.0, "seconds of reads recorded after an image's first open here, 0: never",
                                  check=not_negative, group=PROFILES)
    record_idle: float = option(20.0, "a recording ends once reads stop this long (boots pause ~10 s)",
                                check=positive, group=PROFILES)
    prefetch_flights: int = option(3, "prefetch fetches at once when an image is opened, 0: no prefetch",
                                   check=not_negative, group=PROFILES)
    prefetch_idle: float = option(30.0, "a prefetch stops once nobody has read the image this long",
                                  check=positive, group=PROFILES)
    # Nova
    nova_base_dir: Path | None = option(None, "Nova's image cache, <instances_path>/_base: kept with a link per "
                                        "active image while mounted", group=NOVA)
    nova_instances_path: Path | None = option(None, "where Nova's instance directories are (default: the parent "
                                              "of --nova-base-dir)", group=NOVA)
    # running
    metrics_listen: str | None = option(None, "HOST:PORT to serve Prometheus metrics on (/metrics; default: none)",
                                        check=_host_port("--metrics-listen"))
    allow_other: bool = option(True, "only the mounting user may read", flag="--no-allow-other")
    image_owner: str = option("root", "the user that owns the image files")
    image_group: str | None = option(None, "the group that may read the image files: the one qemu runs in (default: "
                                     "kvm if this host has it, as libvirt-qemu is in it, else root)")
    image_mode: int = option(0o440, "the image files' mode, octal, read bits only (default 440: owner and "
                             "group; 444 lets every local user read every image)", parse=_octal, check=_read_only)
    foreground: bool = option(False, "stay in the foreground, log to stderr")
    log_file: Path | None = option(None, "where the daemon logs (default, in the background: CACHE_DIR/thunderfs.log)")
    debug: bool = option(False, "log at DEBUG")
    ready_fd: int | None = option(None, "the pipe to say READY or ERROR on", hidden=True, file=False)

    def __post_init__(self) -> None:
        cs = self.chunk_size
        if self.cache_size < cs:
            raise ValueError(f"--cache-size ({self.cache_size}) is smaller than one chunk ({cs})")
        if self.max_request < cs:
            raise ValueError(f"--max-request ({self.max_request}) is smaller than one chunk ({cs})")
        if bool(self.tracker) != bool(self.peer_listen):
            raise ValueError("--tracker and --peer-listen go together: a node that takes from peers also serves them")
        if self.tracker and self.peer_url is None:
            host, port = self.peer_address
            if host in ("0.0.0.0", "::"):
                raise ValueError("--peer-listen on a wildcard address needs --peer-url (how peers reach us)")
            object.__setattr__(self, "peer_url", f"http://{host}:{port}")  # derived once, while being made

    def missing_files(self) -> list[str]:
        """The files it names that this host does not have (a check of the host, not the values)."""
        named = (("--secret-file", self.secret_file), ("--tracker-public-key", self.tracker_public_key))
        return [f"{flag} {path} does not exist" for flag, path in named if path is not None and not path.is_file()]

    @property
    def peer_address(self) -> tuple[str, int]:
        return parse_host_port(self.peer_listen, "--peer-listen")

    @property
    def metrics_address(self) -> tuple[str, int]:
        return parse_host_port(self.metrics_listen, "--metrics-listen")

    @property
    def tracker_urls(self) -> list[str]:
        return [u.strip() for u in (self.tracker or "").split(",") if u.strip()]
