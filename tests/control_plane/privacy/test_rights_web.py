"""Settings > Privacy (issue 14) from plain forms (no JavaScript) and from the account
API: every right changes what it promises, is a recorded privacy request (self-service
ones fulfilled at once, the rest open for staff with a "received" e-mail), keeps the
person's words out of privacy_requests, and shows another account nothing."""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import timedelta

import asyncpg
import pytest

from control_plane.privacy import deadlines, rights
from tests.control_plane.privacy.people import Person, person
from tests.control_plane.web.conftest import Web

NOTICE = 'data-testid="restricted-notice"'


async def _requests(pool: asyncpg.Pool, who: Person) -> list[asyncpg.Record]:
    found: list[asyncpg.Record] = await pool.fetch(
        "SELECT r.*, d.subject, d.text FROM privacy_requests r "
        "LEFT JOIN privacy_request_details d ON d.request_id = r.id "
        "WHERE r.account_id = $1 ORDER BY r.id", uuid.UUID(who.me["account_id"]))
    return found


async def _mail(pool: asyncpg.Pool, who: Person, template: str) -> list[asyncpg.Record]:
    found: list[asyncpg.Record] = await pool.fetch(
        "SELECT to_address, subject, body FROM email_outbox WHERE account_id = $1 "
        "AND template = $2 ORDER BY id", uuid.UUID(who.me["account_id"]), template)
    return found


def _done(r: object, code: str) -> None:
    assert getattr(r, "status", None) == 303, r
    assert r.headers["Location"] == f"/settings/privacy?done={code}"  # type: ignore[attr-defined]


async def test_each_right_works_from_plain_forms_and_is_a_recorded_request(
    web: Web, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = await person(web), await person(web)
    account = uuid.UUID(a.me["account_id"])
    page = await a.page("/settings/privacy")
    assert page.count('name="csrf_token"') >= 9 and "<script" not in page.split("</head>")[1]
    assert 'href="/settings/privacy"' in await a.page("/settings")

    _done(await a.form("/settings/privacy/jurisdiction", jurisdiction="gdpr"), "jurisdiction")
    assert "1 month(s), extendable by 2 more month(s)" in await a.page("/settings/privacy")

    _done(await a.form("/settings/privacy/name", name="Ada Corrected"), "name")
    assert await pool.fetchval("SELECT display_name FROM users WHERE email = $1",
                               a.email) == "Ada Corrected"

    canary = "CANARY-" + secrets.token_hex(6)
    _done(await a.form("/settings/privacy/correction", text=f"My company is {canary}"),
          "correction")
    _done(await a.form("/settings/privacy/objection", purpose="security", objected="true",
                       text="I only call from one address"), "objection-staff")
    _done(await a.form("/settings/privacy/human-review", about="dispute:dp_123"), "review")

    rows = await _requests(pool, a)
    assert [(r["type"], r["handled_by"], r["outcome"], r["jurisdiction"]) for r in rows] == [
        ("correction", "self-service", "fulfilled", "gdpr"),
        ("correction", "staff", None, "gdpr"),
        ("objection", "staff", None, "gdpr"),
        ("human_review", "staff", None, "gdpr")]
    assert [(r["subject"], r["text"]) for r in rows[1:]] == [
        ("other", f"My company is {canary}"), ("security", "I only call from one address"),
        ("dispute:dp_123", "")]
    for r in rows[1:]:  # GDPR: one month from receipt
        assert r["due_at"] == deadlines.add_months(r["received_at"], 1)
    # The person's words are in the details table only, never in privacy_requests.
    assert not await pool.fetchval(
        "SELECT count(*) FROM privacy_requests r WHERE row_to_json(r)::text LIKE $1",
        f"%{canary}%")
    received = await _mail(pool, a, "privacy_received")
    assert [m["to_address"] for m in received] == [a.email] * 3
    assert f"#{rows[1]['id']}" in received[0]["subject"] and canary not in received[0]["body"]

    # Restriction: the notice on every dashboard page, the consumers' answer, lifted.
    _done(await a.form("/settings/privacy/restriction", restricted="true"), "restricted")
    for path in ("/settings", "/keys", "/settings/privacy"):
        assert NOTICE in await a.page(path), path
    assert NOTICE not in await b.page("/settings")
    for purpose in ("analytics", "marketing_email", "error_monitoring"):
        assert not await rights.processing_allowed(pool, account, purpose)
    _done(await a.form("/settings/privacy/restriction", restricted="false"), "lifted")
    assert NOTICE not in await a.page("/settings")
    assert await rights.processing_allowed(pool, account, "analytics")

    # Objection to analytics: at once, per purpose, withdrawn at once.
    _done(await a.form("/settings/privacy/objection", purpose="analytics", objected="true"),
          "objection")
    assert not await rights.processing_allowed(pool, account, "analytics")
    assert await rights.processing_allowed(pool, account, "service_improvement")
    assert "we no longer use your data for it" in await a.page("/settings/privacy")
    _done(await a.form("/settings/privacy/objection", purpose="analytics", objected="false"),
          "withdrawn")
    assert await rights.processing_allowed(pool, account, "analytics")
    assert [r["type"] for r in (await _requests(pool, a))[4:]] == ["restriction", "objection"]

    # Bad input: the page again with a clear message, escaped; no request recorded.
    r = await a.form("/settings/privacy/jurisdiction", jurisdiction="mars")
    assert r.status == 400 and "jurisdiction must be one of" in await r.text()
    r = await a.form("/settings/privacy/human-review", about="<script>x</script>")
    text = await r.text()
    assert r.status == 400 and "<script>x" not in text and "short code" in text
    r = await web.client.post("/settings/privacy/restriction", data={"restricted": "true"},
                              headers=a.browser, allow_redirects=False)
    assert r.status == 403  # no CSRF token
    assert len(await _requests(pool, a)) == 6

    # The other account sees none of it.
    theirs = await b.page("/settings/privacy")
    assert canary not in theirs and "dispute:dp_123" not in theirs and "None yet." in theirs
    r = await web.client.get("/api/v1/account/privacy", headers=b.api)
    assert (await r.json())["data"]["requests"] == []
    # Logs name ids, never the person's words, name or address.
    for secret in (canary, "Ada Corrected", "one address", a.email):
        assert secret not in caplog.text, secret


async def test_the_account_api_exercises_the_same_rights_for_its_callers(
    web: Web, pool: asyncpg.Pool
) -> None:
    a = await person(web)
    base = "/api/v1/account/privacy"
    r = await web.client.put(f"{base}/jurisdiction", json={"jurisdiction": "ccpa"},
                             headers=a.api)
    assert r.status == 200 and (await r.json())["data"] == {"jurisdiction": "ccpa"}
    r = await web.client.post("/api/v1/keys", json={"name": "ops", "management": True},
                              headers=a.api)
    manager = {"Authorization": f"Bearer {(await r.json())['key']}"}
    r = await web.client.post("/api/v1/keys", json={"name": "app"}, headers=a.api)
    inference = {"Authorization": f"Bearer {(await r.json())['key']}"}

    r = await web.client.put(f"{base}/restriction", json={"restricted": True}, headers=manager)
    body = (await r.json())["data"]
    assert r.status == 200 and body["restricted_at"] is not None
    assert body["request"]["type"] == "restriction" and body["request"]["outcome"] == "fulfilled"
    r = await web.client.post(f"{base}/objection", headers=manager,
                              json={"purpose": "service_improvement", "objected": True})
    assert r.status == 200 and list((await r.json())["data"]["objections"]) == [
        "service_improvement"]
    r = await web.client.post(f"{base}/objection", headers=a.api,
                              json={"purpose": "fraud_prevention", "objected": True})
    assert r.status == 201 and (await r.json())["data"]["request"]["handled_by"] == "staff"
    r = await web.client.post(f"{base}/human-review", json={"about": "suspension"},
                              headers=a.api)
    created = (await r.json())["data"]["request"]
    assert r.status == 201 and created["type"] == "human_review"
    # CCPA: 45 days from receipt.
    assert created["due_at"] > created["received_at"]
    row = await pool.fetchrow("SELECT received_at, due_at FROM privacy_requests WHERE id = $1",
                              created["id"])
    assert row["due_at"] - row["received_at"] == timedelta(days=45)
    r = await web.client.post(f"{base}/correction", json={"text": "my VAT id is wrong"},
                              headers=a.api)
    assert r.status == 201

    r = await web.client.post(f"{base}/name", json={"name": "From API"}, headers=a.api)
    assert r.status == 200 and (await r.json())["data"]["request"]["type"] == "correction"
    state = (await (await web.client.get(base, headers=a.api)).json())["data"]
    assert state["jurisdiction"] == "ccpa" and state["restricted_at"] is not None
    assert [q["type"] for q in state["requests"]] == [
        "restriction", "objection", "objection", "human_review", "correction", "correction"]

    # Who may call what, and errors in the account API's own format.
    for path, body_ in ((f"{base}/name", {"name": "x"}), (f"{base}/email", {"email": "a@b.c"})):
        r = await web.client.post(path, json=body_, headers=manager)
        assert r.status == 403 and (await r.json())["error"]["code"] == 403  # not a person
    r = await web.client.put(f"{base}/restriction", json={"restricted": False},
                             headers=inference)
    assert r.status == 403
    for method, path, raw in (("PUT", f"{base}/jurisdiction", b'{"jurisdiction": "mars"}'),
                              ("PUT", f"{base}/restriction", b'{"restricted": "yes"}'),
                              ("POST", f"{base}/objection", b'{"purpose": "everything"}'),
                              ("POST", f"{base}/objection",
                               b'{"purpose": "security", "objected": false}'),
                              ("POST", f"{base}/human-review", b'{"about": ""}'),
                              ("POST", f"{base}/correction", b'{"text": "  "}'),
                              ("POST", f"{base}/correction", b"not json")):
        r = await web.client.request(method, path, data=raw, headers=a.api)
        error = (await r.json())["error"]
        assert r.status == 400 and error["code"] == 400 and error["message"], (path, raw)
    r = await web.client.get(base)
    assert r.status == 401
