"""The admin HTTP API (aiohttp): accounts, keys, credit, limits, usage, health, metrics.

Every ``/admin/`` route needs ``Authorization: Bearer <QNP_ADMIN_TOKEN>``.
``error_response`` is the one place errors become responses: JSON
``{"error": {"message", "type"}}``, never a traceback. Resources with a lifetime (pool,
Redis client, the ingest and reconciler tasks) live in ``AppKey``s opened by
``cleanup_ctx``.
Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
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

from control_plane import accounts, keys, ledger, limits, usage
from control_plane.connections import open_pool, open_redis
from control_plane.errors import (
    ControlPlaneError,
    InvalidInput,
    Unauthorized,
    Unavailable,
    classify,
)
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.partitions import create_days, days_around
from control_plane.reconciler import DEFAULT_INTERVAL_S, STARTUP, Reconciler
from control_plane.settings import Settings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
RECONCILER = web.AppKey("reconciler", Reconciler)
RECONCILE_INTERVAL = web.AppKey("reconcile_interval", float)

MAX_BODY_BYTES = 64 * 1024
# Time allowed past one BLOCKed read for the ingest task to finish its batch on stop.
INGEST_STOP_GRACE_S = 10.0

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


def _authorize(request: web.Request) -> None:
    token = request.app[SETTINGS].require_admin_token()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid admin bearer token is required")


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path == "/admin" or request.path.startswith("/admin/"):
            _authorize(request)
        return await handler(request)
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
        account = await limits.set_account_status(
            app[POOL], app[REDIS], app[SETTINGS].names, request.match_info["account_id"],
            status,
        )
        return json_response(account.to_json())

    return handler


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


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    checks = {"postgres": True, "redis": True}
    try:
        await app[POOL].fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
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


async def _stores(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[POOL] = await open_pool(settings)
    app[REDIS] = open_redis(settings)
    try:
        async with app[POOL].acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('usage_logs')") is None:
                raise Unavailable("the schema is missing: run `python -m control_plane migrate`")
            await create_days(conn, days_around(datetime.now(UTC).date()))
        yield
    finally:
        await app[REDIS].aclose()
        await app[POOL].close()


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    consumer = Consumer(settings, app[POOL], app[REDIS], app[METRICS])
    task = asyncio.create_task(consumer.run(), name="ingest")
    yield
    consumer.stop()
    try:
        await asyncio.wait_for(task, settings.ingest_block_ms / 1000 + INGEST_STOP_GRACE_S)
    except TimeoutError:
        log.warning("ingest did not stop in time; cancelled mid-batch (entries stay pending)")


async def _reconcile(app: web.Application) -> AsyncIterator[None]:
    """Refill Redis at start-up, then keep watching for it to lose its data."""
    reconciler = app[RECONCILER] = Reconciler(
        app[POOL], app[REDIS], app[SETTINGS].names, app[METRICS],
        interval_s=app[RECONCILE_INTERVAL],
        sweep_interval_s=app[SETTINGS].sweep_interval_s,
        reservation_max_age_ms=app[SETTINGS].sweep_max_age_ms,
    )
    await reconciler.refill(STARTUP)
    task = asyncio.create_task(reconciler.run(), name="reconciler")
    yield
    reconciler.stop()
    await task


def make_app(
    settings: Settings, *, ingest: bool = True,
    reconcile_interval_s: float = DEFAULT_INTERVAL_S,
) -> web.Application:
    """The admin app; with ``ingest`` it also runs the ingest consumer for its lifetime.

    It always runs the reconciler, which refills Redis on start-up and whenever Redis
    is found empty.
    """
    settings.require_admin_token()
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[RECONCILE_INTERVAL] = reconcile_interval_s
    app.cleanup_ctx.append(_stores)
    app.cleanup_ctx.append(_reconcile)
    if ingest:
        app.cleanup_ctx.append(_ingest)
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
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
