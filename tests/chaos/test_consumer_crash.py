"""Ingest consumers that die holding a batch, as real ``control_plane serve`` processes.

A consumer reads a batch (the entries pending under its name) that it cannot store
yet, because Postgres behind a gate is frozen, or because its insert waits on a lock
the test holds; then it is killed with SIGKILL. A second consumer must claim what the
first held, or, restarted after a crash between commit and XACK, find it stored
already: either way each event ends up exactly once in ``usage_logs``, with one debit,
and nothing stays pending.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.redis_names import RedisNames
from tests.chaos.conftest import (
    add_events,
    control_plane_env,
    debit_count,
    metric,
    pending,
    serve_control_plane,
    stored_ids,
    wait_for,
)
from tests.chaos.gate import Gate

pytestmark = pytest.mark.timeout(120)

HELD = 5000  # entries the killed consumer holds
BATCH = "10000"  # larger than HELD: the killed consumer reads them in one batch


async def test_a_consumer_killed_holding_thousands_pending_is_taken_over(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    redis: aioredis.Redis,
) -> None:
    account = str(uuid.uuid4())
    gate = await Gate(migrated_url).start()
    first_env = control_plane_env(gate.url, redis_url, redis_names.prefix,
                                  QNP_CONSUMER_NAME="ingest-a", QNP_INGEST_BATCH_SIZE=BATCH)
    first = await serve_control_plane(first_env, tmp_path / "first.log")
    try:
        gate.freeze()  # Postgres hangs: the consumer reads a batch and cannot store it
        ids = await add_events(redis, redis_names, account, HELD)
        await wait_for(lambda: _holds(redis, redis_names, "ingest-a", HELD),
                       "the first consumer reads the whole batch")
        first.stop(signal.SIGKILL)
    finally:
        first.stop(signal.SIGKILL)
        await gate.close()
    assert await stored_ids(migrated_url, account) == []

    second_env = control_plane_env(migrated_url, redis_url, redis_names.prefix,
                                   QNP_CONSUMER_NAME="ingest-b",
                                   QNP_INGEST_CLAIM_IDLE_MS="500")
    with await serve_control_plane(second_env, tmp_path / "second.log") as second:
        await wait_for(lambda: _nothing_pending(redis, redis_names),
                       "the second consumer claims and stores every entry")
        ingested = await metric(second_env, "qnp_ingest_events_ingested_total")
        assert second.stop() == 0

    stored = await stored_ids(migrated_url, account)
    assert len(stored) == HELD and set(stored) == set(ids)  # exact: none lost, none doubled
    assert await debit_count(migrated_url, account) == HELD
    assert ingested == HELD  # the second consumer stored them, after the claim
    assert await redis.xlen(redis_names.events_dead) == 0


async def test_a_crash_between_commit_and_ack_is_redelivered_not_doubled(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    redis: aioredis.Redis,
) -> None:
    count = 1000
    account = str(uuid.uuid4())
    redis_gate = await Gate(redis_url).start()
    env = control_plane_env(migrated_url, redis_gate.url, redis_names.prefix,
                            QNP_CONSUMER_NAME="ingest-a", QNP_INGEST_BATCH_SIZE=BATCH)
    crashing = await serve_control_plane(env, tmp_path / "crashing.log")
    blocker = await asyncpg.connect(migrated_url)
    try:
        # A lock the batch's INSERT waits on: once it waits, the consumer holds the
        # whole batch (its XREADGROUP reply read), and nothing is committed yet.
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("LOCK TABLE usage_logs IN SHARE MODE")
        ids = await add_events(redis, redis_names, account, count)
        await wait_for(lambda: _insert_waits(migrated_url), "the consumer's insert waits")
        await redis_gate.cut()  # its XACK will never reach Redis
        await hold.rollback()  # ... but the batch commits
        await wait_for(lambda: _stored(migrated_url, account, count), "the batch commits")
        assert await pending(redis, redis_names) == {"ingest-a": count}  # stored, not acked
        crashing.stop(signal.SIGKILL)
    finally:
        crashing.stop(signal.SIGKILL)
        await blocker.close()
        await redis_gate.close()

    # The same consumer restarted re-reads its own pending entries first.
    restart_env = {**env, "REDIS_URL": redis_url}
    with await serve_control_plane(restart_env, tmp_path / "restarted.log") as restarted:
        await wait_for(lambda: _nothing_pending(redis, redis_names),
                       "the restarted consumer acks the redelivered entries")
        duplicates = await metric(restart_env, "qnp_ingest_duplicates_total")
        ingested = await metric(restart_env, "qnp_ingest_events_ingested_total")
        assert restarted.stop() == 0

    stored = await stored_ids(migrated_url, account)
    assert len(stored) == count and set(stored) == set(ids)
    assert await debit_count(migrated_url, account) == count  # billed once
    assert (duplicates, ingested) == (count, 0)  # redelivered, recognised, not re-inserted


async def _holds(client: aioredis.Redis, names: RedisNames, consumer: str, n: int) -> bool:
    return (await pending(client, names)).get(consumer) == n


async def _nothing_pending(client: aioredis.Redis, names: RedisNames) -> bool:
    info = await client.xpending(names.events, names.ingest_group)
    return int(info["pending"]) == 0


async def _insert_waits(database_url: str) -> bool:
    # A connection of its own: inside a transaction pg_stat_activity is a snapshot.
    conn = await asyncpg.connect(database_url)
    try:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO usage_logs%'")
    finally:
        await conn.close()
    return bool(waiting)


async def _stored(database_url: str, account: str, n: int) -> bool:
    return len(await stored_ids(database_url, account)) >= n
