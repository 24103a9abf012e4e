"""Ingest keeps the daily rollups (usage_daily) exactly: duplicates within a batch, a
batch delivered again, a poison row written row by row, and a failed transaction add
nothing; the sums match the stored usage rows; rollups hold no IP and no request id."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis

from control_plane import rollups
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from shared.events import STREAM_FIELD, Event
from tests.control_plane.factories import days_ago, make_event

_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
         "reasoning_tokens", "cache_write_tokens", "cost_micros")


async def _xadd(client: aioredis.Redis, settings: Settings, *events: Event) -> None:
    for event in events:
        await client.xadd(settings.names.events, {STREAM_FIELD: event.encode()})


async def _rollups(pool: asyncpg.Pool, account_id: str) -> dict[tuple[str, str, str],
                                                                tuple[int, ...]]:
    rows = await pool.fetch("SELECT * FROM usage_daily WHERE account_id = $1",
                            uuid.UUID(account_id))
    return {(r["day"].isoformat(), r["key_id"], r["model"]): tuple(r[c] for c in _SUMS)
            for r in rows}


async def _from_logs(pool: asyncpg.Pool, account_id: str) -> dict[tuple[str, str, str],
                                                                  tuple[int, ...]]:
    rows = await pool.fetch(
        "SELECT (received_at AT TIME ZONE 'UTC')::date AS day, coalesce(key_id, '') AS k, "
        "coalesce(served_model, requested_model, '') AS m, count(*) AS requests, "
        "count(*) FILTER (WHERE outcome <> 'ok') AS errors, "
        "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
        "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
        "sum(cache_write_tokens) AS cache_write_tokens, sum(cost_micros) AS cost_micros "
        "FROM usage_logs WHERE account_id = $1 GROUP BY 1, 2, 3", uuid.UUID(account_id))
    return {(r["day"].isoformat(), r["k"], r["m"]): tuple(int(r[c]) for c in _SUMS)
            for r in rows}


async def test_duplicates_and_a_redelivered_batch_add_nothing(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    consumer = Consumer(settings, pool, rclient, Metrics())
    a = make_event(account_id, prompt_tokens=10, completion_tokens=20, cached_tokens=3,
                   reasoning_tokens=4, cache_write_tokens=5, cost_micros=100)
    b = make_event(account_id, prompt_tokens=1, completion_tokens=2, cached_tokens=0,
                   reasoning_tokens=0, cost_micros=7, outcome="upstream_error", status=502)
    other_key = make_event(account_id, key_id="otherkey0001", cost_micros=50)
    other_model = make_event(account_id, served_model=None, requested_model="m2",
                             cost_micros=9)
    yesterday = make_event(account_id, received_at_us=days_ago(1), cost_micros=11)
    await _xadd(rclient, settings, a, b, a, other_key, other_model, yesterday, b)
    first = await consumer.run_once()
    # The same events delivered again later, as after a consumer crash before XACK.
    await _xadd(rclient, settings, a, b, other_key, other_model, yesterday)
    again = await consumer.run_once()

    assert (first.inserted, first.duplicates) == (5, 2)
    assert (again.inserted, again.duplicates) == (0, 5)
    today = datetime.now(UTC).date().isoformat()
    day_before = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    found = await _rollups(pool, account_id)
    assert found[(today, "abcdefghijkl", "gpt-4o-mini-2024-07-18")] == (
        2, 1, 11, 22, 3, 4, 5, 107)
    assert found[(today, "otherkey0001", "gpt-4o-mini-2024-07-18")][0::7] == (1, 50)
    assert found[(today, "abcdefghijkl", "m2")][0::7] == (1, 9)
    assert found[(day_before, "abcdefghijkl", "gpt-4o-mini-2024-07-18")][0::7] == (1, 11)
    assert len(found) == 4
    assert found == await _from_logs(pool, account_id)


async def test_many_batches_and_consumers_sum_exactly_to_the_rows(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    events = [make_event(account_id, key_id=f"key{i % 3:09d}", cost_micros=i,
                         prompt_tokens=i, requested_model=f"model-{i % 2}",
                         served_model=None) for i in range(300)]
    await _xadd(rclient, settings, *events, *events[::7])
    small = replace(settings, ingest_batch_size=17)
    consumers = [Consumer(small, pool, rclient, Metrics()) for _ in range(2)]
    for _ in range(100):  # bounded: 317 entries in batches of 17 need 19 reads
        results = [await c.run_once() for c in consumers]
        if all(r.read == 0 for r in results):
            break
    total = await pool.fetchrow(
        "SELECT sum(requests) AS n, sum(cost_micros) AS cost, sum(prompt_tokens) AS p "
        "FROM usage_daily WHERE account_id = $1", uuid.UUID(account_id))
    assert total is not None
    assert (total["n"], total["cost"], total["p"]) == (300, sum(range(300)), sum(range(300)))
    assert await _rollups(pool, account_id) == await _from_logs(pool, account_id)


async def test_consumers_writing_the_same_rollups_at_once_lose_nothing(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    # Every batch touches the same few rollup rows: concurrent upserts must add up (row
    # locks, taken in key order, so no deadlock either).
    events = [make_event(account_id, key_id=f"key{i % 2:09d}", cost_micros=1 + i % 5)
              for i in range(600)]
    await _xadd(rclient, settings, *events)
    small = replace(settings, ingest_batch_size=25)

    async def drain(consumer: Consumer) -> int:
        stored = 0
        for _ in range(60):  # bounded: 600 entries in batches of 25 between two
            result = await consumer.run_once()
            if result.read == 0:
                break
            stored += result.inserted
        return stored

    counts = await asyncio.gather(*(drain(Consumer(replace(small, consumer_name=f"c{n}"),
                                                   pool, rclient, Metrics()))
                                    for n in range(3)))
    assert sum(counts) == 600 and all(counts)  # each consumer took part
    total = await pool.fetchrow(
        "SELECT sum(requests) AS n, sum(cost_micros) AS cost FROM usage_daily "
        "WHERE account_id = $1", uuid.UUID(account_id))
    assert total is not None
    assert (total["n"], total["cost"]) == (600, sum(1 + i % 5 for i in range(600)))


async def test_a_poison_row_stored_row_by_row_leaves_rollups_exact(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    marker = "poison" + secrets.token_hex(4)
    fn = f"qnp_test_{marker}"
    await pool.execute(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.key_id = '{marker}' THEN RAISE EXCEPTION 'poisoned'; END IF; "
        "RETURN NEW; END $$")
    await pool.execute(
        f"CREATE TRIGGER {fn} BEFORE INSERT ON usage_logs FOR EACH ROW EXECUTE FUNCTION {fn}()")
    try:
        good = [make_event(account_id, cost_micros=10) for _ in range(3)]
        await _xadd(rclient, settings, good[0], make_event(account_id, key_id=marker),
                    good[1], good[2], good[1])
        result = await Consumer(settings, pool, rclient, Metrics()).run_once()
    finally:
        await pool.execute(f"DROP TRIGGER {fn} ON usage_logs")
        await pool.execute(f"DROP FUNCTION {fn}()")
    assert (result.inserted, result.retrying) == (3, 1)
    found = await _rollups(pool, account_id)
    assert [v[0::7] for v in found.values()] == [(3, 30)]


async def test_rollups_are_written_in_the_rows_transaction(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    # A rollup that cannot be written fails the batch: no row is kept without its
    # rollup, and the batch lands whole once the rollups can be written again.
    await pool.execute("ALTER TABLE usage_daily ADD CONSTRAINT qnp_test_no_cost "
                       f"CHECK (account_id <> '{account_id}' OR cost_micros < 1000) NOT VALID")
    try:
        await _xadd(rclient, settings, make_event(account_id, cost_micros=5000))
        failed = await Consumer(settings, pool, rclient, Metrics()).run_once()
        stored = await pool.fetchval("SELECT count(*) FROM usage_logs WHERE account_id = $1",
                                     uuid.UUID(account_id))
    finally:
        await pool.execute("ALTER TABLE usage_daily DROP CONSTRAINT qnp_test_no_cost")
    assert (failed.inserted, failed.retrying, stored) == (0, 1, 0)
    result = await Consumer(settings, pool, rclient, Metrics()).run_once()
    assert result.inserted == 1
    assert [v[0::7] for v in (await _rollups(pool, account_id)).values()] == [(1, 5000)]


async def test_rollups_hold_no_ip_and_no_request_id(pool: asyncpg.Pool) -> None:
    columns = {r["column_name"] for r in await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_daily'")}
    assert columns == {"account_id", "day", "key_id", "model", *_SUMS}
    assert not {"id", "source_ip", "request_id"} & columns


async def test_per_day_fills_empty_days_and_filters_by_key_and_model(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    await _xadd(rclient, settings,
                make_event(account_id, cost_micros=3, received_at_us=days_ago(2)),
                make_event(account_id, cost_micros=5, key_id="otherkey0001"),
                make_event(account_id, cost_micros=7))
    await Consumer(settings, pool, rclient, Metrics()).run_once()
    today = datetime.now(UTC).date()
    acct = uuid.UUID(account_id)
    days = await rollups.per_day(pool, acct, rollups.Filters(today - timedelta(days=3), today))
    assert [(d.day, d.requests, d.cost_micros) for d in days] == [
        (today - timedelta(days=3), 0, 0), (today - timedelta(days=2), 1, 3),
        (today - timedelta(days=1), 0, 0), (today, 2, 12)]
    one_key = rollups.Filters(today - timedelta(days=3), today, key_id="otherkey0001")
    assert [d.cost_micros for d in await rollups.per_day(pool, acct, one_key)] == [0, 0, 0, 5]
    no_model = rollups.Filters(today, today, model="none")
    assert [d.requests for d in await rollups.per_day(pool, acct, no_model)] == [0]
    assert await rollups.totals(pool, acct, today, today) == (2, 12)
    (model,) = await rollups.per_model(pool, acct, rollups.Filters(today - timedelta(days=3),
                                                                   today))
    assert (model.model, model.requests, model.cost_micros) == ("gpt-4o-mini-2024-07-18", 3, 15)


async def test_another_account_sees_none_of_it(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    await _xadd(rclient, settings, make_event(account_id, cost_micros=3))
    await Consumer(settings, pool, rclient, Metrics()).run_once()
    today = datetime.now(UTC).date()
    assert await rollups.totals(pool, uuid.uuid4(), today, today) == (0, 0)


async def test_the_provider_rollup_counts_each_request_once_by_its_provider(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    """usage_daily_providers (the sharing page's source): per day and provider, the
    requests that reached it, first and last; a redelivery adds nothing, a request that
    reached no provider counts for none."""
    consumer = Consumer(settings, pool, rclient, Metrics())
    first, last = days_ago(0) - 5_000_000, days_ago(0) - 1_000_000
    openai = [make_event(account_id, provider="openai", received_at_us=t)
              for t in (first, last)]
    anthropic = make_event(account_id, provider="anthropic")
    refused = make_event(account_id, provider=None, outcome="rate_limited", status=429)
    yesterday = make_event(account_id, provider="openai", received_at_us=days_ago(1))
    await _xadd(rclient, settings, *openai, anthropic, refused, yesterday)
    await consumer.run_once()
    await _xadd(rclient, settings, *openai, anthropic)  # delivered again
    await consumer.run_once()
    rows = await pool.fetch(
        "SELECT day, provider, requests, first_at, last_at FROM usage_daily_providers "
        "WHERE account_id = $1 ORDER BY day, provider", uuid.UUID(account_id))
    found = {(r["day"], r["provider"]): r["requests"] for r in rows}

    def day(e: Event) -> object:  # from the event itself: right even across midnight
        return datetime.fromtimestamp(e.received_at_us / 1e6, UTC).date()

    expected: dict[tuple[object, str], int] = {}
    for e in (*openai, anthropic, yesterday):
        expected[(day(e), str(e.provider))] = expected.get((day(e), str(e.provider)), 0) + 1
    assert found == expected and sum(found.values()) == 4
    spans = {(r["day"], r["provider"]): (r["first_at"], r["last_at"]) for r in rows}
    if day(openai[0]) == day(openai[1]):
        got = spans[(day(openai[0]), "openai")]
        assert (round(got[0].timestamp() * 1e6), round(got[1].timestamp() * 1e6)) == (
            first, last)
