"""The account API at ``/api/v1``, compatible with OpenRouter's where it has the same
thing (field names included): ``key``, ``credits``, ``keys`` CRUD, ``generation``,
``activity``, plus ``session`` for the dashboard's own scripts.

Callers: a session, a management key (both may manage the account), or an inference
key (reads only: ``key``, ``credits``, ``generation``). Everything is scoped to the
caller's account: another account's key or request is "not found", never "forbidden".
Handlers are thin; SQL lives in ``keys`` and ``account_usage``. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from control_plane import account_usage, keys, users
from control_plane.accounts import clean_name
from control_plane.errors import Forbidden, InvalidInput, NotFound
from control_plane.web.guard import caller
from control_plane.web.state import (
    KEY_DOC_LOADS,
    KEY_DOC_TTL_S,
    KEY_DOCS,
    KEY_DOCS_MAX,
    KEYS,
    SESSIONS,
    SETTINGS,
    STORES,
    Caller,
)
from shared.pricing import PriceError, dollars_to_micros

LIMIT_RESETS = ("daily", "weekly", "monthly")


def data_response(value: Any, status: int = 200, **extra: Any) -> web.Response:
    """The account API's success shape, ``{"data": ...}`` (the privacy routes use it too)."""
    return web.Response(body=orjson.dumps({"data": value, **extra}), status=status,
                        content_type="application/json")


def manager(request: web.Request) -> Caller:
    """The caller, who must be able to manage the account (a session or a management key)."""
    found = caller(request)
    if not found.may_manage:
        raise Forbidden("this needs a management key or a signed-in session")
    return found


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``); InvalidInput otherwise."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def _limit(value: object) -> int | None:
    if value is None:
        return None
    try:
        return dollars_to_micros(value)
    except PriceError:
        raise InvalidInput("limit must be null or a non-negative dollar amount") from None


def _reset(value: object) -> str | None:
    if value is None or value in LIMIT_RESETS:
        return value
    raise InvalidInput("limit_reset must be null, daily, weekly or monthly")


def _expiry(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput("expires_at must be an ISO 8601 time with a zone") from None
    if at.tzinfo is None:
        raise InvalidInput("expires_at must carry a time zone (UTC: ...Z)")
    at = at.astimezone(UTC)
    if at <= datetime.now(UTC):
        raise InvalidInput("expires_at must be in the future")
    return at


def _changes(body: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "name" in body:
        found["name"] = clean_name(body["name"], "key")
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise InvalidInput("disabled must be true or false")
        found["disabled"] = body["disabled"]
    if "limit" in body:
        found["credit_limit_micros"] = _limit(body["limit"])
    if "limit_reset" in body:
        found["limit_reset"] = _reset(body["limit_reset"])
    if "expires_at" in body:
        found["expires_at"] = _expiry(body["expires_at"])
    return found


def _key_json(info: keys.KeyInfo, spent: dict[str, int]) -> dict[str, Any]:
    limit = info.credit_limit_micros
    in_period = spent[info.limit_reset] if info.limit_reset else spent["total"]
    return {
        "hash": info.key_id, "name": info.name, "label": f"qnp_{info.key_id}_…",
        "disabled": info.disabled or info.status != "active", "status": info.status,
        "management": info.kind == "management",
        "limit": account_usage.dollars(limit), "limit_reset": info.limit_reset,
        "limit_remaining": None if limit is None
        else account_usage.dollars(max(0, limit - in_period)),
        "usage": account_usage.dollars(spent["total"]),
        "usage_daily": account_usage.dollars(spent["daily"]),
        "usage_weekly": account_usage.dollars(spent["weekly"]),
        "usage_monthly": account_usage.dollars(spent["monthly"]),
        "created_at": info.created_at.isoformat(),
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
    }


async def _keys_json(request: web.Request, found: list[keys.KeyInfo]) -> list[dict[str, Any]]:
    spent = await account_usage.key_usage(request.app[STORES].pool,
                                          [k.key_id for k in found], datetime.now(UTC))
    return [_key_json(k, spent[k.key_id]) for k in found]


async def current_key(request: web.Request) -> web.Response:
    who = caller(request)
    if who.key is None:
        raise InvalidInput("GET /api/v1/key describes the API key it is called with")
    docs, now = request.app[KEY_DOCS], time.monotonic()
    hit = docs.get(who.key.key_id)
    if hit is not None and hit[0] > now:
        return web.Response(body=hit[1], content_type="application/json")
    loads = request.app[KEY_DOC_LOADS]
    load = loads.get(who.key.key_id)
    if load is None:  # the first to miss reads; the others wait for its answer
        key_id = who.key.key_id
        load = loads[key_id] = asyncio.ensure_future(_key_doc(request, who))
        load.add_done_callback(functools.partial(_loaded, loads, key_id))
    body = await asyncio.shield(load)
    return web.Response(body=body, content_type="application/json")


def _loaded(loads: dict[str, asyncio.Future[bytes]], key_id: str,
            done: asyncio.Future[bytes]) -> None:
    loads.pop(key_id, None)
    if not done.cancelled():
        done.exception()  # retrieved: a failed read is raised to its waiters, not logged


async def _key_doc(request: web.Request, who: Caller) -> bytes:
    assert who.key is not None
    info = await keys.get_key(request.app[STORES].pool, who.account_id, who.key.key_id)
    (data,) = await _keys_json(request, [info])
    rpm = info.limits.get("rpm")
    data |= {"is_free_tier": False, "is_management_key": who.key.management,
             "rate_limit": {"requests": rpm, "interval": "1m"} if rpm else None,
             "limits": info.limits}
    body = orjson.dumps({"data": data})
    docs = request.app[KEY_DOCS]
    if len(docs) >= KEY_DOCS_MAX:
        docs.clear()
    docs[who.key.key_id] = (time.monotonic() + KEY_DOC_TTL_S, body)
    return body


async def credits(request: web.Request) -> web.Response:
    who = caller(request)
    return data_response(await account_usage.credits(request.app[STORES].pool, who.account_id))


async def list_keys(request: web.Request) -> web.Response:
    who = manager(request)
    found = await keys.list_keys(request.app[STORES].pool, str(who.account_id))
    return data_response(await _keys_json(request, [k for k in found if k.status == "active"]))


async def create_key(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    management = body.get("management", False)
    if not isinstance(management, bool):
        raise InvalidInput("management must be true or false")
    if management and who.session is None:
        raise Forbidden("management keys are created from a signed-in session")
    stores, settings = request.app[STORES], request.app[SETTINGS]
    issued = await keys.issue_key(
        stores.pool, stores.redis, settings.names, str(who.account_id),
        clean_name(body.get("name"), "key") if "name" in body else None,
        bcrypt_rounds=settings.bcrypt_rounds,
        kind="management" if management else "inference",
        credit_limit_micros=_limit(body.get("limit")),
        limit_reset=_reset(body.get("limit_reset")), expires_at=_expiry(body.get("expires_at")))
    (data,) = await _keys_json(request, [issued.info])
    # The secret, shown this once; it is never stored or shown again.
    return data_response(data, 201, key=issued.key)


async def get_key(request: web.Request) -> web.Response:
    who = manager(request)
    info = await keys.get_key(request.app[STORES].pool, who.account_id,
                              request.match_info["hash"])
    if info.status != "active":
        raise NotFound("key not found")
    (data,) = await _keys_json(request, [info])
    return data_response(data)


async def _announce_key(request: web.Request, info: keys.KeyInfo) -> None:
    request.app[KEYS].forget(info.key_id)
    request.app[KEY_DOCS].pop(info.key_id, None)
    if info.kind == "management":  # not published, but other replicas cache it
        stores = request.app[STORES]
        await stores.redis.publish(stores.settings.names.key_changes, info.key_id)


async def update_key(request: web.Request) -> web.Response:
    who = manager(request)
    changes = _changes(await json_body(request))
    stores = request.app[STORES]
    info = await keys.update_key(stores.pool, stores.redis, stores.settings.names,
                                 who.account_id, request.match_info["hash"], changes)
    await _announce_key(request, info)
    (data,) = await _keys_json(request, [info])
    return data_response(data)


async def delete_key(request: web.Request) -> web.Response:
    who = manager(request)
    await keys.get_key(request.app[STORES].pool, who.account_id, request.match_info["hash"])
    stores = request.app[STORES]
    info = await keys.revoke_key(stores.pool, stores.redis, stores.settings.names,
                                 request.match_info["hash"], who.account_id)
    await _announce_key(request, info)
    return data_response({"success": True, "hash": info.key_id})


async def generation(request: web.Request) -> web.Response:
    who = caller(request)
    return data_response(await account_usage.generation(request.app[STORES].pool, who.account_id,
                                                request.query.get("id")))


async def activity(request: web.Request) -> web.Response:
    who = manager(request)
    return data_response(await account_usage.activity(request.app[STORES].pool, who.account_id,
                                              datetime.now(UTC)))


async def session(request: web.Request) -> web.Response:
    who = caller(request)
    if who.session is None:
        raise NotFound("not signed in with a session")
    profile = await users.profile(request.app[STORES].pool, who.session.user_id)
    return data_response({"account_id": str(who.account_id), "user": profile,
                  "csrf_token": request.app[SESSIONS].csrf_token(str(who.session.id))})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/key", current_key)
    r.add_get("/api/v1/auth/key", current_key)  # OpenRouter's older path
    r.add_get("/api/v1/credits", credits)
    r.add_get("/api/v1/keys", list_keys)
    r.add_post("/api/v1/keys", create_key)
    r.add_get("/api/v1/keys/{hash}", get_key)
    r.add_patch("/api/v1/keys/{hash}", update_key)
    r.add_delete("/api/v1/keys/{hash}", delete_key)
    r.add_get("/api/v1/generation", generation)
    r.add_get("/api/v1/activity", activity)
    r.add_get("/api/v1/session", session)
