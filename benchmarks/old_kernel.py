"""Restarts and SIGKILLs of the serving process on kernels without ``FUSE_NOTIFY_RESEND`` (Debian
12's 6.1, Ubuntu 22.04's 5.15), in a qemu guest (TCG) that runs this machine's own file system (``harness/guest_kernel.py``),
against a real Glance here: what ``docs/operating.md``'s table by kernel states, printed.

Each run: an 8 MiB image; two ``thunderfs restart``s, then two SIGKILLs, each under four fresh
O_DIRECT readers (``harness/guest_restarts.py``): errors, wrong bytes, the slowest read, readers
stuck, fusectl's ``waiting`` after each; what each restart answered before it handed over, and
what the process after each SIGKILL answered from the dead one's journal.
``tests/test_old_kernel.py`` asserts the same in the slow layer.

Usage: .venv/bin/python benchmarks/old_kernel.py [--runs 1] [--kernel debian-6.1 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchmarks.record import provenance
from harness import guest_kernel
from harness.local_glance import LocalGlance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--kernel", action="append", choices=sorted(guest_kernel.KERNELS),
                    help="a guest kernel (again for more; default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    made = provenance()
    size, seed = 8 * 2**20, 29
    runs = []
    with tempfile.TemporaryDirectory(prefix="thunderfs-old-kernel-", dir="/var/tmp") as tmp:
        glance = LocalGlance(Path(tmp) / "glance")
        glance.start()
        try:
            image_id = glance.upload("old-kernel", random.Random(seed).randbytes(size))["id"]
            port = glance.url.rsplit(":", 1)[1]
            for i, name in [(i, name) for name in args.kernel or sorted(guest_kernel.KERNELS)
                            for i in range(args.runs)]:
                rc, console = guest_kernel.run(
                    f"{sys.executable} -m harness.guest_restarts --glance http://{guest_kernel.HOST}:{port} "
                    f"--image {image_id} --size {size} --seed {seed} --restarts 2 --kills 2",
                    Path(tmp) / f"guest-{name}-{i}", cwd=str(REPO), timeout=1200, kernel_name=name)
                found = re.search(r"RESULT (\{.*\})", console)
                if rc or not found:
                    print(console[-3000:], file=sys.stderr)
                    return 1
                r = {"guest": name, **json.loads(found.group(1))}
                runs.append(r)
                for what, events in (("restart", r["restarts"]), ("SIGKILL", r["kills"])):
                    for e in events:
                        print(f"run {i + 1}, kernel {r['kernel']} (resends {r['kernel_resends']}), {what} under 4 "
                              f"O_DIRECT readers: {e['errors']} errors, {e['wrong']} wrong, slowest read "
                              f"{e['slowest_s']} s, {e['readers_stuck']} readers stuck, waiting after {e['waiting']}"
                              + (f", answered from the journal {e['replayed']}" if what == "SIGKILL" else "")
                              + (f", abort: {e['abort']}" if "abort" in e else ""), flush=True)
                print(f"run {i + 1}: answered before handing over {r['drains']}", flush=True)
        finally:
            glance.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**made, "image_bytes": size, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
