"""The ingest consumer: events on the stream land in usage_logs exactly once."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane.connections import open_pool
from control_plane.ingest import BatchResult, Consumer, IngestRetry
from control_plane.metrics import Metrics
from control_plane.partitions import partition_name
from control_plane.settings import Settings
from control_plane.usage_logs import insert_rows, to_row
from shared.events import STREAM_FIELD, Event
from tests.control_plane.factories import days_ago, make_event


async def _xadd(client: aioredis.Redis, settings: Settings, *payloads: bytes) -> None:
    for payload in payloads:
        await client.xadd(settings.names.events, {STREAM_FIELD: payload})


async def _drain(consumer: Consumer) -> BatchResult:
    """Run batches until the stream is empty; the summed result."""
    total = BatchResult()
    for _ in range(10):
        r = await consumer.run_once()
        if r.read == 0:
            break
        total.read += r.read
        total.inserted += r.inserted
        total.duplicates += r.duplicates
        total.dead_lettered += r.dead_lettered
    return total


async def _pending(client: aioredis.Redis, settings: Settings) -> int:
    info = await client.xpending(settings.names.events, settings.names.ingest_group)
    return int(info["pending"])


async def _rows(pool: asyncpg.Pool, account_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM usage_logs WHERE account_id = $1 ORDER BY received_at",
        uuid.UUID(account_id),
    )


@pytest.fixture
def consumer(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics
) -> Consumer:
    return Consumer(settings, pool, rclient, metrics)


async def test_events_land_with_every_column(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, account_id: str,
) -> None:
    event = make_event(account_id)
    other = make_event(account_id, stream=False, first_byte_at_us=None, source_ip=None,
                       outcome="upstream_error", status=502, error_code="upstream_5xx")
    await _xadd(rclient, settings, event.encode(), other.encode())

    result = await _drain(consumer)

    assert (result.inserted, result.duplicates, result.dead_lettered) == (2, 0, 0)
    assert await _pending(rclient, settings) == 0
    first, second = await _rows(pool, account_id)
    assert str(first["id"]) == event.id
    assert first["received_at"] == datetime.fromtimestamp(event.received_at_us / 1e6, UTC)
    assert (first["endpoint"], first["requested_model"], first["served_model"]) == (
        "/v1/chat/completions", "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
    )
    assert (first["provider"], first["stream"], first["status"], first["outcome"]) == (
        "openai", True, 200, "ok",
    )
    assert (first["prompt_tokens"], first["completion_tokens"], first["cached_tokens"],
            first["reasoning_tokens"], first["cost_micros"]) == (12, 34, 2, 1, 567)
    assert (first["latency_ms"], first["ttft_ms"]) == (1000.0, 250.0)
    assert first["source_ip"] == ipaddress.ip_address("203.0.113.9")
    assert (first["key_id"], first["node_id"], first["usage_source"]) == (
        "abcdefghijkl", "node-a", "upstream",
    )
    assert first["schema_version"] == 1 and first["error_code"] is None
    assert (second["ttft_ms"], second["source_ip"], second["error_code"]) == (
        None, None, "upstream_5xx",
    )


async def test_an_event_delivered_twice_is_stored_once(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, metrics: Metrics, account_id: str,
) -> None:
    payload = make_event(account_id).encode()
    await _xadd(rclient, settings, payload, payload)
    result = await _drain(consumer)
    await _xadd(rclient, settings, payload)
    later = await _drain(consumer)

    assert (result.inserted, result.duplicates, later.duplicates) == (1, 1, 1)
    assert len(await _rows(pool, account_id)) == 1
    assert metrics.registry.get_sample_value("qnp_ingest_duplicates_total") == 2


async def test_a_crash_between_commit_and_ack_stores_nothing_twice(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    metrics: Metrics, account_id: str,
) -> None:
    names = settings.names
    event = make_event(account_id)
    await rclient.xgroup_create(names.events, names.ingest_group, id="0", mkstream=True)
    await _xadd(rclient, settings, event.encode())
    # The crashed run: read (now pending for this consumer) and committed, never acked.
    await rclient.xreadgroup(names.ingest_group, settings.consumer_name, {names.events: ">"})
    async with pool.acquire() as conn:
        await insert_rows(conn, [to_row(event, datetime.now(UTC)).values])
    assert await _pending(rclient, settings) == 1

    restarted = Consumer(settings, pool, rclient, metrics)
    result = await _drain(restarted)

    assert (result.read, result.inserted, result.duplicates) == (1, 0, 1)
    assert await _pending(rclient, settings) == 0
    assert len(await _rows(pool, account_id)) == 1


async def test_malformed_entries_are_dead_lettered_and_the_rest_land(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, account_id: str,
) -> None:
    good = make_event(account_id)
    bad_ip = make_event(account_id, source_ip="not-an-ip")
    ancient = make_event(account_id, received_at_us=0, done_at_us=1)
    await _xadd(rclient, settings, b"{not json", good.encode(), bad_ip.encode(), ancient.encode())
    await rclient.xadd(settings.names.events, {b"x": b"no e field"})

    result = await _drain(consumer)

    assert (result.inserted, result.dead_lettered) == (1, 4)
    assert [str(r["id"]) for r in await _rows(pool, account_id)] == [good.id]
    assert await _pending(rclient, settings) == 0
    dead = await rclient.xrange(settings.names.events_dead)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons == sorted([
        "not JSON", "source_ip is not an IP address",
        "received_at_us is outside the accepted window", "missing field e",
    ])
    assert all(b"entry_id" in fields for _, fields in dead)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_entries_stay_pending_while_postgres_is_down(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    metrics: Metrics, account_id: str,
) -> None:
    down = replace(settings, database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/x")
    down_pool = await open_pool(down, min_size=0)
    try:
        await _xadd(rclient, settings, make_event(account_id).encode(),
                    make_event(account_id).encode())
        with pytest.raises(IngestRetry, match="postgres"):
            await Consumer(down, down_pool, rclient, metrics).run_once()
        with pytest.raises(IngestRetry, match="postgres"):  # re-reads, still nothing acked
            await Consumer(down, down_pool, rclient, metrics).run_once()
    finally:
        await down_pool.close()
    assert await _pending(rclient, settings) == 2
    assert await _rows(pool, account_id) == []

    result = await _drain(Consumer(settings, pool, rclient, metrics))

    assert result.inserted == 2
    assert await _pending(rclient, settings) == 0


async def test_a_partition_is_created_for_an_event_day_on_demand(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, account_id: str,
) -> None:
    received = days_ago(20)
    event = make_event(account_id, received_at_us=received, first_byte_at_us=None,
                       done_at_us=received + 5_000)
    day = datetime.fromtimestamp(received / 1e6, UTC).date()
    await _xadd(rclient, settings, event.encode())

    result = await _drain(consumer)

    assert result.inserted == 1
    assert await pool.fetchval("SELECT to_regclass($1)::text", partition_name(day)) == (
        partition_name(day)
    )
    (row,) = await _rows(pool, account_id)
    assert row["latency_ms"] == 5.0


async def test_run_ingests_until_stopped(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, metrics: Metrics, account_id: str,
) -> None:
    task = asyncio.create_task(consumer.run())
    events: list[Event] = [make_event(account_id) for _ in range(3)]
    await _xadd(rclient, settings, *(e.encode() for e in events))
    for _ in range(100):
        if len(await _rows(pool, account_id)) == 3:
            break
        await asyncio.sleep(0.05)

    consumer.stop()
    await asyncio.wait_for(task, timeout=2)

    assert len(await _rows(pool, account_id)) == 3
    assert metrics.registry.get_sample_value("qnp_ingest_events_ingested_total") == 3
