"""Auto top-up (issue 13): when the balance falls below the user's threshold, charge
the saved card off-session for the chosen credit (plus the fee of ``topups.quote``),
at most once per crossing and never twice concurrently across replicas.

- The card is saved with a SetupIntent (``usage=off_session``) that the browser
  confirms with Stripe.js; we keep its PaymentMethod id and the brand and last 4 Stripe
  returns, nothing else.
- The crossing is a balance trigger (``balance_watch``): the one conditional UPDATE
  that claims it also writes this crossing's row of ``auto_topup_charges``, in the
  same transaction. So a crossing has at most one charge row, whichever replica saw it.
- ``Charger`` takes due rows with ``FOR UPDATE SKIP LOCKED`` (one replica per row at a
  time) and makes an off-session PaymentIntent whose idempotency key is
  ``qnp-auto-topup-<account>-<crossing>``: a retry after a crash between Stripe's
  answer and our commit finds the same PaymentIntent at Stripe instead of charging
  again. Success is credited through ``payments.credit_payment``, the webhook's own
  idempotent function (the webhook, arriving for the same PaymentIntent, changes
  nothing). A refusal turns auto top-up off and queues the e-mail saying so, with
  Stripe's reason code, in the same transaction that records the failure.
Must not import ``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from control_plane import users
from control_plane.billing import low_balance, payments, topups
from control_plane.billing.balance_watch import (
    AUTO_TOPUP,
    STORE_ERRORS,
    Action,
    Clock,
    utc_now,
)
from control_plane.billing.gateway import StripeGateway, StripeRefused, StripeUnavailable
from control_plane.errors import InvalidInput, NotFound
from control_plane.mail import outbox
from control_plane.settings import BillingSettings
from shared.pricing import MICROS_PER_DOLLAR
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

MICROS_PER_CENT = MICROS_PER_DOLLAR // 100
MAX_THRESHOLD_CENTS = 100_000_000  # $1M
# A Stripe outage is retried with the same idempotency key, backing off from 30 s to an
# hour; after MAX_ATTEMPTS (about 22 hours, inside the 24 hours Stripe keeps an
# idempotency key) the charge fails as ``stripe_unavailable``.
BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0
MAX_ATTEMPTS = 12
FAILED_TEMPLATE = "auto_topup_failed"
# The request id of a crossing's billing_topups row: one per crossing, by construction.
_REQUEST_NAMESPACE = uuid.UUID("6f1d3c52-9a0e-4f57-8a43-2f6a4b7c1e90")


def request_id(account: uuid.UUID, crossing: int) -> uuid.UUID:
    return uuid.uuid5(_REQUEST_NAMESPACE, f"auto-topup:{account}:{crossing}")


def idempotency_key(account: uuid.UUID, crossing: int) -> str:
    return f"qnp-auto-topup-{account}-{crossing}"


# --- the settings --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """What the credits page and ``GET /api/v1/credits/auto-topup`` show."""

    enabled: bool
    threshold_cents: int | None
    amount_cents: int | None
    card_brand: str | None
    card_last4: str | None
    disabled_reason: str | None  # Stripe's code, when a failed charge turned it off
    low_balance_cents: int | None  # None: no low-balance e-mail

    def to_json(self) -> dict[str, Any]:
        card = None if self.card_last4 is None else \
            {"brand": self.card_brand, "last4": self.card_last4}
        return {"enabled": self.enabled, "threshold_cents": self.threshold_cents,
                "amount_cents": self.amount_cents, "card": card,
                "disabled_reason": self.disabled_reason,
                "low_balance_cents": self.low_balance_cents}


_CONFIG = """
SELECT s.amount_cents, s.card_brand, s.card_last4, s.disabled_reason,
       t.enabled AS topup_enabled, t.threshold_micros AS topup_threshold,
       l.enabled AS low_enabled, l.threshold_micros AS low_threshold
FROM (SELECT $1::uuid AS account_id) a
LEFT JOIN auto_topup_settings s ON s.account_id = a.account_id
LEFT JOIN balance_triggers t ON t.account_id = a.account_id AND t.kind = 'auto_topup'
LEFT JOIN balance_triggers l ON l.account_id = a.account_id AND l.kind = 'low_balance'
"""


async def config_of(conn: asyncpg.Pool | asyncpg.Connection, account: uuid.UUID) -> Config:
    r = await conn.fetchrow(_CONFIG, account)
    assert r is not None
    threshold = r["topup_threshold"]
    low = r["low_threshold"] if r["low_enabled"] else None
    return Config(enabled=bool(r["topup_enabled"]),
                  threshold_cents=None if threshold is None else threshold // MICROS_PER_CENT,
                  amount_cents=r["amount_cents"], card_brand=r["card_brand"],
                  card_last4=r["card_last4"], disabled_reason=r["disabled_reason"],
                  low_balance_cents=None if low is None else low // MICROS_PER_CENT)


def _cents(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer number of cents")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high} cents")
    return value


def _optional_cents(value: object, name: str) -> int | None:
    return None if value is None else _cents(value, name, 1, MAX_THRESHOLD_CENTS)


@dataclass(frozen=True, slots=True)
class Wanted:
    """A change of settings; a field left out (``...``) keeps its value."""

    enabled: bool
    threshold_cents: int | None
    amount_cents: int | None
    low_balance_cents: int | None


def parse(body: dict[str, Any], current: Config, billing: BillingSettings) -> Wanted:
    """Validate a change against the current settings; InvalidInput says what is wrong."""
    unknown = set(body) - {"enabled", "threshold_cents", "amount_cents", "low_balance_cents"}
    if unknown:
        raise InvalidInput(f"unknown field {sorted(unknown)[0]}")
    enabled = body.get("enabled", current.enabled)
    if not isinstance(enabled, bool):
        raise InvalidInput("enabled must be true or false")
    threshold = _optional_cents(body.get("threshold_cents", current.threshold_cents),
                                "threshold_cents")
    amount = body.get("amount_cents", current.amount_cents)
    if amount is not None:
        amount = topups.quote(billing, amount).credit_cents  # the top-up range
    low = _optional_cents(body.get("low_balance_cents", current.low_balance_cents),
                          "low_balance_cents")
    if enabled:
        if threshold is None or amount is None:
            raise InvalidInput("auto top-up needs a threshold and an amount")
        if current.card_last4 is None:
            raise InvalidInput("save a card for auto top-up first")
    return Wanted(enabled, threshold, amount, low)


async def configure(pool: asyncpg.Pool, account: uuid.UUID, wanted: Wanted,
                    clock: Clock = utc_now) -> Config:
    now = clock()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO auto_topup_settings (account_id, amount_cents, updated_at) "
            "VALUES ($1, $2, $3) ON CONFLICT (account_id) DO UPDATE SET "
            "amount_cents = $2, updated_at = $3, disabled_reason = CASE WHEN $4 "
            "THEN NULL ELSE auto_topup_settings.disabled_reason END",
            account, wanted.amount_cents, now, wanted.enabled)
        if wanted.threshold_cents is None:  # (``parse``: only when it is off)
            await conn.execute(
                "UPDATE balance_triggers SET enabled = false, updated_at = $3 "
                "WHERE account_id = $1 AND kind = $2", account, AUTO_TOPUP, now)
        else:
            # Turning it on arms it (a balance already below fires at the next check);
            # a new threshold alone keeps the armed state, so a charge in flight is not
            # followed by a second one.
            await conn.execute(
                "INSERT INTO balance_triggers (account_id, kind, enabled, threshold_micros,"
                " updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, kind) "
                "DO UPDATE SET enabled = $3, threshold_micros = $4, updated_at = $5, "
                "armed = balance_triggers.armed OR NOT balance_triggers.enabled",
                account, AUTO_TOPUP, wanted.enabled,
                wanted.threshold_cents * MICROS_PER_CENT, now)
        await low_balance.configure(
            conn, account, None if wanted.low_balance_cents is None
            else wanted.low_balance_cents * MICROS_PER_CENT, now)
        config = await config_of(conn, account)
    log.info("auto top-up configured account_id=%s enabled=%s", account, config.enabled)
    return config


# --- the saved card ------------------------------------------------------------------


async def start_card_setup(pool: asyncpg.Pool, gateway: StripeGateway, account: uuid.UUID,
                           click: uuid.UUID) -> dict[str, str]:
    """A SetupIntent for the browser to confirm with Stripe.js (one per click)."""
    customer = await topups.customer_for(pool, gateway, account)
    setup_id, secret = await gateway.create_setup_intent(
        customer=customer, account_id=str(account),
        idempotency_key=f"qnp-card-setup-{account}-{click}")
    return {"setup_intent_id": setup_id, "client_secret": secret}


async def save_card(pool: asyncpg.Pool, gateway: StripeGateway, account: uuid.UUID,
                    setup_intent_id: object) -> Config:
    """Keep the card a succeeded SetupIntent of this account's Customer saved."""
    customer = await payments.customer_of(pool, account)
    if not (isinstance(setup_intent_id, str) and setup_intent_id.startswith("seti_")
            and len(setup_intent_id) < 100) or customer is None:
        raise NotFound("no such card setup")
    card = await gateway.saved_card(setup_intent_id)
    if card.customer != customer:
        raise NotFound("no such card setup")  # another account's looks like none
    await pool.execute(
        "INSERT INTO auto_topup_settings (account_id, payment_method_id, card_brand, "
        "card_last4) VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET "
        "payment_method_id = $2, card_brand = $3, card_last4 = $4, updated_at = now()",
        account, card.payment_method_id, card.brand[:20], card.last4[:4])
    log.info("auto top-up card saved account_id=%s", account)
    return await config_of(pool, account)


# --- the crossing's charge -----------------------------------------------------------


def action(billing: BillingSettings) -> Action:
    """What an auto top-up crossing writes, in its claiming transaction: the charge."""

    async def write_charge(conn: asyncpg.Connection, account: uuid.UUID, crossing: int,
                           balance_micros: int, now: datetime) -> None:
        row = await conn.fetchrow(
            "SELECT amount_cents, payment_method_id FROM auto_topup_settings "
            "WHERE account_id = $1", account)
        if row is None or row["amount_cents"] is None or row["payment_method_id"] is None:
            log.warning("auto top-up crossing without a card account_id=%s", account)
            return
        price = topups.Quote(row["amount_cents"], 0)
        try:
            price = topups.quote(billing, row["amount_cents"])
        except InvalidInput:
            pass  # the configured range moved since; charge what the user chose
        await conn.execute(
            "INSERT INTO auto_topup_charges (account_id, crossing, credit_cents, fee_cents,"
            " payment_method_id, next_attempt_at, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $6)",
            account, crossing, price.credit_cents, price.fee_cents,
            row["payment_method_id"], now)

    return write_charge


_DUE = """
SELECT account_id, crossing, credit_cents, fee_cents, payment_method_id, attempts
FROM auto_topup_charges c
WHERE status = 'pending' AND next_attempt_at <= $1
  -- An account no longer active (suspended, being deleted) is not charged.
  AND EXISTS (SELECT 1 FROM accounts a WHERE a.id = c.account_id AND a.status = 'active')
ORDER BY next_attempt_at
LIMIT 1
FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    status: str  # succeeded, processing, failed, retrying
    payment_intent_id: str | None = None
    failure_code: str | None = None


class Charger:
    """Makes the charges crossings wrote; safe on every replica."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                 gateway: StripeGateway, public_url: str, *, tick_s: float = 5.0,
                 clock: Clock = utc_now) -> None:
        self._pool, self._redis, self._names = pool, redis, names
        self._gateway, self._public_url = gateway, public_url
        self._tick_s, self._clock = tick_s, clock
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and await self.charge_once() is not None:
                    pass
            except STORE_ERRORS as e:
                log.warning("auto top-up charger failed (%s)", type(e).__name__)
            except Exception:  # top of the task: a bug must not end the charger
                log.exception("auto top-up charger failed unexpectedly")
            try:
                await asyncio.wait_for(self._wake.wait(), self._tick_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def charge_once(self) -> ChargeOutcome | None:
        """Make one due charge; None when none is due."""
        credit: payments.Topup | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_DUE, self._clock())
            if row is None:
                return None
            outcome, credit = await self._charge(conn, row)
        if credit is not None:
            await payments.credit_payment(self._pool, self._redis, self._names, credit,
                                          event_id=None, event_type="auto_topup")
        log.info("auto top-up charge account_id=%s crossing=%d status=%s code=%s",
                 row["account_id"], row["crossing"], outcome.status, outcome.failure_code)
        return outcome

    async def _charge(self, conn: asyncpg.Connection, row: asyncpg.Record
                      ) -> tuple[ChargeOutcome, payments.Topup | None]:
        account, crossing = row["account_id"], row["crossing"]
        credit, fee = row["credit_cents"], row["fee_cents"]
        customer = await payments.customer_of(self._pool, account)
        if customer is None:
            return await self._fail(conn, row, "no_customer"), None
        try:
            intent = await self._gateway.charge_off_session(
                customer=customer, payment_method=row["payment_method_id"],
                amount_cents=credit + fee, currency=topups.CURRENCY,
                account_id=str(account), credit_cents=credit,
                idempotency_key=idempotency_key(account, crossing))
        except StripeUnavailable:
            attempts = row["attempts"] + 1
            if attempts >= MAX_ATTEMPTS:
                return await self._fail(conn, row, "stripe_unavailable"), None
            delay = min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_CAP_S)
            await conn.execute(
                "UPDATE auto_topup_charges SET attempts = $3, next_attempt_at = $4 "
                "WHERE account_id = $1 AND crossing = $2", account, crossing, attempts,
                self._clock() + timedelta(seconds=delay))
            return ChargeOutcome("retrying"), None
        except StripeRefused as e:
            return await self._fail(conn, row, e.code or "refused"), None
        if intent.status not in ("succeeded", "processing"):
            # Off-session, Stripe answers a card that needs the customer (3-D Secure)
            # with authentication_required; a fake may leave it waiting instead.
            code = "authentication_required" if intent.status == "requires_action" \
                else f"status_{intent.status}"
            return await self._fail(conn, row, code, intent.id), None
        topup = payments.Topup(intent.id, account, request_id(account, crossing), credit,
                               fee, credit + fee, topups.CURRENCY)
        # Before the charge row says so: the webhook finds the payment by this row.
        await payments.save_topup(self._pool, topup)
        await conn.execute(
            "UPDATE auto_topup_charges SET status = $3, payment_intent_id = $4, "
            "attempts = attempts + 1, finished_at = $5 "
            "WHERE account_id = $1 AND crossing = $2",
            account, crossing, intent.status, intent.id, self._clock())
        # Processing (a delayed payment method): credited by its webhook when it succeeds.
        return ChargeOutcome(intent.status, intent.id), \
            topup if intent.status == "succeeded" else None

    async def _fail(self, conn: asyncpg.Connection, row: asyncpg.Record, code: str,
                    intent_id: str | None = None) -> ChargeOutcome:
        """Record the failure, turn auto top-up off, tell the user: one transaction."""
        account, now = row["account_id"], self._clock()
        code = code[:100]
        await conn.execute(
            "UPDATE auto_topup_charges SET status = 'failed', failure_code = $3, "
            "payment_intent_id = $4, attempts = attempts + 1, finished_at = $5 "
            "WHERE account_id = $1 AND crossing = $2",
            account, row["crossing"], code, intent_id, now)
        await conn.execute(
            "UPDATE balance_triggers SET enabled = false, updated_at = $3 "
            "WHERE account_id = $1 AND kind = $2", account, AUTO_TOPUP, now)
        await conn.execute(
            "UPDATE auto_topup_settings SET disabled_reason = $2, updated_at = $3 "
            "WHERE account_id = $1", account, code, now)
        address = await users.owner_address(conn, account)
        if address is not None:
            charged = (row["credit_cents"] + row["fee_cents"]) * MICROS_PER_CENT
            await outbox.enqueue(
                conn, to_address=address, kind=outbox.MailKind.TRANSACTIONAL,
                template=FAILED_TEMPLATE, account_id=account,
                subject="Your QNP auto top-up failed and is now off",
                body=(f"We tried to charge your saved card {low_balance.dollars(charged)} for an "
                      f"auto top-up of {low_balance.dollars(row['credit_cents'] * MICROS_PER_CENT)}"
                      f", and the payment did not go through (Stripe's reason: {code}).\n\n"
                      "Auto top-up is now off, so we will not try again. Check your card "
                      f"and turn it back on at {self._public_url}/credits\n"))
        return ChargeOutcome("failed", intent_id, code)
