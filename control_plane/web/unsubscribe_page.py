"""One-click unsubscribe from marketing e-mail (RFC 8058), without signing in.

``GET /unsubscribe/<token>`` shows a confirmation page (a link opened by a person, or
fetched by a mail scanner, changes nothing); ``POST`` records the withdrawal of
``marketing_email`` with source ``unsubscribe``, once: a second POST changes nothing and
says so. The POST is CSRF-exempt by design (``guard.CSRF_EXEMPT``): mail clients send
it with no cookie from no page of ours, and all it can do is withdraw the consent of
the one account the token's HMAC names. A token that is not genuine, or whose account
is gone, is a 404. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid

import asyncpg
from aiohttp import web

from control_plane.consent import choices, records
from control_plane.consent.unsubscribe import PURPOSE, account_of
from control_plane.errors import NotFound
from control_plane.web.pages import PAGES
from control_plane.web.state import SETTINGS, STORES


async def _account(request: web.Request) -> uuid.UUID:
    settings = request.app[SETTINGS]
    secrets = [settings.require_session_secret(), *filter(None, [
        settings.session_secret_previous])]
    found = account_of(secrets, request.match_info["token"])
    if found is None or not await request.app[STORES].pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)", found):
        raise NotFound("this unsubscribe link is not valid")
    return found


async def _subscribed(pool: asyncpg.Pool, account_id: uuid.UUID) -> bool:
    loaded = await choices.load(pool, account_id=account_id)
    return PURPOSE in loaded.state.granted


async def confirm_page(request: web.Request) -> web.Response:
    account_id = await _account(request)
    subscribed = await _subscribed(request.app[STORES].pool, account_id)
    return request.app[PAGES].render("unsubscribe.html", request=request, done=False,
                                     subscribed=subscribed)


async def unsubscribe(request: web.Request) -> web.Response:
    account_id = await _account(request)
    pool = request.app[STORES].pool
    async with pool.acquire() as conn, conn.transaction():
        # Serialised per account, so two clicks at once record one withdrawal.
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        loaded = await choices.load(conn, account_id=account_id)
        changed = PURPOSE in loaded.state.granted
        if changed:
            await records.record(
                conn, purpose=PURPOSE, granted=False, source="unsubscribe",
                policy_version=request.app[SETTINGS].policy_version,
                account_id=account_id)
    return request.app[PAGES].render("unsubscribe.html", request=request, done=True,
                                     subscribed=False, changed=changed)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/unsubscribe/{token}", confirm_page)
    app.router.add_post("/unsubscribe/{token}", unsubscribe)
