"""The privacy rights in a real browser (Debian's Chromium through Playwright, issue 14):
a person signs in through the real OpenID provider, creates a key, has used it (request
rows planted as the export tests plant them: the proxy's own journey is test_journey's)
and topped up, then from Settings > Privacy sets where they live, corrects their name,
changes their e-mail through the link sent to the new address, restricts processing
(the notice is on every page) and lifts it, objects to analytics, asks staff to correct
something else and to review an automated decision; then downloads the export with the
browser and finds in it the documented structure (EXPORT_SCHEMA.md) and what the
account did: every key, every request of the last 30 days, every ledger row, every
privacy request just made, the e-mail change, the objection and the words written.
Suspended, the account is led to the page that explains it and still asks for a human
review. Every privacy page passes axe-core and fits 390 pixels."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from playwright.async_api import Locator, Page

from control_plane import ledger, limits
from control_plane.partitions import create_days
from control_plane.web.guard import SUSPENDED_PAGE
from control_plane.web.state import STORES
from tests.browser.conftest import Browser
from tests.browser.test_journey import _check_page, _create_key, _sign_in
from tests.control_plane.privacy.rows import billing_rows, usage_rows
from tests.control_plane.privacy.test_export import _documented
from tests.control_plane.web.conftest import Web

pytestmark = pytest.mark.timeout(1500)  # the first run may apt-get install Chromium
HANG_GUARD_S = 30.0
NOTICE = "restricted-notice"
# Every page of the dashboard, each of which must say that processing is restricted.
PAGES = ("/", "/keys", "/usage", "/credits", "/settings", "/settings/privacy")


async def _submit(page: Page, button: Locator, done: str) -> None:
    """Submit a Settings > Privacy form and wait for the page it answers with."""
    await button.click()
    await page.wait_for_url(f"**/settings/privacy?done={done}")


async def test_a_person_exercises_each_right_from_settings_and_downloads_all_of_it(
    browser: Browser, web: Web, oidc_mock: str
) -> None:
    b, problems = browser, {}
    await _sign_in(b, web, oidc_mock, problems)
    assert web.client.app is not None
    stores = web.client.app[STORES]
    doc, account = await _rights(b, web, stores.pool, stores.redis, problems)
    await _matches_what_the_account_did(doc, account, stores.pool)
    await _suspended(b, web, account, stores.pool, stores.redis, problems)
    # No serious or critical accessibility violation, no horizontal scrolling at 390px,
    # no script error or dialog on our pages.
    assert problems == {}
    assert b.seen.dialogs == []
    assert [e for e in b.seen.console_errors if e[0].startswith(web.origin)] == []


async def _rights(b: Browser, web: Web, pool: asyncpg.Pool, redis: Any,
                  problems: dict[str, object]) -> tuple[dict[str, Any], uuid.UUID]:
    page = b.page
    session = await (await page.request.get(web.origin + "/api/v1/session")).json()
    account = uuid.UUID(session["data"]["account_id"])
    await _create_key(b, "laptop")
    key_id = await pool.fetchval("SELECT key_id FROM api_keys WHERE account_id = $1", account)
    now = datetime.now(UTC)
    await usage_rows(pool, account, key_id, 3, now)
    old_day = now - timedelta(days=31)
    async with pool.acquire() as conn:
        await create_days(conn, {old_day.date()})
    await usage_rows(pool, account, key_id, 1, old_day)  # past the 30 days: not exported
    await ledger.credit(pool, redis, web.settings.names, str(account), "topup", 5_000_000)
    await billing_rows(pool, account, now, f"pi_{account.hex}")

    await page.goto(web.origin + "/settings")
    await page.get_by_role("link", name="Privacy settings").click()
    await page.wait_for_url(web.origin + "/settings/privacy")
    await _check_page(b, "10-privacy", problems)

    await page.get_by_label("Law that applies to you").select_option("kvkk")
    await _submit(page, page.get_by_role("button", name="Save"), "jurisdiction")
    assert "(now: 30 days)" in await page.locator("#jurisdiction + p").inner_text()

    await page.get_by_label("Name", exact=True).fill("Ada Lovelace")
    await _submit(page, page.get_by_role("button", name="Correct name"), "name")
    assert await page.get_by_label("Name", exact=True).input_value() == "Ada Lovelace"

    new_email = f"ada-{secrets.token_hex(4)}@example.test"
    await page.locator("#email").fill(new_email)
    await _submit(page, page.get_by_role("button", name="Send a confirmation link"), "email")
    body = await pool.fetchval("SELECT body FROM email_outbox WHERE account_id = $1 "
                               "AND to_address = $2", account, new_email)
    link = re.search(r"(http://\S+/settings/privacy/email/confirm\?token=\S+)", body)
    assert link is not None, body
    await page.goto(link.group(1))  # as the person opens it from their mail
    assert await page.get_by_test_id("new-email").inner_text() == new_email
    await _check_page(b, "11-email-confirm", problems)
    await _submit(page, page.get_by_role("button", name="Confirm", exact=True), "email-confirmed")
    assert new_email in await page.locator("label[for=email]").inner_text()

    await _submit(page, page.get_by_role("button", name="Restrict processing"), "restricted")
    for path in PAGES:
        await page.goto(web.origin + path)
        assert await page.get_by_test_id(NOTICE).is_visible(), path
    await page.get_by_test_id(NOTICE).get_by_role("link", name="Settings › Privacy").click()
    await _submit(page, page.get_by_role("button", name="Lift the restriction"), "lifted")
    for path in PAGES:
        await page.goto(web.origin + path)
        assert await page.get_by_test_id(NOTICE).count() == 0, path

    analytics = page.locator("form:has(input[name=purpose][value=analytics])")
    await _submit(page, analytics.get_by_role("button", name="Object", exact=True), "objection")
    assert "we no longer use your data for it" in await analytics.inner_text()

    await page.get_by_label("Anything else we hold that is wrong").fill(
        "My company's VAT number is wrong")
    await _submit(page, page.get_by_role("button", name="Ask our privacy team to correct it"),
                  "correction")
    await page.get_by_label("Decision", exact=True).select_option("automated_decision")
    await page.get_by_label("What should we look at? (optional)").fill("A refused top-up")
    await _submit(page, page.get_by_role("button", name="Request human review"), "review")
    assert await page.locator("tr[data-request]").count() == 6
    await _check_page(b, "12-privacy-requests", problems)

    async with page.expect_download() as started:
        await page.get_by_test_id("export").click()
    download = await started.value
    assert re.fullmatch(r"qnp-export-\d{4}-\d{2}-\d{2}\.json", download.suggested_filename)
    doc: dict[str, Any] = orjson.loads(Path(await download.path()).read_bytes())
    assert doc["users"][0]["email"] == new_email
    assert doc["users"][0]["display_name"] == "Ada Lovelace"
    return doc, account


async def _matches_what_the_account_did(doc: dict[str, Any], account: uuid.UUID,
                                        pool: asyncpg.Pool) -> None:
    # The structure EXPORT_SCHEMA.md documents: the top level, then every section in
    # its order, each row with exactly the documented fields.
    documented = _documented()
    top = documented.pop("Top level")
    assert list(doc) == [*top, *documented]
    assert list(doc["account"]) == documented.pop("account")
    for section, fields in documented.items():
        for row in doc[section]:
            assert list(row) == fields, section

    # What the account did: every key, every request of the last 30 days, every ledger
    # row, every privacy request (the download itself is recorded after the last byte).
    since = datetime.fromisoformat(doc["usage_logs_since"])
    assert doc["account_id"] == str(account)
    assert [k["key_id"] for k in doc["keys"]] == [r["key_id"] for r in await pool.fetch(
        "SELECT key_id FROM api_keys WHERE account_id = $1 ORDER BY created_at", account)]
    assert [k["name"] for k in doc["keys"]] == ["laptop"]
    kept = await pool.fetch("SELECT id FROM usage_logs WHERE account_id = $1 "
                            "AND received_at >= $2", account, since)
    assert sorted(u["id"] for u in doc["usage_logs"]) == sorted(str(r["id"]) for r in kept)
    assert len(kept) == 3 and await pool.fetchval(
        "SELECT count(*) FROM usage_logs WHERE account_id = $1", account) == 4
    assert [(e["id"], e["kind"], e["amount_micros"]) for e in doc["ledger"]] == [
        tuple(r) for r in await pool.fetch(
            "SELECT id, kind, amount_micros FROM credit_ledger WHERE account_id = $1 "
            "ORDER BY id", account)]
    assert len(doc["ledger"]) == 2
    made = await pool.fetch("SELECT id, type, handled_by, jurisdiction FROM privacy_requests "
                            "WHERE account_id = $1 ORDER BY id", account)
    assert [(r["type"], r["handled_by"]) for r in made] == [
        ("correction", "self-service"), ("correction", "self-service"),
        ("restriction", "self-service"), ("objection", "self-service"),
        ("correction", "staff"), ("human_review", "staff"), ("access", "self-service")]
    assert [(p["id"], p["type"], p["handled_by"], p["jurisdiction"])
            for p in doc["privacy_requests"]] == [tuple(r) for r in made[:-1]]
    assert {p["jurisdiction"] for p in doc["privacy_requests"]} == {"kvkk"}
    # And what the person said and chose there: the e-mail change (confirmed), the
    # objection, their own words to staff.
    assert [(c["new_email"], c["used_at"] is not None) for c in doc["email_changes"]] == [
        (doc["users"][0]["email"], True)]
    assert [o["purpose"] for o in doc["privacy_objections"]] == ["analytics"]
    assert "My company's VAT number is wrong" in {
        d["text"] for d in doc["privacy_request_details"]}
    assert doc["account"]["jurisdiction"] == "kvkk"


async def _suspended(b: Browser, web: Web, account: uuid.UUID, pool: asyncpg.Pool,
                     redis: Any, problems: dict[str, object]) -> None:
    """Suspended, the dashboard leads to the explanation, whose human-review button
    works (the whole rule: tests/control_plane/privacy/test_suspended.py)."""
    page = b.page
    await limits.set_account_status(pool, redis, web.settings.names, str(account),
                                    "suspended")
    deadline = time.monotonic() + HANG_GUARD_S
    await page.goto(web.origin + "/keys")
    while not page.url.endswith(SUSPENDED_PAGE):  # the web app hears of it by pub/sub
        assert time.monotonic() < deadline, page.url
        await asyncio.sleep(0.1)
        await page.goto(web.origin + "/keys")
    assert "not recorded" in await page.get_by_test_id("suspension-reason").inner_text()
    await _check_page(b, "13-suspended", problems)
    await page.get_by_label("What should we look at? (optional)").fill("Please look again")
    await _submit(page, page.get_by_role("button", name="Request human review"), "review")
    assert await pool.fetchval(
        "SELECT d.subject FROM privacy_requests r JOIN privacy_request_details d "
        "ON d.request_id = r.id WHERE r.account_id = $1 ORDER BY r.id DESC LIMIT 1",
        account) == "suspension"
