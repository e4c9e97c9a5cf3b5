"""Runs Nova's own code (from the Nova venv, not thunderfs's) against an image cache: what a compute
node's nova-compute does with a base file when it boots an instance, and what its image cache
manager does in a pass.  Prints one JSON object.  Used by tests/test_nova.py.

    python nova_probe.py name IMAGE_ID
    python nova_probe.py boot --instances-path P --image-id ID --instance NAME --size BYTES [--glance URL]
    python nova_probe.py manager --instances-path P [--in-use ID ...] [--instance NAME ...]

Nova runs its privileged calls (the base file's utime) through a privsep daemon as root; here they
run in this process, which the tests run as root: the same call with the same rights.

``run()`` is how the tests and benchmarks call it (from thunderfs's venv).

``manager`` calls private methods of Nova's ``ImageCacheManager`` (``_reset_state``,
``_scan_base_images``, ``_age_and_verify_cached_images``), and ``boot`` Nova's internal modules:
they are checked against the Nova that ``constraints/nova.txt`` pins (34.0.0).  Another Nova whose
code differs fails with a message naming both versions, not a traceback from inside Nova.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The Nova whose internals the probe calls: the one the setup pins.
WRITTEN_FOR = next(line.split("==", 1)[1].strip() for line in (REPO / "constraints" / "nova.txt").read_text().splitlines()
                   if line.startswith("nova=="))


class NovaProbeError(RuntimeError):
    pass


def venv_python() -> Path:
    """The Nova venv's python (scripts/setup.sh makes it; THUNDERFS_NOVA_VENV moves it)."""
    venv = Path(os.environ.get("THUNDERFS_NOVA_VENV", REPO / ".venv-nova"))
    python = venv / "bin" / "python"
    if not python.exists():
        raise NovaProbeError(f"no Nova venv at {venv}: run scripts/setup.sh")
    return python


def run(*args: str, timeout: float = 900) -> dict:
    """Runs this probe in the Nova venv and returns what it printed."""
    res = subprocess.run([str(venv_python()), __file__, *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise NovaProbeError(f"nova probe {args[0]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


def _configure(instances_path: str | None) -> None:
    import nova.conf
    import nova.privsep

    conf = nova.conf.CONF
    conf([], project="nova", default_config_files=[])
    if instances_path:
        conf.set_override("instances_path", instances_path)
    nova.privsep.sys_admin_pctxt.set_client_mode(False)


def name(args) -> dict:
    from nova.virt.libvirt import imagecache
    return {"cache_name": imagecache.get_cache_fname(args.image_id)}


def boot(args) -> dict:
    """What the libvirt driver does for an instance's root disk with images_type=qcow2: the image
    cache's base file (downloaded only when missing), inspected, marked in use, then a qcow2 disk
    in the instance's directory backed by it."""
    from nova.conf import CONF
    from nova.virt import images
    from nova.virt.libvirt import imagebackend, imagecache
    from nova.virt.libvirt import utils as libvirt_utils

    filename = imagecache.get_cache_fname(args.image_id)
    base = os.path.join(CONF.instances_path, CONF.image_cache.subdirectory_name, filename)
    downloads = []

    def fetch(target, *a, **kw):  # Nova's fetch_image: called only if the base file is missing
        downloads.append(target)
        if not args.glance:
            raise RuntimeError(f"Nova would download the image to {target}")
        from nova import context
        CONF.set_override("api_servers", [args.glance], group="glance")
        # The test Glance takes no tokens; Nova's Glance client wants one to send.
        ctx = context.RequestContext(user_id="nova", project_id="admin", auth_token="unused", is_admin=True)
        libvirt_utils.fetch_image(ctx, target, args.image_id)

    instance_dir = os.path.join(CONF.instances_path, args.instance)
    os.makedirs(instance_dir, exist_ok=True)
    disk = imagebackend.Qcow2(path=os.path.join(instance_dir, "disk"))
    started = time.monotonic()
    disk.cache(fetch_func=fetch, filename=filename, size=args.size)
    seconds = time.monotonic() - started
    inspector = images.get_image_format(base)
    inspector.safety_check()
    return {
        "seconds": seconds,
        "base": base,
        "format": str(inspector),
        "virtual_size": inspector.virtual_size,
        "downloads": downloads,
        "disk": disk.path,
        "backing_file": libvirt_utils.get_disk_backing_file(disk.path, basename=False),
        "base_mtime": os.stat(base).st_mtime,
    }


def manager(args) -> dict:
    """One pass of Nova's image cache manager over the base files (remove_unused_base_images on,
    minimum ages 0): which base files it finds in use, and which it removes."""
    from nova.conf import CONF
    from nova.virt.libvirt import imagecache

    CONF.set_override("remove_unused_original_minimum_age_seconds", 0, group="image_cache")
    CONF.set_override("remove_unused_resized_minimum_age_seconds", 0, group="image_cache")
    base_dir = os.path.join(CONF.instances_path, CONF.image_cache.subdirectory_name)
    before = sorted(os.listdir(base_dir))
    m = imagecache.ImageCacheManager()
    m._reset_state()
    m.used_images = {i: (1, 0, ["node"]) for i in args.in_use}
    m.instance_names = set(args.instance)
    m._scan_base_images(base_dir)
    m._age_and_verify_cached_images(None, [], base_dir)
    after = sorted(os.listdir(base_dir))
    return {"removed": sorted(set(before) - set(after)), "active": sorted(map(os.path.basename, m.active_base_files))}


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("name")
    n.add_argument("image_id")
    b = sub.add_parser("boot")
    b.add_argument("--instances-path", required=True)
    b.add_argument("--image-id", required=True)
    b.add_argument("--instance", required=True)
    b.add_argument("--size", type=int, required=True)
    b.add_argument("--glance", help="let Nova download a missing base file from this Glance (plain Nova)")
    mg = sub.add_parser("manager")
    mg.add_argument("--instances-path", required=True)
    mg.add_argument("--in-use", action="append", default=[])
    mg.add_argument("--instance", action="append", default=[])
    args = p.parse_args()
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    _configure(getattr(args, "instances_path", None))
    try:
        result = {"name": name, "boot": boot, "manager": manager}[args.cmd](args)
    except (AttributeError, TypeError, ImportError, NotImplementedError) as exc:  # Nova's internals are not what they were
        if importlib.metadata.version("nova") == WRITTEN_FOR:
            raise  # the Nova it was written for: a bug of the probe's, with its traceback
        print(f"nova_probe {args.cmd}: Nova {importlib.metadata.version('nova')}'s code is not what this probe "
              f"was written against (Nova {WRITTEN_FOR}, constraints/nova.txt): {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    result["warnings"] = collect.records
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
