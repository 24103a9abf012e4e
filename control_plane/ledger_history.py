"""The dashboard's read of an account's credit ledger: its top-ups, refunds and
adjustments, newest first (usage by day comes from the daily rollups, not from the
debits). Never imports ``proxy``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

HISTORY_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Entry:
    at: datetime
    kind: str
    amount_micros: int
    reference: str | None


async def credits(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                  limit: int = HISTORY_LIMIT) -> list[Entry]:
    """The latest ``limit`` entries that are not request debits (partial index)."""
    rows = await conn.fetch(
        "SELECT created_at, kind, amount_micros, reference FROM credit_ledger "
        "WHERE account_id = $1 AND kind <> 'debit' ORDER BY created_at DESC LIMIT $2",
        account_id, limit)
    return [Entry(r["created_at"], r["kind"], int(r["amount_micros"]), r["reference"])
            for r in rows]
