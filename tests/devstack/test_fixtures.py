"""The shared fixtures in tests/conftest.py: tests get real servers and leave nothing behind."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames

# Prefixes handed out by earlier tests in this module; the last test checks them.
_used_prefixes: list[str] = []


async def test_database_url_is_a_fresh_database_of_this_session(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("qnp_test_")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        await conn.execute("CREATE TABLE scratch (id int)")
    finally:
        await conn.close()


async def test_redis_names_carry_a_prefix_of_their_own(
    redis: Redis, redis_names: RedisNames
) -> None:
    assert redis_names.prefix.startswith("qnptest")
    await redis.set(redis_names.key_record("k1"), b"record")
    await redis.xadd(redis_names.events, {"e": b"event"})
    assert await redis.get(redis_names.key_record("k1")) == b"record"
    _used_prefixes.append(redis_names.prefix)


async def test_redis_names_keys_are_deleted_after_the_test(redis: Redis) -> None:
    assert _used_prefixes, "runs after the test above"
    for prefix in _used_prefixes:
        assert [key async for key in redis.scan_iter(match=f"{prefix}*")] == []


async def test_mock_upstream_runs_with_the_test_key(mock_upstream: MockOpenAIUpstream) -> None:
    assert mock_upstream.base_url.startswith("http://127.0.0.1:")
    assert mock_upstream.behaviour.api_key == "sk-upstream-test"
    assert mock_upstream.requests == []
