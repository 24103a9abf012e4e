"""Stripe unreachable when a top-up starts, through a gate between the web app and
localstripe (tests/chaos/gate.py): refused connections, then an answer lost on its way
back after Stripe made the PaymentIntent. Each time the user gets the API's 503 with a
clear message and nothing is written; the same click retried once Stripe is back gets
the PaymentIntent that click made, never a second one (Stripe's idempotency key)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import stripe

from shared.redis_names import RedisNames
from tests.chaos.gate import Gate
from tests.control_plane.billing.conftest import billing_env
from tests.control_plane.billing.flows import count, signed_in, start_topup
from tests.control_plane.web.conftest import Web, serve_web, web_settings
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)
HANG_GUARD_S = 30.0


async def _intents_of(client: stripe.StripeClient, customer: str) -> list[Any]:
    found, after = [], None
    while True:
        page = await client.v1.payment_intents.list_async(
            {"limit": 100, **({"starting_after": after} if after else {})})
        found += [p for p in page.data if p.customer == customer]
        if not page.has_more or not page.data:
            return found
        after = page.data[-1].id


async def _refused_cleanly(web: Web, headers: dict[str, str], click: str, account: str
                           ) -> None:
    r = await start_topup(web, headers, 2000, click)
    assert r.status == 503, await r.text()
    body = await r.json()
    assert body["error"]["code"] == 503
    assert "cannot be reached" in body["error"]["message"]
    assert "nothing was charged" in body["error"]["message"]
    assert await count(web, "SELECT count(*) FROM billing_topups WHERE account_id = $1 "
                       "AND request_id = $2", uuid.UUID(account), uuid.UUID(click)) == 0


async def test_one_click_makes_one_payment_intent_however_stripe_fails(
        migrated_url: str, redis_url: str, redis_names: RedisNames, oidc_mock: str,
        localstripe: str, stripe_client: stripe.StripeClient) -> None:
    gate = await Gate(localstripe).start()
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(), providers,
                            **billing_env(gate.url, QNP_STRIPE_TIMEOUT_S="1"))
    try:
        async with serve_web(settings) as web:
            account, headers = await signed_in(web)
            earlier = await start_topup(web, headers, 2000)  # the account's Customer
            assert earlier.status == 201, await earlier.text()
            earlier_id = (await earlier.json())["data"]["payment_intent_id"]
            customer = (await stripe_client.v1.payment_intents.retrieve_async(
                earlier_id)).customer
            click = str(uuid.uuid4())

            await gate.cut()  # connections refused
            await _refused_cleanly(web, headers, click, account)

            # The request reaches Stripe, which makes the PaymentIntent; the answer is lost.
            await gate.open()
            gate.deafen()
            await _refused_cleanly(web, headers, click, account)
            deadline = time.monotonic() + HANG_GUARD_S
            while len(orphans := await _intents_of(stripe_client, customer)) < 2:
                assert time.monotonic() < deadline, "the held request never reached Stripe"
                await asyncio.sleep(0.05)

            await gate.open()  # Stripe is back: the user clicks "Pay" again
            retried = await start_topup(web, headers, 2000, click)
            assert retried.status == 201, await retried.text()
            again = await start_topup(web, headers, 2000, click)
            made = [(await r.json())["data"]["payment_intent_id"] for r in (retried, again)]
            orphan = next(p.id for p in orphans if p.id != earlier_id)
            assert made[0] == made[1] == orphan  # the one the lost answer carried
            assert len(await _intents_of(stripe_client, customer)) == 2
            assert await count(web, "SELECT count(*) FROM billing_topups "
                               "WHERE account_id = $1", uuid.UUID(account)) == 2
    finally:
        await gate.close()
