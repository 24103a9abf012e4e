"""Staff sign in through OIDC like anyone and reach the admin API with their session,
within what their roles allow; changes need the CSRF token and are audited as them."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from control_plane import admin_rbac, staff
from control_plane.admin_api import make_app
from tests.control_plane.web.conftest import Web, sign_in_new_user


async def test_staff_sessions_open_what_their_roles_allow(
    web: Web, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_rbac, "ROLES_CACHE_TTL_S", 0.0)  # role changes seen at once
    customer = await sign_in_new_user(web)
    web.client.session.cookie_jar.clear()
    me = await sign_in_new_user(web)
    cookie = next(c for c in web.client.session.cookie_jar if c.key == "__Host-qnp_session")
    session = {"Cookie": f"__Host-qnp_session={cookie.value}"}
    csrf = {"X-CSRF-Token": me["csrf_token"]}
    account = customer["account_id"]
    usage, credit = f"/admin/accounts/{account}/usage", f"/admin/accounts/{account}/credit"
    body = {"amount_micros": 1_000_000, "reference": "rbac-test"}
    async with TestClient(TestServer(make_app(web.settings))) as admin:
        r = await admin.get(usage, headers=session)
        assert r.status == 404  # not staff yet: the admin API does not show itself

        await staff.grant(pool, me["user"]["email"], "viewer", "test")
        assert (await admin.get(usage, headers=session)).status == 200
        r = await admin.post(credit, json=body, headers={**session, **csrf})
        assert r.status == 403  # a viewer reads only; staff may know the route exists
        assert (await r.json())["error"]["type"] == "forbidden"

        await staff.grant(pool, me["user"]["email"], "billing", "test")
        assert (await admin.post(credit, json=body, headers=session)).status == 403  # no CSRF
        r = await admin.post(credit, json=body, headers={**session, **csrf})
        assert r.status == 201, await r.text()
        r = await admin.post(f"/admin/accounts/{account}/suspend", headers={**session, **csrf})
        assert r.status == 403  # billing does not suspend

        await staff.revoke(pool, me["user"]["email"], "viewer", "test")
        await staff.revoke(pool, me["user"]["email"], "billing", "test")
        assert (await admin.get(usage, headers=session)).status == 404
    rows = await pool.fetch("SELECT actor, action FROM audit_log WHERE account_id = $1::uuid",
                            account)
    staff_id = await pool.fetchval("SELECT id FROM users WHERE email = $1",
                                   me["user"]["email"])
    assert [(r["actor"], r["action"]) for r in rows] == [
        (f"staff:{staff_id}", "POST /admin/accounts/{account_id}/credit")]
