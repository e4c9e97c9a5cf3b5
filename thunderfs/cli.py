"""Command line: parses, then calls the daemon or talks to a running one.  No logic lives here."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from thunderfs import __version__, control, systemd
from thunderfs.config import MountConfig
from thunderfs.errors import ConfigError
from thunderfs.nova_base import NovaBaseDir, NovaBaseError
from thunderfs.units import format_size, parse_size
from thunderfs_tracker import config_file

DEFAULT_CONFIG = Path("/etc/thunderfs/thunderfs.toml")

log = logging.getLogger(__name__)


def _setup_logging(log_file: Path | None, debug: bool) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    if log_file is None and systemd.under_journal():
        handler.setFormatter(systemd.JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- mount ------------------------------------------------------------------------------------


def _mount_config(args) -> MountConfig:
    for name, flag in (("mountpoint", "MOUNTPOINT"), ("cache_dir", "--cache-dir")):
        if not getattr(args, name):
            raise ConfigError(f"{flag} is needed (on the command line, or {name} in the config file)")
    return MountConfig(
        mountpoint=Path(args.mountpoint),
        glance_url=args.glance,
        cache_dir=Path(args.cache_dir).resolve(),
        cache_size=parse_size(args.cache_size),
        chunk_size=parse_size(args.chunk_size),
        max_request=parse_size(args.max_request),
        origin_concurrency=args.origin_concurrency,
        fetch_timeout=args.fetch_timeout,
        connect_timeout=args.connect_timeout,
        listing_ttl=args.listing_ttl,
        readahead=parse_size(args.readahead),
        kernel_readahead=parse_size(args.kernel_readahead),
        allow_other=not args.no_allow_other,
        log_file=Path(args.log_file) if args.log_file else None,
        origin_rate=parse_size(args.origin_rate),
        tracker_url=args.tracker,
        peer_listen=args.peer_listen,
        peer_url=args.peer_url,
        location=args.location,
        secret_file=Path(args.secret_file) if args.secret_file else None,
        max_uploads=args.max_uploads,
        upload_rate=parse_size(args.upload_rate),
        peer_timeout=args.peer_timeout,
        record_window=args.record_window,
        record_idle=args.record_idle,
        prefetch_flights=args.prefetch_flights,
        prefetch_idle=args.prefetch_idle,
        metrics_listen=args.metrics_listen,
        nova_base_dir=Path(args.nova_base_dir) if args.nova_base_dir else None,
        nova_instances_path=Path(args.nova_instances_path) if args.nova_instances_path else None,
        os_cloud=args.os_cloud,
        **({"node_id": args.node_id} if args.node_id else {}),
    )


def cmd_mount(args, argv: list[str]) -> int:
    config = _mount_config(args)
    config.validate()
    if not args.foreground:
        return _spawn_daemon(config, argv)

    import trio  # only the daemon needs it

    from thunderfs import daemon

    _setup_logging(config.log_file, args.debug)
    ready_fd = args.ready_fd

    def ready() -> None:
        nonlocal ready_fd
        systemd.notify(f"READY=1\nSTATUS=serving {config.mountpoint}\nMAINPID={os.getpid()}")
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(daemon.run, config, ready)
    except ConfigError as exc:
        log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {exc}\n".encode())
        else:
            print(f"thunderfs: {exc}", file=sys.stderr)
        return 1
    return 0


def _spawn_daemon(config: MountConfig, argv: list[str]) -> int:
    """Start the daemon in the background; return once it has mounted (0) or failed (1)."""
    log_file = config.log_file or (config.cache_dir / "thunderfs.log")
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "thunderfs", *argv, "--foreground", "--ready-fd", str(w),
           "--log-file", str(log_file)]
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True)
    os.close(w)
    answer = b""
    deadline = time.monotonic() + 120
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                piece = pipe.read(4096)
                if not piece:
                    break
                answer += piece
            elif proc.poll() is not None:
                break
    text = answer.decode(errors="replace").strip()
    if text == "READY":
        print(f"thunderfs: mounted {config.mountpoint} (pid {proc.pid}, log {log_file})")
        return 0
    if text.startswith("ERROR "):
        print(f"thunderfs: cannot mount {config.mountpoint}: {text[6:]}", file=sys.stderr)
    else:
        print(f"thunderfs: the daemon exited before mounting {config.mountpoint}; see {log_file}",
              file=sys.stderr)
    if proc.poll() is None:
        proc.terminate()
    return 1


# --- umount -----------------------------------------------------------------------------------


def cmd_umount(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    try:
        pid = control.read_record(mp)["pid"]
    except ConfigError:
        pid = None
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"thunderfs: cannot unmount {mp}: {res.stderr.strip() or res.stdout.strip()}", file=sys.stderr)
        return 1
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            print(f"thunderfs: unmounted {mp}, but daemon {pid} is still finishing", file=sys.stderr)
            return 1
    return 0


# --- verify -----------------------------------------------------------------------------------


def _glance_hash(glance_url: str, image_id: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"{glance_url.rstrip('/')}/v2/images/{image_id}", timeout=10) as resp:
        rec = json.loads(resp.read())
    return rec.get("os_hash_algo") or "sha512", rec.get("os_hash_value") or ""


def cmd_verify(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    path = mp / "images" / args.image_id
    if not path.exists():
        raise ConfigError(f"{path} does not exist (is {mp} mounted, is the image active?)")
    glance = args.glance or control.read_record(mp)["glance"]
    try:
        algo, expected = _glance_hash(glance, args.image_id)
        where = "Glance"
    except (OSError, urllib.error.URLError) as exc:
        algo = os.getxattr(path, "user.thunderfs.os_hash_algo").decode() or "sha512"
        expected = os.getxattr(path, "user.thunderfs.os_hash_value").decode()
        where = f"the mount's last listing (Glance unreachable: {exc})"
    if not expected:
        raise ConfigError(f"Glance records no hash for image {args.image_id}")
    h = hashlib.new(algo)
    start, total = time.monotonic(), 0
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(4 * 2**20):
            h.update(piece)
            total += len(piece)
    secs = time.monotonic() - start
    rate = f"{format_size(total)} in {secs:.2f}s ({format_size(total / max(secs, 1e-9))}/s)"
    if h.hexdigest() != expected:
        print(f"MISMATCH {args.image_id}: {algo} of the mount is {h.hexdigest()[:16]}..., "
              f"{where} says {expected[:16]}... ({rate})")
        return 1
    print(f"OK {args.image_id}: {algo} matches {where} ({rate})")
    return 0


# --- status -----------------------------------------------------------------------------------


def cmd_status(args, _argv) -> int:
    mounts = [Path(args.mountpoint)] if args.mountpoint else control.mountpoints()
    if not mounts:
        raise ConfigError("no thunderfs mount is running here")
    all_stats = [control.call(m, "stats") for m in mounts]
    if args.json:
        print(json.dumps(all_stats[0] if args.mountpoint else all_stats, indent=2, sort_keys=True))
        return 0
    for stats in all_stats:
        _print_status(stats)
    return 0


def _print_status(stats: dict) -> None:
    g, c, f = stats["glance"], stats["cache"], stats["fetch"]
    print(f"{stats['mountpoint']}: {stats['images']} images, daemon pid {stats['pid']}")
    print(f"  Glance {g['url']} ({'reachable' if g['reachable'] else 'UNREACHABLE'}): "
          f"{format_size(g['bytes'])} in {g['range_requests']} range requests, {g['errors']} errors")
    print(f"  cache {format_size(c['used'])} of {format_size(c['capacity'])}; served "
          f"{format_size(c['bytes_read_disk'])} from disk, {format_size(c['bytes_read_memory'])} uncached; "
          f"{c['evictions']} evictions, {c['corrupt_dropped']} corrupt chunks dropped")
    print(f"  fetched {f['chunks_fetched']} chunks in {f['flights']} requests "
          f"({f['readahead_chunks']} by readahead), {f['failures']} failures")
    if "peers" in stats:
        p, u = stats["peers"], stats["peer_server"]
        print(f"  peers: received {format_size(p['bytes'])} in {p['requests']} requests ({p['bad_chunks']} bad "
              f"chunks refused); sent {format_size(u['served_bytes'])} to others; avoided now: "
              f"{', '.join(p['avoided_peers']) or 'none'}")
    if (n := stats.get("nova")) is not None:
        state = "released (rolled back)" if n["released"] else f"ERROR: {n['last_error']}" if n["last_error"] else "kept"
        print(f"  Nova image cache {n['base_dir']}: {state}; {n['links']} links, {n['linked']} made, "
              f"{n['restored']} put back, {n['removed']} removed, {n['kept_in_use']} kept for instances "
              f"(image gone), {len(n['left_alone'])} other files left alone")
    idle = 0
    for im in stats.get("per_image", []):
        if not im["cached_chunks"] and not im["bytes_read"]:
            idle += 1
            continue
        print(f"  {im['id']} {im['name']!r}: {format_size(im['size'])}, {100 * im['cached_fraction']:.1f}% cached; "
              f"read {format_size(im['bytes_read'])}; fetched {format_size(im['bytes_from_peers'])} from peers, "
              f"{format_size(im['bytes_from_origin'])} from Glance")
        if im["peers"]:
            print("    peers: " + ", ".join(f"{n} {format_size(b)}" for n, b in list(im["peers"].items())[:5])
                  + (f" and {len(im['peers']) - 5} more" if len(im["peers"]) > 5 else ""))
        if (pr := im["profile"]) is not None:
            job = f"{pr['job']} {pr['job_done']}/{pr['job_total']}" if pr["job"] else "no prefetch running"
            print(f"    profile v{pr['profile_version'] or '-'}{', recording' if pr['recording'] else ''}; {job}; "
                  f"prefetched {pr['prefetched']}, {pr['hits']} read, {pr['waste']} not read; "
                  f"{pr['demand_waits']} reads waited")
    if idle:
        print(f"  {idle} other image{'s' if idle > 1 else ''}: nothing cached or read")


def cmd_evict(args, _argv) -> int:
    r = control.call(Path(args.mountpoint), "evict", image_id=args.image_id)
    print(f"{args.image_id}: {r['dropped_chunks']} cached chunks dropped")
    return 0


# --- profiles, prefetch, warm -----------------------------------------------------------------


def _only_mount(args) -> Path:
    if args.mountpoint:
        return Path(args.mountpoint)
    running = control.mountpoints()
    if len(running) != 1:
        raise ConfigError(f"{len(running)} thunderfs mounts are running here: say which with --mountpoint")
    return running[0]


def cmd_profile_record(args, _argv) -> int:
    r = control.call(Path(args.mountpoint), "profile_record", image_id=args.image_id, seconds=args.seconds)
    what = "already recording" if r["already"] else "recording"
    print(f"{what} the first reads of {args.image_id} for up to {r['seconds']:g}s; "
          f"it goes to the tracker when reads stop or the time is up")
    return 0


def cmd_profile_show(args, _argv) -> int:
    p = control.call(_only_mount(args), "profile_show", image_id=args.image_id)
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    chunks = p["chunks"]
    print(f"profile of {p['image_id']} (content {p['content']}): version {p['version']}, "
          f"{p['recordings']} recordings, {len(chunks)} chunks = {format_size(len(chunks) * p['chunk_size'])}")
    if chunks:
        print(f"  first touches from {chunks[0][1] / 1000:.1f}s to {chunks[-1][1] / 1000:.1f}s after the open")
        for c, ms in chunks[:args.head]:
            print(f"  {ms / 1000:8.3f}s  chunk {c:8d}  offset {c * p['chunk_size']}")
        if len(chunks) > args.head:
            print(f"  ... {len(chunks) - args.head} more (--head N, --json)")
    return 0


def _job_line(j: dict) -> str:
    return (f"{j['image_id']}: {j['job'] or 'no job running'}; prefetched {j['prefetched']} chunks, "
            f"{j['hits']} later read, {j['waste']} not read; {j['demand_waits']} reads waited for a fetch; "
            f"{j['cached_chunks']} chunks cached")


def cmd_prefetch(args, _argv) -> int:
    j = control.call(Path(args.mountpoint), "prefetch", image_id=args.image_id)
    print(_job_line(j))
    return 0


def cmd_warm(args, _argv) -> int:
    """The whole image into the cache, the profile's chunks first, with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    mp = Path(args.mountpoint)
    j = control.call(mp, "warm", image_id=args.image_id)
    try:
        with Progress(TextColumn("[bold]warming {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}%"), TransferSpeedColumn(), TimeRemainingColumn(),
                      disable=args.quiet) as bar:
            task = bar.add_task(args.image_id, total=None)
            while True:
                j = control.call(mp, "job", image_id=args.image_id)
                cs = j["chunk_size"]
                if j["job_total"]:
                    bar.update(task, total=j["job_total"] * cs, completed=j["job_done"] * cs)
                if j["job"] is None:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        control.call(mp, "cancel", image_id=args.image_id)
        print(f"warming {args.image_id} cancelled; what was fetched stays cached", file=sys.stderr)
        return 130
    total = j["job_total"] or 0
    print(f"{args.image_id}: {j['cached_chunks']} chunks cached" + (f" of {total}" if total else ""))
    return 0 if total and j["cached_chunks"] >= total else 1


# --- nova-sync --------------------------------------------------------------------------------


def _served_images(mp: Path) -> list[str]:
    """The images the mount at ``mp`` lists; ConfigError unless a live daemon serves it."""
    try:
        control.call(mp, "stats", timeout=10.0)
    except TimeoutError:
        raise ConfigError(f"the thunderfs daemon serving {mp} does not answer") from None
    try:
        return sorted(os.listdir(mp / "images"))
    except OSError as exc:
        raise ConfigError(f"{mp} is not serving images ({exc.strerror})") from None


def cmd_nova_sync(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    base = NovaBaseDir(Path(args.base_dir), mp / "images",
                       Path(args.instances_path) if args.instances_path else None)
    ids = _served_images(mp)  # first: a mount that is not up must not read as "no images"
    base.check()
    if args.rollback:
        return _nova_rollback(mp, base)
    while True:
        report = base.sync(ids)
        print(f"{base.base_dir}: {report.summary()}", flush=True)
        for name, what in sorted(report.foreign.items()):
            print(f"  left alone: {name}: {what}")
        for name in report.kept_in_use:
            print(f"  kept: {name}: its image is gone from Glance, an instance disk is backed by it")
        if args.watch is None:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        ids = _served_images(mp)


def _nova_rollback(mp: Path, base: NovaBaseDir) -> int:
    kept = control.call(mp, "stats").get("nova")
    if kept and not kept["released"]:
        if kept["base_dir"] != str(base.base_dir):
            raise ConfigError(f"the mount keeps {kept['base_dir']}, not {base.base_dir}")
        control.call(mp, "nova_release")  # else it would put the links back
        print(f"the mount no longer keeps {base.base_dir}: take nova_base_dir out of its settings "
              f"before it next starts")
    report = base.rollback()
    for name, written in sorted(report.copied.items()):
        print(f"  copied: {name}: an instance is backed by it; now a file ({format_size(written)} of data)")
    print(f"{base.base_dir}: rolled back: {len(report.removed)} links removed, {len(report.copied)} replaced "
          f"by copies; Nova downloads images again from now on")
    if report.copied:
        print(f"running instances still read {mp}: unmount it once they have been rebooted or moved")
    return 0


# --- parser -----------------------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thunderfs", description="Glance images as lazily fetched files.")
    p.add_argument("--version", action="version", version=f"thunderfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount Glance's images at MOUNTPOINT/images/<image-id>",
                       description="Every option may also be set in the config file (TOML): the option's "
                                   "name with underscores, e.g. cache_size = \"20G\"; flags win.")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("--config", help=f"settings file (default {DEFAULT_CONFIG} if it exists)")
    m.add_argument("--glance", help="Glance API URL, e.g. http://glance:9292 (default, with Keystone: "
                                    "the catalog's image endpoint)")
    m.add_argument("--os-cloud", help="authenticate to Glance with this cloud of clouds.yaml (default: "
                                      "OS_CLOUD, else the OS_* variables, else no authentication)")
    m.add_argument("--cache-dir", help="where cached chunks and their index live")
    m.add_argument("--cache-size", type=_size, default="10G", help="bound of the cache (default 10G)")
    m.add_argument("--chunk-size", type=_size, default="64K",
                   help="unit of caching and verification (default 64K; see benchmarks/README.md)")
    m.add_argument("--max-request", type=_size, default="16M",
                   help="largest Range request to Glance (default 16M; each costs ~7 ms fixed)")
    m.add_argument("--origin-concurrency", type=int, default=8, help="parallel requests to Glance (default 8)")
    m.add_argument("--fetch-timeout", type=float, default=20.0,
                   help="seconds a read may wait for an uncached chunk before EIO (default 20)")
    m.add_argument("--connect-timeout", type=float, default=3.0, help="seconds to connect to Glance")
    m.add_argument("--listing-ttl", type=float, default=10.0, help="seconds between image listings")
    m.add_argument("--readahead", type=_size, default="64M",
                   help="largest window fetched ahead of a sequential reader, 0 for none (default 64M)")
    m.add_argument("--kernel-readahead", type=_size, default="1M",
                   help="the kernel's readahead on the mount: the size of its read requests (default 1M)")
    m.add_argument("--origin-rate", type=_size, default="0", help="bandwidth cap on Glance, bytes/s (e.g. 100M; 0: none)")
    peers = m.add_argument_group("peers", "chunk exchange with other nodes (all unset: Glance only)")
    peers.add_argument("--tracker", help="tracker URL, e.g. http://tracker:7070; replicas separated by commas "
                       "(each node uses one, the next when it fails)")
    peers.add_argument("--peer-listen", help="HOST:PORT to serve cached chunks to other members on")
    peers.add_argument("--peer-url", help="how peers reach this node (default http://<peer-listen>)")
    peers.add_argument("--location", default="", help="where this node is, e.g. zone1/rack7/host3")
    peers.add_argument("--node-id", help="this node's name in the cluster (default: the host name)")
    peers.add_argument("--secret-file", help="the cluster's shared secret; peers and tracker answer only members")
    peers.add_argument("--max-uploads", type=int, default=8, help="chunk uploads served at once (default 8)")
    peers.add_argument("--upload-rate", type=_size, default="0", help="bandwidth cap on uploads to peers, bytes/s (0: none)")
    peers.add_argument("--peer-timeout", type=float, default=2.0, help="seconds a peer may take (default 2)")
    prof = m.add_argument_group("boot profiles", "record what readers touch first; prefetch it (needs --tracker)")
    prof.add_argument("--record-window", type=float, default=60.0,
                      help="seconds of reads recorded after an image's first open here, 0: never (default 60)")
    prof.add_argument("--record-idle", type=float, default=20.0,
                      help="a recording ends once reads stop this long (default 20; boots pause ~10 s)")
    prof.add_argument("--prefetch-flights", type=int, default=3,
                      help="prefetch fetches at once when an image is opened, 0: no prefetch (default 3)")
    prof.add_argument("--prefetch-idle", type=float, default=30.0,
                      help="a prefetch stops once nobody has read the image this long (default 30)")
    nova = m.add_argument_group("Nova", "keep Nova's image cache linked to the images (see thunderfs nova-sync)")
    nova.add_argument("--nova-base-dir", help="Nova's image cache, <instances_path>/_base: kept with a link per "
                      "active image while mounted")
    nova.add_argument("--nova-instances-path", help="where Nova's instance directories are (default: the "
                      "parent of --nova-base-dir)")
    m.add_argument("--metrics-listen", help="HOST:PORT to serve Prometheus metrics on (/metrics; default: none)")
    m.add_argument("--no-allow-other", action="store_true", help="only the mounting user may read")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--log-file")
    m.add_argument("--debug", action="store_true")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=60.0)
    u.set_defaults(func=cmd_umount)

    v = sub.add_parser("verify", help="read an image through the mount and compare it with Glance's hash")
    v.add_argument("mountpoint")
    v.add_argument("image_id")
    v.add_argument("--glance", help="Glance URL (default: the one the mount uses)")
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("status", help="what the daemon serving MOUNTPOINT (default: every mount) has done")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help="everything, as JSON (a list without MOUNTPOINT)")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("evict", help="drop an image's cached chunks")
    e.add_argument("mountpoint")
    e.add_argument("image_id")
    e.set_defaults(func=cmd_evict)

    pr = sub.add_parser("profile", help="boot access profiles: record, show")
    prsub = pr.add_subparsers(dest="profile_command", required=True)
    rec = prsub.add_parser("record", help="record an image's first reads now and send them to the tracker")
    rec.add_argument("mountpoint")
    rec.add_argument("image_id")
    rec.add_argument("--seconds", type=float, help="how long at most (default: the mount's --record-window)")
    rec.set_defaults(func=cmd_profile_record)
    show = prsub.add_parser("show", help="print the tracker's profile of an image")
    show.add_argument("image_id")
    show.add_argument("--mountpoint", help="the mount to ask through (default: the only one running)")
    show.add_argument("--head", type=int, default=20, help="entries to print (default 20)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_profile_show)

    pf = sub.add_parser("prefetch", help="fetch an image's profile chunks into the cache, in profile order")
    pf.add_argument("mountpoint")
    pf.add_argument("image_id")
    pf.set_defaults(func=cmd_prefetch)

    w = sub.add_parser("warm", help="fetch a whole image into the cache, its profile first, with progress")
    w.add_argument("mountpoint")
    w.add_argument("image_id")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warm)

    ns = sub.add_parser("nova-sync", help="link Nova's image cache (_base) to the mount's images, so that Nova "
                        "never downloads them")
    ns.add_argument("mountpoint")
    ns.add_argument("--base-dir", required=True, help="Nova's image cache: <instances_path>/_base")
    ns.add_argument("--instances-path", help="Nova's instances_path, to tell which links instances are backed "
                    "by (default: the parent of --base-dir)")
    once = ns.add_mutually_exclusive_group()
    once.add_argument("--watch", type=float, metavar="SECONDS", help="sync again every SECONDS until stopped "
                    "(a mount with --nova-base-dir does this itself)")
    once.add_argument("--rollback", action="store_true", help="back to plain Nova: remove the links (a link that "
                    "instances are backed by is first replaced by a full copy of its image) and, if the mount "
                    "keeps DIR itself, stop it doing so")
    ns.set_defaults(func=cmd_nova_sync)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["mount"] and (path := config_file.path_in(argv, DEFAULT_CONFIG)) is not None:
            config_file.use(_subparser(parser, "mount"), path)
        args = parser.parse_args(argv)
        return args.func(args, argv)
    except (ConfigError, NovaBaseError, config_file.ConfigFileError) as exc:
        print(f"thunderfs: {exc}", file=sys.stderr)
        return 1


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse has no public way to its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)
