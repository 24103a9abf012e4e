"""Sign-in routes: the provider list, the OIDC redirect and callback, first-run
acceptance (18+, terms, privacy policy with its version), sign-out and sign-out
everywhere.

A sign-in in progress lives in Redis under its ``state`` (provider, nonce, PKCE
verifier, where to go next, and a hash of a browser-binding cookie) and is read once
(GETDEL): a replayed or forged callback finds nothing. Every refusal is a clear page
and creates nothing. ``next`` is followed only when it is a path on our own origin.
Never imports ``proxy``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import quote, urlsplit

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from control_plane import users
from control_plane.auth.oidc import Client, Flow, Identity
from control_plane.auth.sessions import COOKIE, COOKIE_TTL_S
from control_plane.consent import records
from control_plane.consent.cookies import CONSENT_COOKIE, parse_browser_id
from control_plane.errors import Conflict, InvalidInput, NotFound, SignInRefused
from control_plane.web import deletion_page
from control_plane.web.guard import SIGNUP_COOKIE, caller, clear_cookie, set_cookie
from control_plane.web.pages import PAGES, redirect
from control_plane.web.state import CALLER, OIDC, SESSIONS, SETTINGS, STORES

SIGNIN_COOKIE = "__Host-qnp_signin"
SIGNIN_TTL_S = 600
SIGNUP_TTL_S = 1800


def safe_next(raw: str | None) -> str:
    """A same-origin path to go to after sign-in; anything else becomes ``/``."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/"
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or any(ord(c) < 32 for c in raw):
        return "/"
    return raw


def _client(request: web.Request) -> Client:
    found = request.app[OIDC].get(request.match_info["provider"])
    if found is None:
        raise NotFound("no such sign-in provider")
    return found


def _redirect_uri(request: web.Request, provider: str) -> str:
    return f"{request.app[SETTINGS].public_url}/auth/{provider}/callback"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# A sign-up in progress holds a verified email and name. In Redis it is sealed with a
# key only the person's browser holds (derived from the sign-up cookie), under a name
# derived from it: Redis alone reveals neither who is signing up nor the cookie.
def _signup_key(request: web.Request, token: str) -> str:
    return request.app[SETTINGS].names.signup(_digest("key:" + token))


def _aead(token: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"qnp signup").derive(token.encode())
    return AESGCM(key)


def _seal(token: str, plain: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _aead(token).encrypt(nonce, plain, None)


def _unseal(token: str, sealed: bytes | str) -> bytes | None:
    if isinstance(sealed, str):  # our client returns bytes; a str was never sealed by us
        return None
    try:
        return _aead(token).decrypt(sealed[:12], sealed[12:], None)
    except InvalidTag:
        return None


async def signin_page(request: web.Request) -> web.Response:
    providers = [c.provider for c in request.app[OIDC].values()]
    return request.app[PAGES].render("signin.html", request=request, providers=providers,
                                     next=safe_next(request.query.get("next")))


async def start(request: web.Request) -> web.StreamResponse:
    client = _client(request)
    flow = Flow.new()
    binding = secrets.token_urlsafe(32)
    record = {"provider": client.provider.name, "nonce": flow.nonce,
              "verifier": flow.verifier, "next": safe_next(request.query.get("next")),
              "binding": _digest(binding)}
    names = request.app[SETTINGS].names
    url = await client.authorization_url(flow, _redirect_uri(request, client.provider.name),
                                         fresh=request.query.get("fresh") == "1")
    await request.app[STORES].redis.set(names.signin_state(flow.state), orjson.dumps(record),
                                        ex=SIGNIN_TTL_S)
    response = redirect(url)
    # SameSite=None: a response_mode=form_post callback (Apple) is a cross-site POST,
    # and a Lax cookie would not come with it. The cookie only binds this sign-in to
    # this browser; it grants nothing on its own and lives ten minutes.
    set_cookie(response, SIGNIN_COOKIE, binding, SIGNIN_TTL_S, samesite="None")
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    client = _client(request)
    params = request.query if request.method == "GET" else await request.post()
    if "error" in params:
        raise SignInRefused("sign-in was cancelled or refused by the provider",
                            f"provider error {str(params.get('error'))[:50]!r}")
    state, code = params.get("state"), params.get("code")
    if not isinstance(state, str) or not isinstance(code, str) or not state or not code:
        raise SignInRefused("this sign-in link is incomplete; please start again",
                            "callback without state or code")
    stores = request.app[STORES]
    raw = await stores.redis.getdel(request.app[SETTINGS].names.signin_state(state))
    if raw is None:
        raise SignInRefused("this sign-in has expired or was already used; please start "
                            "again", "unknown or replayed state")
    record = orjson.loads(raw)
    binding = request.cookies.get(SIGNIN_COOKIE, "")
    if record["provider"] != client.provider.name or \
            not hmac.compare_digest(record["binding"], _digest(binding)):
        raise SignInRefused("this sign-in was started in another browser; please start "
                            "again", "state not bound to this browser")
    flow = Flow(state, record["nonce"], record["verifier"])
    user = params.get("user")  # Apple's form_post, first sign-in only
    identity = await client.exchange(code, flow, _redirect_uri(request, client.provider.name),
                                     user if isinstance(user, str) else None)
    response = await _signed_in(request, identity, record["next"])
    clear_cookie(response, SIGNIN_COOKIE)
    return response


async def _signed_in(request: web.Request, identity: Identity, next_path: str
                     ) -> web.StreamResponse:
    stores = request.app[STORES]
    member = await users.find_member(stores.pool, identity.provider, identity.subject)
    if member is None and CALLER in request and caller(request).session is not None:
        session = caller(request).session
        assert session is not None
        await users.link(stores.pool, session.user_id, identity)  # linked deliberately
        return redirect(next_path)
    if member is not None:
        if member.status != "active":
            raise SignInRefused("this account is suspended", "suspended user signed in")
        if (keep := await deletion_page.offer_restore(request, member)) is not None:
            return keep  # the account is being deleted: keep it, or nothing (H17)
        return await _new_session(request, member, next_path)
    if identity.email is None or not identity.email_verified:
        raise SignInRefused("your sign-in provider did not confirm your email address",
                            "email missing or unverified")
    if await users.email_taken(stores.pool, identity.email):
        raise SignInRefused(
            "an account with this email already exists: sign in the way you did before, "
            "then connect this provider from your settings", "email of another user")
    token = secrets.token_urlsafe(32)
    await stores.redis.set(_signup_key(request, token),
                           _seal(token, users.identity_to_json(identity)), ex=SIGNUP_TTL_S)
    response = redirect(f"/signup?next={quote(next_path)}")
    set_cookie(response, SIGNUP_COOKIE, token, SIGNUP_TTL_S)
    return response


async def _new_session(request: web.Request, member: users.Member, next_path: str
                       ) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    sid = await sessions.create(request.app[STORES].pool, member.user_id, member.account_id,
                                request.headers.get("User-Agent"))
    # The choices this browser made before signing in become the account's (issue 15).
    browser = parse_browser_id(request.cookies.get(CONSENT_COOKIE))
    if browser is not None:
        await records.attach(request.app[STORES].pool, browser, member.account_id)
    response = redirect(next_path)
    set_cookie(response, COOKIE, sessions.cookie_value(sid), COOKIE_TTL_S)
    return response


async def _pending(request: web.Request) -> tuple[str, Identity]:
    token = request.cookies.get(SIGNUP_COOKIE)
    raw = None if token is None else await request.app[STORES].redis.get(
        _signup_key(request, token))
    plain = None if token is None or raw is None else _unseal(token, raw)
    if token is None or plain is None:
        raise SignInRefused("this sign-up has expired; please sign in again",
                            "no sign-up in progress")
    return token, users.identity_from_json(plain)


async def signup_page(request: web.Request) -> web.Response:
    token, identity = await _pending(request)
    settings = request.app[SETTINGS]
    return request.app[PAGES].render(
        "signup.html", request=request, name=identity.name,
        next=safe_next(request.query.get("next")),
        csrf_token=request.app[SESSIONS].csrf_token("signup:" + token),
        policy_version=settings.policy_version)


async def signup(request: web.Request) -> web.StreamResponse:
    token, identity = await _pending(request)
    form = await request.post()
    if not all(form.get(what) in ("on", "true", "yes") for what in users.ACCEPTED):
        raise InvalidInput("confirm you are 18 or older and accept the terms and the "
                           "privacy policy to continue")
    stores, settings = request.app[STORES], request.app[SETTINGS]
    if await stores.redis.getdel(_signup_key(request, token)) is None:
        raise SignInRefused("this sign-up has expired; please sign in again", "signup reused")
    async with stores.pool.acquire() as conn, conn.transaction():
        if identity.email and await users.email_taken(conn, identity.email):
            raise Conflict("an account with this email already exists")
        member = await users.sign_up(conn, stores.redis, settings.names, identity,
                                     settings.policy_version)
    next_value = form.get("next")
    response = await _new_session(request, member,
                                  safe_next(next_value if isinstance(next_value, str) else None))
    clear_cookie(response, SIGNUP_COOKIE)
    return response


async def signout(request: web.Request) -> web.StreamResponse:
    session = caller(request).session
    if session is not None:
        await request.app[SESSIONS].revoke(session.id)
    response = web.json_response({"signed_out": 1})
    clear_cookie(response, COOKIE)
    return response


async def signout_everywhere(request: web.Request) -> web.StreamResponse:
    session = caller(request).session
    if session is None:
        raise NotFound("not signed in with a session")
    ended = await request.app[SESSIONS].revoke_all(session.user_id)
    response = web.json_response({"signed_out": ended})
    clear_cookie(response, COOKIE)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/signin", signin_page)
    app.router.add_get("/auth/{provider}/start", start)
    app.router.add_get("/auth/{provider}/callback", callback)
    app.router.add_post("/auth/{provider}/callback", callback)
    app.router.add_get("/signup", signup_page)
    app.router.add_post("/signup", signup)
    app.router.add_post("/auth/signout", signout)
    app.router.add_post("/auth/signout-everywhere", signout_everywhere)
