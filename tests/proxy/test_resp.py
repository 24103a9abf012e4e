"""The hot path's coalesced Redis pipe, against a real Redis.

What a user would notice: replies handed to the wrong request (another account's
admission decision), one bad command failing its neighbours, or a dead Redis hanging
requests instead of failing them fast so admission can degrade.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy import resp
from shared.redis_names import RedisNames
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
