"""Deleting an account in a real browser (Debian's Chromium through Playwright): a person
signed in ten minutes ago opens Settings → Delete my account, is sent through a fresh
sign-in at the dev provider and back, types the words and lands signed out with the
deletion scheduled; the key they had is revoked in Postgres and in the record the proxy
reads from Redis. Signing in again in the grace period offers "Keep my account", which
makes the account active again and signs them in; the key stays revoked. Every page on
the way is axe-checked in both themes and fits 390 pixels."""

from __future__ import annotations

import uuid

import pytest

from control_plane.auth.sessions import COOKIE
from control_plane.web.state import STORES
from shared.apikeys import KeyRecord
from tests.browser.conftest import Browser
from tests.browser.test_journey import _check_page, _create_key, _sign_in
from tests.control_plane.privacy.deletion_flows import age_sessions, fetchval
from tests.control_plane.web.conftest import Web

pytestmark = pytest.mark.timeout(600)  # the first run may apt-get install Chromium


async def _authorize(b: Browser, oidc: str, subject: str) -> None:
    await b.page.wait_for_url(f"{oidc}/**")
    await b.page.locator("input[name=sub]").fill(subject)
    await b.page.get_by_role("button", name="Authorize").click()


async def test_deleting_in_the_browser_then_keeping_the_account(
        browser: Browser, web: Web, oidc_mock: str) -> None:
    b, problems = browser, {}
    page = b.page
    subject = await _sign_in(b, web, oidc_mock, problems)
    me = (await (await page.request.get(web.origin + "/api/v1/session")).json())["data"]
    account = uuid.UUID(me["account_id"])
    await _create_key(b, "doomed")
    key_id = await fetchval(web, "SELECT key_id FROM api_keys WHERE account_id = $1", account)
    await age_sessions(web, me["account_id"], 10)  # signed in 10 minutes ago: not fresh

    await page.goto(web.origin + "/settings")
    await page.get_by_role("link", name="Delete my account…").click()
    await page.wait_for_url(web.origin + "/settings/deletion")
    assert await page.get_by_label("Type delete my account to confirm").count() == 0
    await _check_page(b, "20-deletion-sign-in-again", problems)
    await page.get_by_role("link", name="Sign in again with Dev sign-in").click()
    await _authorize(b, oidc_mock, subject)
    await page.wait_for_url(web.origin + "/settings/deletion")
    confirm = page.get_by_label("Type delete my account to confirm")
    await _check_page(b, "21-deletion-confirm", problems)
    await confirm.fill("delete my account")
    await page.get_by_role("button", name="Delete my account").click()
    await page.get_by_role("heading", name="Your account is being deleted").wait_for()
    assert "Every key is revoked and you are signed out" in await page.inner_text("main")
    await _check_page(b, "22-deletion-scheduled", problems)

    assert COOKIE not in {c["name"] for c in await b.context.cookies()}
    assert (await page.request.get(web.origin + "/api/v1/session")).status == 401
    assert await fetchval(web, "SELECT status FROM accounts WHERE id = $1", account) == \
        "deleting"
    assert await fetchval(web, "SELECT status FROM api_keys WHERE key_id = $1",
                          key_id) == "revoked"
    redis = web.client.server.app[STORES].redis
    record = KeyRecord.decode(await redis.get(web.settings.names.key_record(key_id)))
    assert record.status == "revoked"  # what the proxy reads: it refuses the key

    # Signing in again during the grace: no session, but the offer to keep the account.
    await page.goto(web.origin + "/")
    await page.get_by_role("link", name="Dev sign-in").click()
    await _authorize(b, oidc_mock, subject)
    await page.wait_for_url(web.origin + "/account/restore")
    assert (await page.request.get(web.origin + "/api/v1/session")).status == 401
    await _check_page(b, "23-restore-offer", problems)
    await page.get_by_role("button", name="Keep my account").click()
    await page.wait_for_url(web.origin + "/settings")
    assert (await page.request.get(web.origin + "/api/v1/session")).status == 200
    assert await fetchval(web, "SELECT status FROM accounts WHERE id = $1", account) == \
        "active"
    assert await fetchval(web, "SELECT status FROM api_keys WHERE key_id = $1",
                          key_id) == "revoked"  # keys stay revoked
    await page.goto(web.origin + "/keys")
    assert "revoked" in await page.locator("tr", has_text="doomed").inner_text()

    assert problems == {}
    assert b.seen.dialogs == []
    assert [e for e in b.seen.console_errors if e[0].startswith(web.origin)] == []
