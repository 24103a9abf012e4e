"""Rows an account leaves behind, written straight to Postgres for the export tests."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from control_plane.policy import versions


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


async def payment_rows(pool: asyncpg.Pool, account_id: uuid.UUID, user_id: uuid.UUID,
                       now: datetime) -> None:
    """One of each: consent choice, policy notice, Stripe customer, top-up, Stripe event
    and e-mail (the sections schema_version 2 added)."""
    await pool.execute(
        "INSERT INTO consent_records (account_id, purpose, granted, source, policy_version)"
        " VALUES ($1, 'analytics', true, 'banner', '2026-04')", account_id)
    async with pool.acquire() as conn:
        await versions.sync(conn, versions.latest().version)  # as the web role's start does
    await pool.execute(
        "INSERT INTO policy_notices (user_id, version) VALUES ($1, '2026-04') "
        "ON CONFLICT DO NOTHING", user_id)
    await pool.execute(
        "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, $2)",
        account_id, f"cus_{account_id.hex}")
    await pool.execute(
        "INSERT INTO billing_topups (payment_intent_id, account_id, request_id, "
        "credit_cents, fee_cents, amount_cents, currency) VALUES ($1, $2, $3, 1000, 59, "
        "1059, 'usd')", f"pi_x{account_id.hex}", account_id, uuid.uuid4())
    ledger_id = await pool.fetchval(
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, reference, created_at) "
        "VALUES ($1, 'topup', 10000000, $2, $3) RETURNING id", account_id,
        f"pi_x{account_id.hex}", now)
    await pool.execute(
        "INSERT INTO billing_events (event_id, type, ledger_id) "
        "VALUES ($1, 'payment_intent.succeeded', $2)", f"evt_{account_id.hex}", ledger_id)
    await pool.execute(
        "INSERT INTO email_outbox (account_id, to_address, kind, template, subject, body, "
        "next_attempt_at) VALUES ($1, 'someone@example.test', 'transactional', "
        "'signin_notice', 'New sign-in', 'body-not-exported', NULL)", account_id)
