"""The dashboard in a real browser (Debian's Chromium through Playwright): a new person
signs in through the real OpenID provider, confirms 18+, creates a key and copies it;
the test calls the proxy (a real process) with it through the openai SDK; the Usage
page shows the request; revoking the key makes the SDK get 401 within a second. Along
the way: a key named like an XSS payload shows as text and no dialog fires, every page
passes axe-core (no serious or critical violations) and fits a 390-pixel viewport,
every request the browser makes goes to our own origin (the sign-in provider's own
page aside), and the cookies left are documented ones (control_plane.consent.cookies)
with their flags."""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
import time
from pathlib import Path

import aiohttp
import asyncpg
import jwt
import openai
import pytest
import redis.asyncio as aioredis

from control_plane import ledger
from control_plane.auth.sessions import COOKIE
from control_plane.connections import open_pool, open_redis
from control_plane.consent.cookies import CONSENT_COOKIE
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from devstack.upstream_openai import MockOpenAIUpstream
from tests.browser.conftest import Browser, origin_of, undocumented
from tests.control_plane.web.conftest import Web
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(1500)  # the first run may apt-get install Chromium
HANG_GUARD_S = 30.0
XSS_NAME = "<img src=x onerror=alert(1)>"


async def _check_page(b: Browser, name: str, problems: dict[str, object]) -> None:
    """Screenshots, axe-core in the light and the dark theme, and the 390-pixel check."""
    background = "getComputedStyle(document.body).backgroundColor"
    colours = []
    for scheme in ("light", "dark"):
        await b.page.emulate_media(color_scheme=scheme)
        await b.shot(name if scheme == "light" else f"{name}-dark")
        colours.append(await b.page.evaluate(background))
        violations = await b.axe()
        if violations:
            problems[f"{name} ({scheme}): axe"] = violations
    await b.page.emulate_media(color_scheme="light")
    if b.page.url.startswith(b.origin) and colours[0] == colours[1]:
        problems[f"{name}: the dark theme does not follow prefers-color-scheme"] = colours
    overflow = await b.horizontal_overflow(390)
    if overflow:
        problems[f"{name}: {overflow}px of horizontal scrolling at 390px"] = True


async def _sign_in(b: Browser, web: Web, oidc: str, problems: dict[str, object]) -> str:
    """A new person signs up through the dev provider; their subject there."""
    tag = secrets.token_hex(4)
    async with aiohttp.ClientSession() as s, s.put(
            f"{oidc}/users/person-{tag}",
            json={"email": f"person-{tag}@example.test", "email_verified": True,
                  "name": f"Person {tag}"}) as r:
        assert r.status == 204
    page = b.page
    await page.goto(web.origin + "/")
    assert page.url.startswith(web.origin + "/signin"), page.url  # not signed in yet
    await _check_page(b, "01-signin", problems)
    await page.get_by_role("link", name="Dev sign-in").click()
    await page.wait_for_url(f"{oidc}/**")
    await page.locator("input[name=sub]").fill(f"person-{tag}")
    await page.get_by_role("button", name="Authorize").click()
    await page.wait_for_url(f"{web.origin}/signup**")
    await _check_page(b, "02-first-run", problems)
    await page.get_by_label("I am 18 or older.").check()
    await page.get_by_label("I accept the terms of service.").check()
    await page.get_by_label("I accept the privacy").check()
    await page.get_by_role("button", name="Create my account").click()
    await page.wait_for_url(web.origin + "/")
    assert await page.get_by_role("heading", name="Overview").is_visible()
    return f"person-{tag}"


async def _create_key(b: Browser, name: str, limit: str = "") -> str:
    page = b.page
    await page.goto(b.origin + "/keys")
    await page.get_by_label("Name").fill(name)
    if limit:
        await page.get_by_label("Credit limit in dollars (optional)").fill(limit)
        await page.get_by_label("Limit resets").select_option("monthly")
    await page.get_by_role("button", name="Create key").click()
    secret = (await page.get_by_test_id("new-secret").inner_text()).strip()
    assert secret.startswith("qnp_")
    return secret


async def test_a_new_user_signs_in_creates_a_key_uses_it_sees_it_and_revokes_it(
    browser: Browser, web: Web, oidc_mock: str, mock_upstream: MockOpenAIUpstream,
    tmp_path: Path,
) -> None:
    b, problems = browser, {}
    await _sign_in(b, web, oidc_mock, problems)
    pool = await open_pool(web.settings, min_size=1, max_size=2)
    redis = open_redis(web.settings)
    try:
        await _journey(b, web, pool, redis, mock_upstream, tmp_path, problems)
    finally:
        await redis.aclose()
        await pool.close()

    # No serious or critical accessibility violation, no horizontal scrolling at 390px.
    assert problems == {}
    # Every request the browser made went to our origin, except the sign-in provider's
    # own page (a third party's, as Google's would be) and the navigation to it.
    ours = web.origin
    idp = origin_of(oidc_mock)
    for url, frame, navigation in b.seen.requests:
        if navigation:
            assert origin_of(url) in (ours, idp), url
        elif not frame.startswith(idp):
            assert origin_of(url) == ours, (url, frame)
    assert all(frame.startswith(idp) for _, frame in b.seen.blocked), b.seen.blocked
    assert any(url.startswith(ours + "/static/app.css") for url, _, _ in b.seen.requests)
    # Only documented cookies are left (the one table /cookies shows), with their flags:
    # the session and the strictly necessary consent cookie (no choice was made).
    cookies = await b.context.cookies()
    assert undocumented(cookies) == []
    assert sorted(c["name"] for c in cookies) == sorted([COOKIE, CONSENT_COOKIE])
    session_cookie = next(c for c in cookies if c["name"] == COOKIE)
    claims = jwt.decode(session_cookie["value"], options={"verify_signature": False})
    assert set(claims) == {"sid", "iat", "exp"}  # no key, email or name in the cookie
    assert b.seen.dialogs == []
    assert [e for e in b.seen.console_errors if e[0].startswith(ours)] == []


async def _journey(b: Browser, web: Web, pool: asyncpg.Pool, redis: aioredis.Redis,
                   mock_upstream: MockOpenAIUpstream, tmp_path: Path,
                   problems: dict[str, object]) -> None:
    page = b.page
    session = await (await page.request.get(web.origin + "/api/v1/session")).json()
    await ledger.credit(pool, redis, web.settings.names, session["data"]["account_id"],
                        "topup", 5_000_000, None)
    await page.reload()
    assert (await page.get_by_test_id("balance").inner_text()) == "$5.00"
    await _check_page(b, "03-overview", problems)
    await page.get_by_role("link", name="Credits").click()
    assert await page.get_by_test_id("credits-balance").inner_text() == "$5.00"
    await _check_page(b, "03-credits", problems)
    await page.get_by_role("link", name="Settings", exact=True).click()
    assert "(this browser)" in await page.locator("tr[data-session]").inner_text()
    await _check_page(b, "03-settings", problems)

    # A key whose name is an XSS payload: shown as text, nothing runs.
    await _create_key(b, XSS_NAME)
    cell = page.locator("td.key-name", has_text=XSS_NAME)
    assert await cell.count() == 1
    assert await page.locator("td.key-name img").count() == 0

    secret = await _create_key(b, "sdk", limit="2.50")
    await page.get_by_role("button", name="Copy key").click()
    await page.get_by_role("button", name="Copied").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    await _check_page(b, "04-keys-created", problems)
    await page.goto(web.origin + "/keys")
    assert await page.get_by_test_id("new-secret").count() == 0  # shown once only
    row = page.locator("tr", has=page.locator("td.key-name", has_text="sdk"))
    assert "active" in await row.inner_text() and "$2.50 monthly" in await row.inner_text()
    await row.get_by_role("link", name="Edit").click()
    await page.get_by_label("Credit limit in dollars (empty: none)").fill("3")
    await _check_page(b, "05-edit-key", problems)
    await page.get_by_role("button", name="Save").click()
    await page.wait_for_url(web.origin + "/keys")
    assert "$3.00 monthly" in await row.inner_text()

    port = free_port()
    env = proxy_env(web.settings.redis_url, web.settings.names,
                    write_catalog(tmp_path, mock_upstream.base_url), QNP_PROXY_PORT=str(port))
    consumer = Consumer(web.settings, pool, redis, Metrics())
    ingesting = asyncio.create_task(consumer.run())
    try:
        with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env):
            await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                          api_key=secret, max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="demo-mini", messages=[{"role": "user", "content": "Hello!"}])
                request_id = raw.headers["x-request-id"]
                usage = raw.parse().usage
                assert usage is not None
                await _usage_shows(b, web, request_id, usage.prompt_tokens, problems)
                await _revoke_and_expect_401(b, web, client, problems)
    finally:
        consumer.stop()
        await ingesting


async def _usage_shows(b: Browser, web: Web, request_id: str, prompt_tokens: int,
                       problems: dict[str, object]) -> None:
    page = b.page
    deadline = time.monotonic() + HANG_GUARD_S
    await page.goto(web.origin + "/usage")
    # The page reads the rollups, then the recent requests: ingest may commit between
    # the two, so wait until the totals show it (the table then does too).
    while await page.get_by_test_id("total-requests").inner_text() != "1":
        assert time.monotonic() < deadline, "the request never showed on the Usage page"
        await asyncio.sleep(0.2)
        await page.reload()
    assert await page.locator(f"tr[data-request='{request_id}']").count() == 1
    bars = await page.locator("figure.chart rect").evaluate_all(
        "rs => rs.map(r => Number(r.getAttribute('height')))")
    assert max(bars) > 0 and len(bars) == 60  # two charts of 30 days, one day used
    model_row = page.locator("tr[data-model]")
    assert await model_row.count() == 1 and str(prompt_tokens) in await model_row.inner_text()
    await _check_page(b, "06-usage", problems)
    # The filters live in the URL; an unused model selects nothing.
    await page.goto(web.origin + "/usage?model=no-such-model")
    assert await page.get_by_test_id("total-requests").inner_text() == "0"
    export = await page.request.get(web.origin + "/usage/export.csv")
    assert export.status == 200 and "attachment" in export.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(await export.text())))
    assert [(r["id"], int(r["prompt_tokens"])) for r in rows] == [(request_id, prompt_tokens)]
    assert "source_ip" not in rows[0]


async def _revoke_and_expect_401(b: Browser, web: Web, client: openai.AsyncOpenAI,
                                 problems: dict[str, object]) -> None:
    page = b.page
    await page.goto(web.origin + "/keys")
    row = page.locator("tr", has=page.locator("td.key-name", has_text="sdk"))
    await row.get_by_role("link", name="Revoke").click()
    await page.get_by_role("heading", name="Revoke “sdk”?").wait_for()
    await _check_page(b, "07-revoke-confirm", problems)
    await page.get_by_role("button", name="Revoke key").click()
    await page.wait_for_url(web.origin + "/keys")
    revoked_at = time.monotonic()
    status = 200
    while status != 401:
        try:
            await client.chat.completions.create(
                model="demo-mini", messages=[{"role": "user", "content": "again"}])
        except openai.AuthenticationError:
            status = 401
        if time.monotonic() - revoked_at > HANG_GUARD_S:
            break
        await asyncio.sleep(0.02) if status != 401 else None
    took = time.monotonic() - revoked_at
    assert status == 401 and took < 1.0, f"still accepted {took:.2f}s after revocation"
    row = page.locator("tr", has=page.locator("td.key-name", has_text="sdk"))
    assert "revoked" in await row.inner_text()
