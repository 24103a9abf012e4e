"""The hot path's Redis round trips: commands packed by us, coalesced across requests.

Every request runs two scripts (admit, settle) and adds one stream entry. Through
redis-py's generic ``execute_command`` each costs tens of microseconds of Python (one
``isinstance`` and ``encode`` per argument, a pooled connection checked out and in, one
socket write and one read loop per command), which the profile showed to be the largest
single cost of a request. Here the parts that never change per key (script SHA, key
names, limits) are packed into RESP bytes once and reused, and every command issued in
the same event-loop iteration goes out as one write on one pooled connection, its
replies read back in order by redis-py's (hiredis) parser. Each command stays its own
atomic script or ``XADD``: coalescing changes round trips, never semantics.

Connection handling (URL, AUTH, TLS, timeouts, health checks) stays redis-py's: a
``Pipe`` borrows connections from the client's own pool. Redis Cluster spreads keys
over nodes, so ``Pipe.of`` returns None there and callers keep redis-py's cluster
client.

Must not import the handlers, auth, admission or the emitter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Arg = bytes | str | int


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
    """Coalesces commands into one write per loop iteration on one pooled connection.

    ``call`` returns the command's reply, or raises its error reply as redis-py would
    (``ResponseError`` and subclasses such as ``NoScriptError``); a lost connection
    fails every command of its write with redis-py's ``ConnectionError`` /
    ``TimeoutError``, and the connection is dropped.
    """

    def __init__(self, pool: aioredis.ConnectionPool) -> None:
        self._pool = pool
        self._pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def of(cls, client: Any) -> Pipe | None:
        """A pipe over a plain client's pool; None for a cluster client."""
        if isinstance(client, aioredis.Redis):
            return cls(client.connection_pool)
        return None

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((packed, future))
        return future

    async def call_many(self, commands: Sequence[bytes]) -> list[Any]:
        """Replies for ``commands`` in one round trip; an error reply raises (the first
        one's ``ResponseError``), as does a lost connection."""
        loop = asyncio.get_running_loop()
        batch = [(c, loop.create_future()) for c in commands]
        await self._send(batch)
        return [f.result() for _, f in batch]

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        try:
            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except BaseException as e:
            _fail(batch, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        try:
            await conn.send_packed_command(b"".join(c for c, _ in batch), check_health=True)
            for _, future in batch:
                try:
                    reply = await conn.read_response()
                except ResponseError as e:
                    if not future.done():
                        future.set_exception(e)
                        future.exception()  # retrieved: call_many raises only the first
                else:
                    if not future.done():
                        future.set_result(reply)
        except BaseException as e:
            # Replies may be half read: this connection's stream is out of step.
            await conn.disconnect(nowait=True)
            _fail(batch, e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await self._pool.release(conn)

    async def close(self) -> None:
        """Wait for writes in flight (their callers are waiting for them too)."""
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)


def _fail(batch: list[tuple[bytes, asyncio.Future[Any]]], error: BaseException) -> None:
    if isinstance(error, asyncio.CancelledError):
        error = RedisConnectionError("cancelled while talking to Redis")
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: a caller that left must not warn
