"""Admission settings: account and key limits, account suspension, and publishing them.

Limits are ``rpm`` (requests per minute), ``tpm`` (tokens per minute) and ``conc``
(concurrent requests); a name left out, or 0, means unlimited. Setting limits replaces
the whole set. Account limits and status go into the account's state hash, which the
proxy reads on every request; key limits and a suspended account's keys go into key
records, re-SET and announced on ``names.key_changes`` so every proxy drops its cached
copy. As in ``keys``, Redis is written inside the Postgres transaction: a Redis failure
rolls the change back; a failed commit after Redis took it leaves Redis ahead until
the next change or refill. Never imports ``proxy``.
"""

from __future__ import annotations

import logging

import asyncpg
import orjson
import redis.asyncio as aioredis

from control_plane.accounts import ACCOUNT_COLUMNS, Account, parse_account_id
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.keys import KeyInfo, publish_keys
from control_plane.publisher import LIMIT_NAMES, load_state, publish_state
from shared.apikeys import KEY_ID_SHAPE
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

MAX_LIMIT = 10**12
_KEY_COLUMNS = "key_id, account_id, name, status, created_at, revoked_at, limits::text AS limits"


def clean_limits(body: object) -> dict[str, int]:
    """Validated limits without the unlimited (0) entries."""
    if not isinstance(body, dict):
        raise InvalidInput("limits must be a JSON object")
    unknown = sorted(set(body) - set(LIMIT_NAMES))
    if unknown:
        raise InvalidInput(f"unknown limit {unknown[0]!r}; limits are {', '.join(LIMIT_NAMES)}")
    limits: dict[str, int] = {}
    for name in LIMIT_NAMES:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
            raise InvalidInput(f"{name} must be an integer from 0 (unlimited) to {MAX_LIMIT}")
        if value:
            limits[name] = value
    return limits


async def _publish_account(
    conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames, row: asyncpg.Record
) -> Account:
    account = Account.from_row(row)
    state = await load_state(conn, account.id)
    assert state is not None
    await publish_state(redis, names, state)
    return account


async def set_account_limits(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, account_id: str,
    body: object,
) -> Account:
    limits = clean_limits(body)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE accounts SET limits = $2::jsonb WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}",  # noqa: S608
            parse_account_id(account_id), orjson.dumps(limits).decode(),
        )
        if row is None:
            raise NotFound("account not found")
        account = await _publish_account(conn, redis, names, row)
    log.info("account limits set account_id=%s limits=%s", account.id, limits)
    return account


async def set_key_limits(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, key_id: str, body: object
) -> KeyInfo:
    limits = clean_limits(body)
    if not KEY_ID_SHAPE.match(key_id):
        raise NotFound("key not found")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE api_keys SET limits = $2::jsonb WHERE key_id = $1 RETURNING {_KEY_COLUMNS}",  # noqa: S608
            key_id, orjson.dumps(limits).decode(),
        )
        if row is None:
            raise NotFound("key not found")
        await publish_keys(conn, redis, names, key_id=key_id)
    info = KeyInfo.from_row(row)
    log.info("key limits set key_id=%s limits=%s", key_id, limits)
    return info


async def set_account_status(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, account_id: str,
    status: str,
) -> Account:
    """Suspend or resume an account: its state hash and every key record follow."""
    if status not in ("active", "suspended"):
        raise InvalidInput("status must be active or suspended")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE accounts SET status = $2 WHERE id = $1 AND status <> 'deleting' "  # noqa: S608
            f"RETURNING {ACCOUNT_COLUMNS}",
            parse_account_id(account_id), status,
        )
        if row is None:
            if await conn.fetchval("SELECT true FROM accounts WHERE id = $1",
                                   parse_account_id(account_id)):
                raise Conflict("the account is being deleted (issue 14); it cannot be "
                               "suspended or resumed")
            raise NotFound("account not found")
        account = await _publish_account(conn, redis, names, row)
        announced = await publish_keys(conn, redis, names, account_id=account.id)
        # Web sessions and the account API's key cache re-read the account's state at
        # once on every replica ("*": everything; suspension is rare).
        await redis.publish(names.session_revocations, "*")
    log.info("account status=%s account_id=%s keys=%d", status, account.id, len(announced))
    return account
