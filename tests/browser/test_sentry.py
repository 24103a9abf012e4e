"""Sentry in a real browser (Debian's Chromium through Playwright), against the real
dashboard under its real CSP, reporting to our sink (tests/sentry_sink.py):

- before consent the SDK is not even loaded and nothing goes to the Sentry endpoint,
  page error or not;
- with analytics consent a page error sends one event, and no canary (in the page's
  query string, a cookie, the error message) is in anything that arrived;
- after withdrawal ("qnp:consent" without analytics) the SDK is closed and an error
  sends nothing, until consent is given again;
- under Global Privacy Control nothing is sent even if a consent layer wrongly loads the
  scripts (monitoring.js refuses by itself).

H15's consent.js is not on main yet: ``fixtures/consent_activation.js`` stands in for it
(same contract), injected by the test, never served. The server side's
``consent.analytics_allowed`` (H15's too) is a template global set by the test.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Page, Request, Route, async_playwright
from yarl import URL

from control_plane.web.dashboard import TEMPLATES
from shared.redis_names import RedisNames
from tests.browser.conftest import CHROMIUM_ARGS, origin_of
from tests.control_plane.web.conftest import Web, serve_web, sign_in_new_user, web_settings
from tests.sentry_canaries import EMAIL, PROMPT, assert_no_canary
from tests.sentry_sink import SentrySink
from tests.support import free_port

pytestmark = pytest.mark.timeout(600)
HANG_GUARD_S = 30.0
ACTIVATION = (Path(__file__).parent / "fixtures" / "consent_activation.js").read_text()
GPC = ("Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', "
       "{get: () => true, configurable: true});")
BUNDLE = "/static/vendor/sentry/bundle.min.js"


@dataclass
class Tab:
    page: Page
    sink: SentrySink
    issued: list[str] = field(default_factory=list)  # requests to the Sentry endpoint
    finished: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every request the page made

    async def state(self, value: str) -> None:
        await self.page.locator(f'html[data-qnp-monitoring="{value}"]').wait_for(
            state="attached", timeout=HANG_GUARD_S * 1000)

    async def fail(self, name: str) -> None:
        """An uncaught error of type ``name`` whose message quotes the canaries."""
        await self.page.evaluate(
            "([name, text]) => setTimeout(() => { const e = new Error(text); "
            "e.name = name; throw e; })", [name, f"{PROMPT} {EMAIL}"])

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
        # H15's consent state, as its render context will carry it: analytics allowed.
        w.client.server.app[TEMPLATES].globals["consent"] = types.SimpleNamespace(
            analytics_allowed=True)
        yield w


@asynccontextmanager
async def tab(chromium: str, profile: Path, web: Web, sink: SentrySink, *, gpc: bool
              ) -> AsyncIterator[Tab]:
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            extra_http_headers={"Sec-GPC": "1"} if gpc else {})
        try:
            jar = web.client.session.cookie_jar.filter_cookies(URL(web.origin))
            # The session of the person signed in through the real provider (__Host-:
            # Secure, path /, no domain attribute, which browsers allow on 127.0.0.1).
            await context.add_cookies([{"name": name, "value": c.value, "domain": "127.0.0.1",
                                        "path": "/", "secure": True, "httpOnly": True,
                                        "sameSite": "Lax"} for name, c in jar.items()])
            if gpc:
                await context.add_init_script(GPC)
            await context.add_init_script(ACTIVATION)
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


async def test_sentry_runs_only_with_consent_is_closed_on_withdrawal_and_never_under_gpc(
        chromium: str, tmp_path: Path, sentry_web: Web, sink: SentrySink) -> None:
    await sign_in_new_user(sentry_web)
    page_url = f"{sentry_web.origin}/?email={EMAIL}&q={PROMPT}"
    async with tab(chromium, tmp_path / "p1", sentry_web, sink, gpc=False) as t:
        # Before consent: the inert tags are there, the SDK is not loaded, nothing sent.
        await t.page.goto(page_url)
        await t.page.evaluate(f"document.cookie = 'note={PROMPT}; path=/'")
        assert await t.page.locator('script[type="text/plain"]').count() == 2
        await t.fail("BeforeConsentError")
        await t.page.evaluate("new Promise(r => setTimeout(r, 0))")
        assert await t.page.evaluate("typeof window.Sentry") == "undefined"
        assert not any(BUNDLE in u for u in t.urls) and t.issued == []

        # Analytics granted (as consent.js keeps it), page reloaded: one error, one event.
        await t.page.evaluate("localStorage.setItem('qnp-test-granted', '[\"analytics\"]')")
        await t.page.goto(page_url)
        await t.state("on")
        await t.fail("WithConsentError")
        await t.settled(lambda t: "WithConsentError" in t.types())
        assert t.types() == ["WithConsentError"] and len(t.issued) == 1

        # Withdrawn: closed; an error now sends nothing. Granted again: sends again, and
        # had the withdrawn one been sent, it would have been sent before this one.
        await t.page.evaluate("qnpTestSetConsent([])")
        await t.state("closed")
        await t.fail("AfterWithdrawalError")
        await t.page.evaluate("qnpTestSetConsent(['analytics'])")
        await t.state("on")
        await t.fail("RegrantedError")
        await t.settled(lambda t: "RegrantedError" in t.types())
        assert t.types() == ["WithConsentError", "RegrantedError"]
    # Under GPC: even with the scripts wrongly loaded, monitoring.js starts nothing.
    async with tab(chromium, tmp_path / "p2", sentry_web, sink, gpc=True) as g:
        await g.page.goto(sentry_web.origin + "/")
        await g.page.evaluate("localStorage.setItem('qnp-test-granted', '[\"analytics\"]');"
                              "localStorage.setItem('qnp-test-ignore-gpc', '1')")
        await g.page.goto(page_url)
        await g.state("off-gpc")
        await g.fail("UnderGpcError")
        await g.page.evaluate("new Promise(r => setTimeout(r, 0))")
        assert await g.page.evaluate("window.Sentry.getClient()") is None
        assert g.issued == []
    assert len(sink.envelopes) == 2
    assert_no_canary(sink, PROMPT, EMAIL)
    [event, _] = sink.events()
    assert "request" not in event or "?" not in event["request"].get("url", "")
    assert {"user", "extra", "breadcrumbs", "tags"}.isdisjoint(event)
