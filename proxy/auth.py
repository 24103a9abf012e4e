"""API-key authentication: parse, cache, fetch, verify, and forget on revocation.

- A malformed key (shape or checksum, see ``shared.apikeys``) is refused with no lookup.
- A cache hit costs one SHA-256 and a dict lookup: no Redis round trip, no bcrypt.
- A miss reads the key record from Redis; an unknown key id never reaches bcrypt.
  bcrypt runs in a thread, at most once per (key, secret) per process per cache
  lifetime; concurrent misses for the same key share one verification.
- Revocations and other changes arrive on a pub/sub channel and evict the entry at once;
  the bounded cache lifetime covers a lost message, and every entry is marked stale when
  the subscription has to reconnect (messages may have been missed meanwhile).
- While Redis is unreachable, a key this process has verified keeps working (stale),
  unless a change message evicted it; an unknown key gets 503 until Redis is back.

Must not import the request handlers, the emitter or the upstream client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import bcrypt
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.errors import AccountSuspended, AuthUnavailable, KeyRevoked, Unauthorized
from proxy.tasks import cancel_requested
from shared import apikeys
from shared.apikeys import KeyRecord, KeyRecordError
from shared.redis_names import RedisNames

log = logging.getLogger("qnp.proxy.auth")

_BEARER = "Bearer "
_MAX_HEADER = 256  # far above a real key; anything longer is refused before parsing
_MAX_REJECTED = 8  # wrong secrets remembered per key, so guessing cannot burn bcrypt time


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None  # None: the key id is unknown to Redis
    expires_at: float
    verified: set[bytes] = field(default_factory=set)  # SHA-256 of secrets that matched
    rejected: set[bytes] = field(default_factory=set)


def bearer_token(header: str | None, x_api_key: str | None = None) -> str:
    """The presented key from ``Authorization: Bearer`` (or ``x-api-key``), or Unauthorized."""
    if header is not None:
        if len(header) > _MAX_HEADER or not header.startswith(_BEARER):
            raise Unauthorized()
        token = header[len(_BEARER):].strip()
    elif x_api_key is not None:
        token = x_api_key.strip()
    else:
        raise Unauthorized()
    if not token.isascii():
        raise Unauthorized()
    return token


class Authenticator:
    def __init__(
        self, redis: aioredis.Redis, names: RedisNames, *, ttl: float, max_entries: int
    ) -> None:
        self._redis = redis
        self._names = names
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[KeyRecord]] = {}

    async def authenticate(self, token: str) -> KeyRecord:
        """The active key record for a presented key, or Unauthorized / KeyRevoked."""
        try:
            parsed = apikeys.parse(token)
        except apikeys.MalformedKey:
            raise Unauthorized() from None
        digest = hashlib.sha256(parsed.secret.encode()).digest()
        entry = self._cache.get(parsed.key_id)
        if entry is not None and entry.expires_at > time.monotonic():
            if digest in entry.verified:
                return _active(entry.record)
            if entry.record is None or digest in entry.rejected:
                raise Unauthorized()
        # One verification per (key, secret) however many requests miss at once. It runs
        # as its own task so that one caller going away does not fail the others.
        flight_key = (parsed.key_id, digest)
        task = self._inflight.get(flight_key)
        if task is None:
            task = asyncio.ensure_future(self._load(parsed, digest))
            self._inflight[flight_key] = task
            task.add_done_callback(lambda t: self._landed(flight_key, t))
        try:
            return _active(await asyncio.shield(task))
        except AuthUnavailable:
            # Redis is unreachable: a key this process verified before, and that no
            # change message has evicted, keeps working until Redis answers again.
            if entry is not None and digest in entry.verified:
                return _active(entry.record)
            raise

    def _landed(self, flight_key: tuple[str, bytes], task: asyncio.Future[KeyRecord]) -> None:
        del self._inflight[flight_key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

    async def _load(self, parsed: apikeys.ParsedKey, digest: bytes) -> KeyRecord:
        try:
            raw = await self._redis.get(self._names.key_record(parsed.key_id))
        except RedisError as e:
            raise AuthUnavailable() from e
        record = None
        if raw is not None:
            try:
                record = KeyRecord.decode(raw)
            except KeyRecordError:
                log.error("malformed key record in Redis for key_id=%s", parsed.key_id)
        entry = self._cache.get(parsed.key_id)
        if entry is None or entry.record != record:
            entry = _Entry(record, time.monotonic() + self._ttl)
            self._store(parsed.key_id, entry)
        else:
            # Same record as before (same hash, same status): secrets it verified still
            # verify, so a refresh costs no bcrypt — no storm after a reconnect.
            entry.expires_at = time.monotonic() + self._ttl
        if record is None:
            raise Unauthorized()
        if digest in entry.verified:
            return record
        ok = await asyncio.to_thread(
            bcrypt.checkpw, parsed.secret.encode(), record.secret_hash.encode()
        )
        if not ok:
            if len(entry.rejected) < _MAX_REJECTED:
                entry.rejected.add(digest)
            raise Unauthorized()
        entry.verified.add(digest)
        return record

    def _store(self, key_id: str, entry: _Entry) -> None:
        self._cache.pop(key_id, None)
        if len(self._cache) >= self._max:
            # Drop the oldest tenth: dicts keep insertion order, so this is LRU-ish by load.
            for stale in list(self._cache)[: max(1, self._max // 10)]:
                del self._cache[stale]
        self._cache[key_id] = entry

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    def forget_all(self) -> None:
        """Mark every entry stale: re-read from Redis next time, but still usable as a
        fallback while Redis is unreachable (unlike ``forget``, which a change message
        triggers and which must never be served stale)."""
        for entry in self._cache.values():
            entry.expires_at = 0.0

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


def _active(record: KeyRecord | None) -> KeyRecord:
    if record is None:
        raise Unauthorized()
    if record.status == "suspended":
        raise AccountSuspended()
    if not record.active:
        raise KeyRevoked()
    return record
