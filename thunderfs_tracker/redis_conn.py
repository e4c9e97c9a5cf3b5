"""One connection to Redis per tracker replica that carries the hot path's commands, shared by its
peer, profile and manifest stores, with one translation of Redis errors (``StoreUnavailable``:
the replica answers 503).

Every request a replica serves makes one to three round trips to Redis (its nonce, its reads,
its writes).  Through redis-py each round trip cost the replica about as much CPU as the aiohttp
request itself (a connection from the pool, a timeout and an await per reply, a parser), whatever
it carried: at 10,000 nodes that, not Redis, saturated two replicas.  So the stores write their
commands into a ``Batch``, and the replies are parsed as they arrive (hiredis) and handed to their
batches in order: Redis answers one connection's commands in the order they came, so one
connection carries every round trip, with no pool, no per-command timeout and no task per round
trip.  One write is out at a time: what is queued meanwhile goes in the next, as soon as the last
one's replies are in (alone, a batch goes at once; under load, a write carries the batches of
many requests, and a system call per write is what this saves: on this machine's VM a send cost
as much as the Python around it).
redis-py still turns each command as written (``b.set(key, value, nx=True)``) into its words and
its reply into its value (its response callbacks), and carries the paths that are not hot
(``call``: manifests, profiles).

A batch's commands stay together and in order; batches are independent of each other (no
transaction, as before: each store's pipelines were never transactions).  A Redis error in one
of a batch's replies fails that batch only.  A connection that breaks, or that has not answered
within ``timeout`` seconds, fails every batch waiting on it; the next batch opens a new one
(with the URL's password, database and TLS, as redis-py would).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.exceptions import RedisError, ResponseError

from thunderfs_tracker.peer_store import StoreUnavailable

# The most commands one write carries; more queued in one turn go in several writes, in order.
MAX_PIPELINE = 2048


class Batch:
    """Commands to send together, written as on a redis-py pipeline (``b.get(key)``,
    ``b.set(key, value, nx=True)``): each call is recorded, nothing is sent until ``run``."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs) -> Batch:
            self.commands.append((name, args, kwargs))
            return self
        return record


class _Sent:
    """Batches written together: their futures, their commands' words and options, the replies
    so far, and when they were written."""

    __slots__ = ("batches", "count", "replies", "at")

    def __init__(self, batches: list[tuple[asyncio.Future, list[tuple[tuple, dict]]]], count: int, at: float):
        self.batches, self.count, self.replies, self.at = batches, count, [], at


class _Link(asyncio.Protocol):
    """One connection: replies parsed as they arrive and matched to what was sent, in order."""

    def __init__(self, deliver, drained, lost) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent: deque[_Sent] = deque()
        self._parser = hiredis.Reader(replyError=ResponseError)
        self._deliver, self._drained, self._lost = deliver, drained, lost
        self.broken: str | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                if not self.sent:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                sent = self.sent[0]
                sent.replies.append(reply)
                if len(sent.replies) == sent.count:
                    self.sent.popleft()
                    self._deliver(sent)
        except hiredis.ProtocolError as exc:
            self.abort(f"Redis sent what is not its protocol ({exc})")
            return
        if not self.sent:
            self._drained(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = self.broken or (f"connection lost: {exc}" if exc else "connection closed by Redis")
        self._lost(self)

    def abort(self, why: str) -> None:
        self.broken = self.broken or why
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, in a later turn


class RedisConnection:
    def __init__(self, url: str, *, max_connections: int = 32, timeout: float = 2.0):
        self.url = url
        # redis-py, for the paths that are not hot (``call``), and the source of the hot path's
        # commands' words, reply callbacks and connection settings.  A bounded pool makes such a
        # request wait for a connection (up to 5 s) rather than fail: under a burst, latency grows
        # instead of 503s.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5.0,
                                                        socket_timeout=timeout, socket_connect_timeout=timeout)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._timeout = timeout
        self._queued: deque[tuple[Batch, asyncio.Future]] = deque()
        self._flush_due = False
        self._link: _Link | None = None
        self._connecting: asyncio.Task | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._callbacks: dict[str, Any] = {}
        self._closed = False
        self.stats = {"redis_round_trips": 0, "redis_batches": 0, "redis_commands": 0, "redis_connects": 0}

    def batch(self) -> Batch:
        return Batch()

    async def run(self, batch: Batch) -> list:
        """The replies to ``batch``'s commands, in order, sent with whatever else is queued now."""
        if not batch.commands:
            return []
        if self._closed:
            raise self._unavailable("the tracker is stopping")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((batch, future))
        if not self._flush_due:  # the first of this turn: written once every task of this turn has queued
            self._flush_due = True
            loop.call_soon(self._flush)
        return await future

    async def one(self, name: str, *args, **kwargs) -> Any:
        """One command's reply (sent with whatever else is queued now)."""
        return (await self.run(getattr(Batch(), name)(*args, **kwargs)))[0]

    # --- writing ---------------------------------------------------------------------------

    def _flush(self) -> None:
        link = self._link
        if link is None or link.broken:
            self._flush_due = False
            if self._connecting is None and self._queued:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # written once connected
        if link.sent:
            return  # written once the replies out are in (``_drained``); until then none is scheduled
        self._flush_due = False
        while self._queued:
            taken, n = [], 0
            while self._queued and (not taken or n + len(self._queued[0][0].commands) <= MAX_PIPELINE):
                taken.append(self._queued.popleft())
                n += len(taken[-1][0].commands)
            self._write(link, taken)

    def _write(self, link: _Link, taken: list[tuple[Batch, asyncio.Future]]) -> None:
        p = self.redis.pipeline(transaction=False)  # records each command's words and options
        stack = p.command_stack
        batches, packed = [], []
        for batch, future in taken:
            if future.done():  # its request was cancelled meanwhile
                continue
            at = len(stack)
            try:  # a command redis-py or hiredis refuses as written fails its batch alone
                for name, args, kwargs in batch.commands:
                    getattr(p, name)(*args, **kwargs)
                words = [hiredis.pack_command(args) for args, _ in stack[at:]]
            except Exception as exc:
                del stack[at:]
                future.set_exception(exc)
                continue
            batches.append((future, stack[at:]))
            packed.extend(words)
        if not batches:
            return
        loop = asyncio.get_running_loop()
        link.sent.append(_Sent(batches, len(packed), loop.time()))
        link.transport.write(b"".join(packed))
        self.stats["redis_round_trips"] += 1
        self.stats["redis_batches"] += len(batches)
        self.stats["redis_commands"] += len(packed)
        if self._watch is None:
            self._watch = loop.call_later(self._timeout, self._check)

    def _check(self) -> None:
        """A connection that has not answered the oldest write within the timeout is given up."""
        self._watch = None
        link = self._link
        if link is None or not link.sent:
            return
        loop = asyncio.get_running_loop()
        due = link.sent[0].at + self._timeout
        if loop.time() >= due:
            link.abort(f"no reply within {self._timeout:g} s")
        else:
            self._watch = loop.call_at(due, self._check)

    async def _connect(self) -> None:
        """A new connection, authenticated and on the URL's database, then everything queued
        written on it; if it cannot be had, everything queued fails."""
        try:
            link = await asyncio.wait_for(self._open(), self._timeout)
        except (OSError, asyncio.TimeoutError, RedisError, StoreUnavailable) as exc:  # ssl.SSLError is an OSError
            error = exc if isinstance(exc, StoreUnavailable) else self._unavailable(_why(exc))
            while self._queued:
                _, future = self._queued.popleft()
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._connecting = None
        self.stats["redis_connects"] += 1
        self._link = link
        self._flush()

    async def _open(self) -> _Link:
        kw = self.redis.connection_pool.connection_kwargs
        loop = asyncio.get_running_loop()
        link = _Link(self._deliver, self._drained, self._lost)
        if kw.get("path"):
            await loop.create_unix_connection(lambda: link, kw["path"])
        else:
            ctx = None
            if issubclass(self.redis.connection_pool.connection_class, aioredis.SSLConnection):
                ctx = self.redis.connection_pool.make_connection().ssl_context.get()  # as redis-py builds it
            await loop.create_connection(lambda: link, kw.get("host", "localhost"), kw.get("port", 6379), ssl=ctx)
        hello = Batch()
        if kw.get("password") is not None:
            hello.auth(kw["password"], kw["username"]) if kw.get("username") else hello.auth(kw["password"])
        if kw.get("db"):
            hello.select(kw["db"])
        if hello.commands:
            future = loop.create_future()
            self._write(link, [(hello, future)])
            try:
                await future
            except BaseException:
                link.abort("refused")
                raise
        return link

    # --- reading ---------------------------------------------------------------------------

    def _deliver(self, sent: _Sent) -> None:
        at = 0
        for future, commands in sent.batches:
            mine = sent.replies[at:at + len(commands)]
            at += len(commands)
            if future.done():  # its request was cancelled meanwhile
                continue
            try:
                values = [self._value(args, options, reply) for (args, options), reply in zip(commands, mine)]
            except Exception as exc:  # a callback that cannot read the reply: this batch's problem
                future.set_exception(exc)
                continue
            failed = next((v for v in values if isinstance(v, Exception)), None)
            if failed is not None:
                future.set_exception(self._unavailable(failed))
            else:
                future.set_result(values)

    def _value(self, args: tuple, options: dict, reply: Any) -> Any:
        """A reply as redis-py's pipeline would give it (its response callback applied)."""
        if isinstance(reply, ResponseError):
            return options.get(EMPTY_RESPONSE, reply)
        name = args[0]
        try:
            callback = self._callbacks[name]
        except KeyError:
            callback = self._callbacks[name] = self.redis.response_callbacks.get(name)
        if callback is None:
            return reply
        if EMPTY_RESPONSE in options or NEVER_DECODE in options or "keys" in options:
            options = {k: v for k, v in options.items() if k not in (EMPTY_RESPONSE, NEVER_DECODE, "keys")}
        value = callback(reply, **options)
        if inspect.isawaitable(value):
            value.close()
            raise TypeError(f"redis-py reads {name}'s reply asynchronously: not on the hot path")
        return value

    def _drained(self, link: _Link) -> None:
        if link is self._link and self._queued:
            self._flush()

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            if self._queued and not self._closed:  # queued behind it: on a new connection
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush)
        error = self._unavailable(link.broken or "connection lost")
        while link.sent:
            for future, _ in link.sent.popleft().batches:
                if not future.done():
                    future.set_exception(error)

    # ---------------------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException | str) -> StoreUnavailable:
        return StoreUnavailable(f"the peer store (Redis at {self.where}) is unavailable: {exc}")

    async def call(self, pipe_or_coro):
        """Execute a redis-py pipeline or await a command (paths that are not hot: manifests,
        profiles); Redis errors become ``StoreUnavailable``."""
        if isinstance(pipe_or_coro, Batch):
            return await self.run(pipe_or_coro)
        try:
            if hasattr(pipe_or_coro, "execute"):
                return await pipe_or_coro.execute()
            return await pipe_or_coro
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    @property
    def where(self) -> str:
        """The URL without its credentials."""
        return self.url.split("@")[-1]

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        error = self._unavailable("the tracker is stopping")
        while self._queued:
            _, future = self._queued.popleft()
            if not future.done():
                future.set_exception(error)
        if self._link is not None:
            self._link.abort("closed")
        await self.redis.aclose()


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
