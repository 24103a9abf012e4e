"""Reading an account's usage: recent records and totals over a time range.

Shared by the admin API and the CLI. Never returns anything an event does not carry
(so never content). Never imports ``proxy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from control_plane.accounts import get_account
from control_plane.errors import InvalidInput

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
DEFAULT_RANGE = timedelta(days=30)

_RECORDS = """
    SELECT id, received_at, coalesce(served_model, requested_model) AS model, endpoint,
           status, outcome, prompt_tokens, completion_tokens, cached_tokens,
           reasoning_tokens, cost_micros, latency_ms
    FROM usage_logs
    WHERE account_id = $1 AND received_at >= $2 AND received_at < $3
    ORDER BY received_at DESC, id DESC
    LIMIT $4
"""
_TOTALS = """
    SELECT count(*) AS requests,
           coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
           coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
           coalesce(sum(cost_micros), 0)::bigint AS cost_micros
    FROM usage_logs
    WHERE account_id = $1 AND received_at >= $2 AND received_at < $3
"""


@dataclass(frozen=True, slots=True)
class UsageReport:
    records: list[dict[str, Any]]
    totals: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "totals": self.totals}


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidInput("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def parse_time(raw: str | None, what: str) -> datetime | None:
    """An ISO 8601 time; one without a zone is taken as UTC."""
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(f"{what} must be an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def account_usage(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    limit: int = DEFAULT_LIMIT,
    since: datetime | None = None,
    until: datetime | None = None,
) -> UsageReport:
    """The newest ``limit`` records and the totals in [since, until): by default the
    last 30 days."""
    until = until or datetime.now(UTC) + timedelta(seconds=1)
    since = since or until - DEFAULT_RANGE
    if since >= until:
        raise InvalidInput("since must be before until")
    async with pool.acquire() as conn:
        account = await get_account(conn, account_id)
        rows = await conn.fetch(_RECORDS, account.id, since, until, limit)
        totals = await conn.fetchrow(_TOTALS, account.id, since, until)
    assert totals is not None
    records = [
        {
            **dict(row),
            "id": str(row["id"]),
            "received_at": row["received_at"].isoformat(),
            "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        }
        for row in rows
    ]
    return UsageReport(
        records,
        {
            **dict(totals),
            "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"],
            "since": since.isoformat(),
            "until": until.isoformat(),
        },
    )
