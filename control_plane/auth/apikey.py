"""API keys calling the account API: ``Authorization: Bearer qnp_...``.

A malformed key or a bad checksum is refused with no lookup. A well-formed one is read
from Postgres and its secret checked with bcrypt off the event loop, once per
``CACHE_TTL_S``: after that the key id and a SHA-256 of the secret it was verified with
answer from memory, so a warm key costs neither bcrypt nor a query. A key's change
(revocation, disabling, expiry edits) is announced on ``names.key_changes`` and drops
it from the cache (``forget``). Never imports ``proxy`` or ``control_plane.web``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import bcrypt

from control_plane.errors import Unauthorized
from shared.apikeys import MalformedKey, parse

CACHE_TTL_S = 30.0
CACHE_MAX = 100_000
_REFUSED = Unauthorized("a valid API key is required")


@dataclass(frozen=True, slots=True)
class KeyCaller:
    key_id: str
    account_id: uuid.UUID
    management: bool


@dataclass(frozen=True, slots=True)
class _Entry:
    until: float
    digest: bytes
    caller: KeyCaller | None


class KeyAuth:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._cache: dict[str, _Entry] = {}
        # Concurrent first uses of one key share one bcrypt verification.
        self._inflight: dict[tuple[str, bytes], asyncio.Future[KeyCaller | None]] = {}
        self.verifications = 0  # bcrypt runs, for tests and benchmarks

    def forget(self, key_id: bytes | str) -> None:
        """Drop one key (a ``key_changes`` message), or all of them on ``*``."""
        text = key_id.decode() if isinstance(key_id, bytes) else key_id
        if text == "*":
            self._cache.clear()
        else:
            self._cache.pop(text, None)

    async def authenticate(self, presented: str) -> KeyCaller:
        try:
            parsed = parse(presented)
        except MalformedKey:
            raise _REFUSED from None
        digest = hashlib.sha256(parsed.secret.encode("ascii")).digest()
        hit = self._cache.get(parsed.key_id)
        if hit is not None and hit.until > time.monotonic() \
                and hmac.compare_digest(hit.digest, digest):
            if hit.caller is None:
                raise _REFUSED
            return hit.caller
        flight_key = (parsed.key_id, digest)
        pending = self._inflight.get(flight_key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[flight_key] = pending
            try:
                caller = await self._verify(parsed.key_id, parsed.secret, digest)
                pending.set_result(caller)
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except Exception as e:  # handed to the waiters; raised here too
                pending.set_exception(e)
                pending.exception()  # retrieved: no "never retrieved" log without waiters
                raise
            finally:
                del self._inflight[flight_key]
        else:
            caller = await asyncio.shield(pending)
        if caller is None:
            raise _REFUSED
        return caller

    async def _verify(self, key_id: str, secret: str, digest: bytes) -> KeyCaller | None:
        row = await self._pool.fetchrow(
            "SELECT k.account_id, k.secret_hash, k.kind, k.status, k.disabled, k.expires_at, "
            "a.status AS account_status FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            "WHERE k.key_id = $1", key_id)
        if row is None:
            return None  # unknown ids are not cached: they cost a query, never bcrypt
        self.verifications += 1
        ok = await asyncio.to_thread(bcrypt.checkpw, secret.encode("ascii"),
                                     row["secret_hash"].encode("ascii"))
        usable = ok and row["status"] == "active" and not row["disabled"] \
            and row["account_status"] == "active" \
            and (row["expires_at"] is None or row["expires_at"] > datetime.now(UTC))
        caller = KeyCaller(key_id, row["account_id"], row["kind"] == "management") \
            if usable else None
        if ok:  # a wrong secret is never cached: it must not evict the right one
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            ttl = CACHE_TTL_S
            if caller is not None and row["expires_at"] is not None:
                ttl = min(ttl, (row["expires_at"] - datetime.now(UTC)).total_seconds())
            self._cache[key_id] = _Entry(time.monotonic() + ttl, digest, caller)
        return caller
