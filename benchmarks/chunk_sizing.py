"""How the chunk size trades bytes fetched against requests, on the recorded Debian boot.

For each chunk size: the bytes fetched if every read pulls the whole chunks it touches (each
once), the Glance requests if adjacent missing chunks of one read go in one Range request, and
the serial time those requests would cost at the measured ~6.5 ms per Glance request plus the
bytes at 1 GB/s.  Usage: python3 benchmarks/chunk_sizing.py [TRACE]
"""

import sys
from pathlib import Path

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "debian-boot-trace.txt"
PER_REQUEST = 0.0065
BANDWIDTH = 1e9


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else TRACE
    reads = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _, off, n = line.split()
            reads.append((int(off), int(n)))
    total = sum(n for _, n in reads)
    print(f"{len(reads)} reads, {total / 2**20:.1f} MiB read")
    print(f"{'chunk':>8} {'fetched MiB':>12} {'ratio':>6} {'requests':>9} {'chunks':>7} {'serial s':>9}")
    for cs in (4096, 16384, 65536, 131072, 262144, 2**20, 4 * 2**20):
        have: set[int] = set()
        fetched = requests = 0
        for off, n in reads:
            missing = [c for c in range(off // cs, (off + n - 1) // cs + 1) if c not in have]
            requests += sum(1 for i, c in enumerate(missing) if i == 0 or missing[i - 1] != c - 1)
            fetched += len(missing) * cs
            have.update(missing)
        secs = requests * PER_REQUEST + fetched / BANDWIDTH
        print(f"{cs // 1024:>6}Ki {fetched / 2**20:>12.1f} {fetched / total:>6.2f} {requests:>9} {len(have):>7} {secs:>9.2f}")


if __name__ == "__main__":
    main()
