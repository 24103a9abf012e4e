"""Auto top-up against localstripe: a card saved with a SetupIntent through the account
API, settings checked (CSRF, ranges, a card first), one off-session charge per crossing
credited through the webhook's own function, and a card that fails off-session turning
auto top-up off with an e-mail holding Stripe's reason code."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from control_plane import ledger
from control_plane.billing import auto_topup, balance_watch, low_balance
from control_plane.billing.balance_watch import AUTO_TOPUP, LOW_BALANCE, Action
from control_plane.billing.gateway import StripeGateway
from control_plane.billing.routes import BILLING
from control_plane.runtime import Stores
from control_plane.web.state import STORES
from tests.control_plane.billing.flows import balance, count, signed_in
from tests.control_plane.web.conftest import Web
from tests.proxy.conftest import closed_port

pytestmark = pytest.mark.timeout(120)

DOLLAR = 1_000_000
SETTINGS_URL = "/api/v1/credits/auto-topup"


async def save_card(web: Web, headers: dict[str, str], stripe_client: stripe.StripeClient,
                    payment_method: str = "pm_card_visa") -> dict[str, Any]:
    """What the credits page does with Stripe.js: a SetupIntent, confirmed by the
    browser with the card (here the SDK, with one of Stripe's test PaymentMethods)."""
    r = await web.client.post(SETTINGS_URL + "/card", json={"request_id": str(uuid.uuid4())},
                              headers=headers)
    assert r.status == 201, await r.text()
    setup = (await r.json())["data"]
    assert setup["client_secret"].startswith(setup["setup_intent_id"] + "_secret_")
    await stripe_client.v1.setup_intents.confirm_async(
        setup["setup_intent_id"], {"payment_method": payment_method})
    r = await web.client.post(SETTINGS_URL + "/card/complete",
                              json={"setup_intent_id": setup["setup_intent_id"]},
                              headers=headers)
    assert r.status == 200, await r.text()
    data: dict[str, Any] = (await r.json())["data"]
    return data


async def put_settings(web: Web, headers: dict[str, str], **body: Any) -> Any:
    return await web.client.put(SETTINGS_URL, json=body, headers=headers)


def _stores(web: Web) -> Stores:
    return web.client.server.app[STORES]


def _actions(web: Web) -> dict[str, Action]:
    s = web.settings
    return {AUTO_TOPUP: auto_topup.action(s.billing),
            LOW_BALANCE: low_balance.action(s.public_url)}


def _charger(web: Web) -> auto_topup.Charger:
    stores, gateway = _stores(web), web.client.server.app[BILLING].gateway
    assert gateway is not None
    return auto_topup.Charger(stores.pool, stores.redis, stores.settings.names, gateway,
                              web.settings.public_url)


async def _check(web: Web, account: str) -> balance_watch.Checked:
    stores = _stores(web)
    return await balance_watch.check(stores.pool, stores.redis, stores.settings.names,
                                     _actions(web), [uuid.UUID(account)])


async def _adjust(web: Web, account: str, micros: int) -> None:
    stores = _stores(web)
    await ledger.credit(stores.pool, stores.redis, stores.settings.names, account,
                        "adjustment", micros)


async def test_settings_are_checked_and_need_a_card_first(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    _, headers = await signed_in(billing_web)
    r = await billing_web.client.get(SETTINGS_URL)
    assert (await r.json())["data"] == {
        "enabled": False, "threshold_cents": None, "amount_cents": None, "card": None,
        "disabled_reason": None, "low_balance_cents": None}
    r = await put_settings(billing_web, headers, enabled=True, threshold_cents=500,
                           amount_cents=2000)
    assert r.status == 400 and "card" in (await r.json())["error"]["message"]
    # Without the session's CSRF token: refused before anything is read.
    r = await put_settings(billing_web, billing_web.same_origin, low_balance_cents=100)
    assert r.status == 403

    saved = await save_card(billing_web, headers, stripe_client)
    assert saved["card"] == {"brand": "visa", "last4": "4242"}
    for bad in ({"amount_cents": 499}, {"amount_cents": 1_000_001}, {"amount_cents": "20"},
                {"threshold_cents": 0}, {"threshold_cents": 2.5}, {"enabled": "yes"},
                {"low_balance_cents": -1}, {"colour": "red"}):
        r = await put_settings(billing_web, headers, **{"enabled": True,
                               "threshold_cents": 500, "amount_cents": 2000, **bad})
        assert r.status == 400, (bad, await r.text())
        assert (await r.json())["error"]["message"]
    r = await put_settings(billing_web, headers, enabled=True, threshold_cents=500,
                           amount_cents=2000, low_balance_cents=300)
    assert r.status == 200, await r.text()
    assert (await r.json())["data"] == {
        "enabled": True, "threshold_cents": 500, "amount_cents": 2000,
        "card": {"brand": "visa", "last4": "4242"}, "disabled_reason": None,
        "low_balance_cents": 300}

    # The dashboard's form sets the same settings, in dollars.
    page = await billing_web.client.get("/credits")
    assert page.status == 200
    assert "Visa •••• 4242" in await page.text()  # as the page shows a saved card
    r = await billing_web.client.post(
        "/credits/auto-topup", allow_redirects=False, headers=billing_web.same_origin,
        data={"csrf_token": headers["X-CSRF-Token"], "threshold": "7.50", "amount": "25",
              "low_balance": ""})
    assert r.status == 303, await r.text()
    r = await billing_web.client.get(SETTINGS_URL)
    data = (await r.json())["data"]
    assert (data["enabled"], data["threshold_cents"], data["amount_cents"],
            data["low_balance_cents"]) == (False, 750, 2500, None)
    # On again through the API, then off from a form whose threshold was emptied.
    r = await put_settings(billing_web, headers, enabled=True)
    assert (await r.json())["data"]["enabled"] is True
    r = await billing_web.client.post(
        "/credits/auto-topup", allow_redirects=False, headers=billing_web.same_origin,
        data={"csrf_token": headers["X-CSRF-Token"], "threshold": "", "amount": "25"})
    assert r.status == 303, await r.text()
    data = (await (await billing_web.client.get(SETTINGS_URL)).json())["data"]
    assert (data["enabled"], data["threshold_cents"]) == (False, 750)
    r = await billing_web.client.post(
        "/credits/auto-topup", headers=billing_web.same_origin,
        data={"csrf_token": headers["X-CSRF-Token"], "threshold": "abc"})
    assert r.status == 400 and "dollar amount" in await r.text()


async def test_another_accounts_card_setup_is_not_found(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    _, victim = await signed_in(billing_web)
    r = await billing_web.client.post(SETTINGS_URL + "/card",
                                      json={"request_id": str(uuid.uuid4())}, headers=victim)
    setup_id = (await r.json())["data"]["setup_intent_id"]
    await stripe_client.v1.setup_intents.confirm_async(setup_id,
                                                       {"payment_method": "pm_card_visa"})
    billing_web.client.session.cookie_jar.clear()
    _, attacker = await signed_in(billing_web)
    await save_card(billing_web, attacker, stripe_client)  # a Customer of its own
    r = await billing_web.client.post(SETTINGS_URL + "/card/complete",
                                      json={"setup_intent_id": setup_id}, headers=attacker)
    assert r.status == 404, await r.text()
    r = await billing_web.client.get(SETTINGS_URL)
    assert (await r.json())["data"]["card"]["last4"] == "4242"


async def test_one_off_session_charge_per_crossing_credited_once(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    await save_card(billing_web, headers, stripe_client)
    r = await put_settings(billing_web, headers, enabled=True, threshold_cents=500,
                           amount_cents=2000)
    assert r.status == 200, await r.text()
    await _adjust(billing_web, account, 10 * DOLLAR)
    assert (await _check(billing_web, account)).fired == 0
    await _adjust(billing_web, account, -6 * DOLLAR)  # $4: below $5

    checks = await asyncio.gather(*(_check(billing_web, account) for _ in range(6)))
    assert sum(c.fired for c in checks) == 1
    charger = _charger(billing_web)
    outcomes = await asyncio.gather(charger.charge_once(), _charger(billing_web).charge_once())
    done = [o for o in outcomes if o is not None]
    assert len(done) == 1 and done[0].status == "succeeded", outcomes
    assert await charger.charge_once() is None

    intent = await stripe_client.v1.payment_intents.retrieve_async(done[0].payment_intent_id)
    assert (intent.amount, intent.status) == (2130, "succeeded")  # $20 + 5 % + $0.30
    assert intent.metadata["qnp_kind"] == "auto_topup"
    assert (await balance(billing_web, account)).ledger_micros == 24 * DOLLAR
    assert await count(billing_web, "SELECT count(*) FROM credit_ledger WHERE "
                       "account_id = $1 AND kind = 'topup'", uuid.UUID(account)) == 1
    # Above the threshold again: re-armed, and the next crossing is a new charge.
    assert (await _check(billing_web, account)).rearmed == 1
    await _adjust(billing_web, account, -21 * DOLLAR)
    assert (await _check(billing_web, account)).fired == 1
    second = await charger.charge_once()
    assert second is not None and second.status == "succeeded"
    assert second.payment_intent_id != done[0].payment_intent_id
    assert (await balance(billing_web, account)).ledger_micros == 23 * DOLLAR


async def test_a_card_that_fails_off_session_turns_auto_topup_off_and_says_why(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    # Saved fine, declined when charged (Stripe's 4000 0000 0000 0341).
    await save_card(billing_web, headers, stripe_client, "pm_card_chargeCustomerFail")
    r = await put_settings(billing_web, headers, enabled=True, threshold_cents=500,
                           amount_cents=1000)
    assert r.status == 200, await r.text()
    await _adjust(billing_web, account, 2 * DOLLAR)
    assert (await _check(billing_web, account)).fired == 1

    outcome = await _charger(billing_web).charge_once()
    assert outcome is not None
    assert (outcome.status, outcome.failure_code) == ("failed", "card_declined")
    data = (await (await billing_web.client.get(SETTINGS_URL)).json())["data"]
    assert (data["enabled"], data["disabled_reason"]) == (False, "card_declined")
    assert await count(billing_web, "SELECT count(*) FROM credit_ledger WHERE "
                       "account_id = $1 AND kind = 'topup'", uuid.UUID(account)) == 0
    mail = await _stores(billing_web).pool.fetch(
        "SELECT o.to_address, o.kind, o.subject, o.body FROM email_outbox o "
        "WHERE o.account_id = $1 AND o.template = 'auto_topup_failed'", uuid.UUID(account))
    assert len(mail) == 1 and mail[0]["kind"] == "transactional"
    assert "card_declined" in mail[0]["body"] and "0341" not in mail[0]["body"]
    page = await (await billing_web.client.get("/credits")).text()
    assert "turned off because a charge failed" in page and "card_declined" in page
    # Off: the balance staying low charges nothing more.
    await _adjust(billing_web, account, -DOLLAR)
    assert (await _check(billing_web, account)).fired == 0
    assert await _charger(billing_web).charge_once() is None


async def test_stripe_unreachable_retries_the_same_crossing_later_with_its_key(
        billing_web: Web, stripe_client: stripe.StripeClient) -> None:
    account, headers = await signed_in(billing_web)
    await save_card(billing_web, headers, stripe_client)
    r = await put_settings(billing_web, headers, enabled=True, threshold_cents=500,
                           amount_cents=1000)
    assert r.status == 200, await r.text()
    await _adjust(billing_web, account, 3 * DOLLAR)
    assert (await _check(billing_web, account)).fired == 1
    stores = _stores(billing_web)
    t0 = datetime.now(UTC) + timedelta(minutes=1)  # the charge was due at the claim
    down = StripeGateway(replace(billing_web.settings.billing,
                                 stripe_api_base=f"http://127.0.0.1:{closed_port()}"))
    try:
        unreachable = auto_topup.Charger(stores.pool, stores.redis, stores.settings.names,
                                         down, billing_web.settings.public_url,
                                         clock=lambda: t0)
        outcome = await unreachable.charge_once()
        assert outcome is not None and outcome.status == "retrying"
    finally:
        await down.close()
    # A manual top-up meanwhile does not re-arm it: no second charge while one is due.
    await _adjust(billing_web, account, 10 * DOLLAR)
    assert (await _check(billing_web, account)).rearmed == 0
    row = await stores.pool.fetchrow("SELECT * FROM auto_topup_charges WHERE account_id = $1",
                                     uuid.UUID(account))
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == \
        ("pending", 1, t0 + timedelta(seconds=auto_topup.BACKOFF_BASE_S))
    # Not due before its back-off; then the same crossing (and so the same idempotency
    # key, qnp-auto-topup-<account>-1) is charged, once.
    gateway = billing_web.client.server.app[BILLING].gateway
    assert gateway is not None

    def charger_at(at: datetime) -> auto_topup.Charger:
        return auto_topup.Charger(stores.pool, stores.redis, stores.settings.names, gateway,
                                  billing_web.settings.public_url, clock=lambda: at)

    assert await charger_at(t0 + timedelta(seconds=29)).charge_once() is None
    later = await charger_at(t0 + timedelta(seconds=31)).charge_once()
    assert later is not None and later.status == "succeeded"
    assert auto_topup.idempotency_key(uuid.UUID(account), 1) == \
        f"qnp-auto-topup-{account}-1"
    assert (await balance(billing_web, account)).ledger_micros == 23 * DOLLAR
    assert (await _check(billing_web, account)).rearmed == 1  # charged: armed again
