"""OpenID Connect relying party: authorization code flow with PKCE (S256), state and
nonce, for any provider configured by issuer (Google, a dev provider, several at once).

Discovery documents are fetched on first use and cached; JWKS are cached and fetched
again when a token names a ``kid`` we do not know (at most once per
``JWKS_REFETCH_S``, so forged kids cannot make us hammer the provider). ID tokens are
verified with pyjwt: signature with an asymmetric algorithm the provider advertises
(never ``none``, never HMAC: an HS256 token "signed" with the public key is refused),
``iss``, ``aud`` (and ``azp``), ``exp``, ``iat`` (not in the future), ``nonce``. No
hand-written crypto. Never imports ``proxy`` or ``control_plane.web``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
import orjson

from control_plane.errors import SignInRefused
from control_plane.settings import OIDCProvider

log = logging.getLogger(__name__)

DISCOVERY_TTL_S = 3600.0
JWKS_TTL_S = 3600.0
JWKS_REFETCH_S = 30.0
CLOCK_LEEWAY_S = 60
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Asymmetric algorithms only: a symmetric one would let anyone holding the public key
# sign a token.
ASYMMETRIC_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "ES256", "ES384", "ES512", "EdDSA"})
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
SCOPES = "openid email profile"
APPLE_SCOPES = "openid email name"
APPLE_AUDIENCE = "https://appleid.apple.com"
# Apple accepts a client secret valid for at most six months; mint a new one a day early.
APPLE_SECRET_TTL_S = 150 * 86_400
APPLE_SECRET_RENEW_S = 86_400


class ProviderUnavailable(SignInRefused):
    def __init__(self, reason: str) -> None:
        super().__init__("the sign-in provider could not be reached; try again", reason)


@dataclass(frozen=True, slots=True)
class Flow:
    """The secrets of one sign-in attempt, kept server-side until its callback."""

    state: str
    nonce: str
    verifier: str

    @classmethod
    def new(cls) -> Flow:
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                   secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified ID token says about the person."""

    provider: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None


@dataclass(slots=True)
class _Cached:
    value: Any
    fetched_at: float


class Client:
    """One provider: discovery, JWKS, authorization URL, code exchange, verification."""

    def __init__(self, provider: OIDCProvider, http: aiohttp.ClientSession,
                 clock: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self._http = http
        self._discovery: _Cached | None = None
        self._jwks: _Cached | None = None
        self._lock = asyncio.Lock()
        self._clock = clock
        # Read once at start-up: the .p8 key that signs Apple client secrets.
        self._apple_key = None if provider.apple is None else \
            Path(provider.apple.private_key_file).read_bytes()
        self._apple_secret: tuple[float, str] | None = None

    def client_secret(self) -> str:
        """The configured secret; for Apple, an ES256 JWT minted and cached here."""
        apple = self.provider.apple
        if apple is None or self._apple_key is None:
            return self.provider.client_secret
        now = self._clock()
        if self._apple_secret is None or self._apple_secret[0] - now < APPLE_SECRET_RENEW_S:
            expires = now + APPLE_SECRET_TTL_S
            token = jwt.encode(
                {"iss": apple.team_id, "iat": int(now), "exp": int(expires),
                 "aud": APPLE_AUDIENCE, "sub": self.provider.client_id},
                self._apple_key, algorithm="ES256", headers={"kid": apple.key_id})
            self._apple_secret = (expires, token)
        return self._apple_secret[1]

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._http.get(url, timeout=HTTP_TIMEOUT) as r:
                if r.status != 200:
                    raise ProviderUnavailable(f"GET {url} answered {r.status}")
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise ProviderUnavailable(f"GET {url} failed ({type(e).__name__})") from None
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"GET {url}: not a JSON object")
        return body

    async def metadata(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._discovery is None or now - self._discovery.fetched_at > DISCOVERY_TTL_S:
            doc = await self._get_json(self.provider.discovery_url)
            if doc.get("issuer") != self.provider.issuer:
                raise ProviderUnavailable("discovery names another issuer")
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(doc.get(field), str):
                    raise ProviderUnavailable(f"discovery lacks {field}")
            self._discovery = _Cached(doc, now)
        doc = self._discovery.value
        assert isinstance(doc, dict)
        return doc

    async def authorization_url(self, flow: Flow, redirect_uri: str, *,
                                fresh: bool = False) -> str:
        """``fresh``: the person must authenticate again (account deletion asks for a
        sign-in within minutes), OIDC Core 3.1.2.1's ``prompt=login`` and ``max_age=0``;
        Apple supports neither and gets neither."""
        meta = await self.metadata()
        params = {
            "response_type": "code", "client_id": self.provider.client_id,
            "redirect_uri": redirect_uri, "scope": SCOPES, "state": flow.state,
            "nonce": flow.nonce, "code_challenge": flow.challenge,
            "code_challenge_method": "S256",
        }
        if fresh and self.provider.apple is None:
            params |= {"prompt": "login", "max_age": "0"}
        if self.provider.apple is not None:
            # Apple posts the callback (a cross-site POST) when name or email is asked.
            params |= {"scope": APPLE_SCOPES, "response_mode": "form_post"}
        query = urlencode(params)
        endpoint: str = meta["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    async def exchange(self, code: str, flow: Flow, redirect_uri: str,
                       apple_user: str | None = None) -> Identity:
        """Trade the code for tokens and verify the ID token; raises SignInRefused.

        ``apple_user`` is the ``user`` field of Apple's first callback, the only place
        Apple ever sends the person's name."""
        meta = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_uri, "code_verifier": flow.verifier}
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        headers = {"Accept": "application/json"}
        secret = self.client_secret()
        if "client_secret_basic" in methods:
            headers["Authorization"] = _basic(self.provider.client_id, secret)
        else:  # client_secret_post (Apple)
            form |= {"client_id": self.provider.client_id, "client_secret": secret}
        try:
            async with self._http.post(meta["token_endpoint"], data=form, headers=headers,
                                       timeout=HTTP_TIMEOUT) as r:
                body = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise ProviderUnavailable(f"token endpoint failed ({type(e).__name__})") from None
        if status != 200 or not isinstance(body, dict) or "id_token" not in body:
            error = body.get("error") if isinstance(body, dict) else None
            raise SignInRefused("the sign-in provider refused the code; please start again",
                                f"token endpoint answered {status} {error}")
        identity = await self.verify(str(body["id_token"]), flow.nonce)
        name = _apple_name(apple_user) if identity.name is None else None
        return identity if name is None else replace(identity, name=name)

    async def verify(self, id_token: str, nonce: str) -> Identity:
        meta = await self.metadata()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.DecodeError:
            raise _bad_token("malformed ID token") from None
        alg = str(header.get("alg"))
        advertised = set(meta.get("id_token_signing_alg_values_supported") or ["RS256"])
        if alg not in advertised & ASYMMETRIC_ALGS:
            raise _bad_token(f"ID token algorithm {alg!r} is not accepted")
        key = await self._key(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token, key, algorithms=[alg], audience=self.provider.client_id,
                issuer=self.provider.issuer, leeway=CLOCK_LEEWAY_S,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.PyJWTError as e:
            raise _bad_token(f"ID token refused: {type(e).__name__}") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.provider.client_id:
            raise _bad_token("ID token azp is not ours")
        given = claims.get("nonce")
        if not isinstance(given, str) or not hmac.compare_digest(given, nonce):
            raise _bad_token("ID token nonce does not match")
        email = claims.get("email")
        name = claims.get("name")
        return Identity(
            provider=self.provider.name, subject=str(claims["sub"]),
            email=email if isinstance(email, str) and email else None,
            # Some providers (Apple) send the string "true".
            email_verified=claims.get("email_verified") in (True, "true"),
            name=name[:200] if isinstance(name, str) and name else None,
        )

    async def _key(self, kid: object, alg: str) -> Any:
        async with self._lock:
            keys = await self._jwks_keys(refresh=False)
            if kid not in keys and self._jwks is not None \
                    and time.monotonic() - self._jwks.fetched_at > JWKS_REFETCH_S:
                keys = await self._jwks_keys(refresh=True)  # the provider rotated keys
        if kid is None and len(keys) == 1:
            kid = next(iter(keys))  # a provider with one key may leave kid out
        if kid not in keys:
            raise _bad_token("ID token signed with an unknown key")
        jwk: jwt.PyJWK = keys[kid]
        if jwk.key_type != _KEY_TYPES[alg[:2]]:
            raise _bad_token("ID token algorithm does not match its key")
        return jwk.key

    async def _jwks_keys(self, *, refresh: bool) -> dict[object, jwt.PyJWK]:
        now = time.monotonic()
        if refresh or self._jwks is None or now - self._jwks.fetched_at > JWKS_TTL_S:
            meta = await self.metadata()
            doc = await self._get_json(meta["jwks_uri"])
            try:
                found = jwt.PyJWKSet.from_dict(doc)
            except jwt.PyJWKSetError:
                raise ProviderUnavailable("JWKS has no usable key") from None
            keys = {k.key_id: k for k in found.keys
                    if k.public_key_use in (None, "sig") and k.key_type != "oct"}
            self._jwks = _Cached(keys, now)
        value = self._jwks.value
        assert isinstance(value, dict)
        return value


def _apple_name(raw: str | None) -> str | None:
    """The name from Apple's ``user`` form field: {"name": {"firstName", "lastName"}}."""
    if not raw:
        return None
    try:
        user = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    name = user.get("name") if isinstance(user, dict) else None
    if not isinstance(name, dict):
        return None
    parts = [name.get(k) for k in ("firstName", "lastName")]
    text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    return text[:200] or None


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 2.3.1: both parts form-urlencoded before base64.
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _bad_token(reason: str) -> SignInRefused:
    return SignInRefused("sign-in could not be verified; please start again", reason)


def clients(providers: tuple[OIDCProvider, ...], http: aiohttp.ClientSession
            ) -> dict[str, Client]:
    return {p.name: Client(p, http) for p in providers}
