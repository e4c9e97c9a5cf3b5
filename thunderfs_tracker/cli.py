"""thunderfs-tracker: parse options, build the app, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from thunderfs_tracker import __version__, config_file, keystone
from thunderfs_tracker.app import TrackerConfig, create_app
from thunderfs_tracker.signing import SecretError, load_secret

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/thunderfs/tracker.toml")


class _ClientErrorsInOneLine(logging.Filter):
    """aiohttp logs a client's malformed request (a line too long, a bad header: it answers 400)
    at ERROR with a traceback; anyone who can reach the port could fill the log with them.  One
    line at INFO says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request refused (%s): %s", (exc.code, exc.message.splitlines()[0][:200])
            record.exc_info = record.exc_text = None
        return True


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _store_url(value: str) -> str:
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither memory nor a redis:// URL")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="thunderfs-tracker", description="Which thunderfs node holds which chunks. "
                                "Every option may also be set in the config file (TOML), e.g. node_ttl = 30; "
                                "flags win.")
    p.add_argument("--version", action="version", version=f"thunderfs-tracker {__version__}")
    p.add_argument("--config", help=f"settings file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--listen", type=_listen, required=True, help="HOST:PORT")
    p.add_argument("--state-dir", required=True, help="where the tracker keeps its state")
    p.add_argument("--glance", help="Glance API URL: the tracker builds chunk manifests from Glance's bytes "
                                    "(default, with Keystone: the catalog's image endpoint)")
    p.add_argument("--os-cloud", help="read Glance with a Keystone token of this cloud of clouds.yaml "
                                      "(default: OS_CLOUD, else the OS_* variables, else no authentication)")
    p.add_argument("--secret-file", help="the cluster's shared secret: only signed requests of members are answered")
    p.add_argument("--store", default="memory", type=_store_url,
                   help="where peer state and boot profiles live: memory (default; one tracker) or "
                        "redis://HOST:PORT/DB (shared by tracker replicas)")
    p.add_argument("--node-ttl", type=float, default=30.0, help="seconds after which a silent node expires")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between a node's announces")
    p.add_argument("--debug", action="store_true")
    try:
        if (path := config_file.path_in(argv, DEFAULT_CONFIG)) is not None:
            config_file.use(p, path)
    except config_file.ConfigFileError as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorsInOneLine())
    try:
        secret = load_secret(args.secret_file) if args.secret_file else None
        state = Path(args.state_dir)
        state.mkdir(parents=True, exist_ok=True)
    except (SecretError, OSError) as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    if args.node_ttl <= args.heartbeat:
        print("thunderfs-tracker: --node-ttl must be longer than --heartbeat", file=sys.stderr)
        return 1
    glance_url, glance_auth = args.glance, None
    try:
        settings = keystone.find_settings(args.os_cloud)
        if settings is not None:
            source = keystone.TokenSource(settings)
            source.token()  # credentials Keystone refuses stop the tracker now
            glance_url = glance_url or source.image_endpoint()
            glance_auth = keystone.AsyncTokens(source)
            log.info("Glance %s with Keystone tokens (%s)", glance_url, settings.source)
    except (keystone.KeystoneConfigError, keystone.KeystoneTokenError) as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    if secret is None:
        log.warning("no --secret-file: the tracker answers anyone who can reach it")
    host, port = args.listen
    config = TrackerConfig(state_dir=state, secret=secret, node_ttl=args.node_ttl, heartbeat=args.heartbeat,
                           glance_url=glance_url, glance_auth=glance_auth, store_url=args.store)
    try:
        web.run_app(create_app(config), host=host, port=port, print=lambda *_: log.info("listening on %s:%d", host, port),
                    access_log=None, handle_signals=True)
    except OSError as exc:
        print(f"thunderfs-tracker: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
