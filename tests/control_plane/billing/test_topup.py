"""Starting a top-up against localstripe: one Customer per account, a PaymentIntent per
click (idempotent), the fee on top, clear refusals, and the paid intent's webhook
(sent and signed by localstripe itself) crediting exactly the amount chosen."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import stripe

from tests.control_plane.billing.conftest import billing_env
from tests.control_plane.billing.flows import balance, count, signed_in, start_topup
from tests.control_plane.web.conftest import Web, serve_web, web_settings
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)

# QNP_TOPUP_FEE_BPS=500 and QNP_TOPUP_FEE_FIXED_CENTS=30 in the fixture: $20 costs $21.30.
TWENTY = 2000


async def test_topup_creates_one_customer_and_one_intent_per_click(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    click = str(uuid.uuid4())
    r = await start_topup(billing_web, headers, TWENTY, click)
    assert r.status == 201, await r.text()
    first = (await r.json())["data"]
    assert (first["credit_cents"], first["fee_cents"], first["amount_cents"]) == \
        (2000, 130, 2130)
    assert first["client_secret"].startswith(first["payment_intent_id"] + "_secret_")

    # The same click again (a double-click, a retry after a timeout): the same intent.
    again = (await (await start_topup(billing_web, headers, TWENTY, click)).json())["data"]
    assert again["payment_intent_id"] == first["payment_intent_id"]
    assert again["client_secret"] == first["client_secret"]
    # A new click: a new intent, for the same Customer.
    other = (await (await start_topup(billing_web, headers, 500, None)).json())["data"]
    assert other["payment_intent_id"] != first["payment_intent_id"]

    intent = await stripe_client.v1.payment_intents.retrieve_async(first["payment_intent_id"])
    assert intent.amount == 2130 and intent.currency == "usd"
    customer = intent.customer
    other_intent = await stripe_client.v1.payment_intents.retrieve_async(
        other["payment_intent_id"])
    assert other_intent.customer == customer
    assert await count(billing_web, "SELECT count(*) FROM billing_customers "
                       "WHERE account_id = $1", uuid.UUID(account)) == 1
    assert await count(billing_web, "SELECT count(*) FROM billing_topups "
                       "WHERE account_id = $1", uuid.UUID(account)) == 2


async def test_quote_shows_the_fee_before_paying(billing_web: Web) -> None:
    await signed_in(billing_web)
    r = await billing_web.client.get("/api/v1/credits/topup/quote",
                                     params={"amount_cents": "10000"})
    assert r.status == 200, await r.text()
    assert (await r.json())["data"] == {"credit_cents": 10000, "fee_cents": 530,
                                        "amount_cents": 10530, "currency": "usd"}


@pytest.mark.parametrize("amount", [499, 1_000_001, "2000", 20.5, None])
async def test_amounts_outside_the_range_are_refused_and_nothing_is_written(
        billing_web: Web, amount: object) -> None:
    account, headers = await signed_in(billing_web)
    r = await start_topup(billing_web, headers, amount)
    assert r.status == 400, await r.text()
    assert (await r.json())["error"]["message"]
    assert await count(billing_web, "SELECT count(*) FROM billing_customers "
                       "WHERE account_id = $1", uuid.UUID(account)) == 0


async def test_topup_needs_the_sessions_csrf_token(billing_web: Web) -> None:
    account, headers = await signed_in(billing_web)
    r = await start_topup(billing_web, billing_web.same_origin, TWENTY)
    assert r.status == 403
    r = await start_topup(billing_web, {**headers, "Sec-Fetch-Site": "cross-site"}, TWENTY)
    assert r.status == 403
    assert await count(billing_web, "SELECT count(*) FROM billing_topups "
                       "WHERE account_id = $1", uuid.UUID(account)) == 0


async def test_stripe_unreachable_is_a_clear_error_and_nothing_is_half_written(
        migrated_url: str, redis_url: str, redis_names: object, oidc_mock: str,
        localstripe: str) -> None:
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    nothing_there = f"http://127.0.0.1:{free_port()}"
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(),  # type: ignore[arg-type]
                            providers, **billing_env(nothing_there))
    async with serve_web(settings) as web:
        account, headers = await signed_in(web)
        r = await start_topup(web, headers, TWENTY)
        assert r.status == 503
        message = (await r.json())["error"]["message"]
        assert "cannot be reached" in message and "nothing was charged" in message
        assert "sk_test" not in message
        for table in ("billing_customers", "billing_topups"):
            assert await count(web, f"SELECT count(*) FROM {table} "  # noqa: S608
                               "WHERE account_id = $1", uuid.UUID(account)) == 0


async def test_paying_the_intent_credits_exactly_the_amount_chosen(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    before = await balance(billing_web, account)
    started = (await (await start_topup(billing_web, headers, TWENTY)).json())["data"]
    # What Stripe.js does in the browser: a card PaymentMethod, then confirm.
    method = await stripe_client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": "4242424242424242", "exp_month": 12,
                                  "exp_year": 2030, "cvc": "123"}})
    pi = started["payment_intent_id"]
    await stripe_client.v1.payment_intents.update_async(pi, {"payment_method": method.id})
    paid = await stripe_client.v1.payment_intents.confirm_async(pi)
    assert paid.status == "succeeded"

    # localstripe delivers payment_intent.succeeded about a second later, signed.
    deadline = time.monotonic() + 30
    after = await balance(billing_web, account)
    while after.ledger_micros == before.ledger_micros and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = await balance(billing_web, account)
    assert after.ledger_micros - before.ledger_micros == 20_000_000  # the fee is not credit
    assert after.live_micros is not None and before.live_micros is not None
    assert after.live_micros - before.live_micros == 20_000_000  # spendable now
    assert await count(billing_web, "SELECT count(*) FROM billing_events e JOIN "
                       "credit_ledger l ON l.id = e.ledger_id WHERE l.account_id = $1",
                       uuid.UUID(account)) == 1
