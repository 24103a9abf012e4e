"""The hot path's coalesced Redis pipe, against a real Redis.

What a user would notice: replies handed to the wrong request (another account's
admission decision, a write to the wrong database), one bad command failing its
neighbours, or a dead or stalled Redis hanging requests instead of failing them fast
so admission can degrade.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import hiredis
import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack.servers import start_redis
from proxy import resp
from shared.redis_names import RedisNames
from tests.chaos.conftest import OwnRedis
from tests.support import free_port


async def test_concurrent_calls_share_one_round_trip_and_get_their_own_replies(
        redis: aioredis.Redis, redis_names: RedisNames) -> None:
    pipe = resp.Pipe.of(redis)
    assert pipe is not None
    key = f"{redis_names.prefix}:pipe"
    calls = [pipe.call(resp.command("INCRBY", key, n)) for n in range(1, 101)]
    replies = await asyncio.gather(*calls)
    # Issued in one loop iteration: applied in order, each reply to its own caller.
    assert replies == [n * (n + 1) // 2 for n in range(1, 101)]
    await pipe.close()  # gives the connection back; a later call takes one again
    assert await pipe.call(resp.command("GET", key)) == b"5050"
    await redis.delete(key)


async def test_an_error_reply_fails_only_its_own_command(
        redis: aioredis.Redis, redis_names: RedisNames) -> None:
    pipe = resp.Pipe.of(redis)
    assert pipe is not None
    key = f"{redis_names.prefix}:pipe-err"
    ok = pipe.call(resp.command("SET", key, "v"))
    bad = pipe.call(resp.command("INCR", key))  # not an integer
    after = pipe.call(resp.command("GET", key))
    assert await ok == b"OK"
    with pytest.raises(ResponseError):
        await bad
    assert await after == b"v"
    with pytest.raises(ResponseError):
        await pipe.call_many([resp.command("GET", key), resp.command("INCR", key)])
    await redis.delete(key)


async def test_a_dead_redis_fails_calls_with_a_redis_error() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                     socket_connect_timeout=0.5)
    pipe = resp.Pipe.of(client)
    assert pipe is not None
    try:
        with pytest.raises(RedisConnectionError):
            await pipe.call(resp.command("PING"))
    finally:
        await client.aclose()


async def test_an_unknown_script_raises_noscript_for_its_own_command_only(
        redis: aioredis.Redis) -> None:
    pipe = resp.Pipe.of(redis)
    assert pipe is not None
    before = pipe.call(resp.command("ECHO", "before"))
    missing = pipe.call(resp.command("EVALSHA", "0" * 40, 0))
    after = pipe.call(resp.command("EVAL", "return {1, 'two', {3}}", 0))
    assert await before == b"before"
    # Admission catches exactly this class to load the script and retry.
    with pytest.raises(NoScriptError):
        await missing
    assert await after == [1, b"two", [3]]


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(
        redis: aioredis.Redis, redis_names: RedisNames) -> None:
    pipe = resp.Pipe.of(redis)
    assert pipe is not None
    queue, counter = f"{redis_names.prefix}:queue", f"{redis_names.prefix}:counter"

    async def leaves_early() -> object:
        return await pipe.call(resp.command("BLPOP", queue, 0))

    assert await pipe.call(resp.command("PING")) == b"PONG"  # connected: writes go out now
    blocked = asyncio.create_task(leaves_early())
    await asyncio.sleep(0)  # the task issues its BLPOP first
    behind = [pipe.call(resp.command("INCRBY", counter, n)) for n in range(1, 6)]
    await asyncio.sleep(0.05)  # the BLPOP is (most likely) blocking at the server
    blocked.cancel()
    await redis.rpush(queue, "for-the-cancelled-caller")  # on another connection
    # The BLPOP's reply arrives first and must be dropped, not handed to INCRBY 1.
    assert await asyncio.gather(*behind) == [1, 3, 6, 10, 15]
    assert await pipe.call(resp.command("LLEN", queue)) == 0
    assert blocked.cancelled()


async def test_auth_and_select_come_from_the_client() -> None:
    server = await asyncio.to_thread(
        start_redis, ["--user", "pipeuser", "on", ">pipe-secret", "~*", "&*", "+@all"])
    host_port = server.url.removeprefix("redis://").split("/")[0]
    client = aioredis.Redis.from_url(f"redis://pipeuser:pipe-secret@{host_port}/3")
    wrong = aioredis.Redis.from_url(f"redis://pipeuser:not-it@{host_port}/3")
    db0 = aioredis.Redis.from_url(f"redis://{host_port}/0")
    try:
        pipe, wrong_pipe = resp.Pipe.of(client), resp.Pipe.of(wrong)
        assert pipe is not None and wrong_pipe is not None
        assert await pipe.call(resp.command("SET", "where", "db3")) == b"OK"
        assert await client.get("where") == b"db3"
        assert await db0.get("where") is None
        with pytest.raises(AuthenticationError):
            await wrong_pipe.call(resp.command("PING"))
    finally:
        for c in (client, wrong, db0):
            await c.aclose()
        await asyncio.to_thread(server.stop)


async def test_a_redis_killed_mid_flight_fails_waiting_calls_and_the_pipe_recovers(
        tmp_path: Path) -> None:
    own = OwnRedis(tmp_path / "redis")
    await asyncio.to_thread(own.start)
    client = aioredis.Redis.from_url(own.url, socket_connect_timeout=0.5, socket_timeout=5)
    try:
        pipe = resp.Pipe.of(client)
        assert pipe is not None
        assert await pipe.call(resp.command("PING")) == b"PONG"
        waiting = [pipe.call(resp.command("BLPOP", "nothing", 0)),
                   pipe.call(resp.command("PING"))]
        await asyncio.sleep(0.05)
        own.kill()
        for call in waiting:
            with pytest.raises(RedisConnectionError):
                await call
        with pytest.raises(RedisConnectionError):  # down: refused, not queued
            await pipe.call(resp.command("PING"))
        await asyncio.to_thread(own.start)
        assert await pipe.call_many([resp.command("PING"), resp.command("ECHO", "back")]) \
            == [b"PONG", b"back"]
    finally:
        await client.aclose()
        own.kill()


class _Stalls(asyncio.Protocol):
    """A server that answers redis-py's connection set-up, then never anything else."""

    def __init__(self, transports: list[asyncio.Transport]) -> None:
        self._transports = transports
        self._parser = hiredis.Reader()
        self._stalled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while (cmd := self._parser.gets()) is not False:
            self._stalled = self._stalled or cmd[0].upper() not in (b"CLIENT", b"HELLO")
            if not self._stalled:
                self._transport.write(b"+OK\r\n")


async def test_a_stalled_redis_fails_calls_with_a_timeout_and_is_dropped() -> None:
    transports: list[asyncio.Transport] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _Stalls(transports), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
    try:
        pipe = resp.Pipe.of(client)
        assert pipe is not None
        calls = [pipe.call(resp.command("ECHO", n)) for n in range(3)]
        for call in calls:
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(call, 30)  # the guard only stops a hang
        with pytest.raises(RedisTimeoutError):  # a fresh connection, stalled again
            await asyncio.wait_for(pipe.call(resp.command("PING")), 30)
        assert len(transports) == 2
        assert transports[0].is_closing() or await _closed_by_peer(transports[0])
    finally:
        await client.aclose()
        for transport in transports:
            transport.close()
        server.close()
        await server.wait_closed()


def test_a_stall_of_our_own_loop_is_not_taken_for_a_dead_redis(redis_url: str) -> None:
    """Replies that arrived while this process was stalled (a long GC pass, a starved
    CPU) are read, not timed out. Run on uvloop, as the proxy is: libuv runs due timers
    before it polls sockets (asyncio's own loop polls first and would not show this)."""

    async def stall_while_redis_answers() -> bytes:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=0.2)
        try:
            pipe = resp.Pipe.of(client)
            assert pipe is not None
            assert await pipe.call(resp.command("PING")) == b"PONG"  # connected
            # The stall, in another connection's I/O callback (where a long GC pass
            # would strike): Redis answers meanwhile, and when the stall ends the pipe's
            # timeout check is due, and libuv runs due timers before it polls again.
            ours, theirs = socket.socketpair()
            await asyncio.get_running_loop().connect_accepted_socket(_Staller, ours)
            theirs.send(b"stall")  # read at the loop's next poll, after the write below
            call = pipe.call(resp.command("ECHO", "still here"))
            try:
                return await asyncio.wait_for(call, 5)  # type: ignore[no-any-return]
            finally:
                theirs.close()
        finally:
            await client.aclose()

    assert uvloop.run(stall_while_redis_answers()) == b"still here"


class _Staller(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        time.sleep(0.5)  # this process stalls past the pipe's 0.2 s timeout


async def _closed_by_peer(transport: asyncio.Transport) -> bool:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if transport.is_closing():
            return True
    return False


def test_clients_the_pipe_cannot_speak_for_keep_redis_py() -> None:
    assert resp.Pipe.of(aioredis.Redis(decode_responses=True)) is None
    assert resp.Pipe.of(aioredis.Redis(protocol=3)) is None
    assert resp.Pipe.of(aioredis.Redis.from_url("unix:///tmp/nowhere.sock")) is None
    assert resp.Pipe.of(aioredis.Redis()) is not None
    # TLS is spoken, on redis-py's verified connections (tests/proxy/test_tls_redis.py).
    assert resp.Pipe.of(aioredis.Redis.from_url("rediss://127.0.0.1:1/0")) is not None
