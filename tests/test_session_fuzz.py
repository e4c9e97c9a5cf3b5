"""The FUSE session fuzzed over the fake kernel (issue 29, item 5): 100,000 requests, well formed
and mutated (cut short, bytes flipped, bytes added, a header whose length lies, unknown opcodes),
to a session serving the real ``Operations``.  Every request that wants an answer gets exactly
one, nothing else is answered, the session never ends or crashes, nothing logs a traceback, and
memory stays bounded.  (In the slow layer for its length: ~100,000 round trips.)"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent / "unit"))

from fakes import meta_of  # noqa: E402
from test_fs_ops import FakeCatalog, FakeReaders  # noqa: E402
from thunderfs.fuse import kernel as k  # noqa: E402
from thunderfs.fuse.inodes import IMAGES_DIR, ROOT, derive  # noqa: E402
from thunderfs.fuse.kernel import Op  # noqa: E402
from thunderfs.fuse.operations import Operations  # noqa: E402
from thunderfs.fuse.session import Session  # noqa: E402
from thunderfs.fuse.state import SessionState  # noqa: E402

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", 100_000))
BATCH = 64  # requests in the socket at once (a SEQPACKET pair holds a few hundred small ones)
A = meta_of(b"a" * 100_000, "aaaaaaaa-0000-0000-0000-000000000001", "alpha")
B = meta_of(b"b" * 5_000, "bbbbbbbb-0000-0000-0000-000000000002", "beta")


def _body(rng: random.Random, op: int, fhs: list[int]) -> bytes:
    """A well-formed body for ``op`` (random fields where the kernel's could be anything)."""
    fh = rng.choice(fhs) if fhs and rng.random() < 0.8 else rng.getrandbits(64)
    name = rng.choice([b"images", A.id.encode(), B.id.encode(), b"nope", b"", b"x" * 300])
    if op == Op.LOOKUP:
        return name + b"\0"
    if op in (Op.READ, Op.READDIR):
        return k.READ_IN.pack(fh, rng.choice([0, 1, 4095, 99_999, 10**12]), rng.choice([0, 1, 4096, 2**20]),
                              0, 0, 0, 0)
    if op in (Op.OPEN, Op.OPENDIR):
        return k.OPEN_IN.pack(rng.choice([os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC]), 0)
    if op in (Op.RELEASE, Op.RELEASEDIR):
        return k.RELEASE_IN.pack(fh, 0, 0, 0)
    if op in (Op.GETXATTR, Op.LISTXATTR):
        return k.GETXATTR_IN.pack(rng.choice([0, 4, 4096]), 0) + b"user.thunderfs." + name + b"\0"
    if op == Op.SETATTR:
        return bytes(rng.getrandbits(8) for _ in range(k.SETATTR_IN.size))  # any valid bits, any times
    if op == Op.LSEEK:
        return k.LSEEK_IN.pack(fh, rng.choice([0, 5, 10**9]), rng.choice([0, 1, 2, 3, 4, 9]), 0)
    if op == Op.FORGET:
        return k.FORGET_IN.pack(rng.choice([1, 2, 2**40]))
    if op == Op.BATCH_FORGET:
        count = rng.randrange(4)
        return k.BATCH_FORGET_IN.pack(count, 0) + b"".join(
            k.FORGET_ONE.pack(rng.choice([ROOT, IMAGES_DIR, derive(A), 7]), 1) for _ in range(count))
    return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 8, 16, 40])))


def _mutate(rng: random.Random, body: bytes) -> bytes:
    how = rng.randrange(3)
    if how == 0 and body:
        return body[:rng.randrange(len(body))]
    if how == 1 and body:
        b = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b)
    return body + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))


OPS = [Op.LOOKUP, Op.GETATTR, Op.SETATTR, Op.OPEN, Op.READ, Op.RELEASE, Op.OPENDIR, Op.READDIR, Op.RELEASEDIR,
       Op.STATFS, Op.GETXATTR, Op.LISTXATTR, Op.FLUSH, Op.FSYNC, Op.LSEEK, Op.FORGET, Op.BATCH_FORGET,
       Op.INTERRUPT, Op.MKDIR, Op.WRITE, Op.BMAP, Op.INIT, 99, 0]


def _rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_a_hundred_thousand_random_and_mutated_requests_each_get_one_answer(caplog):
    caplog.set_level(logging.WARNING)
    rng = random.Random(29)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    state = SessionState.create()
    seen: dict[int, int] = {}
    expected: set[int] = set()
    fhs: list[int] = []
    rss: list[int] = []

    async def main() -> None:
        ops = Operations(FakeCatalog(A, B), FakeReaders(), state=state)
        session = Session(theirs.fileno(), ops, state)
        ours.setblocking(False)

        async def send(op: int, body: bytes, nodeid: int, unique: int, lie: bool = False) -> None:
            length = k.IN_HEADER.size + len(body) + (rng.choice([-1, 1, 1000]) if lie else 0)
            msg = k.IN_HEADER.pack(max(length, 0), op, unique, nodeid, 0, 0, 1, 0, 0) + body
            while True:
                try:
                    ours.send(msg)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(ours)

        def answers() -> None:
            while True:
                try:
                    msg = ours.recv(1 << 21)
                except BlockingIOError:
                    return
                length, error, unique = k.OUT_HEADER.unpack_from(msg)
                assert length == len(msg), (length, len(msg))
                seen[unique] = seen.get(unique, 0) + 1
                outstanding.discard(unique)
                if unique in opened and error == 0 and len(msg) >= k.OUT_HEADER.size + k.OPEN_OUT.size:
                    fhs.append(k.OPEN_OUT.unpack_from(msg, k.OUT_HEADER.size)[0])
                    del fhs[:-32]

        opened: set[int] = set()
        outstanding: set[int] = set()  # expected, not answered yet
        lies = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            await send(Op.INIT, struct.pack("<IIIII44x", 7, 40, 131072, k.ASYNC_READ | k.MAX_PAGES, 0), 0, 1)
            expected.add(1)
            outstanding.add(1)
            unique = 1
            for i in range(REQUESTS):
                unique += 1
                op = rng.choice(OPS)
                nodeid = rng.choice([ROOT, IMAGES_DIR, derive(A), derive(B), 0, 12345])
                body = _body(rng, op, fhs)
                mutated = rng.random() < 0.3
                if mutated:
                    body = _mutate(rng, body)
                lie = rng.random() < 0.02
                lies += lie
                if op in k.NO_REPLY and not lie:
                    pass  # FORGET, BATCH_FORGET, INTERRUPT: never answered
                elif not (lie and k.IN_HEADER.size + len(body) < 16):
                    expected.add(unique)
                    outstanding.add(unique)
                if op == Op.OPEN and not mutated and not lie:
                    opened.add(unique)
                await send(op, body, nodeid, unique, lie)
                if i % BATCH == BATCH - 1:
                    with trio.move_on_after(5):
                        while outstanding:
                            await trio.lowlevel.wait_readable(ours)
                            answers()
                if i in (REQUESTS // 10, REQUESTS - 1):
                    rss.append(_rss_kib())
            with trio.move_on_after(10):
                while outstanding:
                    await trio.lowlevel.wait_readable(ours)
                    answers()
            answers()
            assert session.statistics()["requests"] == REQUESTS + 1 - lies  # a lying header is not one
            assert not session.unmounted
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        ours.close()
        theirs.close()
        os.close(state.fd)
    missing = expected - seen.keys()
    assert not missing, f"{len(missing)} requests never answered, e.g. {sorted(missing)[:5]}"
    assert seen.keys() <= expected, f"answers to requests that want none: {sorted(seen.keys() - expected)[:5]}"
    twice = [u for u, n in seen.items() if n > 1]
    assert not twice, f"{len(twice)} requests answered more than once"
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], \
        caplog.text[-2000:]
    assert rss[1] - rss[0] < 32 * 1024, rss  # KiB: no growth with the number of requests
