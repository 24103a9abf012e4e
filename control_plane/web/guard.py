"""Sessions and CSRF for every request, in one middleware (as Warehouse does it).

Who is calling: ``Authorization: Bearer <API key>`` (an inference or management key),
else the session cookie. A tampered, expired or revoked cookie is a 401 that clears it.

CSRF, on every unsafe method (POST, PUT, PATCH, DELETE) unless the route is listed in
``CSRF_EXEMPT`` below, with why:
- the request must come from our own origin: ``Sec-Fetch-Site: same-origin``, or (for
  browsers that do not send it) an ``Origin`` equal to QNP_PUBLIC_URL;
- and carry the synchronizer token bound to its session (or to the sign-up in
  progress, or to keeping an account in its deletion grace), in the ``X-CSRF-Token``
  header or the ``csrf_token`` form field.
A request authenticated by a bearer key carries no ambient credential, so it needs no
CSRF token (and any cookie it sends is ignored).

A session of a suspended account reaches only the routes in ``SUSPENDED_ALLOWED``
below (its privacy rights, the page that explains the suspension, signing out, public
pages); any other page sends it to that page, any other API call is a 403. Never
imports ``proxy``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from control_plane.auth.sessions import COOKIE, COOKIE_TTL_S, CookieClaims
from control_plane.consent.cookies import CONSENT_COOKIE
from control_plane.errors import Forbidden, Unauthorized
from control_plane.web.edge import read_body
from control_plane.web.errors import Handler, wants_json
from control_plane.web.state import CALLER, KEYS, SESSIONS, SETTINGS, Caller

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SIGNUP_COOKIE = "__Host-qnp_signup"
RESTORE_COOKIE = "__Host-qnp_restore"  # keeping an account in its deletion grace (H17)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

# Route templates exempt from the CSRF check, each with the reason. Nothing else is.
CSRF_EXEMPT: Mapping[str, str] = {
    "/auth/{provider}/callback": "a provider's response_mode=form_post callback (Apple) "
                                 "is a cross-site POST by design; the single-use state, "
                                 "PKCE verifier and nonce protect it",
    "/webhooks/stripe": "Stripe signs its webhooks; there is no browser session",
    "/unsubscribe/{token}": "RFC 8058 one-click unsubscribe: a mail client POSTs from no "
                            "page of ours and with no cookie; the token in the URL is an "
                            "HMAC naming one account, and it can only withdraw consent",
}
# Routes a browser may post to before it signs in (the cookie banner's choice, the
# theme): with no session, their token is bound to the browser's consent cookie, set
# with the page that holds the form (control_plane/web/consent_page.py).
CONSENT_BOUND = frozenset({"/consent", "/theme"})

# What a session of a suspended account may still reach, each route template matching
# itself and every template under it, with why. An automated suspension (a dispute, an
# abuse block) must not take away the rights to see, export and correct one's data, to
# restrict or object, or to ask a person to review the decision (issue 14; KVKK art.
# 11, GDPR art. 22(3)). Nothing else is reachable, routes added later included.
SUSPENDED_PAGE = "/suspended"
SUSPENDED_ALLOWED: Mapping[str, str] = {
    SUSPENDED_PAGE: "the suspension, its reason, and the human-review button",
    "/settings/privacy": "Settings > Privacy: every right, the human review included",
    "/api/v1/account/privacy": "the same rights through the account API",
    "/api/v1/account/export": "the data export (access and portability)",
    "/settings/deletion": "erasure (H17's deletion page)",
    "/api/v1/account/deletion": "erasure through the account API (H17)",
    "/settings/signout": "signing out",
    "/settings/signout-everywhere": "signing out everywhere",
    "/auth/signout": "signing out (API)",
    "/auth/signout-everywhere": "signing out everywhere (API)",
    "/privacy": "the privacy policy, readable by anyone (H19)",
    "/policy/acknowledge": "acknowledging a new policy version (H19)",
    "/cookies": "the cookie table, readable by anyone (H15)",
    "/consent": "consent can always be withdrawn (H15)",
    "/api/v1/account/consents": "the same through the account API (H15)",
    "/unsubscribe": "one-click unsubscribe from an e-mail (H15)",
    "/static": "the pages' stylesheet, script and icon",
    "/healthz": "the load balancer's check",
}
SUSPENDED_MESSAGE = ("this account is suspended: only its privacy rights are available "
                     "(Settings > Privacy, /api/v1/account/privacy, the data export), "
                     "including a human review of the suspension")


def _allowed_when_suspended(template: str) -> bool:
    return any(template == allowed or template.startswith(allowed + "/")
               for allowed in SUSPENDED_ALLOWED)


def set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int,
               samesite: str = "Lax") -> None:
    # __Host-: Secure, Path=/, no Domain. Browsers accept Secure cookies from
    # http://127.0.0.1 and localhost, the only plain-http origins settings allow.
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True,
                        httponly=True, samesite=samesite)


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/", secure=True, httponly=True, samesite="Lax")


def caller(request: web.Request) -> Caller:
    """The authenticated caller; 401 if there is none."""
    if CALLER not in request:
        raise Unauthorized("sign in or send an API key")
    return request[CALLER]


async def _identify(request: web.Request) -> tuple[Caller | None, CookieClaims | None]:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("use Authorization: Bearer <API key>")
        key = await request.app[KEYS].authenticate(token.strip())
        return Caller(account_id=key.account_id, key=key), None
    raw = request.cookies.get(COOKIE)
    if raw is None:
        return None, None
    sessions = request.app[SESSIONS]
    claims = sessions.read_cookie(raw)
    session = await sessions.get(claims.sid)
    if session is None:
        raise Unauthorized("your session has ended; please sign in again")
    return Caller(account_id=session.account_id, session=session), claims


def csrf_binding(request: web.Request, found: Caller | None,
                 browser: str | None = None) -> str | None:
    """What a form's token is bound to: the session, else a sign-up in progress, else a
    deleted account's restore in progress, else (for ``CONSENT_BOUND`` routes) the
    browser's consent id."""
    if found is not None and found.session is not None:
        return str(found.session.id)
    if (signup := request.cookies.get(SIGNUP_COOKIE)) is not None:
        return "signup:" + signup
    if (restore := request.cookies.get(RESTORE_COOKIE)) is not None:
        return "restore:" + restore
    return None if browser is None else "consent:" + browser


def _same_origin(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    return request.headers.get("Origin") == request.app[SETTINGS].public_url


async def _check_csrf(request: web.Request, found: Caller | None) -> None:
    if found is not None and found.key is not None:
        return
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical in CSRF_EXEMPT:
        return
    if not _same_origin(request):
        raise Forbidden("cross-site request refused")
    browser = request.cookies.get(CONSENT_COOKIE) \
        if resource is not None and resource.canonical in CONSENT_BOUND else None
    binding = csrf_binding(request, found, browser)
    if binding is None:
        raise Forbidden("sign in first")
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.content_type in ("application/x-www-form-urlencoded",
                                                  "multipart/form-data"):
        await read_body(request)  # within the edge's cap and deadline
        value = (await request.post()).get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not request.app[SESSIONS].csrf_ok(binding, given):
        raise Forbidden("the form has expired; reload the page and try again")


def _check_suspended(request: web.Request, found: Caller | None) -> None:
    if found is None or found.session is None or not found.session.suspended:
        return
    resource = request.match_info.route.resource
    if resource is None or _allowed_when_suspended(resource.canonical):
        return  # no such route (a 404 or 405 as for anyone), or one a right needs
    if wants_json(request):
        raise Forbidden(SUSPENDED_MESSAGE)
    raise web.HTTPSeeOther(SUSPENDED_PAGE)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    found, claims = await _identify(request)
    if found is not None:
        request[CALLER] = found
    if request.method in UNSAFE_METHODS:
        await _check_csrf(request, found)
    _check_suspended(request, found)
    response = await handler(request)
    if claims is not None and found is not None and found.session is not None \
            and claims.wants_renewal(time.time()) and COOKIE not in response.cookies:
        sessions = request.app[SESSIONS]
        set_cookie(response, COOKIE, sessions.cookie_value(claims.sid), COOKIE_TTL_S)
        await sessions.touch(claims.sid)
    return response
