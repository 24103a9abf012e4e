"""Daily usage rollups (``usage_daily``): per account x UTC day x key x model, the
requests, errors, tokens of each kind and cost; and per account x day x upstream
provider (``usage_daily_providers``), the requests it received, first and last. Owns
the SQL that keeps them and the queries the dashboard reads them with.

Kept by ingest in the same statement that inserts the usage rows: ``ROLLUP_CTE`` is a
data-modifying CTE over that statement's ``ins`` (the rows ``INSERT ... ON CONFLICT DO
NOTHING RETURNING`` actually inserted), so a redelivered batch adds nothing and a rollup
commits or rolls back with its rows. The batch is grouped first (one upsert per group,
in key order so concurrent consumers lock rollup rows in the same order). Rollups hold
no IP address and no request id. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date
from typing import TypeAlias

import asyncpg

# The columns ``ins`` must return for this CTE (usage_logs adds them to RETURNING).
RETURNING = ("received_at", "account_id", "key_id", "served_model", "requested_model",
             "outcome", "prompt_tokens", "completion_tokens", "cached_tokens",
             "reasoning_tokens", "cache_write_tokens", "cost_micros", "provider")
_SUMS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
         "cache_write_tokens", "cost_micros")
_KEY = ("account_id", "day", "key_id", "model")

# Built from the constant column lists above, never from input.
ROLLUP_CTE = (
    "rollup AS (INSERT INTO usage_daily (account_id, day, key_id, model, requests, "  # noqa: S608
    f"errors, {', '.join(_SUMS)}) "
    "SELECT account_id, (received_at AT TIME ZONE 'UTC')::date, coalesce(key_id, ''), "
    "coalesce(served_model, requested_model, ''), count(*), "
    "count(*) FILTER (WHERE outcome <> 'ok'), "
    + ", ".join(f"sum({c})" for c in _SUMS)
    + " FROM ins WHERE account_id IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
    f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET "
    "requests = usage_daily.requests + EXCLUDED.requests, "
    "errors = usage_daily.errors + EXCLUDED.errors, "
    + ", ".join(f"{c} = usage_daily.{c} + EXCLUDED.{c}" for c in _SUMS)
    + " RETURNING 1), "
    # Per account x day x provider (usage_daily_providers): who received the requests.
    "provider_rollup AS (INSERT INTO usage_daily_providers (account_id, day, provider, "
    "requests, first_at, last_at) "
    "SELECT account_id, (received_at AT TIME ZONE 'UTC')::date, provider, count(*), "
    "min(received_at), max(received_at) FROM ins "
    "WHERE account_id IS NOT NULL AND provider IS NOT NULL "
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 "
    "ON CONFLICT (account_id, day, provider) DO UPDATE SET "
    "requests = usage_daily_providers.requests + EXCLUDED.requests, "
    "first_at = least(usage_daily_providers.first_at, EXCLUDED.first_at), "
    "last_at = greatest(usage_daily_providers.last_at, EXCLUDED.last_at) RETURNING 1)"
)


@dataclass(frozen=True, slots=True)
class Filters:
    """What a usage view selects: days from ``since`` to ``until`` inclusive (UTC),
    optionally one key and one model."""

    since: date
    until: date
    key_id: str | None = None
    model: str | None = None

    def where(self) -> tuple[str, list[object]]:
        """A WHERE clause (after the account, $1) and its arguments, from $2 on."""
        clauses = ["account_id = $1", "day BETWEEN $2 AND $3"]
        args: list[object] = [self.since, self.until]
        if self.key_id is not None:
            args.append(self.key_id)
            clauses.append(f"key_id = ${len(args) + 1}")
        if self.model is not None:
            args.append(self.model)
            clauses.append(f"model = ${len(args) + 1}")
        return " AND ".join(clauses), args


@dataclass(frozen=True, slots=True)
class Day:
    day: date
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class ModelTotal:
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost_micros: int


Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection


async def per_day(conn: Conn, account_id: uuid.UUID, filters: Filters) -> list[Day]:
    """One entry per day of the range, oldest first; days without use are zeros."""
    where, args = filters.where()
    rows = await conn.fetch(
        "WITH u AS (SELECT day, sum(requests) AS requests, sum(errors) AS errors, "  # noqa: S608
        "sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion, "
        f"sum(cost_micros) AS cost FROM usage_daily WHERE {where} GROUP BY day) "
        "SELECT d::date AS day, coalesce(u.requests, 0) AS requests, "
        "coalesce(u.errors, 0) AS errors, coalesce(u.prompt, 0) AS prompt, "
        "coalesce(u.completion, 0) AS completion, coalesce(u.cost, 0) AS cost "
        "FROM generate_series($2::date, $3::date, interval '1 day') AS d "
        "LEFT JOIN u ON u.day = d::date ORDER BY 1", account_id, *args)
    return [Day(r["day"], int(r["requests"]), int(r["errors"]), int(r["prompt"]),
                int(r["completion"]), int(r["cost"])) for r in rows]


async def per_model(conn: Conn, account_id: uuid.UUID, filters: Filters) -> list[ModelTotal]:
    """Totals per model over the range, the most expensive first."""
    where, args = filters.where()
    rows = await conn.fetch(
        "SELECT model, sum(requests) AS requests, sum(prompt_tokens) AS prompt, "  # noqa: S608
        "sum(completion_tokens) AS completion, sum(reasoning_tokens) AS reasoning, "
        "sum(cached_tokens) AS cached, sum(cost_micros) AS cost "
        f"FROM usage_daily WHERE {where} GROUP BY model ORDER BY cost DESC, model",
        account_id, *args)
    return [ModelTotal(r["model"], int(r["requests"]), int(r["prompt"]),
                       int(r["completion"]), int(r["reasoning"]), int(r["cached"]),
                       int(r["cost"])) for r in rows]


async def totals(conn: Conn, account_id: uuid.UUID, since: date, until: date
                 ) -> tuple[int, int]:
    """(requests, cost in micro-dollars) of the account over the days, inclusive."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(requests), 0) AS requests, coalesce(sum(cost_micros), 0) "
        "AS cost FROM usage_daily WHERE account_id = $1 AND day BETWEEN $2 AND $3",
        account_id, since, until)
    assert row is not None
    return int(row["requests"]), int(row["cost"])


async def choices(conn: Conn, account_id: uuid.UUID, since: date
                  ) -> tuple[list[str], list[str]]:
    """The keys and models the account used since ``since``: the filters' options."""
    rows = await conn.fetch(
        "SELECT DISTINCT key_id, model FROM usage_daily WHERE account_id = $1 "
        "AND day >= $2", account_id, since)
    return (sorted({r["key_id"] for r in rows if r["key_id"]}),
            sorted({r["model"] for r in rows if r["model"]}))


@dataclass(frozen=True, slots=True)
class KeyUse:
    last_day: date
    requests: int
    cost_micros: int


async def per_key(conn: Conn, account_id: uuid.UUID, since: date) -> dict[str, KeyUse]:
    """key id -> the last day it was used, its requests and cost, since ``since``."""
    rows = await conn.fetch(
        "SELECT key_id, max(day) AS last, sum(requests) AS requests, sum(cost_micros) AS cost "
        "FROM usage_daily WHERE account_id = $1 AND day >= $2 GROUP BY key_id",
        account_id, since)
    return {r["key_id"]: KeyUse(r["last"], int(r["requests"]), int(r["cost"])) for r in rows}
