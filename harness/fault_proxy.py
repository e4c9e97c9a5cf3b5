"""An HTTP proxy in front of a real Glance that misbehaves on request.

Fault injection only: a real Glance cannot be made to send a short body, a wrong Content-Range
or a 503 on demand.  Everything else is the real Glance's answer, passed through.

Modes (``proxy.mode``): ``pass``; ``short`` (promise the full length, send half, close);
``wrong_range`` (shift the Content-Range start); ``error`` (503); ``hang`` (say nothing for
``hang_seconds``).  ``fail_next`` makes only the next N range requests misbehave, ``fault_min_bytes`` only those at
least that long.
``corrupt_whole``: flip one byte in every whole-image (non-range) download.
``rtt``: every answer starts this many seconds after its request came, a link's round trip (this
machine has no netem: a delaying proxy stands in for the distance to Glance).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # a client that hung up between two requests (a daemon stopped): no traceback
        super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.fail_next: int | None = None  # None: every range request misbehaves in `mode`
        self.hang_seconds = 3600.0
        self.fault_min_bytes = 0  # only range requests at least this long misbehave
        self.corrupt_whole = False
        self.rtt = 0.0
        self.range_requests = 0
        self.ranges: list[str] = []  # the Range header of every range request, in order
        self.range_bytes = 0
        self.whole_bytes = 0  # whole-image downloads (the tracker's manifest read)
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    proxy._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (a timeout): its business

        self._server = _Server((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self, is_range: str | None) -> str:
        with self._lock:
            if is_range is None:
                return "pass"
            self.range_requests += 1
            self.ranges.append(is_range)
            if self.mode == "pass":
                return "pass"
            a, b = (int(x) for x in is_range.removeprefix("bytes=").split("-"))
            if b - a + 1 < self.fault_min_bytes:
                return "pass"
            if self.fail_next is not None:
                if self.fail_next <= 0:
                    return "pass"
                self.fail_next -= 1
            self.faults += 1
            return self.mode

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        fault = self._fault(rng)
        if self.rtt > 0:
            time.sleep(self.rtt)
        if fault == "hang":
            time.sleep(self.hang_seconds)
            return
        if fault == "error":
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        req = urllib.request.Request(self.upstream + h.path, headers={"Range": rng} if rng else {})
        try:
            resp = urllib.request.urlopen(req, timeout=60)
            status, headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            status, headers, body = exc.code, exc.headers, exc.read()
        h.send_response(status)
        for name in ("Content-Type", "Content-Range"):
            value = headers.get(name)
            if value and name == "Content-Range" and fault == "wrong_range":
                unit, rest = value.split(" ", 1)
                span, total = rest.split("/")
                a, b = (int(x) for x in span.split("-"))
                value = f"{unit} {a + 4096}-{b + 4096}/{total}"
            if value:
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.corrupt_whole and rng is None and h.path.endswith("/file") and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if fault == "short":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)
        with self._lock:
            if rng is not None:
                self.range_bytes += len(body)
            elif h.path.endswith("/file"):
                self.whole_bytes += len(body)
