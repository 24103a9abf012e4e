"""Retention on an injected clock: old usage partitions dropped whole, days ahead
created, ledger rows untouched."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis

from control_plane import retention
from control_plane.metrics import Metrics
from control_plane.partitions import create_days, partition_name
from control_plane.service import maintain_once
from control_plane.settings import Settings
from control_plane.trim import Trimmer
from control_plane.usage_logs import insert_rows, to_row
from tests.control_plane.factories import make_event

# Noon of today (UTC), never the wall clock's time of day: the ages below are whole days
# plus an hour, so within the first hour after midnight "29 days and an hour ago" fell
# on the day retention drops and the test failed (seen at 00:09 UTC).
NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


async def _exists(pool: asyncpg.Pool, day: date) -> bool:
    found = await pool.fetchval("SELECT to_regclass($1)", partition_name(day))
    return found is not None


async def test_partitions_past_retention_are_dropped_and_the_ledger_kept(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    ages = [timedelta(days=d, hours=1) for d in (45, 31, 30, 29, 1)] + [timedelta(0)]
    events = [make_event(account_id, received_at_us=_us(NOW - age), first_byte_at_us=None,
                         done_at_us=_us(NOW - age) + 1000, cost_micros=10) for age in ages]
    rows = [to_row(e, NOW) for e in events]
    # The oldest day holds many rows: dropping it must not be a row-by-row delete.
    bulk = [to_row(make_event(account_id, received_at_us=_us(NOW - ages[0]) + i,
                              first_byte_at_us=None, done_at_us=_us(NOW - ages[0]) + i + 1,
                              cost_micros=1), NOW) for i in range(5000)]
    async with pool.acquire() as conn:
        await create_days(conn, {r.day for r in rows})
        await insert_rows(conn, [r.values for r in rows + bulk])
    ledger_before = await pool.fetchval(
        "SELECT count(*) FROM credit_ledger WHERE account_id = $1", uuid.UUID(account_id))

    metrics = Metrics()
    await maintain_once(settings, pool, Trimmer(rclient, settings.names.events, metrics),
                        metrics, clock=lambda: NOW)

    oldest = await pool.fetchval(
        "SELECT min(received_at) FROM usage_logs WHERE account_id = $1", uuid.UUID(account_id))
    assert oldest >= NOW - timedelta(days=30)
    assert await pool.fetchval(
        "SELECT count(*) FROM usage_logs WHERE account_id = $1", uuid.UUID(account_id)) == 3
    assert not await _exists(pool, rows[0].day)  # gone as a table, not emptied
    assert await _exists(pool, (NOW + timedelta(days=7)).date())  # created ahead
    assert await pool.fetchval(
        "SELECT count(*) FROM credit_ledger WHERE account_id = $1", uuid.UUID(account_id)
    ) == ledger_before == 5006
    assert metrics.registry.get_sample_value("qnp_retention_partitions_dropped_total") >= 2

    # Ten days later by the injected clock, the 29-day-old row is past retention too.
    async with pool.acquire() as conn:
        later = await retention.apply(conn, NOW + timedelta(days=10), settings.retention_days)
    assert partition_name(rows[3].day) in later.dropped
    assert await pool.fetchval(
        "SELECT count(*) FROM usage_logs WHERE account_id = $1", uuid.UUID(account_id)) == 2
