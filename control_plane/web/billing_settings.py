"""Auto top-up and low-balance e-mail settings (issue 13), for the caller's own account:

- ``GET /api/v1/credits/auto-topup``: the settings (any caller of the account);
- ``PUT /api/v1/credits/auto-topup``: change them (a session or a management key);
- ``POST /api/v1/credits/auto-topup/card``: a SetupIntent for Stripe.js to save a card
  for off-session use, and ``.../card/complete``: keep the card it saved (sessions);
- ``POST /credits/auto-topup``: the credits page's form (dollars; back to the page).
The guard checks CSRF on every one. Handlers stay thin: the rules are in
``billing.auto_topup``. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from control_plane.billing import auto_topup, topups
from control_plane.billing.routes import BILLING
from control_plane.errors import Forbidden, InvalidInput
from control_plane.web.account_api import data_response, json_body, manager
from control_plane.web.dashboard import session_of
from control_plane.web.guard import caller
from control_plane.web.pages import PAGES
from control_plane.web.state import SETTINGS, STORES


async def get_settings(request: web.Request) -> web.Response:
    found = caller(request)
    config = await auto_topup.config_of(request.app[STORES].pool, found.account_id)
    return data_response(config.to_json())


async def _change(request: web.Request, account: uuid.UUID, body: dict[str, Any]
                  ) -> auto_topup.Config:
    pool = request.app[STORES].pool
    current = await auto_topup.config_of(pool, account)
    wanted = auto_topup.parse(body, current, request.app[SETTINGS].billing)
    return await auto_topup.configure(pool, account, wanted)


async def put_settings(request: web.Request) -> web.Response:
    found = manager(request)
    changed = await _change(request, found.account_id, await json_body(request))
    return data_response(changed.to_json())


def _session_account(request: web.Request) -> uuid.UUID:
    found = caller(request)
    if found.session is None:
        raise Forbidden("cards are saved from a signed-in session")
    return found.account_id


async def card_setup(request: web.Request) -> web.Response:
    account = _session_account(request)
    click = topups.parse_request_id((await json_body(request)).get("request_id"))
    started = await auto_topup.start_card_setup(
        request.app[STORES].pool, request.app[BILLING].require_gateway(), account, click)
    return data_response(started, 201)


async def card_complete(request: web.Request) -> web.Response:
    account = _session_account(request)
    config = await auto_topup.save_card(
        request.app[STORES].pool, request.app[BILLING].require_gateway(), account,
        (await json_body(request)).get("setup_intent_id"))
    return data_response(config.to_json())


def _form_cents(raw: object, what: str) -> int | None:
    text = raw.strip().removeprefix("$") if isinstance(raw, str) else ""
    if not text:
        return None
    try:
        cents = Decimal(text) * 100
    except InvalidOperation:
        raise InvalidInput(f"the {what} must be a dollar amount such as 5 or 2.50") from None
    if not cents.is_finite() or cents != cents.to_integral_value():
        raise InvalidInput(f"the {what} must be a dollar amount such as 5 or 2.50")
    return int(cents)


async def form(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    posted = await request.post()
    body = {"enabled": posted.get("enabled") == "on",
            "threshold_cents": _form_cents(posted.get("threshold"), "threshold"),
            "amount_cents": _form_cents(posted.get("amount"), "amount"),
            "low_balance_cents": _form_cents(posted.get("low_balance"),
                                             "low-balance e-mail amount")}
    try:
        await _change(request, session.account_id, body)
    except InvalidInput as e:
        return request.app[PAGES].message("Auto top-up not saved", e.message, 400)
    raise web.HTTPSeeOther("/credits")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/credits/auto-topup", get_settings)
    r.add_put("/api/v1/credits/auto-topup", put_settings)
    r.add_post("/api/v1/credits/auto-topup/card", card_setup)
    r.add_post("/api/v1/credits/auto-topup/card/complete", card_complete)
    r.add_post("/credits/auto-topup", form)
