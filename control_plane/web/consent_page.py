"""Consent in the web service (issue 15): the cookie banner's context on every page, its
form (``POST /consent``, CSRF-checked, works without JavaScript), the account API
(``GET``/``PUT /api/v1/account/consents``), the /cookies page, the theme choice
(``POST /theme``), Global Privacy Control (``Sec-GPC: 1``, ``/.well-known/gpc.json``)
and the unsubscribe pages (``unsubscribe_page``).

``consent_middleware`` (appended by ``add_routes``, so it runs inside ``guard`` and
knows the caller) gives every page request ``request[CONSENT]``: one indexed statement
for a signed-in account or a browser with a consent cookie, none for a first visit. A
browser without the strictly necessary consent cookie gets one with its first page (a
random id: the banner's form token is bound to it). A theme cookie without functional
consent is removed. ``Sec-GPC: 1`` withdraws analytics and marketing e-mail for a
signed-in account, recorded once with source ``gpc``. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

from aiohttp import web

from control_plane.consent import choices, records
from control_plane.consent.cookies import (
    CONSENT_COOKIE,
    CONSENT_TTL_S,
    COOKIES,
    THEME_COOKIE,
    THEME_TTL_S,
    parse_browser_id,
)
from control_plane.consent.records import PURPOSES
from control_plane.consent.view import (
    BANNER_PURPOSES,
    GPC_PURPOSES,
    THEMES,
    ConsentView,
    Loaded,
    effective,
    gpc_pending,
    shows_banner,
    stored_theme,
)
from control_plane.errors import Forbidden, InvalidInput
from control_plane.policy import versions
from control_plane.web import unsubscribe_page
from control_plane.web.account_api import data_response, json_body, manager
from control_plane.web.errors import Handler, wants_json
from control_plane.web.guard import clear_cookie, csrf_binding, set_cookie
from control_plane.web.pages import PAGES
from control_plane.web.signin import safe_next
from control_plane.web.state import CALLER, CONSENT, SESSIONS, SETTINGS, STORES, Caller, is_page

GPC_LAST_UPDATE = "2026-12-02"  # of /.well-known/gpc.json: when our GPC handling changed
# Requests that never render a page: no consent state is loaded for them.
# Accounts whose GPC withdrawal this replica recorded or saw: a request that renders no
# page skips the check for them (a page always checks). Bounded; cleared when full.
GPC_SEEN = web.AppKey("consent_gpc_seen", dict[uuid.UUID, None])
_GPC_SEEN_MAX = 100_000


def _gpc(request: web.Request) -> bool:
    return request.headers.get("Sec-GPC", "").strip() == "1"


def _caller(request: web.Request) -> Caller | None:
    return request[CALLER] if CALLER in request else None


def _current(request: web.Request) -> str:
    """The policy version a choice is recorded under: the one in force."""
    return request.app[SETTINGS].policy_version


def _reask_from(request: web.Request) -> str:
    """Choices older than this (the latest material version) are asked again."""
    return versions.material_version_of(request.app[SETTINGS].policy_version)


async def _load(request: web.Request, account_id: uuid.UUID | None,
                browser: uuid.UUID | None, gpc: bool) -> Loaded:
    """The state, with GPC recorded first for an account (once)."""
    pool = request.app[STORES].pool
    loaded = await choices.load(pool, account_id=account_id, browser_id=browser)
    if account_id is not None and gpc:
        seen = request.app[GPC_SEEN]
        if await choices.record_gpc(pool, account_id, loaded, _current(request)):
            loaded = await choices.load(pool, account_id=account_id)
        if len(seen) >= _GPC_SEEN_MAX:
            seen.clear()
        seen[account_id] = None
    return loaded


async def _view(request: web.Request) -> ConsentView:
    who = _caller(request)
    browser = parse_browser_id(request.cookies.get(CONSENT_COOKIE))
    minted = browser is None
    if browser is None:
        browser = uuid.uuid4()
    gpc = _gpc(request)
    account = who.account_id if who is not None and who.session is not None else None
    if account is None and minted:
        loaded = choices.NOTHING  # a first visit costs no query
    else:
        loaded = await _load(request, account, browser, gpc)
    granted = effective(loaded.state.granted, gpc)
    current = _current(request)
    return ConsentView(
        granted=granted, gpc=gpc, restricted=loaded.restricted,
        signed_in=account is not None, show_banner=shows_banner(loaded, _reask_from(request)),
        policy_version=current,
        csrf_token=request.app[SESSIONS].csrf_token(
            csrf_binding(request, who, str(browser)) or ""),
        next=request.path_qs, browser_id=browser, minted=minted,
        theme=stored_theme(request.cookies.get(THEME_COOKIE), granted),
        gpc_to_record=account is not None and not gpc and bool(gpc_pending(loaded)))


async def _gpc_elsewhere(request: web.Request) -> None:
    """GPC on a request that renders no page: checked once per account per replica."""
    who = _caller(request)
    if who is None or not _gpc(request) or who.account_id in request.app[GPC_SEEN]:
        return
    await _load(request, who.account_id, None, True)


@web.middleware
async def consent_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    view = None
    if is_page(request):
        view = request[CONSENT] = await _view(request)
    else:
        await _gpc_elsewhere(request)
    response = await handler(request)
    if view is not None and not response.prepared:
        if view.minted and response.content_type == "text/html":
            set_cookie(response, CONSENT_COOKIE, str(view.browser_id), CONSENT_TTL_S)
        if view.theme is None and THEME_COOKIE in request.cookies:
            clear_cookie(response, THEME_COOKIE)  # no functional consent: store nothing
    return response


# -- the banner's form ---------------------------------------------------------------

def _form_choices(form: Any, signed_in: bool) -> dict[str, bool]:
    raw = form.get("purposes", " ".join(BANNER_PURPOSES))
    purposes = raw.split() if isinstance(raw, str) else []
    if not purposes or any(p not in PURPOSES for p in purposes):
        raise InvalidInput(f"purposes must be some of {', '.join(PURPOSES)}")
    if "marketing_email" in purposes and not signed_in:
        raise InvalidInput("sign in to choose marketing e-mail")
    choice = form.get("choice", "save")
    if choice not in ("accept", "reject", "save"):
        raise InvalidInput("choice must be accept, reject or save")
    if choice == "save":
        return {p: form.get(p) == "on" for p in purposes}
    return dict.fromkeys(purposes, choice == "accept")


async def _save(request: web.Request, chosen: dict[str, bool], source: str,
                account: uuid.UUID | None, browser: uuid.UUID | None, gpc: bool) -> None:
    """Under GPC, analytics and marketing e-mail are recorded withdrawn, source ``gpc``,
    whatever the form said."""
    pool, current = request.app[STORES].pool, _current(request)
    held = {p: False for p in chosen if gpc and p in GPC_PURPOSES}
    rest = {p: g for p, g in chosen.items() if p not in held}
    await choices.save(pool, rest, source=source, policy_version=current,
                       account_id=account, browser_id=browser)
    await choices.save(pool, held, source="gpc", policy_version=current,
                       account_id=account, browser_id=browser)


def _back(form: Any) -> web.Response:
    """303 to the page the form was on (a path of ours; anything else: ``/``)."""
    next_value = form.get("next")
    return web.Response(status=303, headers={"Location": safe_next(
        next_value if isinstance(next_value, str) else None)})


def _state_json(loaded: Loaded, gpc: bool, reask_from: str) -> dict[str, Any]:
    granted = effective(loaded.state.granted, gpc)
    return {"granted": sorted(granted), "gpc": gpc, "restricted": loaded.restricted,
            "analytics_allowed": "analytics" in granted and not loaded.restricted,
            "show_banner": shows_banner(loaded, reask_from)}


async def post_consent(request: web.Request) -> web.StreamResponse:
    who = _caller(request)
    if who is not None and who.key is not None:
        raise Forbidden("API keys use PUT /api/v1/account/consents")
    form = await request.post()
    account = who.account_id if who is not None else None
    browser = parse_browser_id(request.cookies.get(CONSENT_COOKIE)) or uuid.uuid4()
    gpc = _gpc(request) or form.get("gpc") == "1"
    if "purposes" in form or "choice" in form:
        source = form.get("source")
        await _save(request, _form_choices(form, account is not None),
                    source if source in ("banner", "settings") else "banner",
                    account, browser, gpc)
    elif not gpc:
        raise InvalidInput("nothing to record: choose accept, reject or save")
    loaded = await _load(request, account, browser, gpc)
    if wants_json(request):
        response: web.StreamResponse = data_response(_state_json(loaded, gpc, _reask_from(request)))
    else:
        response = _back(form)
    set_cookie(response, CONSENT_COOKIE, str(browser), CONSENT_TTL_S)
    if "functional" not in loaded.state.granted and THEME_COOKIE in request.cookies:
        clear_cookie(response, THEME_COOKIE)
    return response


async def post_theme(request: web.Request) -> web.StreamResponse:
    """Remember the theme only with functional consent; without it store nothing (the
    page then follows prefers-color-scheme, or the toggle for this page only)."""
    form = await request.post()
    theme = form.get("theme")
    if theme not in (*THEMES, "system"):
        raise InvalidInput("theme must be light, dark or system")
    who = _caller(request)
    account = who.account_id if who is not None and who.session is not None else None
    browser = parse_browser_id(request.cookies.get(CONSENT_COOKIE))
    loaded = await choices.load(request.app[STORES].pool, account_id=account,
                                browser_id=browser)
    stored = "functional" in loaded.state.granted and theme != "system"
    if wants_json(request):
        response: web.StreamResponse = data_response({"theme": theme, "stored": stored})
    else:
        response = _back(form)
    if stored:
        set_cookie(response, THEME_COOKIE, str(theme), THEME_TTL_S)
    elif THEME_COOKIE in request.cookies:
        clear_cookie(response, THEME_COOKIE)
    return response


# -- the account API -----------------------------------------------------------------

async def _account_document(request: web.Request, account: uuid.UUID) -> dict[str, Any]:
    gpc = _gpc(request)
    loaded = await _load(request, account, None, gpc)
    pool = request.app[STORES].pool
    return {
        "consents": {p: {"granted": p in effective(loaded.state.granted, gpc),
                         "decided": p in loaded.state.decided} for p in PURPOSES},
        "policy_version": loaded.state.policy_version,
        "current_policy_version": _current(request),
        **_state_json(loaded, gpc, _reask_from(request)),
        "history": [{"purpose": r.purpose, "granted": r.granted, "source": r.source,
                     "policy_version": r.policy_version,
                     "recorded_at": r.recorded_at.astimezone(UTC).isoformat()}
                    for r in await records.history(pool, account)],
    }


async def get_consents(request: web.Request) -> web.Response:
    who = manager(request)
    return data_response(await _account_document(request, who.account_id))


async def put_consents(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    if not body:
        raise InvalidInput(f"name at least one of {', '.join(PURPOSES)}")
    for purpose, granted in body.items():
        if purpose not in PURPOSES:
            raise InvalidInput(f"unknown purpose {purpose[:40]!r}; use "
                               f"{', '.join(PURPOSES)}")
        if not isinstance(granted, bool):
            raise InvalidInput(f"{purpose} must be true or false")
    await _save(request, body, "settings", who.account_id, None, _gpc(request))
    return data_response(await _account_document(request, who.account_id))


# -- pages -----------------------------------------------------------------------------

async def cookies_page(request: web.Request) -> web.Response:
    return request.app[PAGES].render("cookies.html", request=request, cookies=COOKIES)


async def gpc_json(request: web.Request) -> web.Response:
    # https://privacycg.github.io/gpc-spec/: we honour the signal on every request.
    return web.json_response({"gpc": True, "lastUpdate": GPC_LAST_UPDATE})


def add_routes(app: web.Application) -> None:
    # Inside guard (it needs the caller); aiohttp_jinja2 adds its middlewares the same
    # way. Before the app starts, so the list is not frozen yet.
    app.middlewares.append(consent_middleware)
    app[GPC_SEEN] = {}
    r = app.router
    r.add_post("/consent", post_consent)
    r.add_post("/theme", post_theme)
    r.add_get("/cookies", cookies_page)
    r.add_get("/.well-known/gpc.json", gpc_json)
    r.add_get("/api/v1/account/consents", get_consents)
    r.add_put("/api/v1/account/consents", put_consents)
    unsubscribe_page.add_routes(app)

