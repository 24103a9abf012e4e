"""Sentry in a real browser (Debian's Chromium through Playwright), through the real
consent banner (static/consent.js) and the real server-side consent state, against the
real dashboard under its real CSP, reporting to our sink (tests/sentry_sink.py):

- a first visit, signed in: the banner is shown, the SDK is not even loaded, nothing
  goes to the Sentry endpoint, page error or not;
- "Accept all" in the banner: consent.js starts the scripts on that page (no reload), a
  page error sends one event, and no canary (in the page's query string, a cookie, the
  error message) is in anything that arrived;
- analytics withdrawn through "Cookie settings": monitoring.js closes the SDK and an
  error sends nothing; granted again, an error sends again (so the withdrawn one was not
  merely delayed);
- a restricted account (Settings > Privacy): no analytics tags on its pages, consent or
  not;
- a browser sending Global Privacy Control (Sec-GPC and navigator.globalPrivacyControl):
  no analytics tags, nothing loaded, nothing sent, and the banner and Settings say
  "GPC honoured"; and were the scripts wrongly loaded there all the same, monitoring.js
  would still start nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, Request, Route, async_playwright
from yarl import URL

from control_plane.consent.cookies import CONSENT_COOKIE
from shared.redis_names import RedisNames
from tests.browser.conftest import CHROMIUM_ARGS, choose_cookies, origin_of
from tests.control_plane.web.conftest import Web, serve_web, sign_in_new_user, web_settings
from tests.sentry_canaries import EMAIL, PROMPT, assert_no_canary
from tests.sentry_sink import SentrySink
from tests.support import free_port

pytestmark = pytest.mark.timeout(600)
HANG_GUARD_S = 30.0
GPC = ("Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', "
       "{get: () => true, configurable: true});")
SCRIPTS = ("/static/vendor/sentry/bundle.min.js", "/static/monitoring.js")
TAGS = 'script[data-consent="analytics"], meta[name="qnp-sentry-dsn"]'


@dataclass
class Tab:
    page: Page
    sink: SentrySink
    issued: list[str] = field(default_factory=list)  # requests to the Sentry endpoint
    finished: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every request the page made

    @property
    def banner(self) -> Any:
        return self.page.locator("#consent-banner")

    async def state(self, value: str) -> None:
        await self.page.locator(f'html[data-qnp-monitoring="{value}"]').wait_for(
            state="attached", timeout=HANG_GUARD_S * 1000)

    async def fail(self, name: str) -> None:
        """An uncaught error of type ``name`` whose message quotes the canaries, and one
        more turn of the event loop, so whatever handles it has run."""
        await self.page.evaluate(
            "([name, text]) => new Promise(done => { setTimeout(() => { "
            "const e = new Error(text); e.name = name; throw e; }); setTimeout(done); })",
            [name, f"{PROMPT} {EMAIL}"])

    async def granted(self) -> list[str]:
        value = await self.page.locator("#qnp-consent").get_attribute("data-granted")
        return (value or "").split()

    def loaded(self) -> list[str]:
        """The analytics scripts this browser requested so far."""
        return [u for u in self.urls for s in SCRIPTS if s in u]

    def types(self) -> list[str]:
        return [v.get("type", "") for e in self.sink.events()
                for v in e.get("exception", {}).get("values", [])]

    async def settled(self, done: Callable[[Tab], bool]) -> None:
        """Until ``done`` and every request the page sent to Sentry has arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_GUARD_S
        while not (done(self) and len(self.issued) == len(self.finished)
                   == len(self.sink.envelopes)):
            assert loop.time() < deadline, (self.issued, self.types())
            await self.sink.wait_for(lambda s: True, HANG_GUARD_S)
            await self.page.evaluate("new Promise(r => requestAnimationFrame(r))")


@pytest.fixture
async def sink() -> AsyncIterator[SentrySink]:
    async with SentrySink() as s:
        yield s


@pytest.fixture
async def sentry_web(migrated_url: str, redis_url: str, redis_names: RedisNames,
                     oidc_mock: str, sink: SentrySink) -> AsyncIterator[Web]:
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(), providers,
                            QNP_SENTRY_BROWSER_DSN=sink.dsn())
    async with serve_web(settings) as w:
        yield w


async def signed_in(web: Web) -> list[Any]:
    """A new person signed in through the real provider: their cookies for a browser
    that has never been here (no consent cookie: its first visit is still to come).
    __Host-: Secure, path /, no domain attribute, which browsers allow on 127.0.0.1."""
    jar = web.client.session.cookie_jar
    jar.clear()
    await sign_in_new_user(web)
    cookies = [{"name": name, "value": c.value, "domain": "127.0.0.1", "path": "/",
                "secure": True, "httpOnly": True, "sameSite": "Lax"}
               for name, c in jar.filter_cookies(URL(web.origin)).items()
               if name != CONSENT_COOKIE]
    jar.clear()
    return cookies


@asynccontextmanager
async def tab(chromium: str, profile: Path, web: Web, sink: SentrySink,
              cookies: list[Any], *, gpc: bool) -> AsyncIterator[Tab]:
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            extra_http_headers={"Sec-GPC": "1"} if gpc else {})
        try:
            await context.add_cookies(cookies)
            if gpc:
                await context.add_init_script(GPC)
            page = context.pages[0] if context.pages else await context.new_page()
            t = Tab(page, sink)

            async def route(r: Route) -> None:  # nothing leaves the machine
                if origin_of(r.request.url) in (web.origin, sink.origin):
                    await r.continue_()
                else:
                    await r.abort()

            def on_request(r: Request) -> None:
                t.urls.append(r.url)
                if r.url.startswith(sink.origin):
                    t.issued.append(r.url)

            def on_finished(r: Request) -> None:
                if r.url.startswith(sink.origin):
                    t.finished.append(r.url)

            await context.route("**/*", route)
            context.on("request", on_request)
            context.on("requestfinished", on_finished)
            context.on("requestfailed", on_finished)
            yield t
        finally:
            await context.close()


async def test_sentry_runs_only_with_consent_given_in_the_banner_and_never_under_gpc(
        chromium: str, tmp_path: Path, sentry_web: Web, sink: SentrySink) -> None:
    page_url = f"{sentry_web.origin}/?email={EMAIL}&q={PROMPT}"
    async with tab(chromium, tmp_path / "p1", sentry_web, sink,
                   await signed_in(sentry_web), gpc=False) as t:
        # First visit: the banner, the inert tags, no SDK loaded, nothing sent.
        await t.page.goto(page_url)
        await t.page.evaluate(f"document.cookie = 'note={PROMPT}; path=/'")
        assert await t.banner.is_visible()
        assert await t.page.locator('script[type="text/plain"][data-consent]').count() == 2
        await t.fail("BeforeConsentError")
        assert await t.page.evaluate("typeof window.Sentry") == "undefined"
        assert t.loaded() == [] and t.issued == []

        # "Accept all": consent.js starts the scripts on this very page; one error, one
        # event.
        await t.banner.get_by_role("button", name="Accept all").click()
        await t.banner.wait_for(state="hidden")
        await t.state("on")
        assert await t.granted() == ["analytics", "functional"]
        await t.fail("WithConsentError")
        await t.settled(lambda t: "WithConsentError" in t.types())
        assert t.types() == ["WithConsentError"] and len(t.issued) == 1

        # Withdrawn in "Cookie settings": closed; an error now sends nothing. Granted
        # again: sends again, and had the withdrawn one been sent, it would have been
        # sent before this one.
        await choose_cookies(t.page, analytics=False)
        await t.state("closed")
        await t.fail("AfterWithdrawalError")
        await choose_cookies(t.page, analytics=True)
        await t.state("on")
        await t.fail("RegrantedError")
        await t.settled(lambda t: "RegrantedError" in t.types())
        assert t.types() == ["WithConsentError", "RegrantedError"] and len(t.issued) == 2

        # The account restricts processing (Settings > Privacy): its consent stays as
        # recorded, but no page carries the analytics tags, so nothing can load.
        await t.page.goto(sentry_web.origin + "/settings/privacy")
        await t.page.get_by_role("button", name="Restrict processing").click()
        await t.page.get_by_test_id("restricted-since").wait_for()
        before = len(t.loaded())
        await t.page.goto(page_url)
        await t.page.get_by_test_id("restricted-notice").wait_for()
        assert "analytics" in await t.granted()
        assert await t.page.locator(TAGS).count() == 0
        await t.fail("WhileRestrictedError")
        await t.page.wait_for_load_state("networkidle")
        assert await t.page.evaluate("typeof window.Sentry") == "undefined"
        assert len(t.loaded()) == before and len(t.issued) == 2

    # A browser with Global Privacy Control: no tags from the server, the banner and
    # Settings say so, and even "Accept all" loads and sends nothing.
    async with tab(chromium, tmp_path / "p2", sentry_web, sink,
                   await signed_in(sentry_web), gpc=True) as g:
        await g.page.goto(page_url)
        assert await g.banner.is_visible()
        await g.banner.get_by_text("GPC honoured").wait_for()
        assert await g.banner.locator("input[name=analytics]").is_disabled()
        assert await g.page.locator(TAGS).count() == 0
        await g.banner.get_by_role("button", name="Accept all").click()
        await g.banner.wait_for(state="hidden")
        assert await g.granted() == ["functional"]
        await g.fail("UnderGpcError")
        await g.page.goto(sentry_web.origin + "/settings")
        await g.page.locator("main").get_by_text("GPC honoured").wait_for()
        assert await g.page.locator(TAGS).count() == 0
        await g.fail("UnderGpcOnSettingsError")
        await g.page.wait_for_load_state("networkidle")
        assert await g.page.evaluate("typeof window.Sentry") == "undefined"
        assert g.loaded() == [] and g.issued == []

        # Had a consent layer got GPC wrong and loaded them, monitoring.js refuses.
        await g.page.evaluate("dsn => { const m = document.createElement('meta'); "
                              "m.name = 'qnp-sentry-dsn'; m.content = dsn; "
                              "document.head.append(m); }", sink.dsn())
        for script in SCRIPTS:
            await g.page.add_script_tag(url=script)
        await g.state("off-gpc")
        await g.fail("WronglyLoadedUnderGpcError")
        await g.page.wait_for_load_state("networkidle")
        assert await g.page.evaluate("window.Sentry.getClient()") is None
        assert g.issued == []

    assert len(sink.envelopes) == 2
    assert_no_canary(sink, PROMPT, EMAIL)
    for event in sink.events():
        assert "request" not in event or "?" not in event["request"].get("url", "")
        assert {"user", "extra", "breadcrumbs", "tags"}.isdisjoint(event)
