"""The billing history (credits page, /credits/history.csv, /api/v1/credits/history):
each payment with amount, fee, credit, status, date, card brand and last 4 and Stripe's
receipt link when there is one, only the caller's own; and the credits page, alone,
allowing Stripe.js's origin in its CSP."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import pytest
import stripe

from control_plane.billing import history
from control_plane.billing.gateway import Intent, _intent
from control_plane.web.state import STORES
from tests.control_plane.billing.conftest import PUBLISHABLE_KEY
from tests.control_plane.billing.flows import balance, signed_in, start_topup
from tests.control_plane.web.conftest import Web

pytestmark = pytest.mark.timeout(120)
HANG_GUARD_S = 30.0


async def _paid(web: Web, client: stripe.StripeClient, headers: dict[str, str],
                number: str = "4242424242424242") -> str:
    started = (await (await start_topup(web, headers, 2000)).json())["data"]
    intent = started["payment_intent_id"]
    method = await client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030,
                                  "cvc": "123"}})
    await client.v1.payment_intents.update_async(intent, {"payment_method": method.id})
    with_error: Any = None
    try:
        await client.v1.payment_intents.confirm_async(intent)
    except stripe.CardError as e:
        with_error = e
    assert (with_error is None) == (number == "4242424242424242")
    return str(intent)


async def _history(web: Web, headers: dict[str, str]) -> list[dict[str, Any]]:
    r = await web.client.get("/api/v1/credits/history", headers=headers)
    assert r.status == 200, await r.text()
    rows: list[dict[str, Any]] = (await r.json())["data"]
    return rows


async def test_the_history_shows_a_paid_and_a_declined_payment_in_every_format(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    _, headers = await signed_in(billing_web)
    paid = await _paid(billing_web, stripe_client, headers)
    declined = await _paid(billing_web, stripe_client, headers, "4000000000000002")
    opened = (await (await start_topup(billing_web, headers, 900)).json())["data"]
    for intent in (paid, declined, opened["payment_intent_id"]):
        r = await billing_web.client.post("/api/v1/credits/topup/complete", headers=headers,
                                          json={"payment_intent_id": intent})
        assert r.status == 200, await r.text()

    rows = await _history(billing_web, headers)
    # Opened and never paid: not a payment. Newest first.
    assert [(r["payment_intent_id"], r["status"]) for r in rows] == \
        [(declined, "failed"), (paid, "succeeded")]
    got = rows[1]
    assert (got["amount_cents"], got["fee_cents"], got["credit_cents"], got["currency"],
            got["card_brand"], got["card_last4"], got["receipt_url"]) == \
        (2130, 130, 2000, "usd", "visa", "4242", None)  # localstripe makes no receipts
    assert got["paid_at"] is not None and rows[0]["paid_at"] is None

    r = await billing_web.client.get("/credits/history.csv")
    assert r.status == 200 and "attachment" in r.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(await r.text())))
    assert [(t["payment_intent_id"], t["status"], t["card_last4"]) for t in table] == \
        [(declined, "failed", "0002"), (paid, "succeeded", "4242")]
    assert list(table[0]) == list(history.COLUMNS)

    page = await (await billing_web.client.get("/credits")).text()
    assert f'data-payment="{paid}" data-status="succeeded"' in page
    assert "Visa ···· 4242" in page and "Declined" in page


async def test_a_payment_credited_by_the_webhook_alone_gets_its_card_in_the_history(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    intent = await _paid(billing_web, stripe_client, headers)  # no return path: a closed tab
    deadline = time.monotonic() + HANG_GUARD_S
    while not [r for r in await _history(billing_web, headers) if r["card_last4"]]:
        assert time.monotonic() < deadline, "the webhook never credited the payment"
        await asyncio.sleep(0.1)
    [row] = await _history(billing_web, headers)
    assert (row["payment_intent_id"], row["status"], row["card_last4"]) == \
        (intent, "succeeded", "4242")
    assert (await balance(billing_web, account)).ledger_micros == 20_000_000


async def test_another_account_sees_none_of_the_history(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    _, theirs = await signed_in(billing_web)
    await _paid(billing_web, stripe_client, theirs)
    billing_web.client.session.cookie_jar.clear()
    _, mine = await signed_in(billing_web)
    assert await _history(billing_web, mine) == []
    r = await billing_web.client.get("/credits/history.csv")
    assert (await r.text()).strip() == ",".join(history.COLUMNS)
    made = await billing_web.client.post("/api/v1/keys", headers=mine, json={"name": "i"})
    inference = (await made.json())["key"]
    billing_web.client.session.cookie_jar.clear()
    r = await billing_web.client.get("/api/v1/credits/history",
                                     headers={"Authorization": f"Bearer {inference}"})
    assert r.status == 403, await r.text()  # an inference key reads no billing
    r = await billing_web.client.get("/credits/history.csv", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signin")


def test_only_https_receipts_and_real_last_fours_are_kept() -> None:
    def intent(receipt: str, last4: str) -> Intent:
        return _intent(stripe.PaymentIntent.construct_from({
            "id": "pi_x", "client_secret": "pi_x_secret_y", "amount": 2130,
            "currency": "usd", "status": "succeeded",
            "payment_method": {"id": "pm_x", "card": {"brand": "visa", "last4": last4}},
            "latest_charge": {"id": "ch_x", "receipt_url": receipt}}, "sk_test_x"))

    kept = intent("https://pay.stripe.com/receipts/r_1", "4242")
    assert (kept.receipt_url, kept.card_last4) == ("https://pay.stripe.com/receipts/r_1", "4242")
    odd = intent("javascript:alert(1)", "42<b>")
    assert (odd.receipt_url, odd.card_last4) == (None, None)


async def test_a_receipt_is_linked_when_stripe_gives_one(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    _, headers = await signed_in(billing_web)
    intent = await _paid(billing_web, stripe_client, headers)
    receipt = "https://pay.stripe.com/receipts/acct_1/ch_1/rcpt_q?s=ap&x=<b>"
    await history.record(billing_web.client.server.app[STORES].pool, Intent(
        intent, "", 2130, "usd", "succeeded", receipt_url=receipt))
    page = await (await billing_web.client.get("/credits")).text()
    assert ('<a href="https://pay.stripe.com/receipts/acct_1/ch_1/rcpt_q?s=ap&amp;x=&lt;b&gt;"'
            in page)


async def test_only_the_credits_page_allows_stripe_js(billing_web: Web,
                                                      localstripe: str) -> None:
    await signed_in(billing_web)
    credits = await billing_web.client.get("/credits")
    policy = credits.headers["Content-Security-Policy"]
    for directive in ("script-src", "frame-src", "connect-src"):
        assert f"{directive} " in policy
        assert localstripe in policy.split(f"{directive} ", 1)[1].split(";", 1)[0]
    page = await credits.text()
    assert f'src="{localstripe}/js.stripe.com/v3/"' in page
    assert f'data-publishable-key="{PUBLISHABLE_KEY}"' in page
    for path in ("/", "/keys", "/usage", "/settings", "/credits/history.csv",
                 "/api/v1/credits/history"):
        r = await billing_web.client.get(path)
        assert localstripe not in r.headers["Content-Security-Policy"], path
