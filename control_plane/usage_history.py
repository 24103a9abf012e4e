"""The dashboard's reads of an account's recent requests in ``usage_logs`` (kept 30
days): one page of them, newest first, by keyset (so page 500 costs what page 1 does),
and the rows of an export, read through a server-side cursor so an export of a busy
day streams in constant memory. Never selects the source IP. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

import asyncpg

from control_plane.rollups import Filters

PAGE_SIZE = 50
EXPORT_CHUNK = 2000
# What a person may see and export about each request: never the source IP.
COLUMNS = ("id", "received_at", "model", "provider", "key_id", "stream", "status",
           "outcome", "prompt_tokens", "completion_tokens", "cached_tokens",
           "reasoning_tokens", "cost_micros", "latency_ms", "ttft_ms")
_SELECT = (
    "SELECT id, received_at, coalesce(served_model, requested_model, '') AS model, "
    "coalesce(provider, '') AS provider, coalesce(key_id, '') AS key_id, stream, status, "
    "outcome, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
    "cost_micros, latency_ms, ttft_ms FROM usage_logs "
)
# The same columns with id and time already as text (ISO 8601, UTC), so an export writes
# each record as it comes, with no per-row conversion in Python.
_EXPORT_SELECT = _SELECT.replace(
    "SELECT id, received_at,",
    "SELECT id::text AS id, to_char(received_at AT TIME ZONE 'UTC', "
    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS received_at,", 1)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: strictly older than this row."""

    received_at: datetime
    id: uuid.UUID

    def token(self) -> str:
        return f"{self.received_at.timestamp():.6f}_{self.id}"

    @classmethod
    def parse(cls, raw: str | None) -> Cursor | None:
        if not raw:
            return None
        at, _, rid = raw.partition("_")
        try:
            return cls(datetime.fromtimestamp(float(at), UTC), uuid.UUID(rid))
        except (ValueError, OverflowError):
            return None


def _where(account_id: uuid.UUID, filters: Filters) -> tuple[str, list[object]]:
    start = datetime.combine(filters.since, time(), UTC)
    end = datetime.combine(filters.until, time(), UTC) + timedelta(days=1)
    clauses = ["account_id = $1", "received_at >= $2", "received_at < $3"]
    args: list[object] = [account_id, start, end]
    if filters.key_id is not None:
        args.append(filters.key_id)
        clauses.append(f"key_id = ${len(args)}")
    if filters.model is not None:
        args.append(filters.model)
        clauses.append(f"coalesce(served_model, requested_model, '') = ${len(args)}")
    return " AND ".join(clauses), args


async def recent(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                 filters: Filters, before: Cursor | None
                 ) -> tuple[list[asyncpg.Record], Cursor | None]:
    """One page, newest first, and the cursor of the next page (None at the end)."""
    where, args = _where(account_id, filters)
    if before is not None:
        args += [before.received_at, before.id]
        where += f" AND (received_at, id) < (${len(args) - 1}, ${len(args)})"
    rows = await conn.fetch(
        _SELECT + f"WHERE {where} ORDER BY received_at DESC, id DESC "  # noqa: S608
        f"LIMIT {PAGE_SIZE + 1}", *args)
    if len(rows) <= PAGE_SIZE:
        return rows, None
    last = rows[PAGE_SIZE - 1]
    return rows[:PAGE_SIZE], Cursor(last["received_at"], last["id"])


async def export(pool: asyncpg.Pool, account_id: uuid.UUID, filters: Filters
                 ) -> AsyncIterator[list[asyncpg.Record]]:
    """The selected rows, oldest first, in chunks, from a server-side cursor."""
    where, args = _where(account_id, filters)
    query = _EXPORT_SELECT + f"WHERE {where} ORDER BY received_at, id"  # noqa: S608
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(query, *args)
        while chunk := await cursor.fetch(EXPORT_CHUNK):
            yield chunk
