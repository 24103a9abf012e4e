"""The public web application: its middlewares, routes and resources, composed once.

Middlewares, outermost first: ``edge.heads`` (a head arrived: the head deadline's
bookkeeping), ``errors`` (the one place errors become JSON or pages), ``guard`` (who
is calling, and CSRF: a bad key or cookie is refused before any body is read),
``edge.bodies`` (the body, within its route's cap and deadline). ``security`` adds
the headers and CSP to every response. Resources with a lifetime (the HTTP client for
OIDC providers, the revocation listener) live in ``cleanup_ctx``. Never imports
``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from control_plane.auth import oidc
from control_plane.auth.apikey import KeyAuth
from control_plane.auth.sessions import ALL, Sessions
from control_plane.billing import routes as billing_routes
from control_plane.privacy import export_api
from control_plane.runtime import Stores
from control_plane.settings import Settings
from control_plane.web import (
    account_api,
    billing_history,
    billing_settings,
    consent_page,
    dashboard,
    deletion_page,
    monitoring,
    policy_page,
    privacy_page,
    security,
    settings_page,
    signin,
    usage_page,
)
from control_plane.web.edge import HEADS, MAX_BODY_BYTES, HeadDeadline, bodies, heads
from control_plane.web.errors import errors
from control_plane.web.guard import guard
from control_plane.web.pages import PAGES, Pages, redirect
from control_plane.web.state import (
    CALLER,
    KEY_DOC_LOADS,
    KEY_DOCS,
    KEYS,
    OIDC,
    SESSIONS,
    SETTINGS,
    STORES,
)

log = logging.getLogger(__name__)

HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def home(request: web.Request) -> web.Response:
    # The dashboard comes with issue 12; until then, say where the account API is.
    if CALLER not in request or request[CALLER].session is None:
        return redirect("/signin")
    return request.app[PAGES].message(
        "You are signed in", "Your account API is at /api/v1 (keys, credits, activity).", 200)


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(trust_env=False) as client:
        app[HTTP_CLIENT] = client
        app[OIDC] = oidc.clients(app[SETTINGS].oidc_providers, client)
        yield


async def _revocations(app: web.Application) -> AsyncIterator[None]:
    stop = asyncio.Event()
    names = app[SETTINGS].names
    sessions, key_auth = app[SESSIONS], app[KEYS]

    def on_session(message: bytes | str) -> None:
        sessions.forget(message)
        if message in (ALL, ALL.encode()):  # an account's state changed: keys re-read too
            key_auth.forget(message)

    task = asyncio.create_task(
        sessions.listen(stop, {names.session_revocations: on_session,
                               names.key_changes: key_auth.forget}),
        name="web revocations")
    yield
    # A listener has nothing to finish: cancelled at once rather than waiting up to its
    # poll interval (a second) for the stop to be noticed. Cancelled in the middle of a
    # reconnect (Redis down), the client may raise on its closed transport instead:
    # whatever it raises, there is nothing left to listen for.
    stop.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as e:  # noqa: BLE001 - a torn-down listener's last error
        log.debug("revocation listener ended with %s at shutdown", type(e).__name__)


def make_web_app(settings: Settings, stores: Stores) -> web.Application:
    app = web.Application(middlewares=[heads, errors, guard, bodies],
                          client_max_size=MAX_BODY_BYTES)
    app[SETTINGS], app[STORES] = settings, stores
    app[PAGES] = Pages(settings.monitoring.browser_dsn or "")
    app[SESSIONS] = Sessions(settings.require_session_secret(), stores.pool, stores.redis,
                             settings.names, stores.outages,
                             previous=settings.session_secret_previous)
    app[KEYS] = KeyAuth(stores.pool)
    app[HEADS] = HeadDeadline()
    app[KEY_DOCS] = {}
    app[KEY_DOC_LOADS] = {}
    security.install(app, settings.public_is_https,
                     connect=settings.monitoring.browser_origin)  # Sentry in pages (H16)
    monitoring.install(app, settings)  # Sentry scopes, restriction (H16)
    app.cleanup_ctx.append(_http_client)
    app.cleanup_ctx.append(_revocations)
    app.router.add_get("/healthz", healthz)
    dashboard.add_routes(app)  # "/" is the dashboard's Overview (issue 12)
    usage_page.add_routes(app)
    settings_page.add_routes(app)
    signin.add_routes(app)
    account_api.add_routes(app)
    export_api.add_routes(app)  # issue 14: the account's data export
    privacy_page.add_routes(app)  # issue 14: Settings > Privacy and its account API
    billing_routes.add_routes(app)  # Stripe top-ups and webhooks (H13)
    billing_settings.add_routes(app)  # auto top-up, low-balance e-mail (H22)
    policy_page.add_routes(app)  # the privacy policy, its changes, sharing, summary (H19)
    deletion_page.add_routes(app)  # issue 14: deleting the account (H17)
    consent_page.add_routes(app)  # issue 15: cookie banner, GPC, theme, unsubscribe
    billing_history.add_routes(app)  # the payments' CSV and JSON (h20)
    return app
