"""A TCP proxy that holds every byte for ``delay`` seconds in each direction: link latency.

Fault injection only: this kernel has no netem, so latency between namespaces cannot be made by
``tc``.  Bytes keep their order; ``delay`` may change while connections are open (a byte is never
sent before one that came earlier).  When the upstream refuses a connection, the client's
connection is closed at once, as a dead host's would be.  Runs one asyncio loop in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger(__name__)

_HIGH_WATER = 4 * 2**20  # bytes queued towards one side before reading from the other pauses


class DelayProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.delay = 0.0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "DelayProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            if self._tasks:  # aborted transports end every pump within one delay
                await asyncio.wait(self._tasks, timeout=self.delay + 5)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, up_w))
        try:
            await asyncio.gather(self._pump(client_r, up_w), self._pump(up_r, client_w))
        finally:
            for w in (client_w, up_w):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0

        def send(data: bytes | None) -> None:
            if writer.transport.is_closing():
                return
            try:
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                else:
                    writer.write(data)
            except OSError:  # the other side is gone
                writer.transport.abort()

        try:
            while data := await reader.read(65536):
                last = max(loop.time() + self.delay, last)
                loop.call_at(last, send, data)
                if writer.transport.get_write_buffer_size() > _HIGH_WATER:
                    await writer.drain()
        except OSError:
            writer.transport.abort()
            return
        last = max(loop.time() + self.delay, last)
        loop.call_at(last, send, None)
        # Keep the connection until the half-close has gone out.
        await asyncio.sleep(max(0.0, last - loop.time()) + 0.01)
