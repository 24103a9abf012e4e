"""Deleting one's account from the web (issue 14): the Settings page's deletion page,
the account API's ``POST``/``DELETE /api/v1/account/deletion``, and keeping the
account by signing in during the grace period.

Deleting needs a signed-in session (never an API key: keys live in scripts) whose
sign-in is fresh (``deletion.FRESH_SIGNIN``; else the page sends the person through
their provider again with ``prompt=login``/``max_age=0``) and the typed confirmation.
Deleting revokes every session, this one too, so the answer clears the cookie.

Cancelling: a deleting account's sessions are refused everywhere (``Sessions.get``
wants an active account), so a person who signs in during the grace gets no session
but a restore cookie (``__Host-qnp_restore``, like the sign-up cookie: a random token,
its Redis record named by a digest of it, ten minutes, read once). It opens only
``GET``/``POST /account/restore`` and ``DELETE /api/v1/account/deletion``; the guard
binds their CSRF token to it. Keeping the account starts a session. Handlers are thin:
the work is ``privacy.deletion``'s. Never imports ``proxy``.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web

from control_plane import users
from control_plane.auth.sessions import COOKIE, COOKIE_TTL_S
from control_plane.errors import Forbidden, InvalidInput, SignInRefused
from control_plane.privacy import deletion
from control_plane.web.account_api import data_response, json_body
from control_plane.web.dashboard import TEMPLATES, render, session_of
from control_plane.web.guard import RESTORE_COOKIE, caller, clear_cookie, set_cookie
from control_plane.web.pages import redirect
from control_plane.web.state import OIDC, SESSIONS, SETTINGS, STORES

RESTORE_TTL_S = 600


def _grace(request: web.Request) -> timedelta:
    return timedelta(days=request.app[SETTINGS].deletion_grace_days)


def _restore_key(request: web.Request, token: str) -> str:
    digest = hashlib.sha256(("restore:" + token).encode()).hexdigest()
    return request.app[SETTINGS].names.account_restore(digest)


async def _page(request: web.Request, status: int = 200, error: str | None = None
                ) -> web.Response:
    session = session_of(request)
    fresh = await deletion.is_fresh(request.app[STORES].pool, session.id, datetime.now(UTC))
    providers = [c.provider for c in request.app[OIDC].values()]
    return render(request, "deletion.html", session, status, fresh=fresh, error=error,
                  providers=providers, confirmation=deletion.CONFIRMATION,
                  grace_days=request.app[SETTINGS].deletion_grace_days,
                  fresh_minutes=int(deletion.FRESH_SIGNIN.total_seconds() // 60))


async def deletion_page(request: web.Request) -> web.Response:
    return await _page(request)


async def _delete(request: web.Request, typed: object) -> deletion.Pending:
    who = caller(request)
    if who.session is None:
        raise Forbidden("an account is deleted from a signed-in session, not with a key")
    stores = request.app[STORES]
    now = datetime.now(UTC)
    if not await deletion.is_fresh(stores.pool, who.session.id, now):
        raise Forbidden("sign in again first (within the last 5 minutes): open "
                        "/settings/deletion")
    deletion.check_confirmation(typed)
    return await deletion.request(stores.pool, stores.redis, stores.settings.names,
                                  who.account_id, now, _grace(request))


def _signed_out(response: web.Response) -> web.Response:
    clear_cookie(response, COOKIE)
    return response


async def delete_form(request: web.Request) -> web.Response:
    session_of(request)
    form = await request.post()
    try:
        done = await _delete(request, form.get("confirm"))
    except Forbidden:
        return redirect("/settings/deletion")  # the page offers the fresh sign-in
    except InvalidInput as e:
        return await _page(request, 400, e.message)
    return _signed_out(_message(request, "Your account is being deleted",
                                f"Every key is revoked and you are signed out. Your data "
                                f"is purged on {done.purge_after:%Y-%m-%d %H:%M} UTC; "
                                "until then, sign in again to keep your account."))


async def delete_api(request: web.Request) -> web.Response:
    done = await _delete(request, (await json_body(request)).get("confirm"))
    return _signed_out(data_response(done.to_json(), 202))


def _message(request: web.Request, title: str, text: str) -> web.Response:
    return aiohttp_jinja2.render_template(
        "restore.html", request, {"nav": (), "path": request.path, "done": text,
                                  "title": title}, app_key=TEMPLATES)


# -- keeping the account, in the grace period ------------------------------------------

async def offer_restore(request: web.Request, member: users.Member
                        ) -> web.Response | None:
    """Called by sign-in for a person whose account is being deleted: no session, but
    the restore page. None when the account is not being deleted."""
    pool = request.app[STORES].pool
    found = await deletion.pending(pool, member.account_id)
    if found is None:
        return None
    if found.kind != "self-service" or found.purge_after <= datetime.now(UTC):
        raise SignInRefused("this account has been deleted",
                            "sign-in to an account being purged")
    token = secrets.token_urlsafe(32)
    record = {"account_id": str(member.account_id), "user_id": str(member.user_id)}
    await request.app[STORES].redis.set(_restore_key(request, token), orjson.dumps(record),
                                        ex=RESTORE_TTL_S)
    response = redirect("/account/restore")
    set_cookie(response, RESTORE_COOKIE, token, RESTORE_TTL_S)
    return response


async def _restoring(request: web.Request, *, take: bool) -> dict[str, Any]:
    token = request.cookies.get(RESTORE_COOKIE)
    redis = request.app[STORES].redis
    raw = None if token is None else await (
        redis.getdel if take else redis.get)(_restore_key(request, token))
    if token is None or raw is None:
        raise Forbidden("sign in again to keep your account")
    record: dict[str, Any] = orjson.loads(raw)
    return record


async def restore_page(request: web.Request) -> web.Response:
    record = await _restoring(request, take=False)
    found = await deletion.pending(request.app[STORES].pool, uuid.UUID(record["account_id"]))
    if found is None:
        raise Forbidden("this account is not being deleted")
    token = request.cookies[RESTORE_COOKIE]
    return aiohttp_jinja2.render_template("restore.html", request, {
        "nav": (), "path": request.path, "done": None,
        "requested_at": f"{found.requested_at:%Y-%m-%d %H:%M}",
        "purge_after": f"{found.purge_after:%Y-%m-%d %H:%M}",
        "csrf_token": request.app[SESSIONS].csrf_token("restore:" + token)},
        app_key=TEMPLATES)


async def _cancel(request: web.Request) -> tuple[uuid.UUID, uuid.UUID]:
    record = await _restoring(request, take=True)
    stores = request.app[STORES]
    account_id, user_id = uuid.UUID(record["account_id"]), uuid.UUID(record["user_id"])
    await deletion.cancel(stores.pool, stores.redis, stores.settings.names, account_id,
                          datetime.now(UTC))
    return account_id, user_id


async def restore(request: web.Request) -> web.Response:
    account_id, user_id = await _cancel(request)
    sessions = request.app[SESSIONS]
    sid = await sessions.create(request.app[STORES].pool, user_id, account_id,
                                request.headers.get("User-Agent"))
    response = redirect("/settings")
    set_cookie(response, COOKIE, sessions.cookie_value(sid), COOKIE_TTL_S)
    clear_cookie(response, RESTORE_COOKIE)
    return response


async def cancel_api(request: web.Request) -> web.Response:
    await _cancel(request)
    response = web.Response(body=orjson.dumps({"data": {"status": "active",
                                                        "keys_revoked": True}}),
                            content_type="application/json")
    clear_cookie(response, RESTORE_COOKIE)
    return response


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/settings/deletion", deletion_page)
    r.add_post("/settings/deletion", delete_form)
    r.add_post("/api/v1/account/deletion", delete_api)
    r.add_delete("/api/v1/account/deletion", cancel_api)
    r.add_get("/account/restore", restore_page)
    r.add_post("/account/restore", restore)
