"""``thunderfs verify``: an image read whole through the mount, its hash compared with Glance's."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import trio

from thunderfs.service import control
from thunderfs.errors import ConfigError
from thunderfs_common.glance_client import GlanceError
from thunderfs_common.glance_client import GlanceClient
from thunderfs_common.units import format_size


def add_parsers(sub) -> None:
    v = sub.add_parser("verify", help="read an image through the mount and compare it with Glance's hash")
    v.add_argument("mountpoint")
    v.add_argument("image_id")
    v.add_argument("--glance", help="Glance URL (default: the one the mount uses)")
    v.set_defaults(func=cmd_verify)


async def _glance_hash(glance_url: str, image_id: str) -> tuple[str, str]:
    async with GlanceClient(glance_url, request_timeout=10) as origin:
        meta = await origin.image(image_id)
    return meta.os_hash_algo or "sha512", meta.os_hash_value or ""


def cmd_verify(args, _argv) -> int:
    mp = control.canonical(Path(args.mountpoint))
    path = mp / "images" / args.image_id
    if not path.exists():
        raise ConfigError(f"{path} does not exist (is {mp} mounted, is the image active?)")
    glance = args.glance or control.read_record(mp)["glance"]
    try:
        algo, expected = trio.run(_glance_hash, glance, args.image_id)
        where = "Glance"
    except GlanceError as exc:
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
