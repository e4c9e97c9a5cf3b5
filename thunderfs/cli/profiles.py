"""``thunderfs profile record|show``, ``prefetch`` and ``warm``: boot profiles, through a running daemon."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from thunderfs.service import control
from thunderfs.errors import ConfigError
from thunderfs_common.units import format_size


def add_parsers(sub) -> None:
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
    show.add_argument("--json", action="store_true", help="the whole profile, as JSON")
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
