"""The admin HTTP API (aiohttp): accounts, keys, credit, limits, usage, health, metrics.

Every ``/admin/`` route needs ``Authorization: Bearer <QNP_ADMIN_TOKEN>`` or a staff
session whose roles allow it (``admin_rbac``); every changing action is audited. Who
gets what, before any route is confirmed: no credential, or a bearer token that is
neither the admin token nor shaped like an API key, 401 (automation with a typo);
an API key (``qnp_...``, whatever its kind or validity) or a session that is not
staff, the router's own 404 for an unknown path, byte for byte; staff whose roles do
not allow the route, 403.
``error_response`` is the one place errors become responses: JSON
``{"error": {"message", "type"}}``, never a traceback. Resources with a lifetime (pool,
Redis client) are the process's ``runtime.Stores``, handed in by ``service``; the
background tasks belong to the roles (``roles``), not to this app.
Never imports ``proxy``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from control_plane import accounts, audit, keys, ledger, limits, usage
from control_plane.accounts import parse_account_id
from control_plane.admin_rbac import CSRF_HEADER, NotStaff, StaffAccess
from control_plane.auth.sessions import COOKIE, Sessions
from control_plane.billing import reconcile
from control_plane.billing.gateway import StripeGateway
from control_plane.errors import (
    ControlPlaneError,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
    classify,
)
from control_plane.metrics import Metrics
from control_plane.outages import POSTGRES_ERRORS
from control_plane.privacy import deletion, suspension
from control_plane.privacy import queue as privacy_queue
from control_plane.privacy import requests as privacy_requests
from control_plane.runtime import Stores, open_stores
from control_plane.settings import Settings
from shared.apikeys import PREFIX as API_KEY_PREFIX

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
STRIPE = web.AppKey("stripe", StripeGateway)

MAX_BODY_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(exc: BaseException) -> web.Response:
    """Map any exception raised while handling a request to a JSON error response."""
    if isinstance(exc, web.HTTPException):  # routing: unknown path, wrong method
        kind = "not_found" if exc.status == 404 else "invalid_request"
        return json_response({"error": {"message": exc.reason, "type": kind}}, exc.status)
    error = classify(exc)
    if error is None:
        log.error("admin request failed", exc_info=exc)
        error = ControlPlaneError("internal error")
    elif error.status >= 500:
        log.error("admin request failed: %s (%s)", error.message, type(exc).__name__)
    else:
        log.debug("admin request refused: %s", error.message)
    return json_response({"error": {"message": error.message, "type": error.type}}, error.status)


def _bearer_ok(request: web.Request) -> bool:
    token = request.app[SETTINGS].require_admin_token()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode())


async def _authorize(request: web.Request) -> str:
    """The actor of an admin request: the bearer token, or a staff session (RBAC)."""
    if _bearer_ok(request):
        return AUTOMATION_ACTOR
    header = request.headers.get("Authorization")
    if header is not None:
        if header.partition(" ")[2].strip().startswith(API_KEY_PREFIX):
            raise web.HTTPNotFound  # a customer's key: no admin route exists for it
        raise Unauthorized("a valid admin bearer token is required")
    if COOKIE not in request.cookies:
        raise Unauthorized("a valid admin bearer token or a staff session is required")
    if STAFF not in request.app:  # no session secret here: no session can be staff
        raise web.HTTPNotFound
    resource = request.match_info.route.resource
    try:
        staff = await request.app[STAFF].staff(
            request.cookies, request.method, resource.canonical if resource else None,
            request.headers.get(CSRF_HEADER))
    except NotStaff:
        raise web.HTTPNotFound from None
    return staff.actor


_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUTOMATION_ACTOR = suspension.AUTOMATION_ACTOR  # the bearer token: automation
STAFF = web.AppKey("staff", StaffAccess)
ACTOR = web.RequestKey("actor", str)  # who is calling, for handlers that audit themselves
# What a handler adds to its action's audit row (the reason of a suspension).
AUDIT_DETAIL = web.RequestKey("audit_detail", dict[str, Any])


async def _audit(request: web.Request, response: web.StreamResponse, actor: str) -> None:
    """Every admin action that changed something: who, what, which target."""
    if request.method not in _UNSAFE or response.status >= 400:
        return
    resource = request.match_info.route.resource
    info = request.match_info
    target = ",".join(f"{k}:{v}" for k, v in sorted(info.items())) or request.path
    account = info.get("account_id")
    try:
        account_id = None if account is None else parse_account_id(account)
    except NotFound:
        account_id = None
    action = f"{request.method} {resource.canonical if resource else request.path}"
    await audit.record(request.app[POOL], actor, action, target, account_id,
                       request.get(AUDIT_DETAIL))


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        actor = None
        if request.path == "/admin" or request.path.startswith("/admin/"):
            actor = await _authorize(request)
            request[ACTOR] = actor
        response = await handler(request)
        if actor is not None:
            await _audit(request, response, actor)
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e)
    except Exception as e:  # top of the request: every failure leaves as JSON
        return error_response(e)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


async def create_account(request: web.Request) -> web.Response:
    body = await _json_body(request)
    app = request.app
    account = await accounts.create_account(
        app[POOL], app[REDIS], app[SETTINGS].names, body.get("name")
    )
    return json_response(account.to_json(), 201)


async def credit(request: web.Request) -> web.Response:
    body = await _json_body(request)
    app = request.app
    done = await ledger.credit(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"],
        body.get("kind", "topup"), body.get("amount_micros"), body.get("reference"),
    )
    return json_response(done.to_json(), 201 if done.created else 200)


async def balance(request: web.Request) -> web.Response:
    app = request.app
    found = await ledger.get_balance(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"]
    )
    return json_response(found.to_json())


async def account_limits(request: web.Request) -> web.Response:
    body = await _json_body(request)
    app = request.app
    account = await limits.set_account_limits(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"], body
    )
    return json_response(account.to_json())


async def key_limits(request: web.Request) -> web.Response:
    body = await _json_body(request)
    app = request.app
    info = await limits.set_key_limits(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["key_id"], body
    )
    return json_response(info.to_json())


def _set_status(status: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        app = request.app
        # A suspension's reason is shown to the account's people (privacy.suspension).
        reason = suspension.clean_reason((await _json_body(request)).get("reason")) \
            if status == "suspended" else None
        if reason is not None:
            request[AUDIT_DETAIL] = {"reason": reason}
        account = await limits.set_account_status(
            app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"],
            status,
        )
        return json_response(account.to_json())

    return handler


async def mark_child(request: web.Request) -> web.Response:
    """Policy clause 11: the account is a child's; deleted on the next maintenance pass,
    without a grace period (``privacy.deletion.mark_child``)."""
    app = request.app
    account_id = parse_account_id(request.match_info["account_id"])
    done = await deletion.mark_child(app[POOL], app[REDIS], app[SETTINGS].names, account_id,
                                     request[ACTOR], datetime.now(UTC))
    return json_response(done.to_json(), 202)


async def issue_key(request: web.Request) -> web.Response:
    body = await _json_body(request)
    app = request.app
    issued = await keys.issue_key(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"],
        body.get("name"), bcrypt_rounds=app[SETTINGS].bcrypt_rounds,
    )
    return json_response(issued.to_json(), 201)


async def list_keys(request: web.Request) -> web.Response:
    found = await keys.list_keys(request.app[POOL], request.match_info["account_id"])
    return json_response({"keys": [k.to_json() for k in found]})


async def revoke_key(request: web.Request) -> web.Response:
    app = request.app
    info = await keys.revoke_key(
        app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["key_id"]
    )
    return json_response(info.to_json())


async def account_usage(request: web.Request) -> web.Response:
    q = request.query
    report = await usage.account_usage(
        request.app[POOL], request.match_info["account_id"],
        limit=usage.parse_limit(q.get("limit")),
        since=usage.parse_time(q.get("since"), "since"),
        until=usage.parse_time(q.get("until"), "until"),
    )
    return json_response(report.to_json())


async def privacy_open(request: web.Request) -> web.Response:
    found = await privacy_queue.open_requests(request.app[POOL], datetime.now(UTC))
    request.app[METRICS].privacy_overdue.set(sum(1 for q in found if q["overdue"]))
    return json_response({"requests": found})


async def _privacy_overdue(app: web.Application, now: datetime) -> None:
    # At once, not at the next maintenance pass: an answered request leaves the gauge.
    app[METRICS].privacy_overdue.set(await privacy_requests.overdue(app[POOL], now))


async def privacy_extend(request: web.Request) -> web.Response:
    body, now = await _json_body(request), datetime.now(UTC)
    rid = privacy_queue.request_id(request.match_info["request_id"])
    until = await privacy_queue.extend(request.app[POOL], rid, now, body.get("reason"))
    await _privacy_overdue(request.app, now)
    return json_response({"id": rid, "extended_until": until.isoformat()})


async def privacy_answer(request: web.Request) -> web.Response:
    body, now = await _json_body(request), datetime.now(UTC)
    rid = privacy_queue.request_id(request.match_info["request_id"])
    await privacy_queue.answer(request.app[POOL], rid, now, body.get("outcome"),
                               body.get("answer"))
    await _privacy_overdue(request.app, now)
    return json_response({"id": rid, "outcome": body["outcome"],
                          "completed_at": now.isoformat()})


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    checks = {"postgres": True, "redis": True}
    try:
        await app[POOL].fetchval("SELECT 1")
    except POSTGRES_ERRORS:
        checks["postgres"] = False
    try:
        await app[REDIS].ping()
    except (RedisError, OSError):
        checks["redis"] = False
    ok = all(checks.values())
    return json_response({"status": "ok" if ok else "unavailable", **checks}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _day(raw: str | None, name: str) -> int:
    try:
        return int(datetime.strptime(raw or "", "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    except ValueError:
        raise InvalidInput(f"{name} must be a date, YYYY-MM-DD (UTC)") from None


async def billing_reconciliation(request: web.Request) -> web.Response:
    """Stripe's totals against the ledger's for the days ``from`` to ``to`` (inclusive,
    UTC), optionally of one ``account_id``."""
    start = _day(request.query.get("from"), "from")
    end = _day(request.query.get("to"), "to") + 86_400
    if end <= start or end - start > 366 * 86_400:
        raise InvalidInput("to must be on or after from, within a year")
    raw = request.query.get("account_id")
    account = None if raw is None else parse_account_id(raw)
    if STRIPE not in request.app:
        raise Unavailable("Stripe is not configured on this server")
    return json_response(await reconcile.report(request.app[POOL], request.app[STRIPE],
                                                start, end, account))


async def _stripe_client(app: web.Application) -> AsyncIterator[None]:
    billing = app[SETTINGS].billing
    if billing.stripe_secret_key:
        app[STRIPE] = StripeGateway(billing)
    try:
        yield
    finally:
        if STRIPE in app:
            await app[STRIPE].close()


async def _own_stores(app: web.Application) -> AsyncIterator[None]:
    """Stores of the app's own, when it runs alone (tests, tools) rather than in a role."""
    async with open_stores(app[SETTINGS]) as stores:
        _attach(app, stores)
        yield


def _attach(app: web.Application, stores: Stores) -> None:
    app[POOL], app[REDIS], app[METRICS] = stores.pool, stores.redis, stores.metrics
    settings = app[SETTINGS]
    secret = settings.session_secret or (None if settings.public_is_https
                                         else settings.require_session_secret())
    if secret is not None:  # staff sessions need the web service's signing key
        sessions = Sessions(secret, stores.pool, stores.redis, settings.names,
                            stores.outages, previous=settings.session_secret_previous)
        app[STAFF] = StaffAccess(sessions, stores.pool)


def make_app(settings: Settings, stores: Stores | None = None) -> web.Application:
    """The admin app over ``stores`` (the process's, see ``service``); without them it
    opens its own for its lifetime. Runs no background task: ingest and the reconciler
    belong to the ingest role."""
    settings.require_admin_token()
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    if stores is None:
        app.cleanup_ctx.append(_own_stores)
    else:
        _attach(app, stores)
    app.router.add_post("/admin/accounts", create_account)
    app.router.add_post("/admin/accounts/{account_id}/keys", issue_key)
    app.router.add_get("/admin/accounts/{account_id}/keys", list_keys)
    app.router.add_post("/admin/keys/{key_id}/revoke", revoke_key)
    app.router.add_put("/admin/keys/{key_id}/limits", key_limits)
    app.router.add_post("/admin/accounts/{account_id}/credit", credit)
    app.router.add_get("/admin/accounts/{account_id}/balance", balance)
    app.router.add_put("/admin/accounts/{account_id}/limits", account_limits)
    app.router.add_post("/admin/accounts/{account_id}/suspend", _set_status("suspended"))
    app.router.add_post("/admin/accounts/{account_id}/resume", _set_status("active"))
    app.router.add_get("/admin/accounts/{account_id}/usage", account_usage)
    app.router.add_get("/admin/privacy/requests", privacy_open)
    app.router.add_post("/admin/privacy/requests/{request_id}/extend", privacy_extend)
    app.router.add_post("/admin/privacy/requests/{request_id}/answer", privacy_answer)
    app.cleanup_ctx.append(_stripe_client)  # the reconciliation report (H21)
    app.router.add_get("/admin/billing/reconciliation", billing_reconciliation)
    app.router.add_post("/admin/accounts/{account_id}/child", mark_child)  # clause 11
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
