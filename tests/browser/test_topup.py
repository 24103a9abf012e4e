"""A top-up in a real browser (Debian's Chromium through Playwright): a new person signs
in, finds the proxy refusing a call for want of credit (402), tops up $20 on the
credits page with Stripe's card form (localstripe's Stripe.js stand-in, loaded from
localstripe's origin: the one origin besides ours the page may reach, and only this
page), pays $21.30 (the fee on top), sees the balance rise by exactly $20 and the
payment in the history and its CSV, and the same call now succeeds. A declined card
shows Stripe's reason and credits nothing. Then a card is saved for auto top-up
(a SetupIntent confirmed by Stripe.js; a declined card shows Stripe's reason and saves
nothing) and auto top-up is turned on. No card number ever reaches our server."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import openai
import pytest
import stripe
from playwright.async_api import Page

from control_plane.auth.sessions import COOKIE
from control_plane.consent.cookies import CONSENT_COOKIE
from devstack.upstream_openai import MockOpenAIUpstream
from tests.browser.conftest import Browser, origin_of, undocumented
from tests.browser.test_journey import _sign_in
from tests.control_plane.billing.conftest import (  # noqa: F401  (fixtures)
    billing_web,
    localstripe,
    stripe_client,
)
from tests.control_plane.billing.flows import balance, count
from tests.control_plane.web.conftest import Web
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(600)  # the first run may apt-get install Chromium
CARD_FORM = "#card-element"  # Stripe's markup (here localstripe's), not ours: axe skips it
SETUP_FORM = "#card-setup-element"  # the card form that saves a card: Stripe's too


@pytest.fixture
def web(billing_web: Web) -> Web:  # noqa: F811
    """The browser's web app: the billing one, Stripe.js served by localstripe."""
    return billing_web


@pytest.fixture
def third_party_origins(localstripe: str) -> tuple[str, ...]:  # noqa: F811
    return (localstripe,)


async def _fill_card(page: Page, where: str, number: str) -> None:
    form = page.locator(where)
    for field, value in (("number", number), ("exp_month", "12"), ("exp_year", "30"),
                         ("cvc", "123"), ("postal_code", "10001")):
        await form.locator(f"input[placeholder={field}]").fill(value)


async def _pay(page: Page, dollars: str, number: str) -> None:
    await page.get_by_label("Amount in dollars").fill(dollars)
    await _fill_card(page, CARD_FORM, number)
    await page.get_by_role("button", name="Pay").click()


async def _save_card_and_turn_on_auto_topup(b: Browser, web: Web, account: str,
                                            problems: dict[str, object]) -> None:
    """A declined card first (Stripe's reason, nothing saved), then 4242 typed with
    spaces as people do; auto top-up can then be turned on, and stays on."""
    page = b.page
    section = page.get_by_test_id("auto-topup")
    enabled = section.get_by_label("Top up automatically")
    assert await enabled.is_disabled()  # no card yet
    await section.get_by_role("button", name="Save a card").click()
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        if violations := await b.axe(exclude=(CARD_FORM, SETUP_FORM)):
            problems[f"credits, saving a card ({scheme}): axe"] = violations
    await page.emulate_media(color_scheme="light")
    if overflow := await b.horizontal_overflow(390):
        problems[f"credits, saving a card: {overflow}px of horizontal scrolling"] = True

    status = page.get_by_test_id("card-setup-status")
    await _fill_card(page, SETUP_FORM, "4000000000000002")
    await page.get_by_role("button", name="Save this card").click()
    await status.filter(has_text="declined").wait_for()
    assert await status.inner_text() == "Your card was declined."
    assert await page.get_by_test_id("auto-topup-card").inner_text() == "none yet"
    assert await count(web, "SELECT count(*) FROM auto_topup_settings WHERE account_id = "
                       "$1::uuid AND payment_method_id IS NOT NULL", account) == 0

    await _fill_card(page, SETUP_FORM, "4242 4242 4242 4242")
    await page.get_by_role("button", name="Save this card").click()
    card = page.get_by_test_id("auto-topup-card")
    await card.filter(has_text="4242").wait_for()
    assert await card.inner_text() == "Visa •••• 4242"
    assert await enabled.is_enabled()
    await b.shot("13-credits-card-saved")
    await enabled.check()
    await section.get_by_label("When the balance falls below ($)", exact=True).fill("5")
    await section.get_by_label("Add this much credit").fill("20")
    await section.get_by_role("button", name="Save", exact=True).click()
    await page.wait_for_url(web.origin + "/credits")
    section = page.get_by_test_id("auto-topup")  # the page as the server shows it now
    assert await section.get_by_label("Top up automatically").is_checked()
    threshold = section.get_by_label("When the balance falls below ($)", exact=True)
    assert await threshold.input_value() == "5.00"
    assert await section.get_by_label("Add this much credit").input_value() == "20.00"
    assert await page.get_by_test_id("auto-topup-card").inner_text() == "Visa •••• 4242"
    await b.shot("14-credits-auto-topup-on")


async def test_a_top_up_in_the_browser_makes_the_credit_spendable(
    browser: Browser, web: Web, oidc_mock: str, localstripe: str,  # noqa: F811
    stripe_client: stripe.StripeClient, mock_upstream: MockOpenAIUpstream,  # noqa: F811
    tmp_path: Path,
) -> None:
    b, problems = browser, {}
    sent: list[tuple[str, str]] = []  # every request's URL and body
    b.context.on("request", lambda r: sent.append((r.url, r.post_data or "")))
    await _sign_in(b, web, oidc_mock, problems)
    page = b.page
    me = (await (await page.request.get(web.origin + "/api/v1/session")).json())["data"]
    made = await page.request.post(web.origin + "/api/v1/keys", data={"name": "topup"},
                                   headers={"X-CSRF-Token": me["csrf_token"],
                                            "Origin": web.origin})
    assert made.status == 201, await made.text()
    secret = (await made.json())["key"]

    port = free_port()
    env = proxy_env(web.settings.redis_url, web.settings.names,
                    write_catalog(tmp_path, mock_upstream.base_url), QNP_PROXY_PORT=str(port))
    with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env):
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key=secret, max_retries=0) as client:
            ask = {"model": "demo-mini", "messages": [{"role": "user", "content": "Hi"}]}
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(**ask)  # type: ignore[call-overload]
            assert refused.value.status_code == 402  # the old balance, $0, is too little

            await page.goto(web.origin + "/credits")
            assert await page.get_by_test_id("credits-balance").inner_text() == "$0.00"
            await page.get_by_label("Amount in dollars").fill("20")
            quote = page.get_by_test_id("topup-quote")
            await quote.filter(has_text="You pay $21.30").wait_for()
            assert "$20.00 of credit plus a $1.30 fee" in await quote.inner_text()
            for scheme in ("light", "dark"):
                await page.emulate_media(color_scheme=scheme)
                if violations := await b.axe(exclude=(CARD_FORM,)):
                    problems[f"credits with the card form ({scheme}): axe"] = violations
            await page.emulate_media(color_scheme="light")
            if overflow := await b.horizontal_overflow(390):
                problems[f"credits: {overflow}px of horizontal scrolling at 390px"] = True
            await b.shot("10-credits-topup")

            await _pay(page, "20", "4242424242424242")
            await page.get_by_test_id("topup-paid").wait_for()
            assert "$20.00 added" in await page.get_by_test_id("topup-paid").inner_text()
            assert await page.get_by_test_id("credits-balance").inner_text() == "$20.00"
            await b.shot("11-credits-paid")
            after = await balance(web, me["account_id"])
            assert (after.ledger_micros, after.live_micros) == (20_000_000, 20_000_000)

            answer = await client.chat.completions.create(**ask)  # type: ignore[call-overload]
            assert answer.choices[0].message.content

    row = page.locator("tr[data-status=succeeded]")
    assert await row.count() == 1
    text = await row.inner_text()
    assert all(part in text for part in ("Paid", "$21.30", "$1.30", "$20.00", "Visa ···· 4242"))
    intent = await stripe_client.v1.payment_intents.retrieve_async(
        str(await row.get_attribute("data-payment")))
    assert (intent.amount, intent.status) == (2130, "succeeded")  # the fee charged on top
    download = await page.request.get(web.origin + "/credits/history.csv")
    assert "attachment" in download.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(await download.text())))
    assert [(r["status"], r["amount_cents"], r["fee_cents"], r["credit_cents"],
             r["card_last4"]) for r in rows] == [("succeeded", "2130", "130", "2000", "4242")]

    # A declined card: Stripe's reason on the page, nothing credited.
    await _pay(page, "20", "4000000000000002")
    status = page.get_by_test_id("topup-status")
    await status.filter(has_text="declined").wait_for()
    assert await status.inner_text() == "Your card was declined."
    await b.shot("12-credits-declined")
    assert (await balance(web, me["account_id"])).ledger_micros == 20_000_000
    assert await count(web, "SELECT count(*) FROM billing_topups WHERE status = 'failed' "
                       "AND account_id = $1::uuid", me["account_id"]) == 1
    await _save_card_and_turn_on_auto_topup(b, web, me["account_id"], problems)

    assert problems == {}
    # Every request went to our origin, but for the sign-in provider's page and, from
    # the credits page only, Stripe.js's origin (here localstripe's).
    ours, idp, stripe_js = web.origin, origin_of(oidc_mock), origin_of(localstripe)
    to_stripe = []
    for url, frame, navigation in b.seen.requests:
        if navigation:
            assert origin_of(url) in (ours, idp), url
        elif origin_of(url) == stripe_js:
            assert frame.startswith(ours + "/credits"), (url, frame)
            to_stripe.append(url)
        elif not frame.startswith(idp):
            assert origin_of(url) == ours, (url, frame)
    assert any(u.endswith("/js.stripe.com/v3/") for u in to_stripe)
    assert any("/payment_intents/" in u and u.endswith("/confirm") for u in to_stripe)
    assert any("/setup_intents/" in u and u.endswith("/confirm") for u in to_stripe)
    assert all(frame.startswith(idp) for _, frame in b.seen.blocked), b.seen.blocked
    # The card numbers went to Stripe's origin only, never in a request to ours.
    for number in ("4242424242424242", "4000000000000002"):
        carried = {origin_of(url) for url, body in sent if number in url + body}
        assert carried == {stripe_js}, (number, carried)
    cookies = await b.context.cookies()
    assert undocumented(cookies) == []  # the consent banner's id came with the merge
    assert sorted(c["name"] for c in cookies) == sorted([COOKIE, CONSENT_COOKIE])
    assert b.seen.dialogs == []
    declined_fetch = "status of 402"  # Chromium logs Stripe's 402 answers to the declines
    assert [e for e in b.seen.console_errors
            if e[0].startswith(ours) and declined_fetch not in e[1]] == []
