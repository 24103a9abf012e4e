"""Accounts: creating them and looking them up.

Shared by the admin API and the CLI. Raises the control plane's errors
(``InvalidInput``, ``NotFound``). Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from control_plane.errors import InvalidInput, NotFound

MAX_NAME_LEN = 200


@dataclass(frozen=True, slots=True)
class Account:
    id: uuid.UUID
    name: str
    status: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
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


async def create_account(pool: asyncpg.Pool, name: object) -> Account:
    row = await pool.fetchrow(
        "INSERT INTO accounts (id, name) VALUES ($1, $2) RETURNING id, name, status, created_at",
        uuid.uuid4(),
        clean_name(name, "account"),
    )
    assert row is not None
    return Account(**dict(row))


async def get_account(conn: asyncpg.Pool | asyncpg.Connection, account_id: str) -> Account:
    row = await conn.fetchrow(
        "SELECT id, name, status, created_at FROM accounts WHERE id = $1",
        parse_account_id(account_id),
    )
    if row is None:
        raise NotFound("account not found")
    return Account(**dict(row))
