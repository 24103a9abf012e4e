"""Recorded privacy requests (issue 14): due dates from the jurisdiction, completion,
the one legal extension, and ``qnp_privacy_requests_overdue`` from the maintenance job
under an injected clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane.metrics import Metrics
from control_plane.privacy import requests
from control_plane.privacy.requests import InvalidRequest
from control_plane.service import maintain_once
from control_plane.settings import Settings
from control_plane.trim import Trimmer

RECEIVED = datetime(2027, 1, 31, 9, 0, tzinfo=UTC)


async def test_a_staff_request_is_due_by_its_jurisdiction_and_stays_open(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account = uuid.UUID(account_id)
    gdpr = await requests.record(pool, account, "correction", "gdpr", RECEIVED, "staff")
    pipa = await requests.record(pool, account, "access", "pipa", RECEIVED, "staff")
    assert gdpr.due_at == datetime(2027, 2, 28, 9, 0, tzinfo=UTC)
    assert pipa.due_at == datetime(2027, 2, 10, 9, 0, tzinfo=UTC)
    assert gdpr.completed_at is None and gdpr.outcome is None
    assert await requests.extend(pool, pipa.id, RECEIVED) is None  # PIPA has none
    too_late = await requests.record(pool, account, "access", "ccpa", RECEIVED, "staff")
    assert await requests.extend(pool, too_late.id, too_late.due_at + timedelta(seconds=1)
                                 ) is None  # notice must come inside the first 45 days
    assert await requests.extend(pool, gdpr.id, RECEIVED + timedelta(days=27)
                                 ) == datetime(2027, 4, 28, 9, 0, tzinfo=UTC)
    later = RECEIVED + timedelta(days=3)
    assert await requests.complete(pool, gdpr.id, later, "fulfilled")
    assert not await requests.complete(pool, gdpr.id, later, "refused")  # answered once
    found = {r.id: r for r in await requests.of_account(pool, account)}
    assert found[gdpr.id].outcome == "fulfilled" and found[gdpr.id].completed_at == later
    assert found[gdpr.id].extended_until == datetime(2027, 4, 28, 9, 0, tzinfo=UTC)
    assert found[pipa.id].completed_at is None


async def test_self_service_is_recorded_complete_at_receipt(
    pool: asyncpg.Pool, account_id: str
) -> None:
    done = await requests.record(pool, uuid.UUID(account_id), "export", "default",
                                 RECEIVED, "self-service", outcome="fulfilled")
    assert done.completed_at == RECEIVED and done.handled_by == "self-service"
    assert done.due_at == RECEIVED + timedelta(days=30)


async def test_unknown_values_are_refused_before_the_database(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account = uuid.UUID(account_id)
    with pytest.raises(InvalidRequest):
        await requests.record(pool, account, "marketing", "gdpr", RECEIVED, "staff")
    with pytest.raises(InvalidRequest):
        await requests.record(pool, account, "access", "gdpr", RECEIVED, "robot")
    assert await requests.of_account(pool, account) == []


async def test_the_overdue_gauge_counts_open_requests_past_due_and_not_answered_ones(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    metrics = Metrics()
    trimmer = Trimmer(rclient, settings.names.events, metrics)
    now = datetime.now(UTC)

    async def gauge() -> float:
        await maintain_once(settings, pool, trimmer, metrics, clock=lambda: now)
        value = metrics.registry.get_sample_value("qnp_privacy_requests_overdue")
        assert value is not None
        return value

    before = await gauge()
    account = uuid.UUID(account_id)
    late = await requests.record(pool, account, "access", "lgpd",
                                 now - timedelta(days=16), "staff")
    await requests.record(pool, account, "access", "lgpd", now - timedelta(days=14), "staff")
    await requests.record(pool, account, "export", "default", now - timedelta(days=60),
                          "self-service", outcome="fulfilled")
    assert await gauge() == before + 1
    assert b"qnp_privacy_requests_overdue" in metrics.render()
    await requests.complete(pool, late.id, now, "fulfilled")
    assert await gauge() == before
    # An extension moves the clock: a GDPR request 40 days old is late, stays late when
    # extended only now, and is not late had it been extended in time.
    gdpr = await requests.record(pool, account, "deletion", "gdpr",
                                 now - timedelta(days=40), "staff")
    assert await gauge() == before + 1
    assert await requests.extend(pool, gdpr.id, now) is None
    assert await gauge() == before + 1
    in_time = gdpr.received_at + timedelta(days=10)  # staff extended it back then
    assert await requests.extend(pool, gdpr.id, in_time) is not None
    assert await gauge() == before
