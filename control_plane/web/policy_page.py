"""The privacy policy's pages (issues 14 and 15): ``/privacy`` (public: the policy in
force, with its version and "Last updated" date; ``/privacy/{version}`` for earlier
ones), the material-change banner on every dashboard page and its "Acknowledge"
button, and two signed-in pages: ``/settings/privacy/sharing`` (who receives what,
which providers got the account's requests, where to complain) and
``/settings/privacy/summary`` (the export's categories with their counts).

At start-up the policy versions are synced to Postgres and QNP_POLICY_VERSION checked
against them (``policy.versions.sync``), and the complaint authorities loaded: either
failing stops the web role. The banner's data comes from this module's middleware
(``PAGE_CONTEXT``, which ``dashboard.render`` merges): one query per page a signed-in
user GETs. Handlers are thin: SQL
lives in ``policy`` and ``privacy``. Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from control_plane.consent import records
from control_plane.errors import NotFound
from control_plane.policy import authorities, document, processors, versions
from control_plane.privacy import summary
from control_plane.web.dashboard import TEMPLATES, render, session_of
from control_plane.web.errors import Handler
from control_plane.web.signin import safe_next
from control_plane.web.state import CALLER, PAGE_CONTEXT, SETTINGS, STORES, is_page

AUTHORITIES = web.AppKey("complaint_authorities", Mapping[str, authorities.Authority])
DOCUMENTS = web.AppKey("policy_documents", dict[str, document.Document])


async def _start(app: web.Application) -> None:
    settings = app[SETTINGS]
    async with app[STORES].pool.acquire() as conn:
        await versions.sync(conn, settings.policy_version)
    app[AUTHORITIES] = authorities.load(settings.complaint_authorities)
    app[DOCUMENTS] = {v.version: document.parse(v.text) for v in versions.manifest()}


@web.middleware
async def banner(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The material change a signed-in user has not acknowledged, for ``layout.html``."""
    who = request.get(CALLER)
    if who is not None and who.session is not None and is_page(request):
        notice = await versions.pending_notice(request.app[STORES].pool,
                                               who.session.user_id)
        if notice is not None:
            request.setdefault(PAGE_CONTEXT, {})["policy_notice"] = notice
    return await handler(request)


def _page(request: web.Request, version: versions.PolicyVersion) -> web.Response:
    values: dict[str, Any] = {"doc": request.app[DOCUMENTS][version.version], "version": version,
              "current": versions.latest(), "versions": list(reversed(versions.manifest()))}
    who = request.get(CALLER)
    if who is not None and who.session is not None:
        return render(request, "privacy_policy.html", who.session, **values)
    return aiohttp_jinja2.render_template(  # signed out: no navigation, no form
        "privacy_policy.html", request, {"nav": (), "path": request.path, **values},
        app_key=TEMPLATES)


async def policy(request: web.Request) -> web.Response:
    return _page(request, versions.latest())


async def policy_version(request: web.Request) -> web.Response:
    found = versions.get(request.match_info["version"])
    if found is None:
        raise NotFound("there is no such version of the privacy policy")
    return _page(request, found)


async def acknowledge(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    form = await request.post()
    await versions.acknowledge(request.app[STORES].pool, session.user_id)
    back = form.get("next")
    raise web.HTTPSeeOther(safe_next(back if isinstance(back, str) else None))


async def _authority(request: web.Request, account_id: uuid.UUID) -> authorities.Authority:
    jurisdiction = await request.app[STORES].pool.fetchval(
        "SELECT jurisdiction FROM accounts WHERE id = $1", account_id)
    return request.app[AUTHORITIES][jurisdiction or "default"]


async def sharing(request: web.Request) -> web.Response:
    session = session_of(request)
    pool = request.app[STORES].pool
    consent = await records.current(pool, account_id=session.account_id)
    return render(
        request, "privacy_sharing.html", session, processors=processors.PROCESSORS,
        analytics="analytics" in consent,
        providers=await processors.providers_used(pool, session.account_id),
        older_models=await processors.models_before(pool, session.account_id),
        authority=await _authority(request, session.account_id))


async def summary_page(request: web.Request) -> web.Response:
    session = session_of(request)
    async with request.app[STORES].pool.acquire() as conn:
        found = await summary.summary(conn, session.account_id, datetime.now(UTC))
    return render(request, "privacy_summary.html", session, categories=found,
                  authority=await _authority(request, session.account_id))


def add_routes(app: web.Application) -> None:
    # First, before any resource with a lifetime is opened: a refusal leaks nothing.
    app.on_startup.insert(0, _start)
    # Innermost, after ``guard`` has found the caller (as aiohttp-jinja2's own context
    # processors are installed).
    app.middlewares.append(banner)
    r = app.router
    r.add_get("/privacy", policy)
    r.add_get("/privacy/{version}", policy_version)
    r.add_post("/policy/acknowledge", acknowledge)
    r.add_get("/settings/privacy/sharing", sharing)
    r.add_get("/settings/privacy/summary", summary_page)
