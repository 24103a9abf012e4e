"""Consent over HTTP (issue 15): the banner on a first visit with only the strictly
necessary consent cookie, its form (CSRF-checked, per browser before sign-in, attached
at sign-in), the account API, GPC recorded once, the policy version asking again, the
/cookies page from the one cookie table, and the theme stored only with functional
consent. The browser journeys are in tests/browser/test_consent.py."""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse

from control_plane.consent import records
from control_plane.consent.cookies import CONSENT_COOKIE, COOKIES, THEME_COOKIE
from tests.control_plane.web.conftest import Web, sign_in_new_user

GPC = {"Sec-GPC": "1"}


def _token(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


def _banner_shown(page: str) -> bool:
    tag = re.search(r'<section class="consent-banner"[^>]*>', page)
    assert tag, "no banner markup on the page"
    return " hidden" not in tag.group(0)


def _cookie(web: Web, name: str) -> str | None:
    for c in web.client.session.cookie_jar:
        if c.key == name:
            return c.value
    return None


def _state(page: str) -> dict[str, str]:
    tag = re.search(r'<div id="qnp-consent"([^>]*)>', page)
    assert tag
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))


async def _post(web: Web, data: dict[str, str], **headers: str) -> ClientResponse:
    return await web.client.post("/consent", data=data, allow_redirects=False,
                                 headers={**web.same_origin, **headers})


async def _rows(pool: asyncpg.Pool, where: str, value: uuid.UUID) -> list[tuple[Any, ...]]:
    found = await pool.fetch(
        f"SELECT purpose, granted, source FROM consent_records WHERE {where} "  # noqa: S608
        "ORDER BY id", value)
    return [tuple(r) for r in found]


async def test_a_first_visit_shows_the_banner_and_sets_only_the_consent_cookie(
    web: Web, pool: asyncpg.Pool
) -> None:
    r = await web.client.get("/signin")
    page = await r.text()
    assert r.status == 200 and _banner_shown(page)
    assert [c.key for c in web.client.session.cookie_jar] == [CONSENT_COOKIE]
    morsel = r.cookies[CONSENT_COOKIE]
    assert morsel["httponly"] and morsel["secure"] and morsel["samesite"] == "Lax"
    browser = uuid.UUID(morsel.value)  # a random id and nothing else
    assert browser.version == 4
    assert await _rows(pool, "browser_id = $1", browser) == []  # nothing recorded yet
    assert 'href="/cookies"' in page and "Reject all" in page and "Accept all" in page
    assert _state(page)["analytics-allowed"] == "0"
    again = await web.client.get("/signin")  # the same browser keeps its id
    assert CONSENT_COOKIE not in again.cookies and _banner_shown(await again.text())


async def test_reject_all_is_recorded_for_the_browser_and_hides_the_banner(
    web: Web, pool: asyncpg.Pool
) -> None:
    token = _token(await (await web.client.get("/signin")).text())
    r = await _post(web, {"csrf_token": token, "choice": "reject", "next": "/signin"})
    assert r.status == 303 and r.headers["Location"] == "/signin"
    browser = uuid.UUID(_cookie(web, CONSENT_COOKIE) or "")
    assert await _rows(pool, "browser_id = $1 AND account_id IS NULL", browser) == [
        ("functional", False, "banner"), ("analytics", False, "banner")]
    page = await (await web.client.get("/cookies")).text()
    assert not _banner_shown(page) and _state(page)["granted"] == ""


async def test_the_form_is_refused_without_its_token_cross_site_or_without_the_cookie(
    web: Web, pool: asyncpg.Pool
) -> None:
    token = _token(await (await web.client.get("/signin")).text())
    assert (await _post(web, {"choice": "accept"})).status == 403
    assert (await _post(web, {"csrf_token": "x" * 64, "choice": "accept"})).status == 403
    r = await web.client.post("/consent", data={"csrf_token": token, "choice": "accept"},
                              headers={"Origin": "https://evil.example",
                                       "Sec-Fetch-Site": "cross-site"})
    assert r.status == 403
    web.client.session.cookie_jar.clear()  # the token was bound to the cookie
    assert (await _post(web, {"csrf_token": token, "choice": "accept"})).status == 403
    bad = await web.client.get("/signin")
    r = await _post(web, {"csrf_token": _token(await bad.text()), "choice": "all"},
                    Accept="application/json")
    assert r.status == 400 and "choice" in (await r.json())["error"]["message"]


async def test_choices_before_sign_in_become_the_accounts_and_follow_a_later_withdrawal(
    web: Web, pool: asyncpg.Pool
) -> None:
    token = _token(await (await web.client.get("/signin")).text())
    r = await _post(web, {"csrf_token": token, "choice": "save", "functional": "on",
                          "analytics": "on"}, Accept="application/json")
    assert r.status == 200
    assert (await r.json())["data"]["granted"] == ["analytics", "functional"]
    browser = uuid.UUID(_cookie(web, CONSENT_COOKIE) or "")
    me = await sign_in_new_user(web)
    account = uuid.UUID(me["account_id"])
    state = await records.current(pool, account_id=account)
    assert state.granted == {"analytics", "functional"}
    page = await (await web.client.get("/settings")).text()
    assert not _banner_shown(page) and _state(page)["analytics-allowed"] == "1"
    assert "Cookies and e-mail" in page
    # Withdrawn while signed in: the account and this browser both record it, so the
    # pages seen after signing out do not load analytics either.
    r = await _post(web, {"csrf_token": _token(page), "choice": "save", "functional": "on",
                          "source": "settings", "next": "/settings",
                          "purposes": "functional analytics marketing_email"})
    assert r.status == 303
    assert "analytics" not in (await records.current(pool, account_id=account)).granted
    assert "analytics" not in (await records.current(pool, browser_id=browser)).granted
    history = await records.history(pool, account)
    assert sorted((h.purpose, h.granted, h.source) for h in history[:2]) == [
        ("analytics", True, "banner"), ("functional", True, "banner")]  # untouched
    # A second sign-in of this browser copies nothing twice.
    assert await records.attach(pool, browser, account) == 0


async def test_the_account_api_reads_and_changes_only_the_callers_consents(
    web: Web, pool: asyncpg.Pool
) -> None:
    await sign_in_new_user(web)
    session = (await (await web.client.get("/api/v1/session")).json())["data"]
    headers = {**web.same_origin, "X-CSRF-Token": session["csrf_token"]}
    r = await web.client.put("/api/v1/account/consents", headers=headers,
                             json={"analytics": True, "marketing_email": True})
    assert r.status == 200, await r.text()
    doc = (await r.json())["data"]
    assert doc["consents"]["analytics"] == {"granted": True, "decided": True}
    assert doc["consents"]["functional"] == {"granted": False, "decided": False}
    assert doc["analytics_allowed"] and doc["current_policy_version"] == "2026-04"
    assert [(h["purpose"], h["source"]) for h in doc["history"]] == [
        ("analytics", "settings"), ("marketing_email", "settings")]
    for body, says in (({"cookies": True}, "unknown purpose"),
                       ({"analytics": "yes"}, "true or false"), ({}, "at least one")):
        r = await web.client.put("/api/v1/account/consents", headers=headers, json=body)
        assert r.status == 400 and says in (await r.json())["error"]["message"]
    r = await web.client.put("/api/v1/account/consents", headers=headers, data=b"{")
    assert r.status == 400 and (await r.json())["error"]["code"] == 400
    r = await web.client.put("/api/v1/account/consents", json={"analytics": False},
                             headers=web.same_origin)  # no CSRF token
    assert r.status == 403
    # A second account sees its own state, never the first one's.
    web.client.session.cookie_jar.clear()
    await sign_in_new_user(web)
    other = (await (await web.client.get("/api/v1/account/consents")).json())["data"]
    assert other["history"] == [] and not other["consents"]["analytics"]["granted"]
    web.client.session.cookie_jar.clear()
    assert (await web.client.get("/api/v1/account/consents")).status == 401


async def test_gpc_withdraws_analytics_and_marketing_once_and_says_so(
    web: Web, pool: asyncpg.Pool
) -> None:
    me = await sign_in_new_user(web)
    account = uuid.UUID(me["account_id"])
    await records.record_many(pool, {"analytics": True, "marketing_email": True,
                                     "functional": True}, source="settings",
                              policy_version="2026-04", account_id=account)
    page = await (await web.client.get("/settings", headers=GPC)).text()
    assert "GPC honoured" in page and 'class="gpc-note" hidden' not in page
    assert _state(page)["analytics-allowed"] == "0" and _state(page)["gpc"] == "1"
    for _ in range(3):  # later requests with the signal write nothing more
        assert (await web.client.get("/keys", headers=GPC)).status == 200
        assert (await web.client.get("/api/v1/credits", headers=GPC)).status == 200
    gpc_rows = [r for r in await _rows(pool, "account_id = $1", account) if r[2] == "gpc"]
    assert sorted(gpc_rows) == [("analytics", False, "gpc"), ("marketing_email", False, "gpc")]
    state = await records.current(pool, account_id=account)
    assert state.granted == {"functional"}
    # Without the header the page asks consent.js to report the page's own signal.
    page = await (await web.client.get("/settings")).text()
    assert _state(page)["gpc-record"] == "0"  # recorded already: nothing to report
    gpc = await (await web.client.get("/.well-known/gpc.json")).json()
    assert gpc["gpc"] is True and re.fullmatch(r"\d{4}-\d{2}-\d{2}", gpc["lastUpdate"])


async def test_gpc_reported_by_the_page_is_recorded_for_the_account(
    web: Web, pool: asyncpg.Pool
) -> None:
    me = await sign_in_new_user(web)
    page = await (await web.client.get("/settings")).text()
    assert _state(page)["gpc-record"] == "1"
    r = await _post(web, {"csrf_token": _token(page), "gpc": "1"}, Accept="application/json")
    assert r.status == 200 and (await r.json())["data"]["gpc"] is True
    rows = await _rows(pool, "account_id = $1", uuid.UUID(me["account_id"]))
    assert sorted(rows) == [("analytics", False, "gpc"), ("marketing_email", False, "gpc")]


async def test_a_restricted_account_never_gets_analytics(web: Web, pool: asyncpg.Pool) -> None:
    me = await sign_in_new_user(web)
    account = uuid.UUID(me["account_id"])
    await records.record_many(pool, {"analytics": True, "functional": True},
                              source="banner", policy_version="2026-04", account_id=account)
    assert _state(await (await web.client.get("/"))
                  .text())["analytics-allowed"] == "1"
    await pool.execute("UPDATE accounts SET restricted_at = now() WHERE id = $1", account)
    state = _state(await (await web.client.get("/")).text())
    assert state["analytics-allowed"] == "0" and "analytics" in state["granted"].split()


async def test_a_choice_under_an_older_policy_shows_the_banner_again(
    web: Web, pool: asyncpg.Pool
) -> None:
    await web.client.get("/signin")
    browser = uuid.UUID(_cookie(web, CONSENT_COOKIE) or "")
    await records.record_many(pool, {"functional": True, "analytics": False},
                              source="banner", policy_version="2025-11", browser_id=browser)
    assert _banner_shown(await (await web.client.get("/cookies")).text())
    await records.record_many(pool, {"functional": True, "analytics": False},
                              source="banner", policy_version="2026-04", browser_id=browser)
    assert not _banner_shown(await (await web.client.get("/cookies")).text())


async def test_the_cookies_page_lists_every_documented_cookie(web: Web) -> None:
    r = await web.client.get("/cookies")
    page = await r.text()
    assert r.status == 200
    listed = re.findall(r'<tr data-cookie="([^"]+)">', page)
    assert listed == [c.name for c in COOKIES]
    for c in COOKIES:
        assert c.lifetime.split(";")[0] in page and c.category in page


@pytest.mark.parametrize("consented", [False, True])
async def test_the_theme_is_stored_only_with_functional_consent(
    web: Web, consented: bool
) -> None:
    token = _token(await (await web.client.get("/signin")).text())
    if consented:
        r = await _post(web, {"csrf_token": token, "choice": "save", "functional": "on"})
        assert r.status == 303
    r = await web.client.post("/theme", data={"csrf_token": token, "theme": "dark"},
                              headers={**web.same_origin, "Accept": "application/json"})
    assert r.status == 200 and (await r.json())["data"]["stored"] is consented
    assert (_cookie(web, THEME_COOKIE) == "dark") is consented
    page = await (await web.client.get("/cookies")).text()
    assert ('<html lang="en" data-theme="dark">' in page) is consented
    if consented:  # withdrawn: the cookie goes with it
        r = await _post(web, {"csrf_token": token, "choice": "reject"})
        assert r.status == 303 and _cookie(web, THEME_COOKIE) is None
        page = await (await web.client.get("/cookies")).text()
        assert "data-theme" not in page.split(">", 2)[1]
    bad = await web.client.post("/theme", data={"csrf_token": token, "theme": "pink"},
                                headers={**web.same_origin, "Accept": "application/json"})
    assert bad.status == 400
