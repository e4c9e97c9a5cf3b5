"""The peer server in-process on a loopback socket: members only, and odd or non-ASCII signature
headers get a 401 that says why (not a dropped connection with a traceback)."""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest
import trio

from fakes import CS, meta_of, pattern
from thunderfs.cache.store import ABSENT
from thunderfs.p2p.peer_server import PeerServer
from thunderfs_common.signing import H_SIG, sign

SECRET = b"a-cluster-secret-of-some-length"
DATA = pattern(8 * CS)
META = meta_of(DATA)


async def ask(port: int, path: str, headers: dict[str, str | bytes]) -> tuple[int, bytes]:
    status, _, body = await ask_full(port, path, headers)
    return status, body


async def ask_full(port: int, path: str, headers: dict[str, str | bytes]) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: peer", b"Connection: close"]
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = b""
        while piece := await s.receive_some(65536):
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
    return int(head.split()[1]), {k.lower(): v for k, v in fields.items()}, body


async def listening(server: PeerServer):
    """The server listening on loopback: (the image's chunks path, the answers by name, and
    ``asked(name, path)``, a member's signed request whose answer goes into them)."""
    _, port = await server.listen("127.0.0.1", 0)
    answers: dict[str, tuple[int, dict, bytes]] = {}

    async def asked(name: str, path: str) -> None:
        answers[name] = await ask_full(port, path, sign(SECRET, "n1", "GET", path))
    return f"/v1/chunks/{META.content_key.hex()}", answers, asked


async def test_members_get_chunks_and_odd_headers_a_401_that_says_why(store, caplog):
    img = store.image(META.content_key, META.size)
    store.stage(img, 0, DATA[:2 * CS])
    server = PeerServer(store, secret=SECRET)
    _, port = await server.listen("127.0.0.1", 0)
    path = f"/v1/chunks/{META.content_key.hex()}/0/2"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        status, body = await ask(port, path, sign(SECRET, "n1", "GET", path))
        assert (status, body) == (200, DATA[:2 * CS])
        for value, words in (("é".encode("latin-1") * 64, b"malformed X-Thunderfs-Signature"),
                             (b"\xff\xfe" * 32, b"malformed X-Thunderfs-Signature"),
                             (b"00", b"malformed X-Thunderfs-Signature")):
            status, body = await ask(port, path, {**sign(SECRET, "n1", "GET", path), H_SIG: value})
            assert status == 401 and words in body, (value, body)
        status, body = await ask(port, path, {})
        assert status == 401 and b"unsigned" in body
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert server.statistics()["refused"] == 4


async def test_a_waiting_request_is_answered_when_its_chunks_arrive_and_404_when_they_do_not(store):
    """The holder tells its waiters: ``?wait=`` holds the request (without an upload slot) until
    the chunks are staged, or answers 404 once the wait is over; past MAX_WAITERS, 503."""
    from thunderfs.p2p import peer_server

    img = store.image(META.content_key, META.size)
    server = PeerServer(store, secret=SECRET, max_uploads=1)
    _, port = await server.listen("127.0.0.1", 0)
    base = f"/v1/chunks/{META.content_key.hex()}"
    answers: dict[str, tuple[int, bytes]] = {}

    async def asked(name: str, path: str) -> None:
        answers[name] = await ask(port, path, sign(SECRET, "n1", "GET", path))

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        nursery.start_soon(asked, "arrives", f"{base}/2/2?wait=5000")
        nursery.start_soon(asked, "never", f"{base}/6/1?wait=300")
        while server.statistics()["waiting"] < 2:
            await trio.sleep(0.01)
        assert "arrives" not in answers  # waits: nothing of it is here
        store.stage(img, 2, DATA[2 * CS:3 * CS])
        await trio.sleep(0.05)
        assert "arrives" not in answers  # half of it is not enough
        store.stage(img, 3, DATA[3 * CS:4 * CS])
        while len(answers) < 2:
            await trio.sleep(0.01)
        assert answers["arrives"] == (200, DATA[2 * CS:4 * CS])
        assert answers["never"][0] == 404
        peer_server.MAX_WAITERS, saved = 0, peer_server.MAX_WAITERS
        try:
            await asked("crowd", f"{base}/7/1?wait=1000")
        finally:
            peer_server.MAX_WAITERS = saved
        assert answers["crowd"][0] == 503
        nursery.cancel_scope.cancel()
    s = server.statistics()
    assert (s["waits"], s["waits_served"], s["waiting"], s["uploads_in_progress"]) == (2, 1, 0, 0)


async def test_waiters_queue_for_an_upload_slot_when_their_chunks_arrive_rather_than_get_a_503(store):
    """A crowd waits at the node fetching its chunks: when they arrive, every waiter is served
    in turn through the one slot (a 503 would send each back a poll later)."""
    img = store.image(META.content_key, META.size)
    server = PeerServer(store, secret=SECRET, max_uploads=1, rate=2**20)  # 1 MiB/s: a slot stays busy
    _, port = await server.listen("127.0.0.1", 0)
    path = f"/v1/chunks/{META.content_key.hex()}/0/2?wait=5000"
    answers: list[tuple[int, bytes]] = []

    async def asked() -> None:
        answers.append(await ask(port, path, sign(SECRET, "n1", "GET", path)))

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        for _ in range(3):
            nursery.start_soon(asked)
        while server.statistics()["waiting"] < 3:
            await trio.sleep(0.01)
        store.stage(img, 0, DATA[:2 * CS])
        while len(answers) < 3:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert answers == [(200, DATA[:2 * CS])] * 3
    s = server.statistics()
    assert s["busy"] == 0 and s["slot_waits"] >= 2 and s["uploads_in_progress"] == 0


async def test_a_waiter_is_sent_to_a_relay_that_took_its_chunks_while_every_slot_is_busy(store):
    """The holder tells its waiters who else has them: n1 took chunks 0-1; n2, waiting for them
    while the one slot is busy, is answered 503 with n1 named, not queued; a node is not named
    to itself, nor one that has not received them yet."""
    data = pattern(512 * CS)  # 2 MiB: past the bucket's 1 MiB burst
    meta = meta_of(data)
    img = store.image(meta.content_key, meta.size)
    store.stage(img, 0, data)
    server = PeerServer(store, secret=SECRET, max_uploads=1, rate=1)
    _, port = await server.listen("127.0.0.1", 0)
    base = f"/v1/chunks/{meta.content_key.hex()}"
    answers = {}

    async def asked(node: str, path: str) -> None:
        answers[node] = await ask_full(port, path, sign(SECRET, node, "GET", path))

    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(server.serve)
            await asked("n1", f"{base}/0/2")
            status, headers, body = answers["n1"]
            assert (status, body) == (200, data[:2 * CS]) and "x-thunderfs-takers" not in headers
            await asked("n0", f"{base}/0/512")  # sent at once, into the bucket's debt: at 1 byte/s...
            nursery.start_soon(asked, "n3", f"{base}/0/2")  # ...the next upload keeps its slot
            while not server.statistics()["uploads_in_progress"]:
                await trio.sleep(0.01)
            await asked("n2", f"{base}/0/2?wait=5000")
            status, headers, _ = answers["n2"]
            assert status == 503 and headers["x-thunderfs-takers"] == "n0:3,n1:3"  # the latest first
            await asked("n1", f"{base}/1/1")  # busy; n1 is not named to itself, n3 has nothing yet
            status, headers, _ = answers["n1"]
            assert status == 503 and headers["x-thunderfs-takers"] == "n0:1"
        finally:
            nursery.cancel_scope.cancel()
    assert server.statistics()["redirects"] == 1


async def test_a_wait_for_chunks_this_node_is_not_fetching_ends_at_once_with_a_404_that_says_so(store):
    """A claim the tracker still names after its claimer's fetch failed (a Glance outage) is stale:
    a waiter is told at once, and one already waiting is told when the fetch ends, not after its
    wait (a full-suite chaos run: a read failed 21 s after Glance was back, on such a claim)."""
    from thunderfs_common.tracker_protocol import NOT_FETCHING_HEADER

    img = store.image(META.content_key, META.size)
    server = PeerServer(store, secret=SECRET, max_uploads=1)
    fetching = {4, 5}
    server.fetching = lambda image, chunk: image is img and chunk in fetching
    base, answers, asked = await listening(server)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        started = trio.current_time()
        await asked("stale", f"{base}/2/1?wait=5000")
        assert trio.current_time() - started < 1
        status, headers, _ = answers["stale"]
        assert status == 404 and headers[NOT_FETCHING_HEADER.lower()] == "1"
        nursery.start_soon(asked, "fails", f"{base}/4/2?wait=5000")
        while server.statistics()["waiting"] < 1:
            await trio.sleep(0.01)
        store.stage(img, 4, DATA[4 * CS:5 * CS])  # one arrives; the fetch of the other then fails
        fetching.clear()
        img.wake_waiters()
        while "fails" not in answers:
            await trio.sleep(0.01)
        assert trio.current_time() - started < 2
        status, headers, _ = answers["fails"]
        assert status == 404 and NOT_FETCHING_HEADER.lower() in headers
        await asked("plain", f"{base}/2/1")  # not a waiter: a plain 404
        assert answers["plain"][0] == 404 and NOT_FETCHING_HEADER.lower() not in answers["plain"][1]
        nursery.cancel_scope.cancel()
    assert server.statistics()["not_fetching"] == 2


async def serving_all_of(store, data: bytes):
    """``data`` cached as an image, a server listening: (its image, the server, its port, the
    path of all its chunks)."""
    meta = meta_of(data)
    img = store.image(meta.content_key, meta.size)
    store.stage(img, 0, data)
    server = PeerServer(store, secret=SECRET)
    _, port = await server.listen("127.0.0.1", 0)
    return img, server, port, f"/v1/chunks/{meta.content_key.hex()}/0/{img.nchunks}"


async def test_a_long_answer_is_sent_by_the_kernel_from_the_cache_file_after_its_check(store):
    """An answer of ``SENDFILE_MIN`` or more of chunks on the data file goes by ``sendfile``, every
    chunk checked first: a rotten one is a 404 and dropped, never sent."""
    from thunderfs.p2p import peer_server
    data = pattern(peer_server.SENDFILE_MIN + 3 * CS)
    img, server, port, path = await serving_all_of(store, data)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        status, body = await ask(port, path, sign(SECRET, "n1", "GET", path))
        assert status == 200 and body == data
        assert server.statistics()["sent_from_file"] == len(data)
        os.pwrite(img.fd, b"rot", 5 * CS)
        status, body = await ask(port, path, sign(SECRET, "n1", "GET", path))
        assert status == 404 and img.state[5] == ABSENT
        nursery.cancel_scope.cancel()
    assert server.statistics()["sent_from_file"] == len(data) and not img.pins


async def slow_asker(port: int, path: str) -> trio.SocketStream:
    """A member's signed request for ``path`` on a connection with a tiny receive buffer (the
    answer cannot all go at once), sent; the stream, its answer unread."""
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: peer"]
    lines += [k.encode() + b": " + v.encode() for k, v in sign(SECRET, "n1", "GET", path).items()]
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
    return stream


async def test_an_asker_that_hangs_up_mid_sendfile_ends_its_connection_quietly(store, caplog):
    """The asker goes away with most of a long answer unsent: the connection ends as a hang-up
    (nothing logged as a failure), its slot and pins are freed, and the server serves on."""
    from thunderfs.p2p import peer_server
    data = pattern(peer_server.MAX_REQUEST_CHUNKS * CS)
    img, server, port, path = await serving_all_of(store, data)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        s = await slow_asker(port, path)
        assert (await s.receive_some(4096)).startswith(b"HTTP/1.1 200")
        s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        await s.aclose()
        while server.statistics()["uploads_in_progress"]:
            await trio.sleep(0.01)
        few = path[:path.rindex("/")] + "/4"
        status, body = await ask(port, few, sign(SECRET, "n2", "GET", few))
        assert status == 200 and body == data[:4 * CS]
        nursery.cancel_scope.cancel()
    s = server.statistics()
    assert s["sent_from_file"] < len(data) and s["bad_requests"] == s["cut_short"] == 0 and not img.pins
    assert "peer connection failed" not in caplog.text


@pytest.mark.parametrize("by_sendfile", [True, False])
async def test_an_asker_that_stops_taking_an_answer_frees_its_slot_after_the_idle_timeout(
        store, monkeypatch, by_sendfile):
    """An asker that asks for a long answer and never reads it: after ``IDLE_TIMEOUT`` with no
    byte taken the server ends the connection and frees the upload slot and the pins."""
    from thunderfs.p2p import peer_server
    monkeypatch.setattr(peer_server, "IDLE_TIMEOUT", 0.5)
    if not by_sendfile:
        async def sendable(img, offset, size):  # as if held or shared: sent with send_all
            return [(offset, size)]
        monkeypatch.setattr(store, "sendable", sendable)
    data = pattern(peer_server.MAX_REQUEST_CHUNKS * CS)
    img, server, port, path = await serving_all_of(store, data)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with await slow_asker(port, path):
            while not server.statistics()["uploads_in_progress"]:
                await trio.sleep(0.01)
            with trio.fail_after(10):  # (20 times the idle timeout set here)
                while server.statistics()["uploads_in_progress"]:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert not img.pins and server.statistics()["bad_requests"] == 0
    assert server.statistics()["sent_from_file" if by_sendfile else "served_bytes"] > 0


async def test_a_long_answer_read_from_the_cache_is_sent_a_piece_at_a_time_and_cut_short_if_a_piece_goes(
        store, monkeypatch):
    """Where an answer's chunks must be read (held in a receive buffer, or another image's), it
    comes whole, read in pieces of ``SEND_PIECE`` (no buffer as long as the answer); a chunk that
    cannot be read once the head is sent ends the connection short, so the asker sees a broken
    answer, never a wrong byte."""
    from thunderfs.p2p import peer_server
    from thunderfs.errors import ChunkCorrupt
    data = pattern(3 * peer_server.SEND_PIECE + 5 * CS)
    img, server, port, path = await serving_all_of(store, data)
    reads = []
    real_read = store.read

    async def read(img, offset, size, extra=None):
        reads.append(size)
        if fail and len(reads) == 3:
            raise ChunkCorrupt(offset // CS)
        return await real_read(img, offset, size, extra)

    async def sendable(img, offset, size):  # as if every chunk were held or shared
        return [(offset, size)]

    monkeypatch.setattr(store, "read", read)
    monkeypatch.setattr(store, "sendable", sendable)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        fail = False
        status, body = await ask(port, path, sign(SECRET, "n1", "GET", path))
        assert status == 200 and body == data
        assert max(reads) == peer_server.SEND_PIECE and len(reads) == 4
        reads.clear()
        fail = True
        status, headers, body = await ask_full(port, path, sign(SECRET, "n1", "GET", path))
        assert status == 200 and int(headers["content-length"]) == len(data) and len(body) < len(data)
        assert body == data[:len(body)]
        nursery.cancel_scope.cancel()
    assert server.statistics()["cut_short"] == 1 and not img.pins


async def test_a_wait_for_chunks_this_node_owns_starts_their_fetch_once_and_is_answered_when_they_arrive(store):
    """Asked as the owner of chunks it neither holds nor fetches (a seeded image's), the node
    fetches them (the daemon's hook) and answers when they arrive; a fetch that ends without
    them is not started again for the same request: 404, not fetching."""
    from thunderfs_common.tracker_protocol import NOT_FETCHING_HEADER

    img = store.image(META.content_key, META.size)
    server = PeerServer(store, secret=SECRET)
    fetching: set[int] = set()
    started: list[list[int]] = []

    def fetch_for_peer(image, chunks):
        started.append(list(chunks))
        fetching.update(chunks)
        return True

    server.fetching = lambda image, chunk: chunk in fetching
    server.fetch_for_peer = fetch_for_peer
    base, answers, asked = await listening(server)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        nursery.start_soon(asked, "owned", f"{base}/2/2?wait=5000")
        while not started:
            await trio.sleep(0.01)
        assert started == [[2, 3]]
        store.stage(img, 2, DATA[2 * CS:4 * CS])
        while "owned" not in answers:
            await trio.sleep(0.01)
        assert answers["owned"][0] == 200 and answers["owned"][2] == DATA[2 * CS:4 * CS]
        nursery.start_soon(asked, "failed", f"{base}/6/1?wait=5000")
        while len(started) < 2:
            await trio.sleep(0.01)
        fetching.clear()  # the fetch ended without the chunk
        img.wake_waiters()
        while "failed" not in answers:
            await trio.sleep(0.01)
        status, headers, _ = answers["failed"]
        assert status == 404 and NOT_FETCHING_HEADER.lower() in headers and started == [[2, 3], [6]]
        nursery.cancel_scope.cancel()
    assert server.statistics()["fetches_for_peers"] == 2
