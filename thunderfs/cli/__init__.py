"""The ``thunderfs`` command: one module per command group, each only parsing and calling.

``mount`` (and ``umount``) start and stop the daemon; ``verify`` reads an image through the mount
against Glance's hash; ``status`` and ``evict`` ask a running daemon; ``profile``, ``prefetch``
and ``warm`` drive boot profiles; ``nova-sync`` keeps Nova's image cache linked to the mount.
"""

from __future__ import annotations

import argparse
import sys

from thunderfs import __version__
from thunderfs.cli import mount, nova, profiles, status, verify
from thunderfs.errors import ConfigError
from thunderfs.nova.base_dir import NovaBaseError
from thunderfs_common.options import OptionError

GROUPS = (mount, verify, status, profiles, nova)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thunderfs", description="Glance images as lazily fetched files.")
    p.add_argument("--version", action="version", version=f"thunderfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, argv)
    except (ConfigError, NovaBaseError, OptionError) as exc:
        print(f"thunderfs: {exc}", file=sys.stderr)
        return 1
