"""Session cookies and CSRF: tampered, expired and revoked cookies get 401 and are
cleared; unsafe requests need our origin and the session's token; sign-out everywhere
reaches a second replica within a second; every response carries the security headers."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import replace
from typing import Any

import jwt
import pytest

from control_plane import limits
from control_plane.auth.sessions import (
    CACHE_TTL_S,
    COOKIE,
    COOKIE_TTL_S,
    Sessions,
    user_agent_summary,
)
from control_plane.web.state import SESSIONS
from tests.control_plane.web.conftest import SESSION_SECRET, Web, serve_web, sign_in_new_user
from tests.support import free_port

HANG_GUARD_S = 5.0


def _cookie(web: Web) -> str:
    for c in web.client.session.cookie_jar:
        if c.key == COOKIE:
            return c.value
    raise AssertionError("no session cookie")


def _set_cookie(web: Web, value: str) -> None:
    web.client.session.cookie_jar.update_cookies({COOKIE: value}, web.client.make_url("/"))


async def _status_and_cleared(web: Web) -> tuple[int, bool]:
    r = await web.client.get("/api/v1/session")
    cleared = COOKIE in r.cookies and r.cookies[COOKIE].value == ""
    body = await r.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["code"] == r.status
    return r.status, cleared


async def test_a_tampered_cookie_gets_401_and_is_cleared(web: Web) -> None:
    await sign_in_new_user(web)
    good = _cookie(web)
    head, body, sig = good.split(".")
    _set_cookie(web, f"{head}.{body}.{sig[:-2]}AA")
    assert await _status_and_cleared(web) == (401, True)


async def test_an_expired_or_foreign_cookie_gets_401(web: Web) -> None:
    me = await sign_in_new_user(web)
    sid = jwt.decode(_cookie(web), options={"verify_signature": False})["sid"]
    now = int(time.time())
    signer = Sessions(SESSION_SECRET, None, None, None, None)  # type: ignore[arg-type]
    _set_cookie(web, signer.cookie_value(uuid.UUID(sid), now - 3600))
    assert await _status_and_cleared(web) == (401, True)
    forged = jwt.encode({"sid": sid, "iat": now, "exp": now + 600}, "another-secret-" * 3,
                        algorithm="HS256")
    _set_cookie(web, forged)
    assert await _status_and_cleared(web) == (401, True)
    _set_cookie(web, signer.cookie_value(uuid.UUID(sid), now))
    r = await web.client.get("/api/v1/session")
    assert r.status == 200 and (await r.json())["data"]["account_id"] == me["account_id"]


async def test_unsafe_requests_need_our_origin_and_the_token(web: Web) -> None:
    me = await sign_in_new_user(web)
    token = {"X-CSRF-Token": me["csrf_token"]}
    body = {"name": "ci"}
    cases = [
        ({"Sec-Fetch-Site": "cross-site", **token}, 403),
        ({"Origin": "https://evil.example", **token}, 403),
        ({}, 403),  # no origin information at all
        (web.same_origin, 403),  # our origin, no token
        ({**web.same_origin, "X-CSRF-Token": "0" * 64}, 403),
    ]
    for headers, status in cases:
        r = await web.client.post("/api/v1/keys", json=body, headers=headers)
        assert r.status == status, (headers, await r.text())
    r = await web.client.get("/api/v1/keys")
    assert (await r.json())["data"] == []  # nothing was created by the refused ones
    r = await web.client.post("/api/v1/keys", json=body,
                              headers={**token, "Origin": web.origin})
    assert r.status == 201, await r.text()


async def test_signout_revokes_the_session(web: Web) -> None:
    me = await sign_in_new_user(web)
    stolen = _cookie(web)
    r = await web.client.post("/auth/signout",
                              headers={**web.same_origin, "X-CSRF-Token": me["csrf_token"]})
    assert r.status == 200 and r.cookies[COOKIE].value == ""
    _set_cookie(web, stolen)  # a copy of the cookie kept from before
    assert await _status_and_cleared(web) == (401, True)


async def test_signout_everywhere_ends_sessions_on_two_replicas_within_a_second(
    web: Web
) -> None:
    me = await sign_in_new_user(web)
    cookie = _cookie(web)
    settings = web.settings
    other = replace(settings, web_port=free_port())
    async with serve_web(other) as replica:
        _set_cookie(replica, cookie)
        # Warm the replica's cache: from here on it answers without Postgres.
        for _ in range(3):
            assert (await replica.client.get("/api/v1/session")).status == 200
        await asyncio.sleep(0.3)  # the replica's subscription is up
        r = await web.client.post("/auth/signout-everywhere",
                                  headers={**web.same_origin, "X-CSRF-Token": me["csrf_token"]})
        assert r.status == 200 and (await r.json())["signed_out"] == 1
        # The replica's cache would keep the session for CACHE_TTL_S (30 s); only the
        # pub/sub message can end it within this hang guard, so no clock is asserted.
        assert HANG_GUARD_S < CACHE_TTL_S
        loop = asyncio.get_running_loop()
        started, status, polls = loop.time(), 200, 0
        while status == 200 and loop.time() - started < HANG_GUARD_S:
            status = (await replica.client.get("/api/v1/session")).status
            polls += 1
            await asyncio.sleep(0.02)
    assert status == 401, f"the replica still accepted the session after {polls} polls"


async def test_a_warm_session_costs_no_postgres_query(web: Web) -> None:
    await sign_in_new_user(web)
    sessions = web.client.server.app[SESSIONS]  # type: ignore[union-attr]
    await web.client.get("/api/v1/session")
    before = sessions.queries
    for _ in range(20):
        r = await web.client.get("/api/v1/credits")
        assert r.status == 200
    assert sessions.queries == before


@pytest.mark.parametrize("path", ["/healthz", "/signin", "/api/v1/key", "/nowhere"])
async def test_every_response_carries_the_security_headers(web: Web, path: str) -> None:
    r = await web.client.get(path)
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "same-origin"
    assert "Strict-Transport-Security" not in r.headers  # plain http in development


async def test_errors_are_json_for_the_api_and_pages_for_browsers(web: Web) -> None:
    r = await web.client.get("/api/v1/nowhere")
    assert r.status == 404 and (await r.json()) == {
        "error": {"code": 404, "message": "Not Found"}}
    r = await web.client.get("/nowhere", headers={"Accept": "text/html"})
    assert r.status == 404 and r.content_type == "text/html"
    r = await web.client.get("/api/v1/keys")
    assert r.status == 401 and (await r.json())["error"]["code"] == 401


async def test_bodies_over_the_route_cap_are_refused_before_any_handler(web: Web) -> None:
    me = await sign_in_new_user(web)
    headers = {**web.same_origin, "X-CSRF-Token": me["csrf_token"]}
    r = await web.client.post("/api/v1/keys", data=b"x" * 20_000, headers=headers)
    assert r.status == 413
    r = await web.client.post("/api/v1/keys", data=b"{", headers=headers)
    assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]


async def test_a_cookie_past_half_its_life_is_renewed(web: Web, pool: Any) -> None:
    await sign_in_new_user(web)
    sid = uuid.UUID(jwt.decode(_cookie(web), options={"verify_signature": False})["sid"])
    signer = Sessions(SESSION_SECRET, None, None, None, None)  # type: ignore[arg-type]
    old = signer.cookie_value(sid, time.time() - COOKIE_TTL_S * 0.75)
    _set_cookie(web, old)
    seen_before = await pool.fetchval("SELECT last_seen_at FROM web_sessions WHERE id = $1",
                                      sid)
    r = await web.client.get("/api/v1/credits")
    assert r.status == 200
    fresh = r.cookies[COOKIE].value
    claims = jwt.decode(fresh, options={"verify_signature": False})
    assert claims["sid"] == str(sid) and claims["exp"] > time.time() + COOKIE_TTL_S * 0.9
    assert await pool.fetchval("SELECT last_seen_at FROM web_sessions WHERE id = $1",
                               sid) > seen_before
    r = await web.client.get("/api/v1/credits")  # a young cookie is not renewed again
    assert COOKIE not in r.cookies


async def test_suspending_the_account_closes_its_sessions_to_all_but_its_rights_at_once(
    web: Web, pool: Any, redis: Any
) -> None:
    me = await sign_in_new_user(web)
    assert (await web.client.get("/api/v1/credits")).status == 200  # cached now
    await limits.set_account_status(pool, redis, web.settings.names, me["account_id"],
                                    "suspended")
    status, polls = 200, 0
    while status == 200 and polls < HANG_GUARD_S / 0.02:  # far inside the cache lifetime
        status = (await web.client.get("/api/v1/credits")).status
        polls += 1
        await asyncio.sleep(0.02)
    # Not signed out: the privacy rights stay (tests/control_plane/privacy/test_suspended.py).
    assert status == 403
    assert (await web.client.get("/api/v1/account/privacy")).status == 200


@pytest.mark.parametrize(("header", "summary"), [
    ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
     "Firefox on Linux"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) Version/17.4 Safari/605.1.15", "Safari on macOS"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51", "Edge on Windows"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/124.0.0.0 Mobile Safari/537.36", "Chrome on Android"),
    ("curl/8.5.0", ""), (None, ""),
])
def test_a_session_keeps_only_the_browser_and_system_of_its_user_agent(
    header: str | None, summary: str
) -> None:
    # The sessions list needs to tell browsers apart, nothing more: versions and build
    # details in the raw header can single a person out.
    assert user_agent_summary(header) == summary


async def test_rotating_the_session_secret_signs_nobody_out(web: Web) -> None:
    """QNP_SESSION_SECRET_PREVIOUS: a replica restarted with a new secret and the old one
    as previous keeps the session and its CSRF token, re-issues the cookie under the new
    secret at once, and the old secret alone no longer opens anything."""
    me = await sign_in_new_user(web)
    old_cookie = _cookie(web)
    new_secret = "rotated-session-secret-" + "1" * 16
    rotated = replace(web.settings, web_port=free_port(), session_secret=new_secret,
                      session_secret_previous=SESSION_SECRET)
    async with serve_web(rotated) as replica:
        _set_cookie(replica, old_cookie)
        r = await replica.client.get("/api/v1/session")
        assert r.status == 200 and (await r.json())["data"]["account_id"] == me["account_id"]
        reissued = r.cookies[COOKIE].value
        assert reissued and reissued != old_cookie
        jwt.decode(reissued, hashlib.sha256(b"qnp-session:" + new_secret.encode()).digest(),
                   algorithms=["HS256"])  # signed under the new secret
        # A form rendered before the rotation (its token from the old secret) still posts.
        r = await replica.client.post("/api/v1/keys", json={"name": "after rotation"},
                                      headers={**replica.same_origin,
                                               "X-CSRF-Token": me["csrf_token"]})
        assert r.status == 201, await r.text()
    # Once the previous secret is dropped, a cookie signed under it is refused.
    dropped = replace(rotated, web_port=free_port(), session_secret_previous=None)
    async with serve_web(dropped) as replica:
        _set_cookie(replica, old_cookie)
        assert await _status_and_cleared(replica) == (401, True)
