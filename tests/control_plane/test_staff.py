"""Staff roles granted from the CLI to people who signed in, and the audit log: every
staff change and every admin action that changed something is a row (who, what,
target, when), exported by ``audit-log``."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from control_plane import users
from control_plane.admin_api import make_app
from control_plane.auth.oidc import Identity
from control_plane.settings import Settings
from tests.control_plane.factories import ADMIN_TOKEN
from tests.control_plane.test_cli import _cli, _env, _json


async def _person(pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings) -> str:
    email = f"staff-{secrets.token_hex(4)}@example.test"
    async with pool.acquire() as conn, conn.transaction():
        await users.sign_up(conn, redis, settings.names,
                            Identity("dev", email, email, True, "Staff"), "2026-04")
    return email


async def test_staff_roles_are_granted_listed_revoked_and_audited(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    env = _env(settings)
    email = await _person(pool, rclient, settings)
    assert (await _json(env, "grant-staff", email, "support"))["granted"] is True
    assert (await _json(env, "grant-staff", email, "support"))["granted"] is False
    listed = (await _json(env, "list-staff"))["staff"]
    assert {"email": email, "roles": ["support"]} in [
        {k: s[k] for k in ("email", "roles")} for s in listed]
    assert (await _json(env, "revoke-staff", email, "support"))["revoked"] is True
    code, _, err = await _cli(env, "grant-staff", "nobody@example.test", "owner")
    assert code == 1 and "no user" in err
    code, _, err = await _cli(env, "grant-staff", email, "god")
    assert code == 2

    user_id = await pool.fetchval("SELECT id FROM users WHERE email = $1", email)
    rows = [r for r in (await _json(env, "audit-log"))["audit"]
            if r["target"] == f"user:{user_id}"]
    assert [(r["actor"], r["action"], r["detail"]["role"]) for r in rows] == [
        ("cli", "staff.grant", "support"), ("cli", "staff.revoke", "support")]
    assert all(email not in str(r) for r in rows)


async def test_every_changing_admin_action_writes_an_audit_row(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with TestClient(TestServer(make_app(settings))) as client:
        r = await client.post("/admin/accounts", json={"name": "audited"}, headers=auth)
        account = (await r.json())["id"]
        await client.post(f"/admin/accounts/{account}/suspend", headers=auth)
        await client.get(f"/admin/accounts/{account}/usage", headers=auth)  # reads: no row
        await client.post("/admin/accounts/not-a-uuid/suspend", headers=auth)  # refused
    rows: list[Any] = await pool.fetch(
        "SELECT actor, action, target FROM audit_log WHERE account_id = $1 ORDER BY id",
        uuid.UUID(account))
    assert [(r["actor"], r["action"]) for r in rows] == [
        ("admin-bearer", "POST /admin/accounts/{account_id}/suspend")]
    created = await pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'POST /admin/accounts' "
        "AND at > now() - interval '1 minute'")
    assert created >= 1
