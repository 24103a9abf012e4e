"""What an account's API reports about spending: per-key usage by period, credits,
one request's metadata, and daily activity per model. Reads ``usage_logs`` (kept 30
days, so usage figures cover at most that) and the credit ledger. Never imports
``proxy``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from control_plane.errors import NotFound
from shared.pricing import MICROS_PER_DOLLAR

ACTIVITY_DAYS = 30


def dollars(micros: int | None) -> float | None:
    return None if micros is None else micros / MICROS_PER_DOLLAR


def period_starts(now: datetime) -> dict[str, datetime]:
    """UTC midnight today, Monday of this week, the first of this month."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"daily": day, "weekly": day - timedelta(days=day.weekday()),
            "monthly": day.replace(day=1)}


async def key_usage(conn: asyncpg.Pool | asyncpg.Connection, key_ids: list[str],
                    now: datetime) -> dict[str, dict[str, int]]:
    """key id -> micro-dollars spent in total (retained logs), today, this week, month."""
    starts = period_starts(now)
    rows = await conn.fetch(
        "SELECT key_id, sum(cost_micros) AS total, "
        "coalesce(sum(cost_micros) FILTER (WHERE received_at >= $2), 0) AS daily, "
        "coalesce(sum(cost_micros) FILTER (WHERE received_at >= $3), 0) AS weekly, "
        "coalesce(sum(cost_micros) FILTER (WHERE received_at >= $4), 0) AS monthly "
        "FROM usage_logs WHERE key_id = ANY($1::text[]) AND received_at >= $5 "
        "GROUP BY key_id",
        key_ids, starts["daily"], starts["weekly"], starts["monthly"],
        now - timedelta(days=ACTIVITY_DAYS + 1))
    found = {k: {"total": 0, "daily": 0, "weekly": 0, "monthly": 0} for k in key_ids}
    for r in rows:
        found[r["key_id"]] = {n: int(r[n]) for n in ("total", "daily", "weekly", "monthly")}
    return found


async def credits(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID
                  ) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT coalesce(sum(amount_micros) FILTER (WHERE kind <> 'debit'), 0) AS credited, "
        "coalesce(-sum(amount_micros) FILTER (WHERE kind = 'debit'), 0) AS used "
        "FROM credit_ledger WHERE account_id = $1", account_id)
    assert row is not None
    return {"total_credits": dollars(int(row["credited"])),
            "total_usage": dollars(int(row["used"]))}


def _uuid7_time(request_id: uuid.UUID) -> datetime:
    return datetime.fromtimestamp((request_id.int >> 80) / 1000, UTC)


async def generation(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                     raw_id: str | None) -> dict[str, Any]:
    """One request's metadata; a request of another account is not found."""
    try:
        request_id = uuid.UUID(raw_id or "")
    except ValueError:
        raise NotFound("generation not found") from None
    # The id is a UUIDv7: its time bounds received_at, so only one partition is read.
    at = _uuid7_time(request_id)
    row = await conn.fetchrow(
        "SELECT * FROM usage_logs WHERE id = $1 AND account_id = $2 "
        "AND received_at BETWEEN $3 AND $4",
        request_id, account_id, at - timedelta(minutes=5), at + timedelta(minutes=5))
    if row is None:
        raise NotFound("generation not found")
    return {
        "id": str(row["id"]), "created_at": row["received_at"].isoformat(),
        "model": row["served_model"] or row["requested_model"],
        "requested_model": row["requested_model"], "provider_name": row["provider"],
        "api_key": row["key_id"], "streamed": row["stream"],
        "cancelled": row["outcome"] == "client_cancelled", "status": row["status"],
        "outcome": row["outcome"],
        "tokens_prompt": row["prompt_tokens"], "tokens_completion": row["completion_tokens"],
        "native_tokens_prompt": row["prompt_tokens"],
        "native_tokens_completion": row["completion_tokens"],
        "native_tokens_cached": row["cached_tokens"],
        "native_tokens_reasoning": row["reasoning_tokens"],
        "usage_source": row["usage_source"],
        "total_cost": dollars(row["cost_micros"]), "cost_micros": row["cost_micros"],
        "latency": row["latency_ms"], "time_to_first_token": row["ttft_ms"],
        "generation_time": None if row["ttft_ms"] is None
        else row["latency_ms"] - row["ttft_ms"],
    }


async def activity(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                   now: datetime) -> list[dict[str, Any]]:
    """Per UTC day and model, the last 30 days: requests, tokens, cost."""
    since = period_starts(now)["daily"] - timedelta(days=ACTIVITY_DAYS - 1)
    rows = await conn.fetch(
        "SELECT (received_at AT TIME ZONE 'UTC')::date AS day, "
        "coalesce(served_model, requested_model, '') AS model, "
        "min(provider) AS provider, count(*) AS requests, "
        "sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion, "
        "sum(reasoning_tokens) AS reasoning, sum(cached_tokens) AS cached, "
        "sum(cost_micros) AS cost FROM usage_logs "
        "WHERE account_id = $1 AND received_at >= $2 GROUP BY 1, 2 ORDER BY 1 DESC, 2",
        account_id, since)
    return [{"date": r["day"].isoformat(), "model": r["model"], "provider_name": r["provider"],
             "requests": int(r["requests"]), "prompt_tokens": int(r["prompt"]),
             "completion_tokens": int(r["completion"]),
             "reasoning_tokens": int(r["reasoning"]), "cached_tokens": int(r["cached"]),
             "usage": dollars(int(r["cost"])), "cost_micros": int(r["cost"])} for r in rows]
