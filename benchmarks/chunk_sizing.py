"""How the chunk size trades bytes fetched against requests, on the recorded Debian boot.

For each chunk size: the bytes fetched if every read pulls the whole chunks it touches (each
once), the Glance requests if adjacent missing chunks of one read go in one Range request, and
the serial time those requests would cost at a fixed time per Glance request plus the bytes at
a rate.  Both are ASSUMPTIONS given as options (defaults 6.5 ms and 1 GB/s); what a running
daemon measures of its Glance is in ``thunderfs status`` (``origin_request_ms``, ``origin_mib_s``).

Usage: python3 benchmarks/chunk_sizing.py [TRACE] [--request-ms 6.5] [--gbps 1.0]
"""

import argparse
from pathlib import Path

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "debian-boot-trace.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="?", type=Path, default=TRACE, help="a boot's reads (default: the Debian boot)")
    ap.add_argument("--request-ms", type=float, default=6.5, help="assumed fixed time per Glance request")
    ap.add_argument("--gbps", type=float, default=1.0, help="assumed Glance rate, GB/s")
    args = ap.parse_args()
    path = args.trace
    per_request, bandwidth = args.request_ms / 1000, args.gbps * 1e9
    reads = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _, off, n = line.split()
            reads.append((int(off), int(n)))
    total = sum(n for _, n in reads)
    print(f"{len(reads)} reads, {total / 2**20:.1f} MiB read; serial time at an assumed "
          f"{args.request_ms} ms per request and {args.gbps} GB/s")
    print(f"{'chunk':>8} {'fetched MiB':>12} {'ratio':>6} {'requests':>9} {'chunks':>7} {'serial s':>9}")
    for cs in (4096, 16384, 65536, 131072, 262144, 2**20, 4 * 2**20):
        have: set[int] = set()
        fetched = requests = 0
        for off, n in reads:
            missing = [c for c in range(off // cs, (off + n - 1) // cs + 1) if c not in have]
            requests += sum(1 for i, c in enumerate(missing) if i == 0 or missing[i - 1] != c - 1)
            fetched += len(missing) * cs
            have.update(missing)
        secs = requests * per_request + fetched / bandwidth
        print(f"{cs // 1024:>6}Ki {fetched / 2**20:>12.1f} {fetched / total:>6.2f} {requests:>9} {len(have):>7} {secs:>9.2f}")


if __name__ == "__main__":
    main()
