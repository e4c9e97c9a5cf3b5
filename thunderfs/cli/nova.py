"""``thunderfs nova-sync``: Nova's image cache (_base) kept as links into the mount, or rolled back."""

from __future__ import annotations

import os
import time
from pathlib import Path

from thunderfs.service import control
from thunderfs.errors import ConfigError
from thunderfs.nova.base_dir import NovaBaseDir
from thunderfs.nova.rollback import rollback
from thunderfs_common.units import format_size


def add_parsers(sub) -> None:
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
    report = rollback(base)
    for name, written in sorted(report.copied.items()):
        print(f"  copied: {name}: an instance is backed by it; now a file ({format_size(written)} of data)")
    print(f"{base.base_dir}: rolled back: {len(report.removed)} links removed, {len(report.copied)} replaced "
          f"by copies; Nova downloads images again from now on")
    if report.copied:
        print(f"running instances still read {mp}: unmount it once they have been rebooted or moved")
    return 0
