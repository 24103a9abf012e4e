"""Web sessions: a pyjwt-signed cookie carrying only a server-side session id, and the
session state behind it, cached so a request costs no Postgres query.

The cookie (``__Host-qnp_session``: HttpOnly, Secure, SameSite=Lax, Path=/) holds
``{"sid", "iat", "exp"}`` signed with HS256 under QNP_SESSION_SECRET: never an API
key, an email or a name. It lives ``COOKIE_TTL_S`` and is re-issued when half of that
has passed (sliding renewal); the row's ``expires_at`` bounds a session absolutely.
Sign-out, sign-out everywhere and deletion set ``revoked_at`` and publish the session
ids on ``names.session_revocations``; every replica drops them from its cache at once,
and a lost message is covered by ``CACHE_TTL_S`` (and by clearing the cache whenever the
subscription reconnects). A suspension revokes nothing: it empties every cache, and the
sessions of a suspended account are read again as ``suspended``, which the web guard
lets reach the account's privacy rights only (issue 14). Never imports ``proxy`` or
``control_plane.web``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import jwt
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.errors import Unauthorized
from control_plane.outages import REDIS, Outages
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

COOKIE = "__Host-qnp_session"
COOKIE_TTL_S = 30 * 60
SESSION_LIFETIME = timedelta(days=30)
CACHE_TTL_S = 30.0
CACHE_MAX = 100_000
ALL = "*"  # a revocation message that empties every cache
_ALG = "HS256"
# (token in the User-Agent header, name shown), first match wins: Edge and Opera
# announce Chrome too, Chrome announces Safari, so the specific ones come first.
_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"),
             ("Chromium/", "Chromium"), ("Chrome/", "Chrome"), ("Safari/", "Safari"))
_SYSTEMS = (("Android", "Android"), ("iPhone", "iOS"), ("iPad", "iPadOS"),
            ("Windows", "Windows"), ("Mac OS X", "macOS"), ("CrOS", "ChromeOS"),
            ("Linux", "Linux"))


@dataclass(frozen=True, slots=True)
class Session:
    id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID
    restricted: bool = False  # the account restricted its processing (issue 14)
    # The account is suspended: the session reaches its privacy rights only (guard).
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class CookieClaims:
    sid: uuid.UUID
    issued_at: int
    expires_at: int
    # Signed under QNP_SESSION_SECRET_PREVIOUS: valid during a rotation, re-issued
    # under the current secret on this response.
    old_key: bool = False

    def wants_renewal(self, now: float) -> bool:
        return self.old_key or self.expires_at - now < COOKIE_TTL_S / 2


def user_agent_summary(raw: str | None) -> str:
    """"Firefox on Linux": enough to tell one's browsers apart in the sessions list,
    never the full header (with its versions and build details it can single a person
    out, and the privacy policy promises only browser type and operating system)."""
    text = raw or ""
    browser = next((name for token, name in _BROWSERS if token in text), "")
    system = next((name for token, name in _SYSTEMS if token in text), "")
    if browser and system:
        return f"{browser} on {system}"
    return browser or system


def _keys(secret: str) -> tuple[bytes, bytes]:
    """The cookie-signing key and the CSRF key derived from one secret."""
    return (hashlib.sha256(b"qnp-session:" + secret.encode()).digest(),
            hashlib.sha256(b"qnp-csrf:" + secret.encode()).digest())


def _csrf(key: bytes, binding: str) -> str:
    return hmac.new(key, binding.encode(), hashlib.sha256).hexdigest()


def _claims(value: str, key: bytes, *, old_key: bool) -> CookieClaims:
    claims = jwt.decode(value, key, algorithms=[_ALG],
                        options={"require": ["sid", "iat", "exp"]})
    return CookieClaims(uuid.UUID(str(claims["sid"])), int(claims["iat"]), int(claims["exp"]),
                        old_key)


class Sessions:
    def __init__(self, secret: str, pool: asyncpg.Pool, redis: aioredis.Redis,
                 names: RedisNames, outages: Outages, previous: str | None = None) -> None:
        # Rotation: cookies and CSRF tokens signed under ``previous`` are still accepted
        # (cookies are re-issued under ``secret`` at once), so changing the secret
        # signs nobody out. New ones are always signed under ``secret``.
        self._key, self._csrf_key = _keys(secret)
        self._previous = None if previous in (None, secret) else _keys(previous or "")
        self._pool, self._redis, self._names, self._outages = pool, redis, names, outages
        # sid -> (cached until, state or None when the session is not usable)
        self._cache: dict[uuid.UUID, tuple[float, Session | None]] = {}
        self.queries = 0  # Postgres reads of session state, for tests and benchmarks

    # -- the cookie ------------------------------------------------------------------

    def cookie_value(self, sid: uuid.UUID, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return jwt.encode({"sid": str(sid), "iat": issued, "exp": issued + COOKIE_TTL_S},
                          self._key, algorithm=_ALG)

    def read_cookie(self, value: str) -> CookieClaims:
        try:
            return _claims(value, self._key, old_key=False)
        except jwt.InvalidSignatureError:
            if self._previous is None:
                raise Unauthorized("your session has ended; please sign in again") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("your session has ended; please sign in again") from None
        try:
            return _claims(value, self._previous[0], old_key=True)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("your session has ended; please sign in again") from None

    def csrf_token(self, binding: str) -> str:
        """The synchronizer token of a session (or a sign-up in progress)."""
        return _csrf(self._csrf_key, binding)

    def csrf_ok(self, binding: str, given: str | None) -> bool:
        if given is None:
            return False
        if hmac.compare_digest(self.csrf_token(binding), given):
            return True
        # A form rendered before the rotation still submits.
        return self._previous is not None and hmac.compare_digest(
            _csrf(self._previous[1], binding), given)

    # -- state -----------------------------------------------------------------------

    async def get(self, sid: uuid.UUID) -> Session | None:
        """The usable session, or None if revoked, expired, its user is not active or
        its account is neither active nor suspended (a suspended account's session is
        marked ``suspended``). From the cache when fresh; else one query."""
        now = time.monotonic()
        hit = self._cache.get(sid)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.queries += 1
        row = await self._pool.fetchrow(
            "SELECT s.id, s.user_id, s.account_id, a.restricted_at IS NOT NULL AS restricted, "
            "a.status = 'suspended' AS suspended FROM web_sessions s "
            "JOIN users u ON u.id = s.user_id JOIN accounts a ON a.id = s.account_id "
            "WHERE s.id = $1 AND s.revoked_at IS NULL AND s.expires_at > now() "
            "AND u.status = 'active' AND a.status IN ('active', 'suspended')", sid)
        found = None if row is None else Session(row["id"], row["user_id"], row["account_id"],
                                                 row["restricted"], row["suspended"])
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()  # bounded memory; a cold cache only costs queries
        self._cache[sid] = (now + CACHE_TTL_S, found)
        return found

    async def create(self, conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID,
                     account_id: uuid.UUID, user_agent: str | None) -> uuid.UUID:
        sid = uuid.uuid4()
        await conn.execute(
            "INSERT INTO web_sessions (id, user_id, account_id, expires_at, user_agent) "
            "VALUES ($1, $2, $3, $4, $5)",
            sid, user_id, account_id, datetime.now(UTC) + SESSION_LIFETIME,
            user_agent_summary(user_agent))
        return sid

    async def touch(self, sid: uuid.UUID) -> None:
        """Record activity; called on renewal only, so at most once per half cookie TTL."""
        await self._pool.execute("UPDATE web_sessions SET last_seen_at = now() WHERE id = $1",
                                 sid)

    async def revoke(self, sid: uuid.UUID) -> None:
        await self._pool.execute(
            "UPDATE web_sessions SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
            sid)
        await self._announce([sid])

    async def revoke_all(self, user_id: uuid.UUID) -> int:
        """Sign out everywhere: every session of the user, on every replica."""
        rows = await self._pool.fetch(
            "UPDATE web_sessions SET revoked_at = now() "
            "WHERE user_id = $1 AND revoked_at IS NULL RETURNING id", user_id)
        await self._announce([r["id"] for r in rows])
        return len(rows)

    async def reread(self, account_id: uuid.UUID) -> None:
        """The account's state changed (a restriction): every replica drops its live
        sessions from the cache, to read them again (nothing is revoked)."""
        rows = await self._pool.fetch(
            "SELECT id FROM web_sessions WHERE account_id = $1 AND revoked_at IS NULL "
            "AND expires_at > now()", account_id)
        await self._announce([r["id"] for r in rows])

    async def _announce(self, sids: list[uuid.UUID]) -> None:
        for sid in sids:
            self._cache.pop(sid, None)
        if not sids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.publish(self._names.session_revocations, str(sid))
                await pipe.execute()
        except RedisError as e:
            # Revoked in Postgres already; other replicas see it within CACHE_TTL_S.
            self._outages.failed(REDIS, e, "session revocation")

    def forget(self, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        if text == ALL:
            self._cache.clear()
            return
        try:
            self._cache.pop(uuid.UUID(text), None)
        except ValueError:
            log.debug("ignored a malformed session revocation message")

    async def listen(self, stop: asyncio.Event,
                     also: Mapping[str, Callable[[bytes | str], None]] | None = None) -> None:
        """Drop revoked sessions from the cache as their ids are announced; ``also``
        maps more channels to their handlers (a handler of ``None`` means: reconnected,
        forget everything)."""
        handlers: dict[str, Callable[[bytes | str], None]] = {
            self._names.session_revocations: self.forget, **(also or {})}
        while not stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*handlers)
                for handler in handlers.values():
                    handler(ALL)  # messages may have been missed while away
                self._outages.ok(REDIS)
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        channel = message["channel"]
                        text = channel.decode() if isinstance(channel, bytes) else channel
                        handlers[text](message["data"])
            except (RedisError, OSError) as e:
                self._outages.failed(REDIS, e, "session revocations")
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass
