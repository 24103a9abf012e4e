"""Ingest of a sharded event stream: every shard read, each event stored exactly once,
dead letters, the unsharded leftovers and trimming per shard."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis

from control_plane.ingest import MAX_DELIVERIES, Consumer
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from control_plane.trim import Trimmer
from shared.events import STREAM_FIELD, Event
from shared.redis_names import RedisNames
from tests.control_plane.factories import make_event, make_settings


def _sharded(settings: Settings, shards: int) -> Settings:
    names = settings.names
    return make_settings(settings.database_url, settings.redis_url, names,
                         QNP_EVENT_SHARDS=str(shards))


async def _add(client: aioredis.Redis, stream: str, events: list[Event]) -> None:
    for event in events:
        await client.xadd(stream, {STREAM_FIELD: event.encode()})


async def _counts(pool: asyncpg.Pool, account_id: str) -> tuple[int, int, int]:
    account = uuid.UUID(account_id)
    rows, distinct = await pool.fetchrow(
        "SELECT count(*), count(DISTINCT id) FROM usage_logs WHERE account_id = $1", account)
    debits = await pool.fetchval(
        "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'debit'", account)
    return int(rows), int(distinct), int(debits)


async def _pending(client: aioredis.Redis, names: RedisNames, stream: str) -> int:
    return int((await client.xpending(stream, names.ingest_group))["pending"])


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(400):  # hang guard, not a measurement
        if await check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"hang guard: {what}")


async def _running(consumer: Consumer, until: Callable[[], Awaitable[bool]]) -> None:
    task = asyncio.create_task(consumer.run())
    try:
        await _until(until, "ingest catches up")
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)


async def test_every_shard_is_read_and_each_event_stored_once(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    sharded = _sharded(settings, 3)
    names = sharded.names
    streams = names.event_streams(3)
    events = [make_event(account_id) for _ in range(30)]
    for i, stream in enumerate(streams):
        await _add(rclient, stream, events[i * 10:(i + 1) * 10])
    # An event replayed from a spool may reach a second shard: still stored once.
    await _add(rclient, streams[2], events[:1])

    async def all_in() -> bool:
        return (await _counts(pool, account_id))[0] >= 30

    await _running(Consumer(sharded, pool, rclient, metrics), all_in)

    assert await _counts(pool, account_id) == (30, 30, 30)  # none lost, none doubled
    for stream in streams:
        assert await _pending(rclient, names, stream) == 0
        assert [g["name"] for g in await rclient.xinfo_groups(stream)] == [b"ingest"]
    assert await rclient.exists(names.events) == 0  # the unsharded name is not created
    sample = metrics.registry.get_sample_value
    assert (sample("qnp_ingest_events_ingested_total"), sample("qnp_ingest_duplicates_total")
            ) == (30, 1)


async def test_a_bad_entry_is_dead_lettered_on_its_own_shard(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    sharded = _sharded(settings, 2)
    shards = sharded.names.event_shards(2)
    await rclient.xadd(shards[1].stream, {STREAM_FIELD: b"not an event"})
    await _add(rclient, shards[0].stream, [make_event(account_id)])
    consumer = Consumer(sharded, pool, rclient, metrics)
    assert (await consumer.run_once(0)).inserted == 1
    results = [await consumer.run_once(1) for _ in range(MAX_DELIVERIES)]

    assert [r.dead_lettered for r in results] == [0] * (MAX_DELIVERIES - 1) + [1]
    dead = await rclient.xrange(shards[1].dead)
    assert len(dead) == 1 and dead[0][1][STREAM_FIELD] == b"not an event"
    assert await rclient.xlen(shards[0].dead) == 0
    assert await rclient.exists(sharded.names.events_dead) == 0
    # A shard's stream and its dead letters share a hash tag: one slot, one MULTI.
    assert shards[1].dead.startswith(shards[1].stream.rsplit(":", 1)[0])
    assert await _pending(rclient, sharded.names, shards[1].stream) == 0


async def test_raising_the_shard_count_drains_the_unsharded_stream(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    # Written by proxies still on one shard, before and after ingest went to two.
    old = [make_event(account_id) for _ in range(5)]
    await _add(rclient, settings.names.events, old)
    sharded = _sharded(settings, 2)
    new = [make_event(account_id) for _ in range(4)]
    await _add(rclient, sharded.names.event_streams(2)[1], new)

    async def all_in() -> bool:
        return (await _counts(pool, account_id))[0] >= 9

    await _running(Consumer(sharded, pool, rclient, metrics), all_in)
    assert await _counts(pool, account_id) == (9, 9, 9)
    assert await _pending(rclient, sharded.names, settings.names.events) == 0


async def test_each_shard_is_trimmed_below_what_its_group_still_needs(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    sharded = _sharded(settings, 2)
    names = sharded.names
    first, second = names.event_streams(2)
    await _add(rclient, first, [make_event(account_id) for _ in range(3)])
    await _add(rclient, second, [make_event(account_id) for _ in range(4)])
    consumer = Consumer(sharded, pool, rclient, metrics)
    await consumer.run_once(0)
    await consumer.run_once(1)
    # Two more on the second shard, read by a consumer that then dies holding them.
    await _add(rclient, second, [make_event(account_id) for _ in range(2)])
    await rclient.xreadgroup(names.ingest_group, "dead", {second: ">"})

    result = await Trimmer(rclient, names.event_streams(2), metrics).trim()

    assert (await rclient.xlen(first), await rclient.xlen(second)) == (0, 2)
    assert (result.length, result.pending, result.trimmed) == (2, 2, 7)
    sample = metrics.registry.get_sample_value
    assert (sample("qnp_stream_length"), sample("qnp_stream_pending")) == (2, 2)
