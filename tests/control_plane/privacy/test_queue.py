"""The privacy staff queue on the admin API (issue 14): role ``privacy`` only; open
requests by due date, overdue first; an extension within the law, with notice; an
answer with reasons e-mailed to the person and stored nowhere else; the overdue gauge
follows at once."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from control_plane import admin_rbac, staff
from control_plane.admin_api import METRICS, make_app
from control_plane.privacy import deadlines, requests
from tests.control_plane.privacy.people import person
from tests.control_plane.web.conftest import Web

QUEUE = "/admin/privacy/requests"


async def test_privacy_staff_answer_the_queue_by_due_date_within_the_law(
    web: Web, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_rbac, "ROLES_CACHE_TTL_S", 0.0)
    a, officer = await person(web), await person(web)
    account = uuid.UUID(a.me["account_id"])
    as_staff = {"Cookie": officer.api["Cookie"]}
    csrf = {**as_staff, "X-CSRF-Token": officer.me["csrf_token"]}
    now = datetime.now(UTC)
    await pool.execute("UPDATE accounts SET jurisdiction = 'gdpr' WHERE id = $1", account)
    r = await web.client.post("/api/v1/account/privacy/human-review", headers=a.api,
                              json={"about": "suspension", "text": "I did nothing wrong"})
    review = (await r.json())["data"]["request"]["id"]
    late = await requests.record(pool, account, "correction", "default",
                                 now - timedelta(days=40), "staff")
    soon = await requests.record(pool, account, "objection", "pipa",
                                 now - timedelta(days=5), "staff")

    async with TestClient(TestServer(make_app(web.settings))) as admin:
        assert (await admin.get(QUEUE, headers=as_staff)).status == 404  # not staff
        await staff.grant(pool, officer.email, "support", "test")
        assert (await admin.get(QUEUE, headers=as_staff)).status == 403  # not privacy
        await staff.grant(pool, officer.email, "privacy", "test")
        r = await admin.get(QUEUE, headers=as_staff)
        assert r.status == 200
        mine = [q for q in (await r.json())["requests"] if q["account_id"] == str(account)]
        assert [(q["id"], q["overdue"]) for q in mine] == [
            (late.id, True), (soon.id, False), (review, False)]
        assert (mine[2]["subject"], mine[2]["text"]) == ("suspension", "I did nothing wrong")
        assert [q["extendable"] for q in mine] == [False, False, True]

        gauge = admin.app[METRICS].registry
        before = gauge.get_sample_value("qnp_privacy_requests_overdue")
        assert before is not None
        assert before == sum(q["overdue"] for q in (await r.json())["requests"]) >= 1

        # Extend: the GDPR request by two months, with the reasons told; once only.
        path = f"{QUEUE}/{review}/extend"
        assert (await admin.post(path, json={}, headers=csrf)).status == 400  # no reasons
        assert (await admin.post(path, json={"reason": "x"}, headers=as_staff)).status == 403
        r = await admin.post(path, json={"reason": "The dispute file is with the bank."},
                             headers=csrf)
        assert r.status == 200, await r.text()
        row = await pool.fetchrow("SELECT * FROM privacy_requests WHERE id = $1", review)
        assert row["extended_until"] == deadlines.extended("gdpr", row["received_at"])
        assert (await r.json())["extended_until"] == row["extended_until"].isoformat()
        assert (await admin.post(path, json={"reason": "again"}, headers=csrf)).status == 409
        r = await admin.post(f"{QUEUE}/{soon.id}/extend", json={"reason": "busy"}, headers=csrf)
        assert r.status == 409  # PIPA allows no extension

        # Answer: the reasons go to the person, not into privacy_requests.
        answer = "We looked again: CANARY-" + secrets.token_hex(5)
        path = f"{QUEUE}/{late.id}/answer"
        r = await admin.post(path, json={"outcome": "maybe", "answer": answer}, headers=csrf)
        assert r.status == 400
        r = await admin.post(path, json={"outcome": "fulfilled", "answer": answer},
                             headers=csrf)
        assert r.status == 200, await r.text()
        assert gauge.get_sample_value("qnp_privacy_requests_overdue") == before - 1
        r = await admin.post(path, json={"outcome": "refused", "answer": "no"}, headers=csrf)
        assert r.status == 409
        for missing in ("999999999999", "abc"):
            r = await admin.post(f"{QUEUE}/{missing}/answer", headers=csrf,
                                 json={"outcome": "fulfilled", "answer": "x"})
            assert r.status == 404
        r = await admin.get(QUEUE, headers=as_staff)
        assert late.id not in [q["id"] for q in (await r.json())["requests"]]

    done = await pool.fetchrow("SELECT * FROM privacy_requests WHERE id = $1", late.id)
    assert (done["outcome"], done["handled_by"]) == ("fulfilled", "staff")
    assert answer not in str(dict(done))
    mails = await pool.fetch(
        "SELECT template, to_address, body FROM email_outbox WHERE account_id = $1 "
        "ORDER BY id", account)
    assert [(m["template"], m["to_address"]) for m in mails] == [
        ("privacy_received", a.email), ("privacy_extended", a.email),
        ("privacy_answered", a.email)]
    assert "with the bank" in mails[1]["body"] and answer in mails[2]["body"]
    actors = await pool.fetch("SELECT actor, action FROM audit_log WHERE target LIKE $1",
                              f"request_id:{late.id}")
    assert [r["action"] for r in actors] == ["POST /admin/privacy/requests/{request_id}/answer"]
    assert actors[0]["actor"].startswith("staff:")
