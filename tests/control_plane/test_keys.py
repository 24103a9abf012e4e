"""Accounts and API keys: what the proxy and the key's owner would notice."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import bcrypt
import pytest
import redis.asyncio as aioredis

from control_plane import accounts, keys
from control_plane.errors import InvalidInput, NotFound
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from shared.apikeys import KeyRecord, parse
from shared.events import STREAM_FIELD
from shared.redis_names import spend_periods
from tests.control_plane.factories import make_event


async def test_issued_key_parses_and_its_record_verifies(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    issued = await keys.issue_key(
        pool, rclient, settings.names, account_id, "ci", bcrypt_rounds=4
    )

    parsed = parse(issued.key)
    assert parsed.key_id == issued.info.key_id
    raw = await rclient.get(settings.names.key_record(parsed.key_id))
    assert raw is not None and parsed.secret.encode() not in raw
    record = KeyRecord.decode(raw)
    assert (record.account_id, record.status, record.limits) == (account_id, "active", {})
    assert bcrypt.checkpw(parsed.secret.encode(), record.secret_hash.encode())
    assert parsed.secret not in repr(issued)
    stored = await pool.fetchval(
        "SELECT row_to_json(k)::text FROM api_keys k WHERE key_id = $1", parsed.key_id
    )
    assert parsed.secret not in stored and issued.key not in stored


async def test_revoke_announces_and_flips_the_record(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    names = settings.names
    issued = await keys.issue_key(pool, rclient, names, account_id, bcrypt_rounds=4)
    key_id = issued.info.key_id
    async with rclient.pubsub() as pubsub:
        await pubsub.subscribe(names.key_changes)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation

        info = await keys.revoke_key(pool, rclient, names, key_id)

        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"] == key_id.encode()
    assert info.status == "revoked" and info.revoked_at is not None
    record = KeyRecord.decode(await rclient.get(names.key_record(key_id)))
    assert record.status == "revoked" and not record.active
    listed = await keys.list_keys(pool, account_id)
    assert [(k.key_id, k.status) for k in listed] == [(key_id, "revoked")]
    again = await keys.revoke_key(pool, rclient, names, key_id)
    assert again.revoked_at == info.revoked_at


async def test_unknown_things_are_not_found(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    with pytest.raises(NotFound):
        await keys.issue_key(
            pool, rclient, names, "00000000-0000-0000-0000-000000000000", bcrypt_rounds=4
        )
    with pytest.raises(NotFound):
        await keys.list_keys(pool, "not-a-uuid")
    with pytest.raises(NotFound):
        await keys.revoke_key(pool, rclient, names, "abcdefghijkl")
    with pytest.raises(InvalidInput):
        await accounts.create_account(pool, rclient, names, "   ")
    assert [k async for k in rclient.scan_iter(match=f"{names.prefix}:keyrec:*")] == []


async def test_republish_restores_records_redis_lost(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    names = settings.names
    kept = await keys.issue_key(pool, rclient, names, account_id, bcrypt_rounds=4)
    gone = await keys.issue_key(pool, rclient, names, account_id, bcrypt_rounds=4)
    await keys.revoke_key(pool, rclient, names, gone.info.key_id)
    await rclient.delete(names.key_record(kept.info.key_id), names.key_record(gone.info.key_id))

    await keys.republish_all(pool, rclient, names)

    kept_rec = KeyRecord.decode(await rclient.get(names.key_record(kept.info.key_id)))
    gone_rec = KeyRecord.decode(await rclient.get(names.key_record(gone.info.key_id)))
    assert (kept_rec.status, gone_rec.status) == ("active", "revoked")
    secret = parse(kept.key).secret
    assert await asyncio.to_thread(
        bcrypt.checkpw, secret.encode(), kept_rec.secret_hash.encode()
    )


async def test_a_disabled_key_is_published_as_disabled_and_enabled_again(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    # The proxy names the reason it refuses a key: a disabled key must not read as an
    # account suspension (403), nor as revoked (it can be switched back on).
    names = settings.names
    issued = await keys.issue_key(pool, rclient, names, account_id, bcrypt_rounds=4)
    key_id = issued.info.key_id
    account = issued.info.account_id
    await keys.update_key(pool, rclient, names, account, key_id, {"disabled": True})
    record = KeyRecord.decode(await rclient.get(names.key_record(key_id)))
    assert record.status == "disabled" and not record.active
    await keys.update_key(pool, rclient, names, account, key_id, {"disabled": False})
    record = KeyRecord.decode(await rclient.get(names.key_record(key_id)))
    assert record.status == "active"


async def test_a_first_credit_limit_starts_from_what_the_key_already_spent(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str
) -> None:
    # Changing a limit never resets usage: the proxy counts spend only for limited
    # keys, so the key's first limit seeds its counter from the usage logs.
    names = settings.names
    issued = await keys.issue_key(pool, rclient, names, account_id, bcrypt_rounds=4)
    info = issued.info
    for cost in (300_000, 200_000):
        event = make_event(account_id, key_id=info.key_id, cost_micros=cost)
        await rclient.xadd(names.events, {STREAM_FIELD: event.encode()})
    consumer = Consumer(settings, pool, rclient, Metrics())
    stored = 0
    for _ in range(20):  # hang guard
        stored += (await consumer.run_once()).inserted
        if stored == 2:
            break
    spend = names.key_spend(account_id, info.key_id)
    await keys.update_key(pool, rclient, names, info.account_id, info.key_id,
                          {"credit_limit_micros": 1_000_000, "limit_reset": "daily"})
    seeded = {k.decode(): int(v) for k, v in (await rclient.hgetall(spend)).items()}
    assert seeded["spent_total"] == 500_000 and seeded["spent_day"] == 500_000
    assert seeded["day"] == spend_periods(int(time.time()))["daily"]
    # Raising the limit keeps the counter the proxy now maintains.
    await rclient.hincrby(spend, "spent_day", 1)
    await keys.update_key(pool, rclient, names, info.account_id, info.key_id,
                          {"credit_limit_micros": 2_000_000})
    assert int(await rclient.hget(spend, "spent_day")) == 500_001
    # No limit: no counter; revoking drops it too.
    await keys.update_key(pool, rclient, names, info.account_id, info.key_id,
                          {"credit_limit_micros": None})
    assert not await rclient.exists(spend)
    await keys.update_key(pool, rclient, names, info.account_id, info.key_id,
                          {"credit_limit_micros": 1_000_000})
    await keys.revoke_key(pool, rclient, names, info.key_id)
    assert not await rclient.exists(spend)
