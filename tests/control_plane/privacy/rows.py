"""Rows an account leaves behind, written straight to Postgres for the export tests."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from control_plane.policy import versions
from control_plane.privacy import requests


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
        "INSERT INTO usage_daily_providers VALUES ($1, $2, 'mock-provider', 3, $3, $3)",
        account_id, day.date(), day)
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


async def account_rows(pool: asyncpg.Pool, account_id: uuid.UUID, user_id: uuid.UUID,
                       now: datetime) -> dict[str, str]:
    """One of each row schema_version 3 added: a staff role, an e-mail change, a paid
    top-up with its history, a charge with a refund and a dispute, auto top-up with its
    trigger and a charge, a staff correction request's details and an objection. The
    values that name this account only, by section."""
    tag = account_id.hex
    marks = {"email_changes": f"new-{tag}@example.test", "billing_charges": f"ch_{tag}",
             "billing_refunds": f"re_{tag}", "billing_disputes": f"dp_{tag}",
             "auto_topup_settings": f"pm_{tag}", "privacy_request_details": f"words {tag}",
             "billing_topups": f"https://pay.stripe.com/receipts/{tag}"}
    intent = f"pi_h{tag}"
    await pool.execute("INSERT INTO staff_roles (user_id, role, granted_by) "
                       "VALUES ($1, 'support', 'admin')", user_id)
    await pool.execute(
        "INSERT INTO email_changes (id, user_id, account_id, new_email, created_at, "
        "expires_at) VALUES ($1, $2, $3, $4, $5, $5::timestamptz + interval '1 day')",
        uuid.uuid4(), user_id, account_id, marks["email_changes"], now)
    await pool.execute(
        "INSERT INTO billing_topups (payment_intent_id, account_id, request_id, "
        "credit_cents, fee_cents, amount_cents, currency, status, card_brand, card_last4, "
        "receipt_url, updated_at) VALUES ($1, $2, $3, 1000, 59, 1059, 'usd', 'succeeded', "
        "'visa', '4242', $4, $5)", intent, account_id, uuid.uuid4(),
        marks["billing_topups"], now)
    await pool.execute("INSERT INTO billing_charges (charge_id, payment_intent_id, "
                       "account_id, refunded_cents) VALUES ($1, $2, $3, 100)",
                       marks["billing_charges"], intent, account_id)
    await pool.execute("INSERT INTO billing_refunds (refund_id, charge_id, amount_cents) "
                       "VALUES ($1, $2, 100)", marks["billing_refunds"],
                       marks["billing_charges"])
    await pool.execute(
        "INSERT INTO billing_disputes (dispute_id, charge_id, account_id, amount_cents, "
        "reason, status) VALUES ($1, $2, $3, 959, 'fraudulent', 'needs_response')",
        marks["billing_disputes"], marks["billing_charges"], account_id)
    await pool.execute(
        "INSERT INTO auto_topup_settings (account_id, amount_cents, payment_method_id, "
        "card_brand, card_last4) VALUES ($1, 2000, $2, 'visa', '4242')", account_id,
        marks["auto_topup_settings"])
    await pool.execute("INSERT INTO balance_triggers (account_id, kind, threshold_micros) "
                       "VALUES ($1, 'auto_topup', 5000000)", account_id)
    await pool.execute(
        "INSERT INTO auto_topup_charges (account_id, crossing, credit_cents, fee_cents, "
        "payment_method_id) VALUES ($1, 1, 2000, 88, $2)", account_id,
        marks["auto_topup_settings"])
    asked = await requests.record(pool, account_id, "correction", "gdpr", now, "staff")
    await pool.execute("INSERT INTO privacy_request_details (request_id, account_id, "
                       "subject, text) VALUES ($1, $2, 'name', $3)", asked.id, account_id,
                       marks["privacy_request_details"])
    await pool.execute("INSERT INTO privacy_objections (account_id, purpose, objected_at) "
                       "VALUES ($1, 'analytics', $2)", account_id, now)
    return marks
