"""Billing rows in Postgres: an account's Stripe Customer, the top-ups we created, the
Stripe events that changed the ledger, and ``credit_payment``, the ONE idempotent
function every path that learns of a succeeded payment goes through (the webhook now;
the page's return path and reconciliation later).

Idempotency: the ledger row's reference is the PaymentIntent id (one credit per
payment, whoever reports it first) and the event id is stored in the same transaction
as the ledger row (a re-delivered event changes nothing). Must not import
``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from control_plane import ledger
from shared.pricing import MICROS_PER_DOLLAR
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

MICROS_PER_CENT = MICROS_PER_DOLLAR // 100
REFERENCE_PREFIX = "stripe:"


@dataclass(frozen=True, slots=True)
class Topup:
    payment_intent_id: str
    account_id: uuid.UUID
    request_id: uuid.UUID
    credit_cents: int
    fee_cents: int
    amount_cents: int
    currency: str


_TOPUP_COLUMNS = ("payment_intent_id, account_id, request_id, credit_cents, fee_cents, "
                  "amount_cents, currency")


async def customer_of(pool: asyncpg.Pool, account: uuid.UUID) -> str | None:
    value: str | None = await pool.fetchval(
        "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1", account)
    return value


async def save_customer(pool: asyncpg.Pool, account: uuid.UUID, customer_id: str) -> str:
    """Store the account's Customer; if another request stored one first, that one."""
    await pool.execute(
        "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, $2) "
        "ON CONFLICT (account_id) DO NOTHING", account, customer_id)
    stored = await customer_of(pool, account)
    assert stored is not None
    return stored


async def topup_for_request(pool: asyncpg.Pool, account: uuid.UUID, request_id: uuid.UUID
                            ) -> Topup | None:
    row = await pool.fetchrow(
        f"SELECT {_TOPUP_COLUMNS} FROM billing_topups "  # noqa: S608
        "WHERE account_id = $1 AND request_id = $2", account, request_id)
    return None if row is None else Topup(**dict(row))


async def topup_of_intent(pool: asyncpg.Pool, intent_id: str) -> Topup | None:
    row = await pool.fetchrow(
        f"SELECT {_TOPUP_COLUMNS} FROM billing_topups "  # noqa: S608
        "WHERE payment_intent_id = $1", intent_id)
    return None if row is None else Topup(**dict(row))


async def save_topup(pool: asyncpg.Pool, topup: Topup) -> None:
    # The same request id always yields the same PaymentIntent (Stripe's idempotency
    # key), so a conflict here is the same row written by a concurrent retry.
    await pool.execute(
        f"INSERT INTO billing_topups ({_TOPUP_COLUMNS}) "  # noqa: S608
        "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        topup.payment_intent_id, topup.account_id, topup.request_id, topup.credit_cents,
        topup.fee_cents, topup.amount_cents, topup.currency)


async def event_seen(pool: asyncpg.Pool, event_id: str) -> bool:
    return bool(await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM billing_events WHERE event_id = $1)", event_id))


@dataclass(frozen=True, slots=True)
class PaymentCredit:
    credited: bool  # False: this payment (or this event) was already in the ledger
    ledger_id: int
    credit_micros: int


async def credit_payment(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, topup: Topup,
    *, event_id: str | None, event_type: str,
) -> PaymentCredit:
    """Credit a succeeded top-up exactly once, recording the Stripe event with it."""

    async def record(conn: asyncpg.Connection, ledger_id: int) -> None:
        if event_id is not None:
            await conn.execute(
                "INSERT INTO billing_events (event_id, type, ledger_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (event_id) DO NOTHING", event_id, event_type, ledger_id)

    micros = topup.credit_cents * MICROS_PER_CENT
    done = await ledger.credit(pool, redis, names, str(topup.account_id), "topup", micros,
                               REFERENCE_PREFIX + topup.payment_intent_id, within=record)
    return PaymentCredit(done.created, done.entry.id, micros)


async def record_event(pool: asyncpg.Pool, event_id: str, event_type: str) -> bool:
    """Store an event that changes no ledger row; False if it was stored already."""
    status: str = await pool.execute(
        "INSERT INTO billing_events (event_id, type) VALUES ($1, $2) "
        "ON CONFLICT (event_id) DO NOTHING", event_id, event_type)
    return status.endswith(" 1")
