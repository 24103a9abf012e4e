"""A suspended account keeps its privacy rights (issue 14; KVKK art. 11): its session
still reaches Settings > Privacy, the export, the human review, sign-out and a page that
explains the suspension with the reason staff or automation gave, and nothing else,
every route of the web app checked (a page sends it to the explanation, the account API
answers 403 in its own format). Another account sees none of it."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from control_plane import limits
from control_plane.admin_api import make_app
from control_plane.web.guard import SUSPENDED_ALLOWED, SUSPENDED_PAGE, UNSAFE_METHODS
from control_plane.web.state import SESSIONS
from tests.control_plane.factories import ADMIN_TOKEN
from tests.control_plane.privacy.people import Person, person
from tests.control_plane.web.conftest import (
    Web,
    authorize_at_mock,
    new_person,
    path_of,
    start_signin,
)

HANG_GUARD_S = 30.0
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REASON = "Unusual traffic: 40,000 requests a minute from one key <b>bold</b>"


async def _status_becomes(who: Person, path: str, status: int) -> None:
    """Wait (within the hang guard) until ``path`` answers ``status``: a suspension
    reaches the web app's session cache through Redis pub/sub."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        r = await who.web.client.get(path, headers=who.browser, allow_redirects=False)
        if r.status == status:
            return
        assert time.monotonic() < deadline, f"{path} still answers {r.status}"
        await asyncio.sleep(0.02)


def _blocked_routes(web: Web, key_id: str) -> list[tuple[str, str]]:
    """Every (method, path) of the web app a suspended session must not reach, each
    placeholder filled so that an active session would get a real answer."""
    app = web.client.server.app
    assert app is not None
    fill = {"hash": key_id, "provider": "dev"}
    found = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or any(resource.canonical == a or
                                   resource.canonical.startswith(a + "/")
                                   for a in SUSPENDED_ALLOWED):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), "x"), resource.canonical)
        found.append((route.method, path))
    return found


async def test_a_suspended_account_keeps_its_privacy_rights_and_nothing_else(
    web: Web, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    someone = new_person()
    a, b = await person(web, someone), await person(web)
    account = uuid.UUID(a.me["account_id"])
    r = await web.client.post("/api/v1/keys", json={"name": "app"}, headers=a.api)
    assert r.status == 201
    key_id = (await r.json())["data"]["hash"]

    async with TestClient(TestServer(make_app(web.settings))) as admin:
        for bad in ({"reason": 5}, {"reason": "x" * 501}, {"reason": "a\x00b"}):
            r = await admin.post(f"/admin/accounts/{account}/suspend", json=bad,
                                 headers=ADMIN)
            assert r.status == 400 and "reason" in (await r.json())["error"]["message"]
        assert await pool.fetchval("SELECT status FROM accounts WHERE id = $1",
                                   account) == "active"
        r = await admin.post(f"/admin/accounts/{account}/suspend", json={"reason": REASON},
                             headers=ADMIN)
        assert r.status == 200, await r.text()
        await _status_becomes(a, "/", 303)

        # The dashboard sends the person to the explanation: the reason (escaped), who
        # decided, and the human-review button.
        r = await web.client.get("/", headers=a.browser, allow_redirects=False)
        assert r.headers["Location"] == SUSPENDED_PAGE
        page = await a.page(SUSPENDED_PAGE)
        assert "Unusual traffic: 40,000 requests a minute from one key &lt;b&gt;bold" in page
        assert "our automated systems" in page and "<b>bold</b>" not in page
        assert 'action="/settings/privacy/human-review"' in page
        assert 'href="/keys"' not in page  # the navigation offers only what works
        assert "Reason: Unusual traffic" in await a.page("/settings/privacy")

        # The rights work: a human review of the suspension, a restriction, the export.
        r = await a.form("/settings/privacy/human-review", about="suspension",
                         text="It was a load test")
        assert r.status == 303 and r.headers["Location"] == "/settings/privacy?done=review"
        assert 'data-testid="pending-review"' in await a.page(SUSPENDED_PAGE)
        r = await a.form("/settings/privacy/restriction", restricted="true")
        assert r.status == 303
        r = await web.client.get("/api/v1/account/privacy", headers=a.api)
        assert r.status == 200
        assert [q["type"] for q in (await r.json())["data"]["requests"]] == [
            "human_review", "restriction"]
        r = await web.client.get("/api/v1/account/export", headers=a.api)
        assert r.status == 200
        doc = orjson.loads(await r.read())
        assert doc["account"]["status"] == "suspended"
        assert [q["type"] for q in doc["privacy_requests"]] == ["human_review", "restriction"]
        assert any(row["detail"] == {"reason": REASON} for row in doc["audit"])
        assert await pool.fetchval(
            "SELECT d.subject FROM privacy_requests r JOIN privacy_request_details d "
            "ON d.request_id = r.id WHERE r.account_id = $1 AND r.type = 'human_review'",
            account) == "suspension"

        # Everything else, every route the app has: pages send it to the explanation,
        # the account API refuses in its own format, and nothing changes.
        sessions = web.client.server.app[SESSIONS]  # type: ignore[index]
        queries = sessions.queries
        blocked = _blocked_routes(web, key_id)
        assert ("POST", "/keys") in blocked and ("DELETE", f"/api/v1/keys/{key_id}") in blocked
        for method, path in blocked:
            headers = {**a.api, "Accept": "text/html"} if method in UNSAFE_METHODS \
                else {**a.browser, "Accept": "text/html"}
            r = await web.client.request(method, path, headers=headers, data=b"{}",
                                         allow_redirects=False)
            if path.startswith("/api/"):
                assert r.status == 403, (method, path)
                if method != "HEAD":  # HEAD: GET's twin, without the body
                    body: dict[str, Any] = await r.json()
                    assert body["error"]["code"] == 403, (method, path)
                    assert "suspended" in body["error"]["message"], (method, path)
            else:
                assert (r.status, r.headers.get("Location")) == (303, SUSPENDED_PAGE), \
                    (method, path, r.status)
        assert sessions.queries == queries  # the check is the cached session, no query
        assert await pool.fetchval(
            "SELECT array_agg(status) FROM api_keys WHERE account_id = $1", account) == [
            "active"]

        # Signing in again while suspended lands on the explanation too.
        callback = await authorize_at_mock(await start_signin(web, "dev"), someone)
        r = await web.client.get(path_of(callback), allow_redirects=False)
        assert r.status == 302, await r.text()
        r = await web.client.get("/keys", allow_redirects=False)
        assert (r.status, r.headers["Location"]) == (303, SUSPENDED_PAGE)
        web.client.session.cookie_jar.clear()

        # The other account: its dashboard as before, and nothing of the suspension.
        for path in ("/", "/keys", "/settings/privacy"):
            assert REASON.split(":")[0] not in await b.page(path)
        r = await web.client.get(SUSPENDED_PAGE, headers=b.browser, allow_redirects=False)
        assert (r.status, r.headers["Location"]) == (303, "/")
        r = await web.client.get("/api/v1/account/export", headers=b.api)
        assert b"Unusual traffic" not in await r.read() and str(account) not in await r.text()

        # Resumed: the dashboard is back at once, the explanation gone.
        r = await admin.post(f"/admin/accounts/{account}/resume", headers=ADMIN)
        assert r.status == 200
        await _status_becomes(a, "/", 200)
        r = await web.client.get(SUSPENDED_PAGE, headers=a.browser, allow_redirects=False)
        assert (r.status, r.headers["Location"]) == (303, "/")

    # Suspended again where no reason is recorded (the CLI's path): the page says so,
    # and sign-out stays reachable (checked last: it ends the session).
    await limits.set_account_status(pool, redis, web.settings.names, str(account),
                                    "suspended")
    await _status_becomes(a, "/", 303)
    page = await a.page(SUSPENDED_PAGE)
    assert "Unusual traffic" not in page and page.count("not recorded") == 3
    r = await a.form("/settings/signout")
    assert (r.status, r.headers["Location"]) == (303, "/signin")
    r = await web.client.get("/settings/privacy", headers=a.browser, allow_redirects=False)
    assert r.status == 401
