"""The Settings page (issue 12): profile, connected sign-in providers, the active
sessions with "sign out everywhere", and signing out of this browser. Profile and
providers come from ``users.profile``; the session list is this module's one query.
The privacy section comes with the privacy work. Never imports ``proxy``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from control_plane import users
from control_plane.auth.sessions import COOKIE
from control_plane.web.dashboard import render, session_of
from control_plane.web.guard import clear_cookie
from control_plane.web.state import OIDC, SESSIONS, STORES


async def settings(request: web.Request) -> web.Response:
    session = session_of(request)
    pool = request.app[STORES].pool
    profile = await users.profile(pool, session.user_id)
    active = await pool.fetch(
        "SELECT id, created_at, last_seen_at, user_agent FROM web_sessions "
        "WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 "
        "ORDER BY last_seen_at DESC", session.user_id, datetime.now(UTC))
    labels = {name: client.provider.label for name, client in request.app[OIDC].items()}
    names = profile["providers"]
    assert isinstance(names, list)
    return render(request, "settings.html", session, profile=profile, sessions=active,
                  this_session=session.id, providers=[labels.get(p, p) for p in names])


def _signed_out() -> web.Response:
    response = web.Response(status=303, headers={"Location": "/signin"})
    clear_cookie(response, COOKIE)
    return response


async def signout(request: web.Request) -> web.Response:
    session = session_of(request)
    await request.app[SESSIONS].revoke(session.id)
    return _signed_out()


async def signout_everywhere(request: web.Request) -> web.Response:
    session = session_of(request)
    await request.app[SESSIONS].revoke_all(session.user_id)
    return _signed_out()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/settings", settings)
    app.router.add_post("/settings/signout", signout)
    app.router.add_post("/settings/signout-everywhere", signout_everywhere)
