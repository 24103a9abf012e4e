"""The hot path's Redis round trips: commands packed by us, coalesced across requests.

Every request runs two scripts (admit, settle) and adds one stream entry. Through
redis-py's generic ``execute_command`` each costs tens of microseconds of Python (one
``isinstance`` and ``encode`` per argument, a pooled connection checked out and in, one
socket write and one read loop per command), which the profile showed to be the largest
single cost of a request. Here the parts that never change per key (script SHA, key
names, limits) are packed into RESP bytes once and reused, and every command issued in
the same event-loop iteration goes out as one write. Each command stays its own atomic
script or ``XADD``: coalescing changes round trips, never semantics.

Replies are read by our own protocol: ``data_received`` feeds a hiredis reader and
resolves the waiting futures in order (RESP answers a connection's commands in the
order sent), without redis-py's per-reply coroutine, timeout context and pool round.

The socket itself is one of the client's pooled connections, checked out once and kept:
redis-py opens it (AUTH, SELECT, its timeouts and errors), and the pool still closes
it, so ``client.aclose()`` ends the pipe too and nobody has to remember a second
``close``. TCP connections, plain or TLS (``rediss://``), speaking RESP2 with bytes
replies qualify. A TLS connection is redis-py's too, handshake and certificate checks
done with the pool's options before we see it; its transport hands us decrypted
bytes, so nothing below differs. For anything else (unix sockets, RESP3, decoded
replies, Redis Cluster, whose keys live on different nodes) ``Pipe.of`` returns None
and callers keep redis-py.

Must not import the handlers, auth, admission or the emitter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int
_TCP = (Connection, SSLConnection)  # connection classes whose socket we can take over
_CONFIRM = 0.05  # seconds: a timed-out wait is confirmed after the loop has polled once


def bulk(value: Arg) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*args: Arg) -> bytes:
    """A complete RESP command."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def header(argc: int) -> bytes:
    """The start of a command of ``argc`` arguments whose bulks are packed separately."""
    return b"*%d\r\n" % argc


class Pipe:
    """Coalesces commands into one write per loop iteration on one kept connection.

    ``call`` returns the command's reply, or raises its error reply as redis-py would
    (``ResponseError`` and subclasses such as ``NoScriptError``) for that command only.
    A lost connection fails every unanswered command with redis-py's
    ``ConnectionError``, no reply within the client's ``socket_timeout`` with its
    ``TimeoutError``; the connection is then dropped and the next call takes a new one.
    """

    def __init__(self, pool: aioredis.ConnectionPool) -> None:
        self._pool = pool
        self._conn: AbstractConnection | None = None  # ours until _drop gives it back
        self._link: _Link | None = None  # None while not connected
        self._backlog: list[tuple[bytes, asyncio.Future[Any]]] = []  # waiting for _link
        self._connecting: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, client: Any) -> Pipe | None:
        """A pipe over a TCP (plain or TLS), RESP2, bytes-replies client; None otherwise."""
        if not isinstance(client, aioredis.Redis):
            return None
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if (pool.connection_class not in _TCP or kwargs.get("decode_responses")
                or kwargs.get("protocol") not in (None, 2, "2")):
            return None
        return cls(pool)

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        link = self._link
        if link is not None:
            return link.send(packed)
        # Bounded: these wait for one connect attempt, which fails within the client's
        # connect timeout when Redis is down, failing them with it.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._backlog.append((packed, future))
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        return future

    async def call_many(self, commands: Sequence[bytes]) -> list[Any]:
        """Replies for ``commands`` in one round trip; an error reply raises (the first
        one's ``ResponseError``) once all replies are in, as does a lost connection."""
        futures = [self.call(c) for c in commands]
        if futures:
            # Replies come in order and a failure fails all: the last one done, all are.
            with contextlib.suppress(Exception):
                await futures[-1]
        return [f.result() for f in futures]

    async def close(self) -> None:
        """Wait for the replies in flight, then give the connection back to the pool.

        Optional: ``client.aclose()`` closes the connection too. A later call connects
        again.
        """
        if self._connecting is not None:
            await asyncio.wait((self._connecting,))
        if self._link is not None:
            await self._link.drained()
        await self._drop()

    async def _connect(self) -> None:
        try:
            await self._drop()
            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                link = _Link.take_over(conn, self._lost)
            except RedisConnectionError:
                await self._pool.release(conn)
                raise
        except BaseException as e:
            backlog, self._backlog = self._backlog, []
            _fail((f for _, f in backlog), e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            self._connecting = None
        self._conn, self._link = conn, link
        backlog, self._backlog = self._backlog, []
        for packed, future in backlog:
            if not future.done():  # its caller left: nobody wants the reply
                link.enqueue(packed, future)

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None  # the connection object is given back by the next _drop

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if self._link is not None:
            self._link.die(RedisConnectionError("Redis pipe closed"))
        if conn is not None:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)


class _Link(asyncio.Protocol):
    """Our protocol on a redis-py connection's transport: writes coalesced per loop
    iteration, replies matched to a FIFO of futures, one timer for the whole link."""

    def __init__(self, transport: asyncio.WriteTransport, inner: asyncio.BaseProtocol,
                 timeout: float | None, where: str, on_lost: Callable[[_Link], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self._transport = transport
        self._inner = inner
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=_reply_error)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0  # loop time the oldest unanswered command started waiting
        self._where = where
        self._on_lost = on_lost
        self._open = True

    @classmethod
    def take_over(cls, conn: AbstractConnection, on_lost: Callable[[_Link], None]) -> _Link:
        writer = getattr(conn, "_writer", None)
        if not isinstance(writer, asyncio.StreamWriter) or writer.transport.is_closing():
            raise RedisConnectionError("redis-py handed out a connection without a socket")
        transport = writer.transport
        where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
        link = cls(transport, transport.get_protocol(), conn.socket_timeout, where, on_lost)
        transport.set_protocol(link)
        return link

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.enqueue(packed, future)
        return future

    def enqueue(self, packed: bytes, future: asyncio.Future[Any]) -> None:
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(packed)
        if not self._waiters:
            self._progress = self.loop.time()
            if self._timer is None and self._timeout is not None:
                self._timer = self.loop.call_later(self._timeout, self._check)
        self._waiters.append(future)

    async def drained(self) -> None:
        if self._waiters:
            await asyncio.wait((self._waiters[-1],))

    def die(self, error: Exception) -> None:
        """Fail every unanswered command and drop the connection (idempotent)."""
        if not self._open:
            return
        self._open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, deque()
        _fail(waiters, error)
        self._transport.abort()
        self._on_lost(self)

    def _flush(self) -> None:
        if self._open:  # else its commands have failed already
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        reader, waiters = self._reader, self._waiters
        reader.feed(data)
        try:
            reply = reader.gets()
            if reply is False:
                return
            self._progress = self.loop.time()
            while reply is not False:
                future = waiters.popleft()
                if not future.done():  # else its caller was cancelled: drop the reply
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                        future.exception()  # retrieved: call_many raises only the first
                    else:
                        future.set_result(reply)
                reply = reader.gets()
        except (InvalidResponse, IndexError) as e:  # garbage, or a reply nobody asked for
            self.die(RedisConnectionError(f"Protocol error from Redis at {self._where}: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.die(RedisConnectionError(f"Connection to Redis at {self._where} lost"
                                      + (f": {exc}" if exc else "")))
        # redis-py's own protocol resolves its close waiter here (client.aclose awaits it).
        self._inner.connection_lost(exc)

    def _check(self, confirming: bool = False) -> None:
        self._timer = None
        if not self._waiters or self._timeout is None:
            return
        late = self.loop.time() - self._progress
        if late < self._timeout:
            self._timer = self.loop.call_later(self._timeout - late, self._check)
        elif not confirming:
            # The loop runs due timers before it polls sockets: after a stall of our
            # own (a long GC pass, a starved CPU) the replies may be sitting unread.
            # Look again once they have had a poll, before calling Redis dead.
            self._timer = self.loop.call_later(_CONFIRM, self._check, True)
        else:
            self.die(RedisTimeoutError(f"Timeout reading from {self._where}"))


def _reply_error(message: str) -> Exception:
    # redis-py's mapping of error prefixes: NOSCRIPT -> NoScriptError, and so on.
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def _fail(futures: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    if isinstance(error, asyncio.CancelledError):
        error = RedisConnectionError("cancelled while connecting to Redis")
    for future in futures:
        if not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: a caller that left must not warn
