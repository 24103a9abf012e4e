"""POST /webhooks/stripe: signed as Stripe signs (t=, v1=HMAC-SHA256 of "t.body"),
verified against the raw body with a 300 s tolerance; a succeeded payment is credited
exactly once however often, and under however many event ids, it is delivered."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from control_plane.web.state import STORES
from tests.control_plane.billing.conftest import event, sign
from tests.control_plane.billing.flows import balance, count, signed_in, start_topup
from tests.control_plane.web.conftest import Web

pytestmark = pytest.mark.timeout(120)


async def _started(web: Web) -> tuple[str, dict[str, Any]]:
    account, headers = await signed_in(web)
    r = await start_topup(web, headers, 2000)
    assert r.status == 201, await r.text()
    return account, (await r.json())["data"]


def _succeeded(started: dict[str, Any], event_id: str | None = None) -> bytes:
    return event(event_id or f"evt_{uuid.uuid4().hex[:24]}", "payment_intent.succeeded",
                 {"id": started["payment_intent_id"], "object": "payment_intent",
                  "amount": started["amount_cents"],
                  "amount_received": started["amount_cents"], "currency": "usd",
                  "status": "succeeded"})


async def _deliver(web: Web, body: bytes, signature: str) -> Any:
    return await web.client.post("/webhooks/stripe", data=body, headers={
        "Stripe-Signature": signature, "Content-Type": "application/json"})


async def _ledger(web: Web, account: str) -> int:
    return (await balance(web, account)).ledger_micros


@pytest.mark.parametrize("why", ["wrong secret", "body changed", "301 s old", "no header"])
async def test_a_bad_signature_or_old_timestamp_is_400_and_credits_nothing(
        billing_web: Web, why: str) -> None:
    account, started = await _started(billing_web)
    body = _succeeded(started)
    signature = {
        "wrong secret": sign(body, secret="whsec_someone_else"),
        "body changed": sign(body.replace(b"2130", b"9130")),
        "301 s old": sign(body, at=int(time.time()) - 301),
        "no header": "",
    }[why]
    r = await _deliver(billing_web, body, signature)
    assert r.status == 400, await r.text()
    assert await _ledger(billing_web, account) == 0
    assert await count(billing_web, "SELECT count(*) FROM billing_events "
                       "WHERE event_id = $1", orjson.loads(body)["id"]) == 0


async def test_a_fresh_signature_within_the_tolerance_is_accepted(billing_web: Web) -> None:
    account, started = await _started(billing_web)
    body = _succeeded(started)
    r = await _deliver(billing_web, body, sign(body, at=int(time.time()) - 240))
    assert r.status == 200, await r.text()
    assert (await r.json())["data"]["outcome"] == "credited"
    assert await _ledger(billing_web, account) == 20_000_000


async def test_the_same_event_five_times_credits_once(billing_web: Web) -> None:
    account, started = await _started(billing_web)
    body = _succeeded(started)
    outcomes = []
    for _ in range(5):
        r = await _deliver(billing_web, body, sign(body))
        assert r.status == 200, await r.text()
        outcomes.append((await r.json())["data"]["outcome"])
    assert outcomes == ["credited"] + ["duplicate"] * 4
    assert await _ledger(billing_web, account) == 20_000_000
    live = (await balance(billing_web, account)).live_micros
    assert live == 20_000_000


async def test_concurrent_deliveries_under_different_event_ids_credit_once(
        billing_web: Web) -> None:
    # Stripe may send one payment's success as distinct events (and the page's return
    # path will credit the same PaymentIntent): the PaymentIntent is credited once.
    account, started = await _started(billing_web)
    bodies = [_succeeded(started) for _ in range(5)] * 2
    answers = await asyncio.gather(*(_deliver(billing_web, b, sign(b)) for b in bodies))
    assert [a.status for a in answers] == [200] * 10
    assert await _ledger(billing_web, account) == 20_000_000
    assert await count(billing_web, "SELECT count(*) FROM credit_ledger "
                       "WHERE account_id = $1", uuid.UUID(account)) == 1
    assert await count(billing_web, "SELECT count(DISTINCT event_id) FROM billing_events "
                       "WHERE type = 'payment_intent.succeeded' AND ledger_id = "
                       "(SELECT id FROM credit_ledger WHERE account_id = $1)",
                       uuid.UUID(account)) == 5


async def test_unknown_types_are_acknowledged_and_counted(billing_web: Web) -> None:
    registry = billing_web.client.server.app[STORES].metrics.registry

    def counted() -> float:
        return registry.get_sample_value("qnp_billing_webhook_unknown_types_total",
                                         {"type": "customer.updated"}) or 0.0

    before = counted()
    body = event(f"evt_{uuid.uuid4().hex}", "customer.updated",
                 {"id": "cus_x", "object": "customer"})
    for _ in range(2):
        r = await _deliver(billing_web, body, sign(body))
        assert r.status == 200, await r.text()
        assert (await r.json())["data"]["outcome"] == "ignored"
    assert counted() - before == 2
    assert await count(billing_web, "SELECT count(*) FROM credit_ledger "
                       "WHERE reference = 'stripe:cus_x'") == 0


async def test_a_payment_we_did_not_start_or_that_paid_less_credits_nothing(
        billing_web: Web) -> None:
    account, started = await _started(billing_web)
    stranger = event(f"evt_{uuid.uuid4().hex}", "payment_intent.succeeded",
                     {"id": "pi_not_ours", "amount": 2130, "currency": "usd"})
    short = event(f"evt_{uuid.uuid4().hex}", "payment_intent.succeeded",
                  {"id": started["payment_intent_id"], "amount": 2130,
                   "amount_received": 2000, "currency": "usd"})
    outcomes = []
    for body in (stranger, short):
        r = await _deliver(billing_web, body, sign(body))
        assert r.status == 200, await r.text()
        outcomes.append((await r.json())["data"]["outcome"])
    assert outcomes == ["unmatched", "mismatch"]
    assert await _ledger(billing_web, account) == 0
