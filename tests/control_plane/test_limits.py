"""Limits and suspension: stored, published to Redis and announced to every proxy."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane import accounts, keys, limits
from control_plane.errors import InvalidInput, NotFound
from control_plane.settings import Settings
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames


async def _changes(pubsub: aioredis.client.PubSub, count: int) -> set[bytes]:
    seen: set[bytes] = set()
    for _ in range(count * 4):  # a hang guard, not a timing threshold
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        if message is not None:
            seen.add(message["data"])
        if len(seen) == count:
            break
    return seen


async def _record(rclient: aioredis.Redis, names: RedisNames, key_id: str) -> KeyRecord:
    return KeyRecord.decode(await rclient.get(names.key_record(key_id)))


async def test_limits_reach_the_state_and_the_key_record_with_a_notice(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account = await accounts.create_account(pool, rclient, names, "acme")
    a = str(account.id)
    issued = await keys.issue_key(pool, rclient, names, a, bcrypt_rounds=4)
    key_id = issued.info.key_id

    updated = await limits.set_account_limits(pool, rclient, names, a,
                                              {"rpm": 600, "tpm": 0, "conc": 5})
    assert updated.limits == {"rpm": 600, "conc": 5}
    state = await rclient.hmget(names.account_state(a), "rpm", "tpm", "conc", "status")
    assert state == [b"600", b"0", b"5", b"active"]

    async with rclient.pubsub() as pubsub:
        await pubsub.subscribe(names.key_changes)
        await pubsub.get_message(timeout=1)
        info = await limits.set_key_limits(pool, rclient, names, key_id, {"tpm": 20_000})
        assert await _changes(pubsub, 1) == {key_id.encode()}
    assert info.limits == {"tpm": 20_000}
    assert (await _record(rclient, names, key_id)).limits == {"tpm": 20_000}

    # Setting limits replaces the set; the old ones are gone from Redis too.
    await limits.set_account_limits(pool, rclient, names, a, {})
    state = await rclient.hmget(names.account_state(a), "rpm", "tpm", "conc")
    assert state == [b"0", b"0", b"0"]
    # A republish after Redis lost the record keeps the limits.
    await rclient.delete(names.key_record(key_id))
    await keys.republish_all(pool, rclient, names)
    assert (await _record(rclient, names, key_id)).limits == {"tpm": 20_000}


async def test_suspension_reaches_every_key_and_resume_restores_them(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    a = str((await accounts.create_account(pool, rclient, names, "acme")).id)
    live = [(await keys.issue_key(pool, rclient, names, a, bcrypt_rounds=4)).info.key_id
            for _ in range(2)]
    dead = (await keys.issue_key(pool, rclient, names, a, bcrypt_rounds=4)).info.key_id
    await keys.revoke_key(pool, rclient, names, dead)
    every = {k.encode() for k in [*live, dead]}

    async with rclient.pubsub() as pubsub:
        await pubsub.subscribe(names.key_changes)
        await pubsub.get_message(timeout=1)
        suspended = await limits.set_account_status(pool, rclient, names, a, "suspended")
        assert await _changes(pubsub, 3) == every
        assert suspended.status == "suspended"
        assert await rclient.hget(names.account_state(a), "status") == b"suspended"
        assert [(await _record(rclient, names, k)).status for k in [*live, dead]] == [
            "suspended", "suspended", "revoked"]

        await limits.set_account_status(pool, rclient, names, a, "active")
        assert await _changes(pubsub, 3) == every
    assert await rclient.hget(names.account_state(a), "status") == b"active"
    assert [(await _record(rclient, names, k)).status for k in [*live, dead]] == [
        "active", "active", "revoked"]


@pytest.mark.parametrize(
    "body",
    [[], {"rpm": -1}, {"rpm": 1.5}, {"rpm": "10"}, {"rpm": True}, {"burst": 3},
     {"conc": 10**13}],
)
async def test_bad_limits_are_refused(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
    body: object,
) -> None:
    with pytest.raises(InvalidInput):
        await limits.set_account_limits(pool, rclient, settings.names, account_id, body)


async def test_the_database_refuses_malformed_limits(pool: asyncpg.Pool, account_id: str
                                                     ) -> None:
    for bad in ('{"rpm": -1}', '{"rpm": 1.5}', '{"x": 1}', '[]', '{"rpm": "1"}'):
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute("UPDATE accounts SET limits = $2::jsonb WHERE id = $1::uuid",
                               account_id, bad)


async def test_unknown_targets_are_not_found(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    with pytest.raises(NotFound):
        await limits.set_key_limits(pool, rclient, names, "abcdefghijkl", {})
    with pytest.raises(NotFound):
        await limits.set_key_limits(pool, rclient, names, "BAD", {})
    with pytest.raises(NotFound):
        await limits.set_account_status(pool, rclient, names, "nope", "suspended")
    with pytest.raises(NotFound):
        await limits.set_account_limits(pool, rclient, names,
                                        "00000000-0000-0000-0000-000000000000", {})
