"""A machine in the middle between a node and the tracker, and the attacker's own peer server.

Fault injection only (issue 17's attack): ``TrackerMitm`` passes every request on to the real
tracker, signature headers and all, and rewrites what comes back: a manifest's digests become the
digests of the attacker's bytes, every peer in a lookup answer becomes the attacker's server (one
holding every chunk is added if there were none), and a claim names the attacker as the holder of
every chunk.  ``EvilPeer`` serves those bytes to anyone who asks.  Without authenticated answers a
node would read the attacker's bytes into its cache and serve them to its readers; with them, it
refuses every rewritten answer and reads from Glance.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thunderfs_common import chunk_digest
from thunderfs_common.tracker_protocol import encode_bits


def _server(handle, host: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            handle(self)

        do_POST = do_GET

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class _Served:
    """An HTTP server of its own on ``host``, in a thread; ``_handle(request)`` answers."""

    def __init__(self, host: str):
        self._server = _server(self._handle, host)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._server.shutdown()


class EvilPeer(_Served):
    """Serves ``fill`` bytes for every chunk of every image: what the rewritten manifests expect."""

    def __init__(self, chunk_size: int, host: str = "127.0.0.1", fill: int = 0x41):
        self.chunk_size, self.fill = chunk_size, fill
        self.requests = 0
        super().__init__(host)

    def chunk(self, length: int) -> bytes:
        return bytes([self.fill]) * length

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        m = re.match(r"^/v1/chunks/[0-9a-f]{32}/(\d+)/(\d+)$", h.path)
        count = int(m.group(2)) if m else 1
        _reply(h, 200, self.chunk(count * self.chunk_size), {"Content-Type": "application/octet-stream"})


class TrackerMitm(_Served):
    """``rewrite``: which answers it rewrites ("manifest", "lookup", "claim")."""

    def __init__(self, tracker_url: str, evil: EvilPeer, host: str = "127.0.0.1",
                 rewrite: frozenset[str] = frozenset({"manifest", "lookup", "claim"})):
        self.upstream = tracker_url.rstrip("/")
        self.evil = evil
        self.rewrite = rewrite
        self.rewritten: dict[str, int] = {"manifest": 0, "lookup": 0, "claim": 0}
        super().__init__(host)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        data = h.rfile.read(length) if length else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        req = urllib.request.Request(self.upstream + h.path, data=data, headers=headers, method=h.command)
        try:
            resp = urllib.request.urlopen(req, timeout=30)
            status, resp_headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            status, resp_headers, body = exc.code, exc.headers, exc.read()
        body = self._rewrite(h.path, status, body)
        keep = {k: v for k, v in resp_headers.items() if k.lower() not in ("content-length", "connection",
                                                                            "transfer-encoding", "date", "server")}
        _reply(h, status, body, keep)

    def _rewrite(self, path: str, status: int, body: bytes) -> bytes:
        if status != 200:
            return body
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if path.startswith("/v1/manifests/") and chunk_digest.ALGORITHM in obj and "manifest" in self.rewrite:
            cs, size = obj["chunk_size"], obj["size"]
            digests = b"".join(chunk_digest.digest(self.evil.chunk(min(cs, size - off)))
                               for off in range(0, size, cs))
            obj[chunk_digest.ALGORITHM] = base64.b64encode(digests).decode()
            self.rewritten["manifest"] += 1
        elif "/peers?" in path and "peers" in obj and "lookup" in self.rewrite:
            nbits = obj["last"] - obj["first"] + 1
            for p in obj["peers"]:
                p["peer_url"] = self.evil.url
            if not obj["peers"]:
                obj["peers"] = [{"node_id": "evil", "peer_url": self.evil.url, "location": "", "load": 0,
                                 "chunks": encode_bits((1 << nbits) - 1, nbits)}]
            self.rewritten["lookup"] += 1
        elif path.endswith("/claims") and "claimed" in obj and "claim" in self.rewrite:
            every = obj["granted"] + [r for c in obj["claimed"] for r in c["chunks"]]
            obj = {"granted": [], "claimed": [{"node_id": "evil", "peer_url": self.evil.url, "location": "",
                                               "load": 0, "chunks": every, "held": True}]}
            self.rewritten["claim"] += 1
        else:
            return body
        return json.dumps(obj).encode()
