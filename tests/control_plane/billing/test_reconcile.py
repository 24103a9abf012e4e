"""Reconciliation against localstripe: a payment whose webhook was lost, and a refund
localstripe never announces, are put in the ledger by the job through the webhook's
own idempotent functions (once, however often it runs); the admin report shows the
difference before and none after."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from control_plane.admin_api import make_app
from control_plane.billing.gateway import StripeGateway
from control_plane.billing.reconcile import ReconcileMetrics, Reconciler
from control_plane.web.state import STORES
from tests.control_plane.billing.conftest import register_webhook
from tests.control_plane.billing.flows import balance, pay, signed_in, start_topup
from tests.control_plane.factories import ADMIN_TOKEN
from tests.control_plane.web.conftest import Web
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


async def _report(web: Web, account: str, **query: str) -> Any:
    stores = web.client.server.app[STORES]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    params = {"from": today, "to": today, "account_id": account, **query}
    async with TestClient(TestServer(make_app(web.settings, stores))) as admin:
        r = await admin.get("/admin/billing/reconciliation", params=params,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        return r.status, await r.json()


async def test_the_job_credits_a_lost_payment_and_debits_an_unannounced_refund_once(
        billing_web: Web, stripe_client: stripe.StripeClient, localstripe: str) -> None:
    await register_webhook(localstripe, f"http://127.0.0.1:{free_port()}/webhooks/stripe")
    account, headers = await signed_in(billing_web)
    intent = (await (await start_topup(billing_web, headers, 2000)).json())["data"][
        "payment_intent_id"]
    await pay(stripe_client, intent)  # its webhook goes nowhere
    assert (await balance(billing_web, account)).ledger_micros == 0
    status, before = await _report(billing_web, account)
    assert status == 200, before
    assert before["missing_payments"] == [intent]
    assert before["difference_micros"] == {"credit": 20_000_000, "reversal": 0}

    stores = billing_web.client.server.app[STORES]
    gateway = StripeGateway(billing_web.settings.billing)
    registry = CollectorRegistry()
    job = Reconciler(stores.pool, stores.redis, stores.settings.names, gateway,
                     ReconcileMetrics(registry), lookback_s=3600)
    try:
        first = await job.run_once()
        assert (await balance(billing_web, account)).ledger_micros == 20_000_000
        # A refund of $5 that no webhook announces (localstripe sends none).
        await stripe_client.v1.refunds.create_async({"payment_intent": intent, "amount": 500})
        second = await job.run_once()
        third = await job.run_once()
    finally:
        await gateway.close()
    assert first.repairs["payment"] >= 1 and second.repairs["refund"] == 1
    assert (third.repairs.get("payment", 0), third.repairs.get("refund", 0)) == (0, 0)
    found = await balance(billing_web, account)
    assert (found.ledger_micros, found.live_micros) == (15_000_000, 15_000_000)
    assert registry.get_sample_value("qnp_billing_reconcile_repairs_total",
                                     {"kind": "refund"}) == 1
    cursor = await stores.pool.fetchval(
        "SELECT since_unix FROM billing_reconcile_cursor WHERE name = 'stripe'")
    assert abs(cursor - time.time()) < 3600

    status, after = await _report(billing_web, account)
    assert after["difference_micros"] == {"credit": 0, "reversal": 0}
    assert after["missing_payments"] == [] and after["charges_differing"] == []
    assert after["stripe"]["credit_micros"] == 20_000_000
    assert after["stripe"]["reversal_micros"] == 5_000_000


@pytest.mark.parametrize("query", [{"from": "yesterday"}, {"to": "2020-01-01"},
                                   {"account_id": "not-a-uuid"}])
async def test_a_bad_period_is_a_clear_400(billing_web: Web, query: dict[str, str]) -> None:
    status, doc = await _report(billing_web, str(uuid.uuid4()), **query)
    assert status in (400, 404), doc
    assert doc["error"]["message"]
