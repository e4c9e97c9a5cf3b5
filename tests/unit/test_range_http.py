"""The lean HTTP client against a real socket on loopback, answering by script: bodies received
exactly into the caller's memory however the socket cuts them, keep-alive, and every way an answer
can lie or break (short, long, unframed, chunked, silent, closed) failing clearly, its connection
never reused.  And the buffer pool's bounds."""

from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio
import trio.testing

from thunderfs.fetch.range_http import HTTPClient, HTTPFailed, HTTPTimeout

BODY = bytes(range(256)) * 400  # 102,400 bytes


class Server:
    """Answers each request on a connection with the next scripted answer: a list of byte
    strings sent one after another (None: close the connection; a float: sleep that long)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            while self.answers:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                for part in self.answers.pop(0):
                    if part is None:
                        await stream.aclose()
                        return
                    if part == "RST":  # a reset, not a close: the client's receive fails
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        stream.socket.close()
                        return
                    if isinstance(part, float):
                        await trio.sleep(part)
                        continue
                    await stream.send_all(part)
        except trio.BrokenResourceError:
            pass

    async def start(self, nursery) -> str:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def ok(body: bytes = BODY, length: int | None = None, step: int = 7 * 1024 + 3, extra: bytes = b"") -> list:
    head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body) if length is None else length}\r\n"
            "Content-Range: bytes 0-1/2\r\n\r\n").encode()
    return [head + body[:step]] + [body[i:i + step] for i in range(step, len(body), step)] + ([extra] if extra else [])


async def receive(client: HTTPClient, url: str, n: int = len(BODY)) -> tuple[int, bytes]:
    out = bytearray(n)
    async with client.get(url + "/img", {"Range": "bytes=0-1"}) as resp:
        view = memoryview(out)
        for i in range(0, n, 10_000):  # pieces that do not match the socket's
            await resp.read_into(view[i:i + 10_000])
        assert resp.length == n
        return resp.status, bytes(out)


async def test_bodies_arrive_exactly_and_the_connection_is_kept(nursery):
    server = Server(ok(), ok())
    url = await server.start(nursery)
    client = HTTPClient(timeout=2)
    assert await receive(client, url) == (206, BODY)
    assert await receive(client, url) == (206, BODY)
    assert server.connections == 1 and client.statistics()["reused"] == 1
    assert b"Range: bytes=0-1" in server.requests[0] and server.requests[0].startswith(b"GET /img HTTP/1.1")
    await client.aclose()


async def test_a_body_cut_short_fails_and_its_connection_is_not_reused(nursery):
    server = Server(ok(BODY[:50_000], length=len(BODY)) + [None], ok())
    url = await server.start(nursery)
    client = HTTPClient(timeout=2)
    with pytest.raises(HTTPFailed, match="closed after 50000 of 102400"):
        await receive(client, url)
    assert await receive(client, url) == (206, BODY)
    assert server.connections == 2 and client.statistics()["failures"] == 1


async def test_a_connection_reset_mid_body_is_a_clear_failure(nursery):
    server = Server(ok(BODY[:50_000], length=len(BODY), step=50_000) + [0.05, "RST"])
    url = await server.start(nursery)
    with pytest.raises(HTTPFailed, match="connection failed: Connection reset"):
        await receive(HTTPClient(timeout=2), url)


async def test_more_bytes_than_promised_never_reach_the_next_answer(nursery):
    server = Server(ok(extra=b"GARBAGE"), ok())
    url = await server.start(nursery)
    client = HTTPClient(timeout=2)
    assert await receive(client, url) == (206, BODY)
    await trio.testing.wait_all_tasks_blocked()
    assert await receive(client, url) == (206, BODY)  # on a new connection
    assert server.connections == 2 and client.statistics()["reused"] == 0


async def test_an_idle_connection_the_server_closed_is_replaced(nursery):
    server = Server(ok() + [None], ok())
    url = await server.start(nursery)
    client = HTTPClient(timeout=2)
    assert await receive(client, url) == (206, BODY)
    await trio.testing.wait_all_tasks_blocked()
    assert await receive(client, url) == (206, BODY)
    assert server.connections == 2


@pytest.mark.parametrize("answer,error", [
    ([b"HTTP/1.1 206 Partial\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"], "no Content-Length"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"], "bad Content-Length"),
    ([b"SSH-2.0-OpenSSH\r\n\r\n"], "not an HTTP answer"),
    ([b"HTTP/1.1 206 Partial\r\nContent-Le", None], "closed within the answer's head"),
    ([None], "connection closed before the answer"),
], ids=["chunked", "bad-length", "not-http", "head-cut", "closed"])
async def test_an_answer_that_is_not_what_was_expected_fails_clearly(nursery, answer, error):
    server = Server(answer)
    url = await server.start(nursery)
    with pytest.raises(HTTPFailed, match=error):
        await receive(HTTPClient(timeout=2), url, 5)


async def test_small_bodies_are_read_whole_in_any_framing(nursery):
    server = Server([b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbusy!\r\n0\r\n\r\n"],
                    [b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"])
    url = await server.start(nursery)
    client = HTTPClient(timeout=2)
    for status, body in ((503, b"busy!"), (404, b"nope")):
        async with client.get(url + "/x", {}) as resp:
            assert (resp.status, await resp.read()) == (status, body)
    assert server.connections == 1  # both framings leave the connection reusable


async def test_silence_is_a_timeout(nursery, autojump_clock):
    server = Server(ok(step=40_000)[:1] + [30.0])
    url = await server.start(nursery)
    with pytest.raises(HTTPTimeout, match="no byte within 2s"):
        await receive(HTTPClient(timeout=2), url)


async def test_nobody_listening_fails_at_once():
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HTTPFailed, match="cannot connect"):
        await receive(HTTPClient(timeout=2), f"http://127.0.0.1:{port}")


async def test_tls_bodies_arrive_the_same_and_an_unknown_certificate_is_refused(nursery, tmp_path):
    import ssl

    from harness.tls import make_ca_and_server
    ca, _, _ = make_ca_and_server(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    server = Server(ok(), ok(), ok())

    async def handle(stream):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the client refused the certificate
        await server.handle(tls)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    url = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    trusted = HTTPClient(timeout=2, ssl_context=ssl.create_default_context(cafile=str(ca)))
    assert await receive(trusted, url) == (206, BODY)
    assert await receive(trusted, url) == (206, BODY)
    assert trusted.statistics()["reused"] == 1
    with pytest.raises(HTTPFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await receive(HTTPClient(timeout=2, ssl_context=ssl.create_default_context()), url)
