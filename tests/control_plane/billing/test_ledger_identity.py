"""The ledger identity: after top-ups paid at localstripe (credited by its own signed
webhooks), usage debited through ingest, and refunds (one announced by a webhook, one
found only by reconciliation), the account's ledger sum is Stripe's payments minus
Stripe's refunds minus the usage debits, to the micro-dollar, and the reconciliation
report shows no difference. Fee-free here, so that Stripe's amounts are the credits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import stripe
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from control_plane.admin_api import make_app
from control_plane.billing.gateway import StripeGateway
from control_plane.billing.reconcile import ReconcileMetrics, Reconciler
from control_plane.ingest import Consumer
from control_plane.web.state import STORES
from shared.events import STREAM_FIELD
from shared.pricing import MICROS_PER_DOLLAR
from shared.redis_names import RedisNames
from tests.control_plane.billing.conftest import billing_env, event, register_webhook
from tests.control_plane.billing.flows import balance, pay, signed_in, start_topup
from tests.control_plane.billing.stripe_events import deliver, event_id
from tests.control_plane.factories import ADMIN_TOKEN, make_event
from tests.control_plane.web.conftest import Web, serve_web, web_settings
from tests.support import free_port

pytestmark = pytest.mark.timeout(180)
CENT = MICROS_PER_DOLLAR // 100


@pytest.fixture
async def fee_free_web(migrated_url: str, redis_url: str, redis_names: RedisNames,
                       oidc_mock: str, localstripe: str) -> AsyncIterator[Web]:
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    port = free_port()
    env = billing_env(localstripe, QNP_TOPUP_FEE_BPS="0", QNP_TOPUP_FEE_FIXED_CENTS="0")
    settings = web_settings(migrated_url, redis_url, redis_names, port, providers, **env)
    await register_webhook(localstripe, f"http://127.0.0.1:{port}/webhooks/stripe")
    async with serve_web(settings) as w:
        yield w


async def _ledger_reaches(web: Web, account: str, micros: int) -> None:
    for _ in range(300):  # localstripe's webhooks arrive about a second after each payment
        if (await balance(web, account)).ledger_micros == micros:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"the ledger never reached {micros}")


async def test_ledger_is_payments_minus_refunds_minus_usage_to_the_micro_dollar(
        fee_free_web: Web, stripe_client: stripe.StripeClient) -> None:
    web = fee_free_web
    stores = web.client.server.app[STORES]
    account, headers = await signed_in(web)
    intents = []
    for cents in (2000, 777, 5000):
        r = await start_topup(web, headers, cents)
        intents.append((await r.json())["data"]["payment_intent_id"])
        await pay(stripe_client, intents[-1])
    await _ledger_reaches(web, account, 7777 * CENT)

    costs = [1, 567, 123_456, 2_000_001, 99]
    for cost in costs:
        await stores.redis.xadd(stores.settings.names.events, {
            STREAM_FIELD: make_event(account, cost_micros=cost).encode()})
    consumer = Consumer(stores.settings, stores.pool, stores.redis, stores.metrics)
    assert (await consumer.run_once()).debits == len(costs)

    # One refund announced by Stripe's webhook (the charge as localstripe has it)...
    await stripe_client.v1.refunds.create_async({"payment_intent": intents[0], "amount": 1234})
    charge_id = (await stripe_client.v1.payment_intents.retrieve_async(
        intents[0])).to_dict()["latest_charge"]["id"]
    charge = (await stripe_client.v1.charges.retrieve_async(charge_id)).to_dict()
    charge["payment_intent"] = intents[0]
    assert await deliver(web, event(event_id(), "charge.refunded", charge)) == "reversed"
    # ... and one that only reconciliation finds.
    await stripe_client.v1.refunds.create_async({"payment_intent": intents[2], "amount": 4321})
    gateway = StripeGateway(web.settings.billing)
    try:
        await Reconciler(stores.pool, stores.redis, stores.settings.names, gateway,
                         ReconcileMetrics(CollectorRegistry()), lookback_s=3600).run_once()
    finally:
        await gateway.close()

    paid = refunded = 0
    for intent in intents:
        found = await stripe_client.v1.payment_intents.retrieve_async(intent)
        paid += found.amount
        refunds = await stripe_client.v1.refunds.list_async({"payment_intent": intent})
        refunded += sum(r.amount for r in refunds.data)
    assert (paid, refunded) == (7777, 5555)
    found = await balance(web, account)
    expected = (paid - refunded) * CENT - sum(costs)
    assert found.ledger_micros == expected
    # Credits and reversals reach the live balance at once; usage reaches it through
    # the proxies' settle (these events were made without a proxy), never via ingest.
    assert found.live_micros == expected + sum(costs)

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    async with TestClient(TestServer(make_app(web.settings, stores))) as admin:
        r = await admin.get("/admin/billing/reconciliation",
                            params={"from": today, "to": today, "account_id": account},
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        report = await r.json()
    assert report["difference_micros"] == {"credit": 0, "reversal": 0}, report
    assert report["stripe"]["credit_micros"] - report["stripe"]["reversal_micros"] == \
        (paid - refunded) * CENT
    assert uuid.UUID(report["account_id"]) == uuid.UUID(account)
