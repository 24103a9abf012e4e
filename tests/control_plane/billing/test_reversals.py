"""Refunds and disputes through the signed webhook: a refund debits the change in
Stripe's cumulative amount_refunded, exactly once, in any order; a dispute debits the
disputed credit once and pauses the account's keys on every proxy until it is won,
which gives both back; the dashboard says why and offers a human review."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest

from control_plane import keys
from control_plane.web.state import STORES
from tests.control_plane.billing.flows import balance, count, signed_in, start_topup
from tests.control_plane.billing.stripe_events import deliver, dispute, refunded, succeeded
from tests.control_plane.web.conftest import Web
from tests.proxy.conftest import (  # noqa: F401  (fixtures)
    Gateway,
    GatewayFactory,
    mock_anthropic,
    mock_gemini,
    start_gateway,
)

pytestmark = pytest.mark.timeout(120)

# QNP_TOPUP_FEE_BPS=500 and QNP_TOPUP_FEE_FIXED_CENTS=30: $20 of credit is charged $21.30.
CREDIT, CHARGED = 20_000_000, 2130


async def _paid(web: Web) -> tuple[str, dict[str, str], str, str]:
    """A signed-in account with a $20 top-up credited: (account, headers, intent, charge)."""
    account, headers = await signed_in(web)
    r = await start_topup(web, headers, 2000)
    assert r.status == 201, await r.text()
    intent = (await r.json())["data"]["payment_intent_id"]
    assert await deliver(web, succeeded(intent, CHARGED)) == "credited"
    return account, headers, intent, "ch_" + uuid.uuid4().hex[:24]


async def _ledger(web: Web, account: str) -> tuple[int, int | None]:
    found = await balance(web, account)
    return found.ledger_micros, found.live_micros


async def _reversals(web: Web, account: str) -> list[int]:
    rows = await web.client.server.app[STORES].pool.fetch(
        "SELECT amount_micros FROM credit_ledger WHERE account_id = $1 AND kind = 'reversal' "
        "ORDER BY id", uuid.UUID(account))
    return [r["amount_micros"] for r in rows]


async def test_half_then_the_rest_two_debits_that_add_up_to_the_payment(
        billing_web: Web) -> None:
    account, _, intent, charge = await _paid(billing_web)
    half = refunded(intent, charge, CHARGED, [("re_a" + charge, 1065)])
    rest = refunded(intent, charge, CHARGED, [("re_a" + charge, 1065), ("re_b" + charge, 1065)])
    assert await deliver(billing_web, half) == "reversed"
    assert await _ledger(billing_web, account) == (CREDIT - 10_650_000,) * 2
    assert await deliver(billing_web, rest) == "reversed"
    for body in (half, rest):  # Stripe retries: nothing changes
        assert await deliver(billing_web, body) == "duplicate"
    # The refund takes the credit first and the fee last: $21.30 back, $20 debited.
    assert await _reversals(billing_web, account) == [-10_650_000, -9_350_000]
    assert await _ledger(billing_web, account) == (0, 0)


async def test_the_second_refunds_event_first_still_debits_the_payment_once(
        billing_web: Web) -> None:
    account, _, intent, charge = await _paid(billing_web)
    first = refunded(intent, charge, CHARGED, [("re_a" + charge, 500)])
    second = refunded(intent, charge, CHARGED, [("re_a" + charge, 500), ("re_b" + charge, 700)])
    assert await deliver(billing_web, second) == "reversed"
    assert await deliver(billing_web, first) == "recorded"  # older news: nothing to add
    # The same state again under a new event id (Stripe sends one per refund).
    assert await deliver(billing_web, refunded(
        intent, charge, CHARGED, [("re_a" + charge, 500), ("re_b" + charge, 700)])) == "recorded"
    assert await _reversals(billing_web, account) == [-12_000_000]
    assert await _ledger(billing_web, account) == (CREDIT - 12_000_000,) * 2
    assert await count(billing_web, "SELECT count(*) FROM billing_refunds "
                       "WHERE charge_id = $1", charge) == 2


async def test_a_refund_of_a_payment_not_ours_or_beyond_it_changes_nothing(
        billing_web: Web) -> None:
    account, _, intent, charge = await _paid(billing_web)
    assert await deliver(billing_web, refunded("pi_not_ours", charge, CHARGED,
                                               [("re_x" + charge, 100)])) == "unmatched"
    assert await deliver(billing_web, refunded(intent, charge, CHARGED,
                                               [("re_y" + charge, CHARGED + 1)])) == "mismatch"
    assert await _ledger(billing_web, account) == (CREDIT, CREDIT)


async def _call(gateway: Gateway, key: str) -> Any:
    async with gateway.client(key) as client:
        return await client.chat.completions.create(
            model="demo-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


async def _refused_everywhere(gateways: list[Gateway], key: str) -> None:
    for gateway in gateways:
        with pytest.raises(openai.PermissionDeniedError, match="suspended"):
            await _call(gateway, key)


async def test_a_dispute_pauses_the_keys_at_once_and_winning_it_restores_both(
        billing_web: Web, start_gateway: GatewayFactory, tmp_path: Path,  # noqa: F811
) -> None:
    account, headers, intent, charge = await _paid(billing_web)
    stores = billing_web.client.server.app[STORES]
    issued = await keys.issue_key(stores.pool, stores.redis, stores.settings.names, account,
                                  bcrypt_rounds=4)
    # Two proxies (each its own spool, as two processes would have).
    proxies = [await start_gateway(QNP_SPOOL_DIR=str(tmp_path / f"spool-{n}"),
                                   QNP_NODE_ID=f"node-{n}") for n in (1, 2)]
    for gateway in proxies:
        assert (await _call(gateway, issued.key)).choices

    dp = "dp_" + uuid.uuid4().hex[:20]
    assert await deliver(billing_web, dispute("created", intent, charge, dp, CHARGED,
                                              "needs_response")) == "reversed"
    # The next request on every proxy, with no wait: the account state hash says so.
    await _refused_everywhere(proxies, issued.key)
    assert await deliver(billing_web, dispute("funds_withdrawn", intent, charge, dp, CHARGED,
                                              "needs_response")) == "recorded"
    assert (await balance(billing_web, account)).ledger_micros == 0

    page = await (await billing_web.client.get("/")).text()
    assert "Your API keys are paused" in page and "unauthorised" in page
    form = re.search(r'<form method="post" action="/settings/privacy/human-review">(.*?)</form>',
                     page, re.S)
    assert form and f'name="about" value="dispute:{dp}"' in form.group(1)
    assert f'name="csrf_token" value="{headers["X-CSRF-Token"]}"' in form.group(1)

    # Another account sees no notice of ours.
    billing_web.client.session.cookie_jar.clear()
    await signed_in(billing_web)
    assert "paused" not in await (await billing_web.client.get("/")).text()

    assert await deliver(billing_web, dispute("closed", intent, charge, dp, CHARGED,
                                              "won")) == "reinstated"
    assert await deliver(billing_web, dispute("funds_reinstated", intent, charge, dp, CHARGED,
                                              "won")) == "recorded"
    for gateway in proxies:
        assert (await _call(gateway, issued.key)).choices
    assert await _reversals(billing_web, account) == [-CREDIT, CREDIT]
    assert (await balance(billing_web, account)).ledger_micros == CREDIT


@pytest.mark.parametrize("order", ["closed first", "withdrawn first"])
async def test_a_lost_dispute_keeps_the_debit_and_lifts_the_pause_in_any_order(
        billing_web: Web, order: str) -> None:
    account, _, intent, charge = await _paid(billing_web)
    dp = "dp_" + uuid.uuid4().hex[:20]
    bodies = [dispute("funds_withdrawn", intent, charge, dp, 1000, "needs_response"),
              dispute("closed", intent, charge, dp, 1000, "lost")]
    if order == "closed first":
        bodies.reverse()
    for body in bodies:
        await deliver(billing_web, body)
    assert await _reversals(billing_web, account) == [-10_000_000]
    stores = billing_web.client.server.app[STORES]
    state = await stores.redis.hget(stores.settings.names.account_state(account), "status")
    assert state in (b"active", "active")
