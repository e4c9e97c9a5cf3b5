"""Nova's own boot path, plain and through thunderfs, side by side: a real Debian VM (qemu, TCG).

For each instance, Nova 34's own code (from .venv-nova, through harness/nova_probe.py) prepares
the root disk as nova-compute does with images_type=qcow2 (the image cache's base file, fetched
from Glance only if missing, with Nova's format inspection and utime; then the qcow2 instance
disk on it), and qemu boots that disk with cache=none, as Nova's libvirt driver does, to the
guest's multi-user marker.  "Ready" is preparation plus boot: how long after nova-compute starts
on the instance it is up.

  (a) plain Nova, first instance of the image on the node: Nova downloads the whole image
  (b) thunderfs, first instance on the node, empty cache: _base holds a link into the mount
  (c) plain Nova, a second instance (the base file is there)
  (d) thunderfs, a second instance (the chunks the first one read are cached)

The image is the 2 GiB raw Debian disk of benchmarks/debian_image.sh, in a real Glance on
loopback (no bandwidth cap: a real network makes (a) slower, not (b)).  No tracker: one node.

Usage: .venv/bin/python benchmarks/nova_boot.py [--work /var/tmp/thunderfs-bench]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.boot_bench import boot_disk  # noqa: E402
from harness import nova_probe  # noqa: E402
from harness.local_glance import LocalGlance  # noqa: E402
from harness.mounts import Mount  # noqa: E402
from harness.pagecache import drop_page_cache  # noqa: E402
from thunderfs.nova.base_dir import cache_name  # noqa: E402

MiB = 2**20


def nova_boot(instances: Path, image_id: str, instance: str, glance_url: str | None = None) -> dict:
    args = ["boot", "--instances-path", str(instances), "--image-id", image_id, "--instance", instance,
            "--size", str(4 * 2**30)]
    return nova_probe.run(*args, *(["--glance", glance_url] if glance_url else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/thunderfs-bench", help="where the Debian disk is built and kept")
    args = ap.parse_args()
    try:
        nova_probe.venv_python()
    except nova_probe.NovaProbeError as exc:
        raise SystemExit(str(exc)) from None
    work = Path(args.work)
    disk = Path(subprocess.run(["bash", str(REPO / "benchmarks" / "debian_image.sh"), str(work / "debian")],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="thunderfs-nova-", dir=work) as tmp:
        tmp = Path(tmp)
        glance = LocalGlance(tmp / "glance")
        mount = None
        try:
            glance.start()
            image_id = glance.upload("debian-nova", disk)["id"]
            rows = []

            def instance(label: str, instances: Path, name: str, glance_url: str | None, fetched) -> None:
                before = fetched()
                prep = nova_boot(instances, image_id, name, glance_url)
                if prep["downloads"] and not glance_url:
                    raise RuntimeError("Nova downloaded with thunderfs")
                secs = boot_disk(Path(prep["disk"]), tmp, name, cache="none")
                rows.append((label, prep["seconds"], secs, fetched() - before))

            # Plain Nova: what Glance sent is the base file Nova wrote (its size).
            plain = tmp / "plain"
            (plain / "_base").mkdir(parents=True)
            plain_base = plain / "_base" / cache_name(image_id)

            def plain_fetched() -> int:
                return plain_base.stat().st_size if plain_base.exists() else 0

            before = time.perf_counter()
            instance("(a) plain Nova, first instance", plain, "a", glance.url, plain_fetched)

            thunder = tmp / "thunder"
            (thunder / "_base").mkdir(parents=True)
            mount = Mount(tmp / "mnt", glance.url, tmp / "cache", "--cache-size", "4G",
                          "--nova-base-dir", str(thunder / "_base"))
            mount.mount()
            deadline = time.monotonic() + 30
            while not (thunder / "_base" / cache_name(image_id)).is_symlink():
                if time.monotonic() > deadline:
                    raise RuntimeError("the mount made no link in _base")
                time.sleep(0.2)

            def mount_fetched() -> int:
                return mount.stats()["glance"]["bytes"]

            instance("(b) thunderfs, first instance", thunder, "b", None, mount_fetched)
            drop_page_cache(plain_base)
            instance("(c) plain Nova, second instance", plain, "c", glance.url, plain_fetched)
            drop_page_cache(mount.image(image_id))
            instance("(d) thunderfs, second instance", thunder, "d", None, mount_fetched)

            a_ready = rows[0][1] + rows[0][2]
            print(f"Debian disk {disk.stat().st_size / MiB:.0f} MiB (raw) in Glance on loopback; qemu TCG, "
                  f"1 vCPU, cache=none; {time.perf_counter() - before:.0f}s in all")
            print(f"  {'':36s} {'prepare':>8s} {'boot':>7s} {'ready':>7s} {'vs (a)':>7s} {'from Glance':>12s}")
            for label, prep, secs, sent in rows:
                ready = prep + secs
                print(f"  {label:36s} {prep:7.1f}s {secs:6.1f}s {ready:6.1f}s {ready / a_ready:7.2f} "
                      f"{sent / MiB:9.1f} MiB")
        finally:
            if mount is not None:
                mount.cleanup()
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
