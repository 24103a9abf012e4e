"""Cross-account access (issue 11): every admin route and every account API route that
names an object, enumerated from the apps' routers so a new route cannot be forgotten,
called with a second account's session and keys. The admin API answers them with the
same 404 it gives a path that does not exist (it is not even confirmed to exist); the
account API answers another account's object exactly as it answers an object that does
not exist, 404 for a session or a management key."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from control_plane.admin_api import make_app
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from shared.apikeys import generate
from shared.events import STREAM_FIELD
from tests.control_plane.factories import ADMIN_TOKEN, make_event
from tests.control_plane.web.conftest import Web, sign_in_new_user

COOKIE = "__Host-qnp_session"
# Account API routes that act on the caller's own account only: there is nothing of
# another account to name in them. Every other /api/v1 route must name an object and
# is called below with another account's; a new route has to be put in one or the other.
OWN_ACCOUNT_ROUTES = frozenset({
    ("GET", "/api/v1/key"), ("GET", "/api/v1/auth/key"), ("GET", "/api/v1/credits"),
    ("GET", "/api/v1/keys"), ("POST", "/api/v1/keys"), ("GET", "/api/v1/activity"),
    ("GET", "/api/v1/session"), ("GET", "/api/v1/account/export"),
    # Top-ups (H13) name no object: they start a payment for the caller's own account.
    ("POST", "/api/v1/credits/topup"), ("GET", "/api/v1/credits/topup/quote"),
    ("POST", "/api/v1/credits/topup/complete"),  # another account's intent: 404
    # Privacy rights (issue 14) act on the caller's own account; another user's e-mail
    # confirmation token is 404 (tests/control_plane/privacy/test_email_change.py).
    *((m, "/api/v1/account/privacy" + p) for m, p in (
        ("GET", ""), ("PUT", "/jurisdiction"), ("POST", "/name"), ("POST", "/email"),
        ("POST", "/email/confirm"), ("POST", "/correction"), ("PUT", "/restriction"),
        ("POST", "/objection"), ("POST", "/human-review"))),
    # Auto top-up settings (H22): the caller's own; another account's SetupIntent: 404.
    ("GET", "/api/v1/credits/auto-topup"), ("PUT", "/api/v1/credits/auto-topup"),
    ("POST", "/api/v1/credits/auto-topup/card"),
    ("POST", "/api/v1/credits/auto-topup/card/complete"),
    # Deletion (H17) names no object: the caller's own account, or (cancel) the one its
    # restore cookie names; tests/control_plane/privacy/test_deletion.py.
    ("POST", "/api/v1/account/deletion"), ("DELETE", "/api/v1/account/deletion"),
    # Consent (issue 15): the caller's own choices (tests/control_plane/consent).
    ("GET", "/api/v1/account/consents"), ("PUT", "/api/v1/account/consents"),
    # The caller's own payments (h20); the cross-account test in
    # tests/control_plane/billing/test_history.py shows another's are never listed.
    ("GET", "/api/v1/credits/history"),
})


async def _signed_in(web: Web) -> tuple[dict[str, Any], dict[str, str]]:
    me = await sign_in_new_user(web)
    cookie = next(c for c in web.client.session.cookie_jar if c.key == COOKIE)
    return me, {"Cookie": f"{COOKIE}={cookie.value}", **web.same_origin,
                "X-CSRF-Token": me["csrf_token"]}


async def _key(web: Web, session: dict[str, str], **body: Any) -> tuple[str, str]:
    r = await web.client.post("/api/v1/keys", json=body, headers=session)
    assert r.status == 201, await r.text()
    created = await r.json()
    return created["key"], created["data"]["hash"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _routes(app: Any, prefix: str) -> list[tuple[str, str]]:
    return sorted({(r.method, r.resource.canonical) for r in app.router.routes()
                   if r.resource is not None and r.resource.canonical.startswith(prefix)})


async def test_no_admin_route_is_confirmed_to_a_customers_session_or_key(
    web: Web
) -> None:
    victim, victim_session = await _signed_in(web)
    _, victim_key = await _key(web, victim_session, name="victim")
    web.client.session.cookie_jar.clear()
    _, session = await _signed_in(web)
    inference, _ = await _key(web, session, name="llm")
    management, _ = await _key(web, session, name="ops", management=True)
    forged_key, _ = generate()  # well formed, never issued
    callers = {
        "session": {k: session[k] for k in ("Cookie", "X-CSRF-Token")},
        "tampered session": {"Cookie": session["Cookie"] + "x"},
        "inference key": _bearer(inference),
        "management key": _bearer(management),
        "unknown key": _bearer(forged_key),
    }
    async with TestClient(TestServer(make_app(web.settings))) as admin:
        routes = _routes(admin.app, "/admin")
        assert len(routes) >= 11 and ("HEAD", "/admin/accounts/{account_id}/usage") in routes
        nowhere = await admin.get(f"/admin/no-such-route-{secrets.token_hex(4)}",
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert nowhere.status == 404
        not_found = await nowhere.read()
        for method, template in routes:
            path = template.replace("{account_id}", victim["account_id"]) \
                .replace("{key_id}", victim_key)
            for who, headers in callers.items():
                r = await admin.request(method, path, headers=headers, json={})
                body = await r.read()
                assert r.status == 404, (who, method, path, body)
                if method != "HEAD":
                    assert body == not_found, (who, method, path, body)
            r = await admin.request(method, path, json={})  # no credential: automation
            assert r.status == 401, (method, path)
        usage = f"/admin/accounts/{victim['account_id']}/usage"
        r = await admin.get(usage, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status == 200  # the routes above exist: the 404s hid them
        r = await admin.get(usage, headers={"Authorization": "Bearer not-the-token"})
        assert r.status == 401  # automation with a wrong token is told so


async def test_another_accounts_objects_look_like_no_object(
    web: Web, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    owner, owner_session = await _signed_in(web)
    _, theirs = await _key(web, owner_session, name="theirs")
    event = make_event(owner["account_id"], key_id=theirs)
    await redis.xadd(web.settings.names.events, {STREAM_FIELD: event.encode()})
    consumer = Consumer(web.settings, pool, redis, Metrics())
    for _ in range(20):
        if (await consumer.run_once()).inserted:
            break
    assert await pool.fetchval("SELECT count(*) FROM usage_logs WHERE id = $1::uuid",
                               event.id) == 1
    web.client.session.cookie_jar.clear()
    _, session = await _signed_in(web)
    inference, _ = await _key(web, session, name="llm")
    management, _ = await _key(web, session, name="ops", management=True)
    assert web.client.app is not None
    routes = [r for r in _routes(web.client.app, "/api/v1")
              if r[0] != "HEAD" and r not in OWN_ACCOUNT_ROUTES]
    assert ("GET", "/api/v1/generation") in routes and len(routes) >= 4, routes

    def paths(method: str, template: str) -> tuple[str, str]:
        """(the other account's object, an object that does not exist)"""
        if template == "/api/v1/generation":
            never = make_event(owner["account_id"]).id
            return f"{template}?id={event.id}", f"{template}?id={never}"
        assert "{hash}" in template, f"classify {method} {template} in OWN_ACCOUNT_ROUTES"
        return (template.replace("{hash}", theirs),
                template.replace("{hash}", generate()[1].key_id))

    callers = {"session": session, "management key": _bearer(management),
               "inference key": _bearer(inference)}
    for method, template in routes:
        real, missing = paths(method, template)
        for who, headers in callers.items():
            body = {"name": "stolen", "disabled": True} if method == "PATCH" else None
            r = await web.client.request(method, real, json=body, headers=headers)
            got = await r.json()
            r2 = await web.client.request(method, missing, json=body, headers=headers)
            assert (r.status, got) == (r2.status, await r2.json()), (who, method, real)
            if who != "inference key":  # it may not manage keys at all: 403 for any hash
                assert r.status == 404, (who, method, real, got)
            assert theirs not in str(got) and event.id not in str(got)
    row = await pool.fetchrow("SELECT name, disabled, status FROM api_keys WHERE key_id = $1",
                              theirs)
    assert tuple(row) == ("theirs", False, "active")
