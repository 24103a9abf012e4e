"""The page's return path: it asks Stripe how the payment went and credits a succeeded
one through the webhook's idempotent function, so a lost webhook never loses money."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import stripe

from tests.control_plane.billing.conftest import register_webhook
from tests.control_plane.billing.flows import balance, count, signed_in, start_topup
from tests.control_plane.web.conftest import Web
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


async def _complete(web: Web, headers: dict[str, str], intent: str) -> Any:
    return await web.client.post("/api/v1/credits/topup/complete",
                                 json={"payment_intent_id": intent}, headers=headers)


async def _pay(client: stripe.StripeClient, intent: str) -> None:
    method = await client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": "4242424242424242", "exp_month": 12,
                                  "exp_year": 2030, "cvc": "123"}})
    await client.v1.payment_intents.update_async(intent, {"payment_method": method.id})
    assert (await client.v1.payment_intents.confirm_async(intent)).status == "succeeded"


async def test_a_lost_webhook_is_made_good_by_the_return_path_once(
        billing_web: Web, stripe_client: stripe.StripeClient, localstripe: str) -> None:
    # Stripe's webhooks go nowhere for this test: only the return path can credit.
    await register_webhook(localstripe, f"http://127.0.0.1:{free_port()}/webhooks/stripe")
    account, headers = await signed_in(billing_web)
    intent = (await (await start_topup(billing_web, headers, 2000)).json())["data"][
        "payment_intent_id"]

    r = await _complete(billing_web, headers, intent)  # back before paying
    assert r.status == 200, await r.text()
    assert (await r.json())["data"]["status"] == "requires_payment_method"
    assert (await balance(billing_web, account)).ledger_micros == 0

    await _pay(stripe_client, intent)
    first = (await (await _complete(billing_web, headers, intent)).json())["data"]
    again = (await (await _complete(billing_web, headers, intent)).json())["data"]
    assert (first["status"], first["credited"], again["credited"]) == \
        ("succeeded", True, False)
    after = await balance(billing_web, account)
    assert (after.ledger_micros, after.live_micros) == (20_000_000, 20_000_000)


async def test_return_path_and_webhook_together_credit_once(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    intent = (await (await start_topup(billing_web, headers, 2000)).json())["data"][
        "payment_intent_id"]
    await _pay(stripe_client, intent)
    assert (await _complete(billing_web, headers, intent)).status == 200
    # localstripe's signed webhook arrives about a second after the payment.
    for _ in range(300):
        if await count(billing_web, "SELECT count(*) FROM billing_events "
                       "WHERE type = 'payment_intent.succeeded' AND ledger_id IN "
                       "(SELECT id FROM credit_ledger WHERE account_id = $1)",
                       uuid.UUID(account)):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("localstripe's webhook never arrived")
    assert (await balance(billing_web, account)).ledger_micros == 20_000_000


async def test_another_accounts_top_up_looks_like_none(billing_web: Web) -> None:
    _, theirs = await signed_in(billing_web)
    intent = (await (await start_topup(billing_web, theirs, 2000)).json())["data"][
        "payment_intent_id"]
    billing_web.client.session.cookie_jar.clear()
    _, mine = await signed_in(billing_web)
    for asked in (intent, "pi_does_not_exist", 42):
        r = await _complete(billing_web, mine, asked)
        assert r.status == 404, await r.text()
