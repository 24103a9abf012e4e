"""Consent in a real browser (Debian's Chromium through Playwright), issue 15: a first
visit sets only the strictly necessary consent cookie and loads no script of a consent
category; "Reject all" keeps it so across pages; accepting analytics activates the
analytics scripts, in document order; a withdrawal stops any further activation; a
browser sending Global Privacy Control never activates them and is told "GPC honoured";
the theme survives a reload only with functional consent.

The scripts of each category come from ``_analytics.html`` (Sentry's owner writes the
real one); these tests render their own in its place, whose tags load our own
``/static/app.js`` under a query string only they use, so every activation is one
request the test can see."""

from __future__ import annotations

import asyncio
import time

import jinja2
import pytest

from control_plane.consent.cookies import CONSENT_COOKIE, THEME_COOKIE
from control_plane.web.dashboard import TEMPLATES
from control_plane.web.pages import PAGES
from tests.browser.conftest import Browser, choose_cookies, undocumented
from tests.control_plane.web.conftest import Web

pytestmark = pytest.mark.timeout(600)
HANG_GUARD_S = 30.0
PROBES = ("analytics-1", "analytics-2", "functional-1")
OVERRIDE = "".join(
    f'<script type="text/plain" data-consent="{p.split("-")[0]}" '
    f'data-src="/static/app.js?probe={p}"></script>\n' for p in PROBES)
BACKGROUND = "getComputedStyle(document.body).backgroundColor"


def _override_analytics(web: Web) -> None:
    """Our ``_analytics.html`` in both template environments of the running app."""
    app = web.client.app
    assert app is not None
    for env in (app[TEMPLATES], app[PAGES]._env):
        assert env.loader is not None
        env.loader = jinja2.ChoiceLoader(
            [jinja2.DictLoader({"_analytics.html": OVERRIDE}), env.loader])
        env.cache = None  # no template compiled before this one counts


def _probed(b: Browser) -> list[str]:
    return [url.split("probe=", 1)[1] for url, _, _ in b.seen.requests if "probe=" in url]


async def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _names(b: Browser) -> list[str]:
    return sorted(c["name"] for c in await b.context.cookies())


async def _theme_survives_reload(b: Browser) -> bool:
    page = b.page
    light = await page.evaluate(BACKGROUND)
    await page.locator("button[data-theme-toggle]").click()
    assert await page.evaluate(BACKGROUND) != light  # this page switched at once
    if "functional" in (await page.locator("#qnp-consent").get_attribute("data-granted")
                        or ""):
        await _until(lambda: _has_cookie(b, THEME_COOKIE), "the theme was never stored")
    await page.reload()
    return bool(await page.evaluate(BACKGROUND) != light)


async def _has_cookie(b: Browser, name: str) -> bool:
    return name in await _names(b)


async def test_nothing_optional_before_a_choice_then_reject_accept_and_withdraw(
    browser: Browser, web: Web
) -> None:
    b, page = browser, browser.page
    _override_analytics(web)
    await page.goto(web.origin + "/signin")
    banner = page.locator("#consent-banner")
    assert await banner.is_visible()
    assert await banner.get_by_role("link", name="Every cookie we set").is_visible()
    assert await b.axe() == [] and await b.horizontal_overflow(390) == 0
    await b.shot("01-banner")
    # First visit: only the strictly necessary consent cookie, no category's script.
    assert await _names(b) == [CONSENT_COOKIE] and undocumented(await b.context.cookies()) == []
    assert _probed(b) == []

    # Reject all: nothing optional on any page after it, and the theme is not kept.
    await banner.get_by_role("button", name="Reject all").click()
    await banner.wait_for(state="hidden")
    for path in ("/cookies", "/signin"):
        await page.goto(web.origin + path)
        assert not await banner.is_visible()
    assert not await _theme_survives_reload(b)
    assert _probed(b) == [] and await _names(b) == [CONSENT_COOKIE]

    # Accept analytics (and functional): the scripts run, in document order, at once.
    await page.evaluate("window.seen = []; window.addEventListener('qnp:consent', "
                        "e => window.seen.push(e.detail))")
    await choose_cookies(page, functional=True, analytics=True)
    await _until(lambda: asyncio.sleep(0, len(_probed(b)) == 3), "scripts never ran")
    assert _probed(b) == list(PROBES)
    assert await page.evaluate("window.seen") == [
        {"granted": ["analytics", "functional"], "gpc": False}]
    assert await _theme_survives_reload(b)  # functional consent: the theme is kept
    assert undocumented(await b.context.cookies()) == []
    assert await _names(b) == sorted([CONSENT_COOKIE, THEME_COOKIE])
    await b.shot("02-accepted-dark")

    # Withdraw analytics: no page activates them again; functional ones still run.
    await page.goto(web.origin + "/cookies")
    before = len(_probed(b))
    await page.evaluate("window.seen = []; window.addEventListener('qnp:consent', "
                        "e => window.seen.push(e.detail))")
    await choose_cookies(page, analytics=False)
    assert await page.evaluate("window.seen") == [{"granted": ["functional"], "gpc": False}]
    await page.goto(web.origin + "/signin")
    await _until(lambda: asyncio.sleep(0, len(_probed(b)) > before), "functional never ran")
    await page.goto(web.origin + "/cookies")
    await page.wait_for_load_state("networkidle")
    assert [p for p in _probed(b)[before:] if p.startswith("analytics")] == []
    assert b.seen.console_errors == [] and b.seen.blocked == []


async def test_a_gpc_browser_never_activates_analytics_and_is_told_so(
    browser: Browser, web: Web
) -> None:
    b, page = browser, browser.page
    _override_analytics(web)
    await page.goto(web.origin + "/signin")
    banner = page.locator("#consent-banner")
    await banner.get_by_role("button", name="Accept all").click()
    await _until(lambda: asyncio.sleep(0, len(_probed(b)) == 3), "scripts never ran")

    # The browser turns GPC on. First only navigator.globalPrivacyControl: the server
    # has not heard of it and would allow analytics, so consent.js alone must refuse.
    await b.context.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', "
        "{get: () => true, configurable: true})")
    await page.goto(web.origin + "/cookies")
    form = page.locator("main form[data-consent-form]")
    await form.get_by_text("GPC honoured").wait_for()
    assert await form.locator("input[name=analytics]").is_disabled()
    await _until(lambda: asyncio.sleep(0, _probed(b).count("functional-1") == 2),
                 "functional scripts never ran")  # so activation ran, and skipped analytics
    assert _probed(b).count("analytics-1") == 1

    # Then Sec-GPC: 1 too, as browsers send it: the server says so and a choice made
    # now records analytics withdrawn whatever the form said.
    await b.context.set_extra_http_headers({"Sec-GPC": "1"})
    for path in ("/signin", "/cookies"):
        await page.goto(web.origin + path)
        await page.wait_for_load_state("networkidle")
    assert await page.locator("main").get_by_text("GPC honoured").first.is_visible()
    await form.get_by_role("button", name="Accept all").click()
    await _until(lambda: _granted_is(b, "functional"), "the choice was never applied")
    await page.goto(web.origin + "/signin")
    await page.wait_for_load_state("networkidle")
    assert _probed(b).count("analytics-1") == 1 and _probed(b).count("analytics-2") == 1
    await b.shot("03-gpc")


async def _granted_is(b: Browser, value: str) -> bool:
    return await b.page.locator("#qnp-consent").get_attribute("data-granted") == value
