"""Accounts: creating them and looking them up.

Shared by the admin API and the CLI. A new account's admission state (zero balance,
active, no limits) is written to Redis inside the creating transaction, so the proxy
never sees an account without one. Raises the control plane's errors
(``InvalidInput``, ``NotFound``). Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from control_plane.errors import InvalidInput, NotFound
from control_plane.publisher import AccountState, decode_limits, publish_state
from shared.redis_names import RedisNames

MAX_NAME_LEN = 200


@dataclass(frozen=True, slots=True)
class Account:
    id: uuid.UUID
    name: str
    status: str
    created_at: datetime
    limits: dict[str, int]

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Account:
        return cls(row["id"], row["name"], row["status"], row["created_at"],
                   decode_limits(row["limits"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "limits": self.limits,
        }


def clean_name(value: object, what: str) -> str:
    """A display name: a non-empty string of printable characters, trimmed."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} name must be a non-empty string")
    name = value.strip()
    if len(name) > MAX_NAME_LEN:
        raise InvalidInput(f"{what} name must be at most {MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise InvalidInput(f"{what} name must not contain control characters")
    return name


def parse_account_id(value: str) -> uuid.UUID:
    """An account id from a URL or command line; an id that cannot exist is not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("account not found") from None


ACCOUNT_COLUMNS = "id, name, status, created_at, limits::text AS limits"


async def create_account(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, name: object
) -> Account:
    """A new active account with a zero balance, published to Redis before it commits."""
    clean = clean_name(name, "account")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO accounts (id, name) VALUES ($1, $2) RETURNING {ACCOUNT_COLUMNS}",  # noqa: S608
            uuid.uuid4(), clean,
        )
        assert row is not None
        account = Account.from_row(row)
        await publish_state(redis, names, AccountState(account.id, "active", {}, 0, 0))
    return account


async def get_account(conn: asyncpg.Pool | asyncpg.Connection, account_id: str) -> Account:
    row = await conn.fetchrow(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1",  # noqa: S608
        parse_account_id(account_id),
    )
    if row is None:
        raise NotFound("account not found")
    return Account.from_row(row)


async def is_restricted(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID
                        ) -> bool:
    """Whether the account asked to restrict processing (issue 14); an account that is
    gone counts as restricted (what reads this must fail closed)."""
    value = await conn.fetchval(
        "SELECT restricted_at IS NOT NULL FROM accounts WHERE id = $1", account_id)
    return value is not False
