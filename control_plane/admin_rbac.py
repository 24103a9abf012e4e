"""Who may call which admin route.

The bearer token (QNP_ADMIN_TOKEN) is for automation and opens every route. Staff
sign in through the public web service like anyone else; their session cookie (the
same ``__Host-qnp_session``, signed with the same QNP_SESSION_SECRET) opens the routes
``ROUTE_ROLES`` allows their roles (granted by ``python -m control_plane
grant-staff``); ``owner`` opens all. A changing request by a staff session must also
carry the session's CSRF token in ``X-CSRF-Token`` (a custom header a cross-site page
cannot send).

Who learns that the admin API exists: a caller presenting a session (or an API key:
see ``admin_api``) that is not staff gets the router's own 404, as if no route were
there, so a customer's credentials cannot even map the admin API. Staff holding the
wrong role get 403: they know the admin API exists, and "your role does not allow
this" tells them whom to ask. No credential at all stays 401 for automation.
Never imports ``proxy`` or ``control_plane.web``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from control_plane.auth.sessions import COOKIE, Sessions
from control_plane.errors import Forbidden, Unauthorized

READ = frozenset({"viewer", "support", "billing", "privacy", "owner"})
SUPPORT = frozenset({"support", "owner"})
BILLING = frozenset({"billing", "owner"})
OWNER = frozenset({"owner"})
PRIVACY = frozenset({"privacy", "owner"})

# (method, route template) -> the staff roles that may call it.
ROUTE_ROLES: Mapping[tuple[str, str], frozenset[str]] = {
    ("POST", "/admin/accounts"): SUPPORT,
    ("POST", "/admin/accounts/{account_id}/keys"): SUPPORT,
    ("GET", "/admin/accounts/{account_id}/keys"): READ,
    ("POST", "/admin/keys/{key_id}/revoke"): SUPPORT,
    ("PUT", "/admin/keys/{key_id}/limits"): SUPPORT,
    ("POST", "/admin/accounts/{account_id}/credit"): BILLING,
    ("GET", "/admin/accounts/{account_id}/balance"): READ,
    ("PUT", "/admin/accounts/{account_id}/limits"): SUPPORT,
    ("POST", "/admin/accounts/{account_id}/suspend"): SUPPORT,
    ("POST", "/admin/accounts/{account_id}/resume"): SUPPORT,
    ("GET", "/admin/accounts/{account_id}/usage"): READ,
    # The privacy queue (issue 14): requests hold people's own words; privacy staff only.
    ("GET", "/admin/privacy/requests"): PRIVACY,
    ("POST", "/admin/privacy/requests/{request_id}/extend"): PRIVACY,
    ("POST", "/admin/privacy/requests/{request_id}/answer"): PRIVACY,
    ("GET", "/admin/billing/reconciliation"): BILLING,
    ("POST", "/admin/accounts/{account_id}/child"): PRIVACY,  # clause 11 (H17)
}
ROLES_CACHE_TTL_S = 5.0
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "X-CSRF-Token"


class NotStaff(Exception):
    """The session is missing, tampered with, expired, revoked or holds no staff role;
    the admin API answers it as an unknown route (404)."""


@dataclass(frozen=True, slots=True)
class Staff:
    user_id: uuid.UUID
    roles: frozenset[str]

    @property
    def actor(self) -> str:
        return f"staff:{self.user_id}"


class StaffAccess:
    """Resolves a staff session to its roles, cached briefly (a revoked role stops
    working within ``ROLES_CACHE_TTL_S``; a revoked session at once on this replica)."""

    def __init__(self, sessions: Sessions, pool: asyncpg.Pool) -> None:
        self._sessions, self._pool = sessions, pool
        self._roles: dict[uuid.UUID, tuple[float, frozenset[str]]] = {}

    async def staff(self, cookies: Mapping[str, str], method: str, template: str | None,
                    csrf: str | None) -> Staff:
        raw = cookies.get(COOKIE)
        if raw is None:
            raise NotStaff
        try:
            claims = self._sessions.read_cookie(raw)
        except Unauthorized:
            raise NotStaff from None
        session = await self._sessions.get(claims.sid)
        if session is None:
            raise NotStaff
        roles = await self._roles_of(session.user_id)
        if not roles:
            raise NotStaff
        allowed = ROUTE_ROLES.get((method, template or ""), OWNER)
        if not roles & allowed:
            raise Forbidden("your staff roles do not allow this")
        if method in UNSAFE_METHODS and not self._sessions.csrf_ok(str(session.id), csrf):
            raise Forbidden("a staff change needs the session's X-CSRF-Token")
        return Staff(session.user_id, roles)

    async def _roles_of(self, user_id: uuid.UUID) -> frozenset[str]:
        now = time.monotonic()
        hit = self._roles.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        rows = await self._pool.fetch("SELECT role FROM staff_roles WHERE user_id = $1",
                                      user_id)
        roles = frozenset(r["role"] for r in rows)
        self._roles[user_id] = (now + ROLES_CACHE_TTL_S, roles)
        return roles
