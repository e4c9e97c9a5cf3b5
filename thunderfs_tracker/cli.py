"""thunderfs-tracker: parse options, build the app, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from thunderfs_common import keystone, options
from thunderfs_common.manifest_proof import KeyFileError, ManifestProof, load_private_key
from thunderfs_common.signing import SecretError, load_secret
from thunderfs_tracker import __version__
from thunderfs_tracker.app import create_app
from thunderfs_tracker.config import TrackerConfig
from thunderfs_tracker.manifests import ManifestStore, shared_between

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="thunderfs-tracker", description="Which thunderfs node holds which chunks. "
                                "Every option may also be set in the config file (TOML), e.g. node_ttl = 30; "
                                "flags win.")
    p.add_argument("--version", action="version", version=f"thunderfs-tracker {__version__}")
    p.add_argument("--config", help=f"settings file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--shared", nargs=2, metavar=("IMAGE_A", "IMAGE_B"),
                   help="print, as JSON, what the two images' manifests in --state-dir share (chunks of "
                        "IMAGE_B whose digest IMAGE_A has, zero chunks), and exit")
    options.add_arguments(p, TrackerConfig)
    args = p.parse_args(argv)
    if args.shared and getattr(args, "listen", None) is None:
        args.listen = "127.0.0.1:1"  # a report: nothing is served
    try:
        config = options.load(TrackerConfig, args, options.config_file(args.config, DEFAULT_CONFIG))
    except options.OptionError as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorsInOneLine())
    try:
        secret = load_secret(config.secret_file) if config.secret_file else None
        signing_key = load_private_key(config.manifest_key) if config.manifest_key else None
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except (SecretError, KeyFileError, OSError) as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    glance_url, glance_auth = config.glance, None
    try:
        settings = keystone.find_settings(config.os_cloud)
        if settings is not None:
            source = keystone.TokenSource(settings)
            source.token()  # credentials Keystone refuses stop the tracker now
            glance_url = glance_url or source.image_endpoint()
            glance_auth = keystone.AsyncTokens(source)
            log.info("Glance %s with Keystone tokens (%s)", glance_url, settings.source)
    except (keystone.KeystoneConfigError, keystone.KeystoneTokenError) as exc:
        print(f"thunderfs-tracker: {exc}", file=sys.stderr)
        return 1
    if args.shared:
        return _report_shared(ManifestStore(config.state_dir, None, proof=ManifestProof(signing_key, secret)),
                              *args.shared)
    if secret is None:
        log.warning("no --secret-file: the tracker answers anyone who can reach it")
    config = dataclasses.replace(config, secret=secret, glance_url=glance_url, glance_auth=glance_auth,
                                 manifest_proof=ManifestProof(signing_key, secret))
    host, port = config.listen
    try:
        web.run_app(create_app(config), host=host, port=port, print=lambda *_: log.info("listening on %s:%d", host, port),
                    access_log=None, handle_signals=True)
    except OSError as exc:
        print(f"thunderfs-tracker: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _report_shared(store: ManifestStore, a: str, b: str) -> int:
    ma, mb = store.stored(a), store.stored(b)
    common = sorted(ma.keys() & mb.keys())
    if not common:
        missing = [i for i, m in ((a, ma), (b, mb)) if not m]
        print(f"thunderfs-tracker: no checked manifest of {' and '.join(missing) or 'both at one chunk size'} "
              f"in {store.directory}: it is built when a node first reads the image", file=sys.stderr)
        return 1
    for cs in common:
        print(json.dumps(shared_between(ma[cs], mb[cs])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
