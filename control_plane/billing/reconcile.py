"""Reconciliation with Stripe: the job that repairs what lost webhooks left out of the
ledger, and the admin report of Stripe's totals against the ledger's.

The job (run by the ingest role, every ``reconcile_interval_s``) lists Stripe's
PaymentIntents and refunds created since its last run, less ``reconcile_lookback_s``
(the cursor is a row in Postgres), and passes each through the SAME idempotent
functions as the webhook: ``payments.credit_payment`` for a succeeded payment,
``reversals.refunded`` for a charge's refunds. Something already in the ledger changes
nothing; something missing is a repair: ``qnp_billing_reconcile_repairs_total{kind}``
and one log line (Stripe ids and amounts only, no personal data). A succeeded payment
we did not start, or one that paid less than its top-up, is flagged
(``qnp_billing_reconcile_flags_total{kind}``) and left alone. One replica runs it at a
time (a session advisory lock; the others skip that round).

Disputes are not listed: the report counts what our dispute rows say. Must not import
``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from control_plane.billing import payments, reversals
from control_plane.billing.gateway import StripeGateway, StripeUnavailable
from control_plane.outages import POSTGRES_ERRORS
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

CURSOR = "stripe"
_LOCK = (0x514E5013, 1)  # advisory lock: one reconciliation run at a time
Clock = Callable[[], float]


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.repairs = Counter(
            "qnp_billing_reconcile_repairs",
            "Ledger entries written by reconciliation because no webhook had (payment, "
            "refund).", ["kind"], registry=registry)
        self.flags = Counter(
            "qnp_billing_reconcile_flags",
            "Stripe objects reconciliation could not match to the ledger (not_ours, "
            "mismatch).", ["kind"], registry=registry)


@dataclass(slots=True)
class RunResult:
    ran: bool = True  # False: another replica held the lock
    payments: int = 0  # succeeded payments looked at
    refunds: int = 0
    repairs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flags: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Reconciler:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                 gateway: StripeGateway, metrics: ReconcileMetrics, *,
                 lookback_s: int, clock: Clock = time.time) -> None:
        self.pool, self.redis, self.names, self.gateway = pool, redis, names, gateway
        self.metrics, self.lookback_s, self.clock = metrics, lookback_s, clock
        self._stopping = asyncio.Event()

    async def run_once(self) -> RunResult:
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *_LOCK):
                return RunResult(ran=False)
            try:
                started = int(self.clock())
                last = await conn.fetchval(
                    "SELECT since_unix FROM billing_reconcile_cursor WHERE name = $1", CURSOR)
                since = (started if last is None else int(last)) - self.lookback_s
                result = RunResult()
                await self._payments(since, result)
                await self._refunds(since, result)
                await conn.execute(
                    "INSERT INTO billing_reconcile_cursor (name, since_unix) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO UPDATE SET since_unix = EXCLUDED.since_unix, "
                    "last_run_at = now()", CURSOR, started)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", *_LOCK)
        log.info("stripe reconciliation since=%d payments=%d refunds=%d repairs=%d flags=%d",
                 since, result.payments, result.refunds, sum(result.repairs.values()),
                 sum(result.flags.values()))
        return result

    def _flag(self, result: RunResult, kind: str, what: str, stripe_id: str) -> None:
        result.flags[kind] += 1
        self.metrics.flags.labels(kind).inc()
        log.warning("stripe reconciliation flag kind=%s %s=%s", kind, what, stripe_id)

    async def _payments(self, since: int, result: RunResult) -> None:
        async for intent in self.gateway.listed("payment_intents", since):
            if intent.get("status") != "succeeded":
                continue
            result.payments += 1
            topup = await payments.topup_of_intent(self.pool, str(intent["id"]))
            if topup is None:
                self._flag(result, "not_ours", "payment_intent", str(intent["id"]))
                continue
            received = int(intent.get("amount_received") or intent.get("amount") or 0)
            if received < topup.amount_cents or intent.get("currency") != topup.currency:
                self._flag(result, "mismatch", "payment_intent", topup.payment_intent_id)
                continue
            done = await payments.credit_payment(self.pool, self.redis, self.names, topup,
                                                 event_id=None, event_type="reconcile")
            if done.credited:
                result.repairs["payment"] += 1
                self.metrics.repairs.labels("payment").inc()
                log.warning("stripe reconciliation repaired kind=payment payment_intent=%s "
                            "credit_micros=%d ledger_id=%d", topup.payment_intent_id,
                            done.credit_micros, done.ledger_id)

    async def _refunds(self, since: int, result: RunResult) -> None:
        charges: dict[str, list[dict[str, Any]]] = defaultdict(list)
        async for refund in self.gateway.listed("refunds", since):
            if refund.get("status") == "succeeded" and isinstance(refund.get("charge"), str):
                charges[refund["charge"]].append(refund)
        for charge_id, refunds in charges.items():
            result.refunds += len(refunds)
            intent = next((r["payment_intent"] for r in refunds
                           if isinstance(r.get("payment_intent"), str)), None)
            intent = intent or await self._intent_of(charge_id)
            # The refunds listed are a floor for the charge's cumulative refunded amount;
            # reversals.refunded merges it with every refund id it already knows.
            charge = {"id": charge_id, "payment_intent": intent,
                      "currency": refunds[0].get("currency"),
                      "amount_refunded": sum(int(r["amount"]) for r in refunds),
                      "refunds": {"data": refunds}}
            done = await reversals.refunded(
                self.pool, self.redis, self.names, charge, event_id=None,
                event_type="reconcile", cause=f"reconcile:{uuid.uuid4().hex[:16]}")
            if done.outcome in ("unmatched", "mismatch"):
                self._flag(result, "not_ours" if done.outcome == "unmatched" else "mismatch",
                           "charge", charge_id)
            elif done.change_micros:
                result.repairs["refund"] += 1
                self.metrics.repairs.labels("refund").inc()
                log.warning("stripe reconciliation repaired kind=refund charge=%s "
                            "change_micros=%d", charge_id, done.change_micros)

    async def _intent_of(self, charge_id: str) -> str | None:
        known: str | None = await self.pool.fetchval(
            "SELECT payment_intent_id FROM billing_charges WHERE charge_id = $1", charge_id)
        return known or await self.gateway.charge_intent(charge_id)

    async def run(self, interval_s: float) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except StripeUnavailable:
                pass  # logged by the gateway; the next round lists the same window again
            except POSTGRES_ERRORS as e:
                log.warning("stripe reconciliation skipped: postgres %s", type(e).__name__)
            except Exception:  # top of the task: log it, keep the task alive
                log.exception("stripe reconciliation failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()


async def report(pool: asyncpg.Pool, gateway: StripeGateway, start: int, end: int,
                 account: uuid.UUID | None = None) -> dict[str, Any]:
    """Stripe's payments and refunds created in [start, end) against the ledger rows
    for the same Stripe objects (only ``account``'s, if given), in micro-dollars."""
    credit = reversed_ = ledger_credit = ledger_reversed = 0
    amount = refunded_cents = n_payments = n_refunds = not_ours = 0
    missing: list[str] = []
    async for intent in gateway.listed("payment_intents", start, end):
        if intent.get("status") != "succeeded":
            continue
        topup = await payments.topup_of_intent(pool, str(intent["id"]))
        if topup is None:
            not_ours += 1
            continue
        if account is not None and topup.account_id != account:
            continue
        n_payments += 1
        amount += int(intent.get("amount_received") or intent.get("amount") or 0)
        credit += topup.credit_cents * payments.MICROS_PER_CENT
        row: int | None = await pool.fetchval(
            "SELECT amount_micros FROM credit_ledger WHERE kind = 'topup' AND reference = $1",
            payments.REFERENCE_PREFIX + topup.payment_intent_id)
        if row is None:
            missing.append(topup.payment_intent_id)
        ledger_credit += row or 0
    charges: set[str] = set()
    async for refund in gateway.listed("refunds", start, end):
        if refund.get("status") == "succeeded" and isinstance(refund.get("charge"), str):
            charges.add(refund["charge"])
    differing: list[str] = []
    for charge_id in sorted(charges):
        found = await _charge_report(pool, gateway, charge_id, account)
        if found is None:
            continue
        n_refunds += found["refunds"]
        refunded_cents += found["refunded_cents"]
        reversed_ += found["implied_micros"]
        ledger_reversed += found["ledger_micros"]
        if found["implied_micros"] != found["ledger_micros"]:
            differing.append(charge_id)
    return {
        "from": start, "to": end, "account_id": None if account is None else str(account),
        "stripe": {"payments": n_payments, "amount_cents": amount, "credit_micros": credit,
                   "refunds": n_refunds, "refunded_cents": refunded_cents,
                   "reversal_micros": reversed_},
        "ledger": {"credit_micros": ledger_credit, "reversal_micros": ledger_reversed},
        "difference_micros": {"credit": credit - ledger_credit,
                              "reversal": reversed_ - ledger_reversed},
        "missing_payments": missing, "charges_differing": differing,
        "payments_not_ours": not_ours,
    }


async def _charge_report(pool: asyncpg.Pool, gateway: StripeGateway, charge_id: str,
                         account: uuid.UUID | None) -> dict[str, int] | None:
    """One refunded charge: every refund Stripe has for it (not only the period's), the
    reversal that implies with our dispute rows, and the ledger's reversal rows."""
    refunds = [r async for r in gateway.listed("refunds", 0, charge=charge_id)
               if r.get("status") == "succeeded"]
    intent = next((r["payment_intent"] for r in refunds
                   if isinstance(r.get("payment_intent"), str)), None)
    if intent is None:
        intent = await pool.fetchval(
            "SELECT payment_intent_id FROM billing_charges WHERE charge_id = $1", charge_id)
    topup = None if intent is None else await payments.topup_of_intent(pool, intent)
    if topup is None or (account is not None and topup.account_id != account):
        return None
    total = sum(int(r["amount"]) for r in refunds)
    held: int = await pool.fetchval(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM billing_disputes WHERE charge_id = $1 "
        "AND withdrawn AND coalesce(outcome, 'lost') = 'lost'", charge_id)
    ledger_micros: int = await pool.fetchval(
        "SELECT coalesce(-sum(amount_micros), 0)::bigint FROM credit_ledger "
        "WHERE kind = 'reversal' "
        "AND account_id = $1 AND starts_with(reference, $2)",
        topup.account_id, f"{payments.REFERENCE_PREFIX}{charge_id}:")
    implied = min(total + held, topup.credit_cents) * payments.MICROS_PER_CENT
    return {"refunds": len(refunds), "refunded_cents": total, "implied_micros": implied,
            "ledger_micros": ledger_micros}
