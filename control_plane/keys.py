"""API keys: issuing, listing, revoking, and publishing their records to Redis.

Postgres holds only the bcrypt hash of a key's secret; the full key string is returned
once by ``issue_key`` and never stored or logged. A record carries the key's limits
and reads "suspended" while its account is. Every change is written to Redis
(``SET`` the record, ``PUBLISH`` the key id) inside the Postgres transaction, so a Redis
failure rolls the change back rather than leaving the proxy with a stale record.
Imports ``shared.apikeys`` and ``accounts``; never ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import bcrypt
import redis.asyncio as aioredis

from control_plane.accounts import clean_name, get_account
from control_plane.errors import Conflict, NotFound
from control_plane.publisher import decode_limits
from shared.apikeys import KEY_ID_SHAPE, KeyRecord, generate
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

DEFAULT_KEY_NAME = "default"
_REPUBLISH_CHUNK = 500
_COLUMNS = ("key_id, account_id, name, status, created_at, revoked_at, limits::text AS limits, "
            "kind, credit_limit_micros, limit_reset, expires_at, disabled")
KINDS = ("inference", "management")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never its secret or hash."""

    key_id: str
    account_id: uuid.UUID
    name: str
    status: str
    created_at: datetime
    revoked_at: datetime | None
    limits: dict[str, int]
    kind: str = "inference"
    credit_limit_micros: int | None = None
    limit_reset: str | None = None
    expires_at: datetime | None = None
    disabled: bool = False

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> KeyInfo:
        values = dict(row)
        values["limits"] = decode_limits(values["limits"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "account_id": str(self.account_id),
            "name": self.name,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "limits": self.limits,
            "kind": self.kind,
            "credit_limit_micros": self.credit_limit_micros,
            "limit_reset": self.limit_reset,
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "disabled": self.disabled,
        }


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str
    info: KeyInfo

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, **self.info.to_json()}

    def __repr__(self) -> str:  # keep the secret out of any accidental log line
        return f"IssuedKey(key_id={self.info.key_id!r})"


def _hash_secret(secret: str, rounds: int) -> str:
    hashed: bytes = bcrypt.hashpw(secret.encode("ascii"), bcrypt.gensalt(rounds))
    return hashed.decode("ascii")


def _record_status(key_status: str, account_status: str, disabled: bool = False) -> str:
    if key_status != "active":
        return key_status
    return "active" if account_status == "active" and not disabled else "suspended"


async def _publish(redis: aioredis.Redis, names: RedisNames, record: KeyRecord) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(names.key_record(record.key_id), record.encode())
        pipe.publish(names.key_changes, record.key_id)
        await pipe.execute()


async def issue_key(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    names: RedisNames,
    account_id: str,
    name: object = None,
    *,
    bcrypt_rounds: int,
    kind: str = "inference",
    credit_limit_micros: int | None = None,
    limit_reset: str | None = None,
    expires_at: datetime | None = None,
) -> IssuedKey:
    """A new key for an active account; the returned ``key`` is its only copy.

    A management key is never published to Redis, so no proxy will ever accept it.
    """
    key_name = DEFAULT_KEY_NAME if name is None else clean_name(name, "key")
    assert kind in KINDS
    await get_account(pool, account_id)  # refuse unknown accounts before paying for bcrypt
    full, parsed = generate()
    secret_hash = await asyncio.to_thread(_hash_secret, parsed.secret, bcrypt_rounds)
    async with pool.acquire() as conn, conn.transaction():
        account = await get_account(conn, account_id)
        if account.status != "active":
            raise Conflict(f"account is {account.status}")
        row = await conn.fetchrow(
            "INSERT INTO api_keys (key_id, account_id, name, secret_hash, kind, "  # noqa: S608
            "credit_limit_micros, limit_reset, expires_at) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_COLUMNS}",
            parsed.key_id, account.id, key_name, secret_hash, kind, credit_limit_micros,
            limit_reset, expires_at,
        )
        assert row is not None
        info = KeyInfo.from_row(row)
        if kind == "inference":
            await _publish(redis, names, KeyRecord(
                info.key_id, str(account.id), "active", secret_hash, {},
                credit_limit_micros, limit_reset, _unix(expires_at)))
    log.info("key issued key_id=%s account_id=%s", info.key_id, account.id)
    return IssuedKey(full, info)


async def list_keys(pool: asyncpg.Pool, account_id: str) -> list[KeyInfo]:
    async with pool.acquire() as conn:
        account = await get_account(conn, account_id)
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM api_keys WHERE account_id = $1 "  # noqa: S608
            "ORDER BY created_at, key_id",
            account.id,
        )
    return [KeyInfo.from_row(row) for row in rows]


async def revoke_key(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, key_id: str,
    account_id: uuid.UUID | None = None,
) -> KeyInfo:
    """Revoke a key (again, harmlessly, if already revoked) and tell every proxy.

    With ``account_id``, a key of another account is not found."""
    if not KEY_ID_SHAPE.match(key_id):
        raise NotFound("key not found")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE api_keys SET status = 'revoked', revoked_at = coalesce(revoked_at, now()) "  # noqa: S608
            f"WHERE key_id = $1 AND ($2::uuid IS NULL OR account_id = $2) RETURNING {_COLUMNS}",
            key_id, account_id,
        )
        if row is None:
            raise NotFound("key not found")
        info = KeyInfo.from_row(row)
        await publish_keys(conn, redis, names, key_id=key_id)
    log.info("key revoked key_id=%s account_id=%s", info.key_id, info.account_id)
    return info


# Management keys are never published: the proxy must not know them.
_RECORD_SQL = (
    "SELECT k.key_id, k.account_id, k.status, k.secret_hash, k.limits::text AS limits, "
    "k.disabled, k.credit_limit_micros, k.limit_reset, k.expires_at, "
    "a.status AS account_status FROM api_keys k JOIN accounts a ON a.id = k.account_id "
    "WHERE k.kind = 'inference'"
)


def _unix(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


def _record(row: asyncpg.Record) -> KeyRecord:
    """The record the proxy sees: a key of a suspended account, or a disabled key,
    reads as suspended."""
    return KeyRecord(
        row["key_id"], str(row["account_id"]),
        _record_status(row["status"], row["account_status"], row["disabled"]),
        row["secret_hash"], decode_limits(row["limits"]),
        row["credit_limit_micros"], row["limit_reset"], _unix(row["expires_at"]),
    )


async def publish_keys(
    conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames, *,
    key_id: str | None = None, account_id: uuid.UUID | None = None,
) -> list[str]:
    """Re-SET the records of one key or of all an account's keys and announce each.

    Reads through ``conn``, so a caller inside a transaction publishes what it is about
    to commit.
    """
    if key_id is not None:
        rows = await conn.fetch(_RECORD_SQL + " AND k.key_id = $1", key_id)
    else:
        rows = await conn.fetch(_RECORD_SQL + " AND k.account_id = $1 ORDER BY k.key_id",
                                account_id)
    records = [_record(row) for row in rows]
    if records:
        async with redis.pipeline(transaction=True) as pipe:
            for record in records:
                pipe.set(names.key_record(record.key_id), record.encode())
                pipe.publish(names.key_changes, record.key_id)
            await pipe.execute()
    return [r.key_id for r in records]


async def republish_all(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames) -> int:
    """Write every key's record to Redis again, e.g. after Redis lost its data.

    Records are only SET, not announced: each change was announced when it was made,
    and announcing every key at once would empty every proxy's cache together.
    """
    count = 0
    async with pool.acquire() as conn, conn.transaction():
        cursor = conn.cursor(_RECORD_SQL + " ORDER BY k.key_id", prefetch=_REPUBLISH_CHUNK)
        async with redis.pipeline(transaction=False) as pipe:
            async for row in cursor:
                record = _record(row)
                pipe.set(names.key_record(record.key_id), record.encode())
                count += 1
                if count % _REPUBLISH_CHUNK == 0:
                    await pipe.execute()
            await pipe.execute()
    log.info("key records republished count=%d", count)
    return count


async def get_key(pool: asyncpg.Pool, account_id: uuid.UUID, key_id: str) -> KeyInfo:
    """One key of the account; a key of another account is not found."""
    if not KEY_ID_SHAPE.match(key_id):
        raise NotFound("key not found")
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1 AND account_id = $2",  # noqa: S608
        key_id, account_id)
    if row is None:
        raise NotFound("key not found")
    return KeyInfo.from_row(row)


_UPDATABLE = ("name", "disabled", "credit_limit_micros", "limit_reset", "expires_at")


async def update_key(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, account_id: uuid.UUID,
    key_id: str, changes: dict[str, Any],
) -> KeyInfo:
    """Change a key's name, disabled flag, credit limit, reset period or expiry (values
    already validated; ``None`` clears) and republish it. Usage is never reset."""
    if not KEY_ID_SHAPE.match(key_id):
        raise NotFound("key not found")
    fields = [f for f in _UPDATABLE if f in changes]
    sets = ", ".join(f"{f} = ${i + 3}" for i, f in enumerate(fields)) or "name = name"
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE api_keys SET {sets} WHERE key_id = $1 AND account_id = $2 "  # noqa: S608
            f"AND status = 'active' RETURNING {_COLUMNS}",
            key_id, account_id, *(changes[f] for f in fields))
        if row is None:
            raise NotFound("key not found")
        info = KeyInfo.from_row(row)
        await publish_keys(conn, redis, names, key_id=key_id)
    log.info("key updated key_id=%s fields=%s", key_id, ",".join(fields))
    return info
