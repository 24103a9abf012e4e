"""The web app's typed state (``AppKey``s) and who is calling (``Caller``), shared by
its middlewares and handlers. Never imports ``proxy``."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from aiohttp import web

from control_plane.auth.apikey import KeyAuth, KeyCaller
from control_plane.auth.oidc import Client
from control_plane.auth.sessions import Session, Sessions
from control_plane.consent.view import ConsentView
from control_plane.runtime import Stores
from control_plane.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
STORES = web.AppKey("stores", Stores)
SESSIONS = web.AppKey("sessions", Sessions)
KEYS = web.AppKey("key_auth", KeyAuth)
OIDC = web.AppKey("oidc", dict[str, Client])
# GET /api/v1/key answers per key id, kept KEY_DOC_TTL_S: a hot key costs one query a
# second per replica, not one per request. (cached until, JSON body)
KEY_DOCS = web.AppKey("key_docs", dict[str, tuple[float, bytes]])
# The refresh in flight per key id: requests arriving meanwhile share it (one query per
# key per second per replica however many connections ask at once).
KEY_DOC_LOADS = web.AppKey("key_doc_loads", dict[str, "asyncio.Future[bytes]"])
KEY_DOC_TTL_S = 1.0
KEY_DOCS_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Caller:
    """A request's authenticated caller: a session or an API key, never both."""

    account_id: uuid.UUID
    session: Session | None = None
    key: KeyCaller | None = None

    @property
    def may_manage(self) -> bool:
        """Sessions and management keys manage the account; inference keys only read."""
        return self.session is not None or (self.key is not None and self.key.management)


CALLER = web.RequestKey("caller", Caller)
# What middlewares add to the template context of every dashboard page (the policy
# banner, ``policy_page``; the open payment disputes, ``billing.routes.hold_notice``);
# ``dashboard.render`` merges it. Add with ``request.setdefault(PAGE_CONTEXT, {})``.
PAGE_CONTEXT = web.RequestKey("page_context", dict[str, object])
# Paths that never render a page: the API, assets, webhooks, sign-in hops, probes and
# downloads. What a page shows besides its own content (the cookie banner, the policy
# banner, dispute notices) is looked up only for the rest, so an API call or a health
# probe costs no query for it.
NOT_PAGES = ("/static/", "/api/", "/.well-known/", "/auth/", "/webhooks/", "/healthz",
             "/usage/export", "/credits/history.csv")


def is_page(request: web.Request) -> bool:
    """May this request render a dashboard page (a GET or HEAD outside ``NOT_PAGES``)?"""
    return request.method in ("GET", "HEAD") and not request.path.startswith(NOT_PAGES)
# What a page may do under the browser's consent (issue 15; control_plane/web/consent_page.py).
CONSENT = web.RequestKey("consent", ConsentView)
