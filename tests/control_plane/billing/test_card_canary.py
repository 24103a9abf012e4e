"""A canary card through the whole flow — a PaymentMethod made with the official SDK at
localstripe (which, like Stripe's test mode, takes any 16-digit number: this one is
Luhn-valid and distinctive), the top-up, localstripe's signed webhook, the return path,
a refund announced by webhook, reconciliation and its report — and then the card
number, its CVC, the Stripe secret key and the webhook secret are in no log line
(every logger at DEBUG, and the process's stdout/stderr), no Postgres row of any
table, and no Redis key or value."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import stripe
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from control_plane import logs
from control_plane.admin_api import make_app
from control_plane.billing.gateway import StripeGateway
from control_plane.billing.reconcile import ReconcileMetrics, Reconciler
from control_plane.web.state import STORES
from tests.control_plane.billing.conftest import STRIPE_KEY, WEBHOOK_SECRET, event
from tests.control_plane.billing.flows import balance, pay, signed_in, start_topup
from tests.control_plane.billing.stripe_events import deliver, event_id
from tests.control_plane.factories import ADMIN_TOKEN
from tests.control_plane.web.conftest import Web
from tests.end_to_end.conftest import Stack, _assert_nowhere

pytestmark = pytest.mark.timeout(120)

# The CVC is three digits, so it is looked for only where it could have been written as
# given (text and JSON, log lines), as a value of its own, and it starts with a 0: no
# integer (a row id, an amount, a count) is ever printed that way, so a match is the CVC.
CARD, CVC = "4000123456789017", "086"
CVC_ALONE = re.compile(rf"(?<![\w.]){CVC}(?![\w.])")


async def test_the_card_and_the_stripe_secrets_are_nowhere(
        billing_web: Web, stripe_client: stripe.StripeClient, redis: aioredis.Redis,
        migrated_url: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    sdk = logging.getLogger("stripe")
    before = sdk.level
    logs.quiet_libraries()  # as the service's logging set-up does (logs.configure)
    try:
        await _flow(billing_web, stripe_client, redis, migrated_url, caplog, capfd, tmp_path)
    finally:
        sdk.setLevel(before)


async def _flow(web: Web, stripe_client: stripe.StripeClient, redis: aioredis.Redis,
                migrated_url: str, caplog: pytest.LogCaptureFixture,
                capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    stores = web.client.server.app[STORES]
    account, headers = await signed_in(web)
    intent = (await (await start_topup(web, headers, 2000)).json())["data"][
        "payment_intent_id"]
    await pay(stripe_client, intent, number=CARD, cvc=CVC)
    for _ in range(300):  # localstripe's own signed webhook, about a second later
        if (await balance(web, account)).ledger_micros == 20_000_000:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("localstripe's webhook never credited the top-up")
    r = await web.client.post("/api/v1/credits/topup/complete",
                              json={"payment_intent_id": intent}, headers=headers)
    assert r.status == 200, await r.text()

    await stripe_client.v1.refunds.create_async({"payment_intent": intent, "amount": 700})
    charge_id = (await stripe_client.v1.payment_intents.retrieve_async(
        intent)).to_dict()["latest_charge"]["id"]
    charge = (await stripe_client.v1.charges.retrieve_async(charge_id)).to_dict()
    charge["payment_intent"] = intent
    assert await deliver(web, event(event_id(), "charge.refunded", charge)) == "reversed"
    gateway = StripeGateway(web.settings.billing)
    try:
        await Reconciler(stores.pool, stores.redis, stores.settings.names, gateway,
                         ReconcileMetrics(CollectorRegistry()), lookback_s=3600).run_once()
    finally:
        await gateway.close()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    async with TestClient(TestServer(make_app(web.settings, stores))) as admin:
        r = await admin.get("/admin/billing/reconciliation",
                            params={"from": today, "to": today, "account_id": account},
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert (await r.json())["difference_micros"] == {"credit": 0, "reversal": 0}
    assert (await balance(web, account)).ledger_micros == 13_000_000

    # Every log line, and whatever reached the process's stdout and stderr.
    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    log_file = tmp_path / "service.log"
    log_file.write_text(logged + out + err)
    assert logged, "nothing was logged: the check would prove nothing"
    for canary in (CARD, STRIPE_KEY, WEBHOOK_SECRET):
        await _assert_nowhere(canary, redis, migrated_url,
                              Stack("", "", [log_file], stores.settings.names))
    # The CVC, and the number written as people write it.
    assert not CVC_ALONE.search(logged + out + err)
    spaced = " ".join(CARD[i:i + 4] for i in range(0, 16, 4))
    assert spaced not in logged + out + err
    for table, text in await _rows(migrated_url):
        assert not CVC_ALONE.search(text) and spaced not in text, table
    # The card's last four digits are what Stripe returns for display; they may be shown.


async def _rows(url: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        # Every text, varchar and JSON column of every table (partitions included).
        columns = await conn.fetch(
            "SELECT format('%I.%I', c.table_schema, c.table_name) AS t, "
            "format('%I', c.column_name) AS c FROM information_schema.columns c "
            "JOIN pg_tables p ON p.schemaname = c.table_schema AND p.tablename = c.table_name "
            "WHERE c.table_schema NOT IN ('pg_catalog', 'information_schema') "
            "AND c.data_type IN ('text', 'character varying', 'json', 'jsonb')")
        assert columns
        return [(t, text) for t, c in columns
                for (text,) in await conn.fetch(  # noqa: S608
                    f"SELECT {c}::text FROM {t} WHERE {c} IS NOT NULL")]
    finally:
        await conn.close()
