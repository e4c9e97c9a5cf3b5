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

All four run --runs times (fresh instance directories, a fresh mount and cache each time); the
ratios are the medians of the runs' ratios, with their range.

Usage: .venv/bin/python benchmarks/nova_boot.py [--work /var/tmp/thunderfs-bench] [--runs 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchmarks.boot_bench import boot_disk
from harness import nova_probe
from benchmarks.record import provenance, spread
from harness.local_glance import LocalGlance
from harness.mounts import Mount
from harness.pagecache import drop_page_cache
from thunderfs.nova.base_dir import cache_name

MiB = 2**20


def nova_boot(instances: Path, image_id: str, instance: str, glance_url: str | None = None) -> dict:
    args = ["boot", "--instances-path", str(instances), "--image-id", image_id, "--instance", instance,
            "--size", str(4 * 2**30)]
    return nova_probe.run(*args, *(["--glance", glance_url] if glance_url else []))


def one_run(tmp: Path, glance: LocalGlance, image_id: str) -> list[tuple[str, float, float, int]]:
    """The four instances once: [(label, prepare s, boot s, bytes from Glance)]."""
    tmp.mkdir(parents=True)
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

    instance("(a) plain Nova, first instance", plain, "a", glance.url, plain_fetched)
    thunder = tmp / "thunder"
    (thunder / "_base").mkdir(parents=True)
    mount = Mount(tmp / "mnt", glance.url, tmp / "cache", "--cache-size", "4G",
                  "--nova-base-dir", str(thunder / "_base"))
    try:
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
    finally:
        mount.cleanup()
        shutil.rmtree(plain, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/thunderfs-bench", help="where the Debian disk is built and kept")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the runs here (benchmarks/results/nova.json)")
    args = ap.parse_args()
    made = provenance()  # the code as the run starts
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
        try:
            glance.start()
            image_id = glance.upload("debian-nova", disk)["id"]
            runs = []
            for run_no in range(args.runs):
                runs.append(one_run(tmp / f"run{run_no}", glance, image_id))
            a = {"ready": [r[0][1] + r[0][2] for r in runs]}
            out = {**made, "runs": args.runs, "image_bytes": disk.stat().st_size, "cases": {}}

            print(f"Debian disk {disk.stat().st_size / MiB:.0f} MiB (raw) in Glance on loopback; qemu TCG, "
                  f"1 vCPU, cache=none; medians (ranges) of {args.runs} runs")
            print(f"  {'':36s} {'prepare':>8s} {'boot':>7s} {'ready':>7s} {'vs (a)':>17s} {'from Glance':>12s}")
            for i, label in enumerate(r[0] for r in runs[0]):
                prep = [r[i][1] for r in runs]
                boot = [r[i][2] for r in runs]
                ready = [p + b for p, b in zip(prep, boot)]
                ratio = [x / y for x, y in zip(ready, a["ready"])]
                sent = [r[i][3] for r in runs]
                out["cases"][label] = {"prepare_s": spread(prep), "boot_s": spread(boot), "ready_s": spread(ready),
                                       "ready_vs_a": spread(ratio), "glance_bytes": spread(sent)}
                print(f"  {label:36s} {statistics.median(prep):7.1f}s {statistics.median(boot):6.1f}s "
                      f"{statistics.median(ready):6.1f}s {statistics.median(ratio):5.2f} ({min(ratio):.2f}-{max(ratio):.2f}) "
                      f"{statistics.median(sent) / MiB:9.1f} MiB")
            if args.json:
                args.json.write_text(json.dumps(out, indent=1) + "\n")
        finally:
            glance.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
