"""``thunderfs status`` and ``thunderfs evict``: what a running daemon has done; an image's
cached chunks dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from thunderfs.service import control
from thunderfs.errors import ConfigError
from thunderfs_common.units import format_size


def add_parsers(sub) -> None:
    s = sub.add_parser("status", help="what the daemon serving MOUNTPOINT (default: every mount) has done")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help="everything, as JSON (a list without MOUNTPOINT)")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("evict", help="drop an image's cached chunks")
    e.add_argument("mountpoint")
    e.add_argument("image_id")
    e.set_defaults(func=cmd_evict)


def cmd_status(args, _argv) -> int:
    if args.mountpoint:
        all_stats = [control.call(Path(args.mountpoint), "stats")]
    else:
        all_stats = []
        for m in control.mountpoints():
            try:
                all_stats.append(control.call(m, "stats"))
            except ConfigError as exc:
                # A record left by a daemon that is gone (killed with SIGKILL): said, and the
                # live mounts listed all the same.
                print(f"thunderfs: {exc} (a record left by a daemon that is gone)", file=sys.stderr)
        if not all_stats:
            raise ConfigError("no thunderfs mount is running here")
    if args.json:
        print(json.dumps(all_stats[0] if args.mountpoint else all_stats, indent=2, sort_keys=True))
        return 0
    for stats in all_stats:
        _print_status(stats)
    return 0


def _print_status(stats: dict) -> None:
    g, c, f = stats["glance"], stats["cache"], stats["fetch"]
    held = f"keeper pid {stats['keeper']}" if stats.get("keeper") else "its service manager"
    how = "took the mount over" if stats["fs"].get("takeover") else "mounted it"
    print(f"{stats['mountpoint']}: {stats['images']} images; serving process pid {stats['pid']} ({how}; "
          f"the mount is held by {held})")
    down = f.get("origin_breaker", {}).get("open")
    print(f"  Glance {g['url']} ({'reachable' if g['reachable'] and not down else 'UNREACHABLE'}"
          f"{': reads that need it fail at once' if down else ''}): "
          f"{format_size(g['bytes'])} in {g['range_requests']} range requests, {g['errors']} errors")
    print(f"  cache {format_size(c['used'])} of {format_size(c['capacity'])}; served "
          f"{format_size(c['bytes_read_disk'])} from disk, {format_size(c['bytes_read_memory'])} uncached; "
          f"{c['evictions']} evictions, {c['corrupt_dropped']} corrupt chunks dropped")
    print(f"  fetched {f['chunks_fetched']} chunks in {f['flights']} requests "
          f"({f['readahead_chunks']} by readahead), {f['failures']} failures")
    if "peers" in stats:
        p, u = stats["peers"], stats["peer_server"]
        print(f"  peers: received {format_size(p['bytes'])} in {p['requests']} requests ({p['bad_chunks']} bad "
              f"chunks refused); sent {format_size(u['served_bytes'])} to others; avoided now: "
              f"{', '.join(p['avoided_peers']) or 'none'}")
    if (n := stats.get("nova")) is not None:
        state = "released (rolled back)" if n["released"] else f"ERROR: {n['last_error']}" if n["last_error"] else "kept"
        print(f"  Nova image cache {n['base_dir']}: {state}; {n['links']} links, {n['linked']} made, "
              f"{n['restored']} put back, {n['removed']} removed, {n['kept_in_use']} kept for instances "
              f"(image gone), {len(n['left_alone'])} other files left alone")
    idle = 0
    for im in stats.get("per_image", []):
        if not im["cached_chunks"] and not im["bytes_read"]:
            idle += 1
            continue
        print(f"  {im['id']} {im['name']!r}: {format_size(im['size'])}, {100 * im['cached_fraction']:.1f}% cached; "
              f"read {format_size(im['bytes_read'])}; fetched {format_size(im['bytes_from_peers'])} from peers, "
              + (f"{format_size(im['bytes_from_seed'])} through the tracker (seeding it), "
                 if im.get("bytes_from_seed") else "")
              + f"{format_size(im['bytes_from_origin'])} from Glance")
        if im.get("shared_bytes") or im.get("zero_bytes"):
            print(f"    saved {format_size(im['shared_bytes'] + im['zero_bytes'])}: "
                  f"{format_size(im['shared_bytes'])} shared with other cached images, "
                  f"{format_size(im['zero_bytes'])} of zero chunks (neither fetched nor stored)")
        if im["peers"]:
            print("    peers: " + ", ".join(f"{n} {format_size(b)}" for n, b in list(im["peers"].items())[:5])
                  + (f" and {len(im['peers']) - 5} more" if len(im["peers"]) > 5 else ""))
        if (pr := im["profile"]) is not None:
            job = f"{pr['job']} {pr['job_done']}/{pr['job_total']}" if pr["job"] else "no prefetch running"
            print(f"    profile v{pr['profile_version'] or '-'}{', recording' if pr['recording'] else ''}; {job}; "
                  f"prefetched {pr['prefetched']}, {pr['hits']} read, {pr['waste']} not read; "
                  f"{pr['demand_waits']} reads waited")
    if idle:
        print(f"  {idle} other image{'s' if idle > 1 else ''}: nothing cached or read")


def cmd_evict(args, _argv) -> int:
    r = control.call(Path(args.mountpoint), "evict", image_id=args.image_id)
    print(f"{args.image_id}: {r['dropped_chunks']} cached chunks dropped")
    return 0
