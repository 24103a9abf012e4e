"""Ingest bills each request once, retries poison entries to a limit, never dead-letters
because Postgres was down; the stream is trimmed only below what ingest has stored."""

from __future__ import annotations

import secrets
import socket
import uuid
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane.connections import open_pool
from control_plane.ingest import MAX_DELIVERIES, BatchResult, Consumer, IngestRetry
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from control_plane.trim import Trimmer
from shared.events import STREAM_FIELD
from tests.control_plane.factories import make_event


async def _xadd(client: aioredis.Redis, settings: Settings, *payloads: bytes) -> None:
    for payload in payloads:
        await client.xadd(settings.names.events, {STREAM_FIELD: payload})


async def _debits(pool: asyncpg.Pool, account_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM credit_ledger WHERE account_id = $1 AND kind = 'debit'",
        uuid.UUID(account_id),
    )


async def _count(pool: asyncpg.Pool, account_id: str) -> int:
    n: int = await pool.fetchval(
        "SELECT count(*) FROM usage_logs WHERE account_id = $1", uuid.UUID(account_id)
    )
    return n


async def _pending(client: aioredis.Redis, settings: Settings) -> int:
    info = await client.xpending(settings.names.events, settings.names.ingest_group)
    return int(info["pending"])


@pytest.fixture
def consumer(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics
) -> Consumer:
    return Consumer(settings, pool, rclient, metrics)


async def test_each_billed_request_is_debited_once_with_its_row(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, account_id: str,
) -> None:
    billed = make_event(account_id, cost_micros=1234)
    free = make_event(account_id, cost_micros=0)
    anonymous = make_event(None, cost_micros=99)  # type: ignore[arg-type]
    await _xadd(rclient, settings, billed.encode(), free.encode(), anonymous.encode(),
                billed.encode())
    first = await consumer.run_once()
    await _xadd(rclient, settings, billed.encode())  # delivered again later
    again = await consumer.run_once()

    assert (first.inserted, first.duplicates, first.debits) == (3, 1, 1)
    assert (again.inserted, again.duplicates, again.debits) == (0, 1, 0)
    (debit,) = await _debits(pool, account_id)
    assert (str(debit["event_id"]), debit["amount_micros"]) == (billed.id, -1234)


async def test_a_poison_entry_is_dead_lettered_after_five_deliveries_and_others_flow(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    consumer: Consumer, account_id: str,
) -> None:
    # A row Postgres itself refuses (to_row cannot foresee a trigger): the batch is
    # written row by row, the poison stays pending and is retried, the rest land.
    marker = "poison" + secrets.token_hex(4)
    fn = f"qnp_test_{marker}"
    await pool.execute(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.key_id = '{marker}' THEN RAISE EXCEPTION 'poisoned'; END IF; "
        "RETURN NEW; END $$"
    )
    await pool.execute(
        f"CREATE TRIGGER {fn} BEFORE INSERT ON usage_logs FOR EACH ROW EXECUTE FUNCTION {fn}()"
    )
    try:
        poison = make_event(account_id, key_id=marker)
        good = [make_event(account_id) for _ in range(3)]
        await _xadd(rclient, settings, good[0].encode(), poison.encode(), b"{not json",
                    good[1].encode())
        results: list[BatchResult] = [await consumer.run_once()]
        assert (results[0].inserted, results[0].retrying) == (2, 2)
        await _xadd(rclient, settings, good[2].encode())
        for _ in range(MAX_DELIVERIES + 2):
            results.append(await consumer.run_once())
    finally:
        await pool.execute(f"DROP TRIGGER {fn} ON usage_logs")
        await pool.execute(f"DROP FUNCTION {fn}()")

    assert [r.dead_lettered for r in results[:MAX_DELIVERIES]] == [0, 0, 0, 0, 2]
    assert sum(r.inserted for r in results) == 3
    assert await _count(pool, account_id) == 3
    assert await _pending(rclient, settings) == 0
    dead = await rclient.xrange(settings.names.events_dead)
    assert sorted(f[b"reason"].decode() for _, f in dead) == [
        "not JSON", "postgres refused the row (RaiseError)"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_postgres_down_dead_letters_nothing_however_often_redelivered(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
    metrics: Metrics, account_id: str,
) -> None:
    down = replace(settings, database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/x")
    down_pool = await open_pool(down, min_size=0)
    try:
        await _xadd(rclient, settings, make_event(account_id).encode())
        for _ in range(MAX_DELIVERIES + 2):
            with pytest.raises(IngestRetry, match="postgres"):
                await Consumer(down, down_pool, rclient, metrics).run_once()
    finally:
        await down_pool.close()
    result = await Consumer(settings, pool, rclient, metrics).run_once()
    assert (result.inserted, result.dead_lettered) == (1, 0)
    assert await rclient.xlen(settings.names.events_dead) == 0


async def test_trim_keeps_every_entry_not_yet_acked(
    settings: Settings, rclient: aioredis.Redis, consumer: Consumer,
    metrics: Metrics, account_id: str,
) -> None:
    names = settings.names
    await _xadd(rclient, settings, *(make_event(account_id).encode() for _ in range(4)))
    await consumer.run_once()  # stored and acked
    await _xadd(rclient, settings, *(make_event(account_id).encode() for _ in range(3)))
    # Another consumer takes them and dies before acking: they must survive the trim.
    await rclient.xreadgroup(names.ingest_group, "dead", {names.events: ">"}, count=2)
    trimmer = Trimmer(rclient, names.events, metrics)

    result = await trimmer.trim()

    assert (result.trimmed, result.length, result.pending, result.lost) == (4, 3, 2, False)
    assert metrics.registry.get_sample_value("qnp_stream_pending") == 2
    # The producers' MAXLEN cap cuts into what nobody stored: reported once.
    await rclient.xtrim(names.events, maxlen=0)
    assert (await trimmer.trim()).lost and not (await trimmer.trim()).lost
    assert metrics.registry.get_sample_value("qnp_stream_trimmed_unacked_total") == 1  # 1 unread
