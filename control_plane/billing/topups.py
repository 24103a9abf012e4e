"""Starting a top-up: the fee quote, the account's Stripe Customer (created on its
first top-up) and a PaymentIntent per client request id.

Nothing is half-written when Stripe is unreachable: the Customer row is stored only
once Stripe has made the Customer, the top-up row only once Stripe has made the
PaymentIntent, and the idempotency keys make a retry of the same click find the same
Customer and PaymentIntent. Must not import ``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from control_plane.billing import history, payments
from control_plane.billing.gateway import StripeGateway, StripeRefused, StripeUnavailable
from control_plane.errors import InvalidInput, NotFound
from control_plane.settings import BillingSettings
from shared.redis_names import RedisNames

CURRENCY = "usd"
log = logging.getLogger(__name__)
NOTE_DETAILS_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Quote:
    credit_cents: int
    fee_cents: int

    @property
    def amount_cents(self) -> int:
        return self.credit_cents + self.fee_cents

    def to_json(self) -> dict[str, Any]:
        return {"credit_cents": self.credit_cents, "fee_cents": self.fee_cents,
                "amount_cents": self.amount_cents, "currency": CURRENCY}


def quote(settings: BillingSettings, credit_cents: object) -> Quote:
    """The fee on top of ``credit_cents``, rounded up to the cent; refuses amounts
    outside the configured range."""
    if isinstance(credit_cents, bool) or not isinstance(credit_cents, int):
        raise InvalidInput("amount_cents must be an integer number of cents")
    low, high = settings.min_topup_cents, settings.max_topup_cents
    if not low <= credit_cents <= high:
        raise InvalidInput(f"a top-up is between ${low / 100:,.2f} and ${high / 100:,.2f}")
    fee = -(-credit_cents * settings.fee_bps // 10_000) + settings.fee_fixed_cents
    return Quote(credit_cents, fee)


def parse_request_id(raw: object) -> uuid.UUID:
    if not isinstance(raw, str):
        raise InvalidInput("request_id must be a UUID the page makes once per click")
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidInput("request_id must be a UUID the page makes once per click") from None


@dataclass(frozen=True, slots=True)
class Started:
    topup: payments.Topup
    client_secret: str

    def to_json(self) -> dict[str, Any]:
        t = self.topup
        return {"payment_intent_id": t.payment_intent_id, "client_secret": self.client_secret,
                "credit_cents": t.credit_cents, "fee_cents": t.fee_cents,
                "amount_cents": t.amount_cents, "currency": t.currency}


async def customer_for(pool: asyncpg.Pool, gateway: StripeGateway, account: uuid.UUID
                       ) -> str:
    """The account's Stripe Customer, created (once, whoever races) on first use."""
    customer = await payments.customer_of(pool, account)
    if customer is None:
        customer = await payments.save_customer(
            pool, account, await gateway.create_customer(str(account)))
    return customer


async def start_topup(pool: asyncpg.Pool, gateway: StripeGateway, settings: BillingSettings,
                      account: uuid.UUID, credit_cents: object, request_id: uuid.UUID
                      ) -> Started:
    """The PaymentIntent for this click: made once, found again on a retry."""
    existing = await payments.topup_for_request(pool, account, request_id)
    if existing is not None:
        intent = await gateway.retrieve_intent(existing.payment_intent_id)
        return Started(existing, intent.client_secret)
    price = quote(settings, credit_cents)
    customer = await customer_for(pool, gateway, account)
    intent = await gateway.create_intent(
        customer=customer, amount_cents=price.amount_cents, currency=CURRENCY,
        account_id=str(account), credit_cents=price.credit_cents,
        idempotency_key=f"qnp-topup-{account}-{request_id}")
    topup = payments.Topup(intent.id, account, request_id, price.credit_cents,
                           price.fee_cents, price.amount_cents, CURRENCY)
    await payments.save_topup(pool, topup)
    return Started(topup, intent.client_secret)


@dataclass(frozen=True, slots=True)
class Completed:
    status: str  # Stripe's PaymentIntent status
    credited: bool  # True: this call wrote the credit (the webhook had not yet)
    credit_cents: int
    failure: str | None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "credited": self.credited,
                "credit_cents": self.credit_cents, "failure": self.failure}


async def complete_topup(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                         gateway: StripeGateway, account: uuid.UUID, intent_id: object
                         ) -> Completed:
    """The page's return path: ask Stripe how the payment went and, if it succeeded,
    credit it through the same idempotent function as the webhook, so a lost webhook
    never loses money."""
    topup = None
    if isinstance(intent_id, str) and intent_id.startswith("pi_") and len(intent_id) < 100:
        topup = await payments.topup_of_intent(pool, intent_id)
    if topup is None or topup.account_id != account:
        raise NotFound("no such top-up")  # another account's looks like none
    intent = await gateway.retrieve_intent(topup.payment_intent_id)
    await history.record(pool, intent)
    paid = intent.status == "succeeded" and intent.currency == topup.currency \
        and intent.amount_cents >= topup.amount_cents
    if not paid:
        return Completed(intent.status, False, topup.credit_cents, intent.failure)
    done = await payments.credit_payment(pool, redis, names, topup, event_id=None,
                                         event_type="return_path")
    return Completed(intent.status, done.credited, topup.credit_cents, None)


async def note_details(pool: asyncpg.Pool, gateway: StripeGateway | None, intent_id: str
                       ) -> None:
    """After a webhook credited a payment: the card's brand and last 4 and the receipt
    for the history, as the return path would have noted them. Best effort: the credit
    is already written, and the history shows the payment without them."""
    if gateway is None:
        return
    try:
        # Bounded: Stripe waits for the webhook's answer, and a slow Stripe API must not
        # make it wait long (nor retry a delivery that was credited).
        async with asyncio.timeout(NOTE_DETAILS_TIMEOUT_S):
            intent = await gateway.retrieve_intent(intent_id)
    except (StripeUnavailable, StripeRefused, TimeoutError) as e:
        log.info("payment details not fetched payment_intent=%s: %s", intent_id,
                 type(e).__name__)
        return
    await history.record(pool, intent)
