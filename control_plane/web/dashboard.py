"""The dashboard's pages (issue 12): Overview and Keys, server-rendered with
aiohttp-jinja2 (autoescape on, templates in ``templates/``), plus the static assets
(``static/``, ours only: one stylesheet, one small script for copy buttons, and
``topup.js`` for the credits page's card form, whose Stripe.js is the one script not
ours, allowed by that page's CSP alone). Every page
needs a signed-in session (else: to sign-in and back); forms post with the session's
CSRF token, checked by ``guard``. Handlers are thin: SQL lives in ``keys``,
``rollups``, ``account_usage``. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web
from redis.exceptions import RedisError

from control_plane import account_usage, keys, ledger, ledger_history, publisher, rollups
from control_plane.accounts import clean_name
from control_plane.auth.sessions import Session
from control_plane.billing import auto_topup, topups
from control_plane.billing import history as billing_history
from control_plane.errors import InvalidInput, NotFound
from control_plane.web import security
from control_plane.web.state import (
    CALLER,
    CONSENT,
    KEY_DOCS,
    KEYS,
    PAGE_CONTEXT,
    SESSIONS,
    SETTINGS,
    STORES,
)
from shared.pricing import PriceError, dollars_to_micros

HERE = Path(__file__).parent
TEMPLATES = web.AppKey("dashboard_templates", jinja2.Environment)
LIMIT_RESETS = ("daily", "weekly", "monthly")
DEFAULT_TOPUP_CENTS = 2000  # the amount the credits page suggests
PAYMENT_LABELS = {"succeeded": "Paid", "failed": "Declined", "processing": "Processing",
                  "canceled": "Canceled", "open": "Not paid"}
NAV = (("/", "Overview"), ("/keys", "Keys"), ("/usage", "Usage"), ("/credits", "Credits"),
       ("/settings", "Settings"))
# A suspended account's session reaches only these pages (``guard``).
SUSPENDED_NAV = (("/suspended", "Suspension"), ("/settings/privacy", "Privacy"))


def money(micros: int | None) -> str:
    if micros is None:
        return "—"
    dollars = micros / 1_000_000
    return f"${dollars:,.2f}" if abs(dollars) >= 1 or micros == 0 else f"${dollars:,.6f}"


def session_of(request: web.Request) -> Session:
    """The signed-in session; anyone else goes to sign-in and comes back here."""
    session = request[CALLER].session if CALLER in request else None
    if session is None:
        raise web.HTTPFound(f"/signin?next={quote(request.path_qs, safe='/')}")
    return session


def render(request: web.Request, template: str, session: Session, status: int = 200,
           **values: Any) -> web.Response:
    context = {**request.get(PAGE_CONTEXT, {}),
               "nav": SUSPENDED_NAV if session.suspended else NAV, "path": request.path,
               "api_base": request.app[SETTINGS].api_base_url,
               "csrf_token": request.app[SESSIONS].csrf_token(str(session.id)),
               "restricted": session.restricted, **values}
    if CONSENT in request:  # the cookie banner, scripts by category, the theme (issue 15)
        context.setdefault("consent", request[CONSENT])
    return aiohttp_jinja2.render_template(template, request, context, status=status,
                                          app_key=TEMPLATES)


async def _balance(request: web.Request, account_id: uuid.UUID) -> int:
    """The balance after every settled request: the live balance the proxies admit
    against plus what in-flight requests hold. Two Redis reads, where the ledger's sum
    would read every debit of a busy month; the ledger only while Redis has no state."""
    stores = request.app[STORES]
    try:
        live, reserved = await publisher.live_balance(stores.redis, stores.settings.names,
                                                      account_id)
    except RedisError:
        live, reserved = None, 0
    if live is not None:
        return live + reserved
    found = await ledger.get_balance(stores.pool, stores.redis, stores.settings.names,
                                     str(account_id), tolerate_redis_down=True)
    return found.ledger_micros


async def overview(request: web.Request) -> web.Response:
    session = session_of(request)
    pool = request.app[STORES].pool
    today = datetime.now(UTC).date()
    balance = await _balance(request, session.account_id)
    _, month_cost = await rollups.totals(pool, session.account_id, today.replace(day=1), today)
    today_requests, _ = await rollups.totals(pool, session.account_id, today, today)
    return render(request, "overview.html", session, balance=balance,
                  month_cost=month_cost,
                  today_requests=today_requests)


async def credits_page(request: web.Request) -> web.Response:
    session = session_of(request)
    pool = request.app[STORES].pool
    today = datetime.now(UTC).date()
    days = await rollups.per_day(pool, session.account_id, rollups.Filters(
        today - timedelta(days=account_usage.ACTIVITY_DAYS - 1), today))
    settings = request.app[SETTINGS]
    billing = settings.billing
    paid = await billing_history.payments(pool, session.account_id)
    response = render(request, "credits.html", session,
                      balance=await _balance(request, session.account_id),
                      entries=await ledger_history.credits(pool, session.account_id),
                      auto_topup=await auto_topup.config_of(pool, session.account_id),  # H22
                      days=[d for d in reversed(days) if d.requests],
                      billing=billing, payments=paid, payment_labels=PAYMENT_LABELS,
                      topup_quote=topups.quote(billing, max(billing.min_topup_cents, min(
                          billing.max_topup_cents, DEFAULT_TOPUP_CENTS))),
                      paid=next((p for p in paid if p.status == "succeeded"
                                 and p.payment_intent_id == request.query.get("paid")), None))
    if billing.page_topups:  # Stripe.js's origin, on this page only
        security.allow_payments(response, billing.stripe_js_url,
                                settings.monitoring.browser_origin)
    return response


async def _key_rows(request: web.Request, account_id: uuid.UUID) -> list[dict[str, Any]]:
    pool = request.app[STORES].pool
    found = await keys.list_keys(pool, str(account_id))
    since = datetime.now(UTC).date() - timedelta(days=account_usage.ACTIVITY_DAYS)
    used = await rollups.per_key(pool, account_id, since)
    now = datetime.now(UTC)
    rows = []
    for k in sorted(found, key=lambda k: k.created_at, reverse=True):
        if k.kind != "inference":
            continue
        u = used.get(k.key_id)
        expired = k.expires_at is not None and k.expires_at <= now
        status = "revoked" if k.status != "active" else "expired" if expired else \
            "disabled" if k.disabled else "active"
        rows.append({"info": k, "status": status, "last_used": u.last_day if u else None,
                     "requests": u.requests if u else 0, "cost": u.cost_micros if u else 0})
    return rows


async def keys_page(request: web.Request) -> web.Response:
    session = session_of(request)
    return render(request, "keys.html", session, keys=await _key_rows(request, session.account_id),
                  created=None, error=None, form={})


def _form_limit(raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        return dollars_to_micros(raw.strip())
    except PriceError:
        raise InvalidInput("the credit limit must be a dollar amount such as 5 or 2.50") from None


def _form_expiry(raw: str) -> datetime | None:
    if not raw.strip():
        return None
    try:
        day = datetime.fromisoformat(raw.strip()).date()
    except ValueError:
        raise InvalidInput("the expiry must be a date") from None
    at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    if at <= datetime.now(UTC):
        raise InvalidInput("the expiry must be today or later")
    return at  # the end of that UTC day


async def create_key(request: web.Request) -> web.Response:
    session = session_of(request)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    stores, settings = request.app[STORES], request.app[SETTINGS]
    try:
        wanted = _key_changes(form)
        issued = await keys.issue_key(
            stores.pool, stores.redis, settings.names, str(session.account_id),
            wanted["name"], bcrypt_rounds=settings.bcrypt_rounds,
            credit_limit_micros=wanted["credit_limit_micros"],
            limit_reset=wanted["limit_reset"], expires_at=wanted["expires_at"])
    except InvalidInput as e:
        return render(request, "keys.html", session, 400,
                      keys=await _key_rows(request, session.account_id), created=None,
                      error=e.message, form=form)
    # The secret, shown this once in this response (Cache-Control: no-store); never again.
    return render(request, "keys.html", session, 201,
                  keys=await _key_rows(request, session.account_id),
                  created={"name": issued.info.name, "secret": issued.key}, error=None, form={})


async def _own_key(request: web.Request, session: Session) -> keys.KeyInfo:
    info = await keys.get_key(request.app[STORES].pool, session.account_id,
                              request.match_info["hash"])
    if info.status != "active" or info.kind != "inference":
        raise NotFound("key not found")
    return info


def _reset(raw: str) -> str | None:
    if raw and raw not in LIMIT_RESETS:
        raise InvalidInput("choose a reset period from the list")
    return raw or None


# form field -> (key field, parser): what the create and edit forms set.
_FIELDS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "name": ("name", lambda raw: clean_name(raw, "key")),
    "limit": ("credit_limit_micros", _form_limit),
    "limit_reset": ("limit_reset", _reset),
    "expires": ("expires_at", _form_expiry),
    "disabled": ("disabled", lambda raw: raw == "on"),
}


def _key_changes(form: dict[str, str], shown: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields the form sets (with ``shown``: only those changed); InvalidInput names
    what is wrong."""
    return {field: parse(form.get(name, "")) for name, (field, parse) in _FIELDS.items()
            if shown is None or form.get(name, "") != shown[name]}


def _form_of(info: keys.KeyInfo) -> dict[str, str]:
    limit = info.credit_limit_micros
    return {"name": info.name,
            "limit": "" if limit is None else format(Decimal(limit).scaleb(-6).normalize(), "f"),
            "limit_reset": info.limit_reset or "",
            "expires": "" if info.expires_at is None
            else (info.expires_at - timedelta(days=1)).date().isoformat(),
            "disabled": "on" if info.disabled else ""}


async def edit_page(request: web.Request) -> web.Response:
    session = session_of(request)
    info = await _own_key(request, session)
    return render(request, "edit_key.html", session, key=info, form=_form_of(info), error=None)


async def edit(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    info = await _own_key(request, session)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    try:
        # Only what the person changed: an expiry set through the API at 12:00 is shown
        # as a date and must not move because the form was saved.
        changes = _key_changes(form, _form_of(info))
    except InvalidInput as e:
        return render(request, "edit_key.html", session, 400, key=info, form=form,
                      error=e.message)
    stores = request.app[STORES]
    # Changing a limit never resets what the key has used (keys.update_key).
    await keys.update_key(stores.pool, stores.redis, stores.settings.names,
                          session.account_id, info.key_id, changes)
    request.app[KEYS].forget(info.key_id)
    request.app[KEY_DOCS].pop(info.key_id, None)
    raise web.HTTPSeeOther("/keys")


async def revoke_page(request: web.Request) -> web.Response:
    session = session_of(request)
    return render(request, "revoke.html", session, key=await _own_key(request, session))


async def revoke(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    info = await _own_key(request, session)
    stores = request.app[STORES]
    await keys.revoke_key(stores.pool, stores.redis, stores.settings.names, info.key_id,
                          session.account_id)
    request.app[KEYS].forget(info.key_id)
    request.app[KEY_DOCS].pop(info.key_id, None)
    raise web.HTTPSeeOther("/keys")


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), app_key=TEMPLATES,
        autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["money"] = money
    # _analytics.html (H16): where pages' Sentry reports go, "" = off.
    env.globals["sentry_browser_dsn"] = app[SETTINGS].monitoring.browser_dsn or ""


def add_routes(app: web.Application) -> None:
    setup(app)
    r = app.router
    r.add_static("/static/", HERE / "static", append_version=False)
    r.add_get("/", overview)
    r.add_get("/credits", credits_page)
    r.add_get("/keys", keys_page)
    r.add_post("/keys", create_key)
    r.add_get("/keys/{hash}/edit", edit_page)
    r.add_post("/keys/{hash}/edit", edit)
    r.add_get("/keys/{hash}/revoke", revoke_page)
    r.add_post("/keys/{hash}/revoke", revoke)
