"""Reversals of our Stripe payments: refunds and disputes, as ledger rows of kind
``reversal``, and the pause of an account's keys while a dispute is open.

What the ledger holds for a charge is a function of what we know about it, never of
the order we learnt it in: ``target = min(refunded + disputed-and-withdrawn, credit)``
where ``refunded`` is the highest cumulative ``amount_refunded`` seen (Stripe's is
cumulative), a dispute counts while its funds are withdrawn and it is not won, and
``credit`` is what the top-up credited (refunds take credit first, the fee last: the
customer never keeps credit for money they got back, and the fee covers what Stripe
keeps). Each event (or reconciliation repair) writes one ledger row for the change
``target - what is already reversed``, under the account's ledger lock, in one
transaction with the charge's state and the Stripe event id. A re-delivered event,
or an older event arriving after a newer one, finds nothing left to change.

Disputes: facts only accumulate (funds withdrawn; an outcome, set once). While one is
withdrawn without an outcome the account is published to Redis as suspended
(``publisher._STATE_SQL``), so every proxy refuses its keys on the next request, and
the dashboard says why (``hold_notice``). Won (or funds reinstated): the debit is
credited back and the pause lifted. Lost: the debit stays and the pause is lifted —
the money is settled by the debit (a negative balance already refuses spending with
402 until it is covered), and keeping someone locked out over their bank's decision
is a lasting automated decision that a person should make (staff can suspend after a
review). Must not import ``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane import ledger
from control_plane.billing.payments import MICROS_PER_CENT, REFERENCE_PREFIX, Topup, topup_of_intent
from control_plane.publisher import load_state, publish_state
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

KIND = "reversal"
REFUNDED = "charge.refunded"
DISPUTE_EVENTS = ("charge.dispute.created", "charge.dispute.updated",
                  "charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated",
                  "charge.dispute.closed")
_OUTCOMES = {"won": "won", "lost": "lost", "warning_closed": "closed"}
MAX_ID_LEN = 100

# Stripe's reason codes, as the dashboard says them.
REASONS = {
    "fraudulent": "the cardholder's bank reports the payment as unauthorised",
    "duplicate": "the cardholder says they were charged twice",
    "product_not_received": "the cardholder says the credit was not received",
    "unrecognized": "the cardholder does not recognise the payment",
    "credit_not_processed": "the cardholder says a refund was not processed",
    "subscription_canceled": "the cardholder says they cancelled",
}


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: str  # reversed, reinstated, recorded, duplicate, unmatched, mismatch
    change_micros: int = 0  # what this call added to the ledger (negative: a debit)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN else None


def _cents(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


async def _target(conn: asyncpg.Connection, charge_id: str, credit_cents: int) -> int:
    row = await conn.fetchrow(
        "SELECT c.refunded_cents + coalesce((SELECT sum(d.amount_cents) FROM billing_disputes d "
        "WHERE d.charge_id = c.charge_id AND d.withdrawn "
        "AND coalesce(d.outcome, 'lost') = 'lost'), 0) AS owed "
        "FROM billing_charges c WHERE c.charge_id = $1", charge_id)
    assert row is not None
    return min(int(row["owed"]), credit_cents) * MICROS_PER_CENT


Change = Callable[[asyncpg.Connection], Awaitable[None]]


async def _apply(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, topup: Topup,
                 charge_id: str, *, cause: str, event_id: str | None, event_type: str,
                 change: Change) -> Applied:
    """Record what changed about a charge and bring the ledger to its target."""
    account = topup.account_id
    applied = Applied("recorded")
    async with ledger.account_lock(pool, account) as conn:
        async with conn.transaction():
            fresh = event_id is None or await conn.fetchval(
                "INSERT INTO billing_events (event_id, type) VALUES ($1, $2) "
                "ON CONFLICT (event_id) DO NOTHING RETURNING true", event_id, event_type)
            if fresh:
                applied = await _change(conn, topup, charge_id, cause, event_id, change)
            else:
                applied = Applied("duplicate")
        if applied.change_micros:
            await ledger.drain_account(conn, redis, names, account)
        # Even for a duplicate: a delivery Stripe retries because Redis was down the
        # first time still ends with the pause (or its lifting) published.
        await _publish(conn, redis, names, account)
    if applied.change_micros:
        log.info("stripe reversal charge=%s cause=%s change_micros=%d account_id=%s",
                 charge_id, cause, applied.change_micros, account)
    return applied


async def _change(conn: asyncpg.Connection, topup: Topup, charge_id: str, cause: str,
                  event_id: str | None, change: Change) -> Applied:
    await conn.execute(
        "INSERT INTO billing_charges (charge_id, payment_intent_id, account_id) "
        "VALUES ($1, $2, $3) ON CONFLICT (charge_id) DO NOTHING",
        charge_id, topup.payment_intent_id, topup.account_id)
    row = await conn.fetchrow(
        "SELECT payment_intent_id, reversed_micros FROM billing_charges "
        "WHERE charge_id = $1 FOR UPDATE", charge_id)
    assert row is not None
    if row["payment_intent_id"] != topup.payment_intent_id:
        log.error("stripe charge names another payment charge=%s", charge_id)
        return Applied("mismatch")
    await change(conn)
    delta = await _target(conn, charge_id, topup.credit_cents) - row["reversed_micros"]
    if delta == 0:
        return Applied("recorded")
    entry, _ = await ledger.insert_credit(
        conn, topup.account_id, KIND, -delta,
        f"{REFERENCE_PREFIX}{charge_id}:{cause}")
    await conn.execute(
        "UPDATE billing_charges SET reversed_micros = reversed_micros + $2, "
        "updated_at = now() WHERE charge_id = $1", charge_id, delta)
    if event_id is not None:
        await conn.execute("UPDATE billing_events SET ledger_id = $2 WHERE event_id = $1",
                           event_id, entry.id)
    return Applied("reversed" if delta > 0 else "reinstated", -delta)


async def _publish(conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames,
                   account: uuid.UUID) -> None:
    state = await load_state(conn, account)
    if state is None:
        return
    try:
        await publish_state(redis, names, state)
    except RedisError as e:  # the next delivery or change publishes it again
        log.warning("account state not published account_id=%s: %s", account,
                    type(e).__name__)


async def _topup_of(pool: asyncpg.Pool, intent: object, currency: object
                    ) -> tuple[Topup | None, str | None]:
    intent_id = _text(intent)
    topup = None if intent_id is None else await topup_of_intent(pool, intent_id)
    if topup is None:
        return None, "unmatched"
    if currency is not None and currency != topup.currency:
        return topup, "mismatch"
    return topup, None


async def refunded(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                   charge: dict[str, Any], *, event_id: str | None, event_type: str,
                   cause: str) -> Applied:
    """A Charge (``charge.refunded``'s object, or one reconciliation built from Stripe's
    refund list): its cumulative ``amount_refunded`` and the refunds it lists."""
    charge_id = _text(charge.get("id"))
    total = _cents(charge.get("amount_refunded"))
    topup, problem = await _topup_of(pool, charge.get("payment_intent"),
                                     charge.get("currency"))
    if topup is None or charge_id is None or total is None:
        return await _unhandled(pool, event_id, event_type, problem or "mismatch", charge_id)
    if problem is not None or total > topup.amount_cents:
        return await _unhandled(pool, event_id, event_type, "mismatch", charge_id)
    listed = charge.get("refunds")
    items = listed.get("data") if isinstance(listed, dict) else None
    refunds = [(r["id"], r["amount"]) for r in items or ()
               if isinstance(r, dict) and _text(r.get("id")) and _cents(r.get("amount"))
               and r.get("status", "succeeded") == "succeeded"]

    async def change(conn: asyncpg.Connection) -> None:
        if refunds:
            await conn.executemany(
                "INSERT INTO billing_refunds (refund_id, charge_id, amount_cents) "
                "VALUES ($1, $2, $3) ON CONFLICT (refund_id) DO NOTHING",
                [(rid, charge_id, amount) for rid, amount in refunds])
        await conn.execute(
            "UPDATE billing_charges SET refunded_cents = least($3::bigint, greatest("
            "refunded_cents, $2::bigint, (SELECT coalesce(sum(amount_cents), 0) "
            "FROM billing_refunds WHERE charge_id = $1))) WHERE charge_id = $1",
            charge_id, total, topup.amount_cents)

    return await _apply(pool, redis, names, topup, charge_id, cause=cause,
                        event_id=event_id, event_type=event_type, change=change)


async def disputed(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                   dispute: dict[str, Any], *, event_id: str, event_type: str) -> Applied:
    """A Dispute event: what it says is added to what we knew (see the module doc)."""
    dispute_id, charge_id = _text(dispute.get("id")), _text(dispute.get("charge"))
    amount = _cents(dispute.get("amount"))
    status = _text(dispute.get("status")) or "unknown"
    topup, problem = await _topup_of(pool, dispute.get("payment_intent"),
                                     dispute.get("currency"))
    if topup is None or dispute_id is None or charge_id is None or amount is None:
        return await _unhandled(pool, event_id, event_type, problem or "mismatch", charge_id)
    if problem is not None:
        return await _unhandled(pool, event_id, event_type, problem, charge_id)
    inquiry = status.startswith("warning_")
    withdrawn = event_type == "charge.dispute.funds_withdrawn" or (
        not inquiry and event_type != "charge.dispute.funds_reinstated")
    outcome = "won" if event_type == "charge.dispute.funds_reinstated" \
        else _OUTCOMES.get(status)
    reason = _text(dispute.get("reason")) or "general"

    async def change(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO billing_disputes (dispute_id, charge_id, account_id, amount_cents, "
            "reason, status, withdrawn, outcome, closed_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8::text IS NULL THEN NULL "
            "ELSE now() END) ON CONFLICT (dispute_id) DO UPDATE SET "
            "withdrawn = billing_disputes.withdrawn OR EXCLUDED.withdrawn, "
            "outcome = coalesce(billing_disputes.outcome, EXCLUDED.outcome), "
            "closed_at = coalesce(billing_disputes.closed_at, EXCLUDED.closed_at), "
            "status = CASE WHEN billing_disputes.outcome IS NULL THEN EXCLUDED.status "
            "ELSE billing_disputes.status END",
            dispute_id, charge_id, topup.account_id, amount, reason, status, withdrawn,
            outcome)

    return await _apply(pool, redis, names, topup, charge_id, cause=event_id,
                        event_id=event_id, event_type=event_type, change=change)


async def _unhandled(pool: asyncpg.Pool, event_id: str | None, event_type: str,
                     outcome: str, charge_id: str | None) -> Applied:
    log.warning("stripe reversal not applied outcome=%s charge=%s type=%s", outcome,
                charge_id, event_type)
    if event_id is not None:
        await pool.execute("INSERT INTO billing_events (event_id, type) VALUES ($1, $2) "
                           "ON CONFLICT (event_id) DO NOTHING", event_id, event_type)
    return Applied(outcome)


@dataclass(frozen=True, slots=True)
class Hold:
    """An open dispute pausing the account's keys, as the dashboard shows it."""

    dispute_id: str
    amount_cents: int
    reason: str
    opened_at: datetime

    @property
    def explanation(self) -> str:
        return REASONS.get(self.reason, "the cardholder's bank opened a dispute")


async def holds(pool: asyncpg.Pool, account: uuid.UUID) -> list[Hold]:
    rows = await pool.fetch(
        "SELECT dispute_id, amount_cents, reason, opened_at FROM billing_disputes "
        "WHERE account_id = $1 AND withdrawn AND outcome IS NULL ORDER BY opened_at",
        account)
    return [Hold(**dict(r)) for r in rows]
