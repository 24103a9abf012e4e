"""Staff roles (``viewer``, ``support``, ``billing``, ``privacy``, ``owner``), granted
and revoked from the CLI to users who have signed in through OIDC like anyone else.
Each change is an audit row. Logs user ids, never emails. Never imports ``proxy``."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from control_plane import audit
from control_plane.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)

ROLES = ("viewer", "support", "billing", "privacy", "owner")


async def _user_id(conn: asyncpg.Connection, email: str) -> Any:
    user_id = await conn.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)",
                                  email)
    if user_id is None:
        raise NotFound("no user with that email has signed in")
    return user_id


def _role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    return role


async def grant(pool: asyncpg.Pool, email: str, role: str, actor: str) -> bool:
    """True if granted now, False if the user already held the role."""
    async with pool.acquire() as conn, conn.transaction():
        user_id = await _user_id(conn, email)
        done = await conn.fetchval(
            "INSERT INTO staff_roles (user_id, role, granted_by) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING true", user_id, _role(role), actor)
        if done:
            await audit.record(conn, actor, "staff.grant", f"user:{user_id}",
                               detail={"role": role})
    log.info("staff role %s user_id=%s role=%s", "granted" if done else "already held",
             user_id, role)
    return bool(done)


async def revoke(pool: asyncpg.Pool, email: str, role: str, actor: str) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        user_id = await _user_id(conn, email)
        done = await conn.fetchval(
            "DELETE FROM staff_roles WHERE user_id = $1 AND role = $2 RETURNING true",
            user_id, _role(role))
        if done:
            await audit.record(conn, actor, "staff.revoke", f"user:{user_id}",
                               detail={"role": role})
    log.info("staff role revoked user_id=%s role=%s", user_id, role)
    return bool(done)


async def list_staff(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT u.id, u.email, array_agg(s.role ORDER BY s.role) AS roles "
        "FROM staff_roles s JOIN users u ON u.id = s.user_id GROUP BY u.id, u.email "
        "ORDER BY u.email")
    return [{"user_id": str(r["id"]), "email": r["email"], "roles": list(r["roles"])}
            for r in rows]
