"""Error monitoring in the web service: every request reports through a Sentry scope of
its own, and a restricted account's requests are marked so that none of their errors is
sent (issue 14: a restriction excludes error monitoring; ``shared.monitoring`` drops
events carrying ``RESTRICTED_TAG``). Installed only when ``SENTRY_DSN`` is set: without
it the app has neither middleware and makes no extra query. Never imports ``proxy``.
"""

from __future__ import annotations

import sentry_sdk
from aiohttp import web

from control_plane import accounts
from control_plane.outages import POSTGRES_ERRORS
from control_plane.settings import Settings
from control_plane.web.errors import Handler
from control_plane.web.guard import guard
from control_plane.web.state import CALLER, STORES
from shared.monitoring import RESTRICTED_TAG


@web.middleware
async def request_scope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: tags set while this request runs (by ``restriction``) are its own,
    and still in force when the ``errors`` middleware logs its failure."""
    with sentry_sdk.isolation_scope():
        return await handler(request)


@web.middleware
async def restriction(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After ``guard``: mark the request's scope if its account is restricted. If the
    restriction cannot be read, the request counts as restricted (fail closed)."""
    if CALLER in request:
        try:
            restricted = await accounts.is_restricted(request.app[STORES].pool,
                                                      request[CALLER].account_id)
        except POSTGRES_ERRORS:
            restricted = True
        if restricted:
            sentry_sdk.get_isolation_scope().set_tag(RESTRICTED_TAG, "1")
    return await handler(request)


def install(app: web.Application, settings: Settings) -> None:
    """Add both middlewares (``request_scope`` first, ``restriction`` right after
    ``guard``) when the service reports to Sentry."""
    if not settings.monitoring.sentry_dsn:
        return
    app.middlewares.insert(0, request_scope)
    app.middlewares.insert(app.middlewares.index(guard) + 1, restriction)
