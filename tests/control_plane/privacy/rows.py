"""Rows an account leaves behind, written straight to Postgres for the export tests."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg


async def usage_rows(pool: asyncpg.Pool, account_id: uuid.UUID, key_id: str | None,
                     count: int, newest: datetime) -> list[uuid.UUID]:
    """``count`` request rows, one millisecond apart, ending at ``newest``."""
    rows = await pool.fetch(
        "INSERT INTO usage_logs (id, received_at, done_at, account_id, key_id, endpoint, "
        "stream, status, outcome, prompt_tokens, completion_tokens, cached_tokens, "
        "reasoning_tokens, usage_source, cost_micros, latency_ms, node_id, schema_version, "
        "source_ip) SELECT gen_random_uuid(), $2::timestamptz - g * interval '1 millisecond', "
        "$2::timestamptz - g * interval '1 millisecond' + interval '1 second', $1, $3, "
        "'/v1/chat/completions', false, 200, 'ok', 10, 20, 0, 0, 'upstream', 5, 12.5, "
        "'node-a', 1, '203.0.113.7' FROM generate_series(1, $4) g RETURNING id",
        account_id, newest, key_id, count)
    return [r["id"] for r in rows]


async def billing_rows(pool: asyncpg.Pool, account_id: uuid.UUID, day: datetime,
                       reference: str) -> None:
    await pool.execute(
        "INSERT INTO usage_daily VALUES ($1, $2, 'k', 'm', 3, 0, 30, 60, 0, 0, 0, 15)",
        account_id, day.date())
    await pool.execute(
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, reference) "
        "VALUES ($1, 'topup', 5000000, $2)", account_id, reference)
    await pool.execute(
        "INSERT INTO audit_log (actor, action, target, account_id) "
        "VALUES ('admin', 'credit.grant', $1, $2)", f"account:{account_id}", account_id)
