"""API-key authentication: parse, cache, fetch, verify, and forget on revocation.

- A malformed key (shape or checksum, see ``shared.apikeys``) is refused with no lookup.
- A cache hit costs one SHA-256 of the presented key and two dict lookups: no parsing,
  no Redis round trip, no bcrypt. ``cached`` is that step alone, synchronous, for the
  HTTP server's early-auth hook; ``authenticate`` is complete on its own.
- A miss reads the key record from Redis; an unknown key id never reaches bcrypt.
  bcrypt runs in a thread, at most once per (key, secret) per process per cache
  lifetime; concurrent misses for the same key share one verification.
- Verifications that may fail are throttled per key id and per client IP, and bcrypt
  work for unverified secrets is bounded (``proxy.auth_throttle``); a verified key is a
  cache hit and never waits behind them.
- A key past its ``expires_at`` (Unix seconds, from the control plane) is refused with
  401 ``key_expired`` on every path, the cache's too: a key that expires while cached
  costs one comparison with the wall clock, a key without expiry not even that.
- Revocations and other changes arrive on a pub/sub channel and evict the entry at once;
  the bounded cache lifetime covers a lost message, and every entry is marked stale when
  the subscription has to reconnect (messages may have been missed meanwhile).
- While Redis is unreachable, a key this process has verified keeps working (stale),
  unless a change message evicted it; an unknown key gets 503 until Redis is back.
- A missing key record is a verdict (401) only once the control plane has filled Redis
  (its ``published`` sentinel is set). Without it — Redis restarted empty and not yet
  refilled — keys this process verified keep working and others get 503 with
  Retry-After, never a 401 that clients would take as "bad key".

Must not import the request handlers, the emitter or the upstream client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import bcrypt
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.auth_errors import auth_unavailable
from proxy.auth_throttle import VerifyThrottle
from proxy.errors import (
    AccountSuspended,
    AuthUnavailable,
    KeyDisabled,
    KeyExpired,
    KeyRevoked,
    Unauthorized,
)
from proxy.tasks import cancel_requested
from shared import apikeys
from shared.apikeys import KeyRecord, KeyRecordError
from shared.redis_names import RedisNames

log = logging.getLogger("qnp.proxy.auth")

_BEARER = "Bearer "
_SCHEME_LEN = len(_BEARER)
_MAX_HEADER = 256  # far above a real key; anything longer is refused before parsing
_MAX_REJECTED = 8  # wrong secrets remembered per key, so guessing cannot burn bcrypt time
# Where the key id sits in a well-formed key: the cache is keyed by it, and slicing it
# out costs less than parsing (a wrong slice only misses: hits need the whole key's hash).
_ID_START = len(apikeys.PREFIX)
_ID_END = _ID_START + apikeys.KEY_ID_LEN
_V = TypeVar("_V")


@dataclass(slots=True)
class _Entry:
    record: KeyRecord
    expires_at: float
    verified: set[bytes] = field(default_factory=set)  # SHA-256 of whole keys that matched
    rejected: set[bytes] = field(default_factory=set)


class _Unfilled(Exception):
    """The key record is missing and Redis has not been filled since it lost its data."""


def bearer_token(header: str | None, x_api_key: str | None = None) -> str:
    """The presented key from ``Authorization: Bearer`` (or ``x-api-key``), or Unauthorized.

    The scheme is case-insensitive (RFC 9110, 11.1): ``bearer`` and ``BEARER`` work.
    """
    if header is not None:
        if len(header) > _MAX_HEADER or not (
            header.startswith(_BEARER) or header[:_SCHEME_LEN].lower() == "bearer "
        ):
            raise Unauthorized()
        token = header[_SCHEME_LEN:].strip()
    elif x_api_key is not None:
        token = x_api_key.strip()
    else:
        raise Unauthorized()
    if not token.isascii():
        raise Unauthorized()
    return token


def _bcrypt_checkpw(secret: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(secret, hashed))  # looked up per call: tests may wrap it
    except ValueError:  # a stored hash that is not bcrypt's: no secret can match it
        log.error("key record holds a malformed bcrypt hash; refusing the key")
        return False


class Authenticator:
    def __init__(
        self, redis: aioredis.Redis, names: RedisNames, *, ttl: float, max_entries: int,
        on_throttled: Callable[[str], None] | None = None,
        failures_per_key_per_minute: int = 10, failures_per_ip_per_minute: int = 30,
        max_concurrent_verifications: int = 2, max_queued_verifications: int = 256,
        unavailable_retry_after_s: int = 1,
        checkpw: Callable[[bytes, bytes], bool] = _bcrypt_checkpw,
    ) -> None:
        """``on_throttled`` is called with "key_id", "client_ip" or "queue" each time
        the verification throttle refuses an attempt (see ``proxy.auth_throttle``)."""
        self._redis = redis
        self._names = names
        self._ttl = ttl
        self._max = max_entries
        self._retry_after_s = unavailable_retry_after_s
        self._checkpw = checkpw
        self._throttle = VerifyThrottle(
            per_key_per_minute=failures_per_key_per_minute,
            per_ip_per_minute=failures_per_ip_per_minute,
            max_concurrent=max_concurrent_verifications,
            max_queued=max_queued_verifications,
            on_throttled=on_throttled,
        )
        self._cache: dict[str, _Entry] = {}
        # Key ids Redis does not know, apart: a flood of made-up ids (each a cheap Redis
        # read) must never push verified keys out of the cache and back to bcrypt.
        self._unknown: dict[str, float] = {}  # key id -> expires_at
        self._inflight: dict[tuple[str, bytes], asyncio.Future[KeyRecord]] = {}

    @property
    def throttle(self) -> VerifyThrottle:
        return self._throttle

    def cached(self, token: str) -> KeyRecord | None:
        """The active record if the cache alone can say so, synchronously.

        Returns the record for a fresh entry whose secret this process verified; raises
        what ``authenticate`` would for a refusal the cache already knows (malformed
        key, unknown key id, rejected secret, revoked, suspended); returns None when
        only ``authenticate`` can tell (miss, stale entry, secret not yet verified).
        """
        if len(token) != apikeys.KEY_LEN:
            raise Unauthorized()  # before hashing: x-api-key has no length limit of its own
        entry = self._cache.get(token[_ID_START:_ID_END])
        digest = hashlib.sha256(token.encode()).digest()
        if entry is not None and entry.expires_at > time.monotonic():
            if digest in entry.verified:
                return _active(entry.record)
            try:
                apikeys.parse(token)
            except apikeys.MalformedKey:
                raise Unauthorized() from None
            if digest in entry.rejected:
                raise Unauthorized()
            return None
        try:
            parsed = apikeys.parse(token)
        except apikeys.MalformedKey:
            raise Unauthorized() from None
        if self._unknown.get(parsed.key_id, 0.0) > time.monotonic():
            raise Unauthorized()
        return None

    async def authenticate(self, token: str, client_ip: str | None = None) -> KeyRecord:
        """The active key record for a presented key, or Unauthorized / KeyRevoked /
        AccountSuspended / VerificationThrottled (429) / AuthUnavailable (503)."""
        record = self.cached(token)  # also refuses what the cache already knows
        if record is not None:
            return record
        parsed = apikeys.parse(token)  # well-formed: cached() refused it otherwise
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(parsed.key_id)
        if entry is None or digest not in entry.verified:
            # Only attempts that may need bcrypt get here (a verified key refreshing a
            # stale entry does not): a spent budget refuses them before any Redis read,
            # and without creating a task.
            self._throttle.check(parsed.key_id, client_ip)
        # One verification per (key, secret) however many requests miss at once. It runs
        # as its own task so that one caller going away does not fail the others.
        flight_key = (parsed.key_id, digest)
        task = self._inflight.get(flight_key)
        if task is None:
            task = asyncio.ensure_future(self._load(parsed, digest, client_ip))
            self._inflight[flight_key] = task
            task.add_done_callback(lambda t: self._landed(flight_key, t))
        try:
            return _active(await asyncio.shield(task))
        except (AuthUnavailable, _Unfilled) as e:
            # Redis is unreachable, or lost its data and is not refilled yet: a key this
            # process verified before, and that no change message has evicted since,
            # keeps working; any other gets 503 with Retry-After, never a 401.
            entry = self._cache.get(parsed.key_id)
            if entry is not None and digest in entry.verified:
                return _active(entry.record)
            raise auth_unavailable(self._retry_after_s) from e

    def _landed(self, flight_key: tuple[str, bytes], task: asyncio.Future[KeyRecord]) -> None:
        del self._inflight[flight_key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

    async def _load(self, parsed: apikeys.ParsedKey, digest: bytes,
                    client_ip: str | None) -> KeyRecord:
        entry = self._cache.get(parsed.key_id)
        if entry is None or entry.expires_at <= time.monotonic():
            entry = await self._fetch(parsed.key_id)
            if entry is None:
                raise Unauthorized()
        # else: a fresh record, only this secret is new to it: no need to read it again.
        record = entry.record
        if digest in entry.verified:
            return record
        if digest in entry.rejected:  # the same hash as when it failed: still wrong
            raise Unauthorized()
        async with self._throttle.verifying(parsed.key_id, client_ip) as outcome:
            ok = await asyncio.to_thread(
                self._checkpw, parsed.secret.encode(), record.secret_hash.encode()
            )
            outcome.ok = ok
        if not ok:
            if len(entry.rejected) < _MAX_REJECTED:
                entry.rejected.add(digest)
            raise Unauthorized()
        entry.verified.add(digest)
        return record

    async def _fetch(self, key_id: str) -> _Entry | None:
        """The key's entry refreshed from Redis, or None if Redis does not know the key;
        raises AuthUnavailable or _Unfilled."""
        try:
            # The sentinel is read first: the control plane sets it only after it
            # published every record, so a record missing after the sentinel was seen
            # is truly gone. One round trip; on a hit the EXISTS is a few µs in Redis.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(self._names.published)
                pipe.get(self._names.key_record(key_id))
                filled, raw = await pipe.execute()
        except RedisError as e:
            raise AuthUnavailable() from e
        record = None
        if raw is not None:
            try:
                record = KeyRecord.decode(raw)
            except KeyRecordError:
                log.error("malformed key record in Redis for key_id=%s", key_id)
        elif not filled:
            raise _Unfilled()  # the cache keeps what it had: no verdict on this key yet
        now = time.monotonic()
        if record is None:  # unknown (or unreadable, which is logged): refused
            self._cache.pop(key_id, None)
            _bounded_put(self._unknown, key_id, now + self._ttl, self._max)
            return None
        self._unknown.pop(key_id, None)
        entry = self._cache.get(key_id)
        if entry is None or entry.record != record:
            entry = _Entry(record, now + self._ttl)
            self._cache.pop(key_id, None)
            _bounded_put(self._cache, key_id, entry, self._max)
        else:
            # Same record as before (same hash, same status): secrets it verified still
            # verify, so a refresh costs no bcrypt — no storm after a reconnect.
            entry.expires_at = now + self._ttl
        return entry

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)
        self._unknown.pop(key_id, None)

    def forget_all(self) -> None:
        """Mark every entry stale: re-read from Redis next time, but still usable as a
        fallback while Redis is unreachable or unfilled (unlike ``forget``, which a
        change message triggers and which must never be served stale)."""
        for entry in self._cache.values():
            entry.expires_at = 0.0
        self._unknown.clear()  # an unknown key is never served, stale or not

    async def watch_changes(self, ready: asyncio.Event | None = None) -> None:
        """Evict keys named on the change channel; runs until cancelled."""
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._names.key_changes)
                # Anything published while we were not subscribed is lost: start clean.
                self.forget_all()
                if ready is not None:
                    ready.set()
                backoff = 0.05
                async for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        self.forget(data.decode("ascii", "replace"))
            except (RedisError, OSError) as e:
                if cancel_requested():
                    return
                log.warning("key-change subscription lost (%s); reconnecting", type(e).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _bounded_put(cache: dict[str, _V], key: str, value: _V, limit: int) -> None:
    if len(cache) >= limit:
        # Drop the oldest tenth: dicts keep insertion order, so this is LRU-ish by load.
        for stale in list(cache)[: max(1, limit // 10)]:
            del cache[stale]
    cache[key] = value


def _active(record: KeyRecord) -> KeyRecord:
    if record.status == "suspended":
        raise AccountSuspended()
    if record.status == "disabled":
        raise KeyDisabled()
    if not record.active:
        raise KeyRevoked()
    # The wall clock, not the monotonic one: expires_at is a date the user chose.
    if record.expires_at is not None and record.expires_at <= time.time():
        raise KeyExpired()
    return record
