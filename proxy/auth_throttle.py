"""The throttle on key verifications that may fail: failure budgets and a bcrypt gate.

A key id is public and a checksum is easy to compute, so a stranger can make the proxy
run bcrypt (~0.3 s of CPU at cost 12) once per forged secret. This module bounds that:

- A failure budget per scope (per key id, per client IP): a token bucket of
  ``per_minute`` tokens, refilled continuously. An attempt is charged when its bcrypt is
  about to start and refunded when the secret verifies, so concurrent forged attempts
  cannot overrun the budget (they are charged before any of them has failed) and a good
  secret never costs its key or its IP anything. Once a scope is empty, attempts in it
  are refused (429 with Retry-After) before any Redis read or bcrypt.
- A gate of ``max_concurrent`` bcrypt slots, so forged secrets cannot fill the thread
  pool. An attempt whose key id and IP have no failure or attempt pending ("clean", as
  a first-time legitimate key is) is let in ahead of every other waiter; the others
  queue, at most ``max_queued`` of them, and are refused beyond that.

The maps hold at most ``max_scopes`` buckets each (the oldest is dropped first; a
dropped bucket is a full one, so that errs towards letting attempts through), and a
bucket that refills to full is deleted. Verified keys are served from the key cache
before any of this runs, so forged attempts never delay them.

Pure asyncio; must not import Redis, bcrypt, the handlers or the emitter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from proxy.auth_errors import VerificationThrottled

# What ``on_throttled`` is called with: the scope whose budget ran out, or the queue.
KEY_ID = "key_id"
CLIENT_IP = "client_ip"
QUEUE = "queue"
_QUEUE_RETRY_S = 1.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class FailureBudget:
    """Token buckets, one per scope, of ``per_minute`` failures each."""

    def __init__(self, per_minute: int, *, max_scopes: int = 65_536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1 or max_scopes < 1:
            raise ValueError("a failure budget needs per_minute >= 1 and max_scopes >= 1")
        self._cap = float(per_minute)
        self._rate = per_minute / 60.0
        self._max = max_scopes
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, scope: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(scope)
        if bucket is not None:
            bucket.tokens = min(self._cap, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        return bucket

    def wait_s(self, scope: str) -> float:
        """Seconds until ``scope`` may be charged again (0: it may be now)."""
        bucket = self._level(scope, self._clock())
        if bucket is None or bucket.tokens >= 1.0:
            return 0.0
        return (1.0 - bucket.tokens) / self._rate

    def clean(self, scope: str) -> bool:
        """No failure and no pending attempt in the scope within its refill time."""
        bucket = self._level(scope, self._clock())
        return bucket is None or bucket.tokens >= self._cap

    def charge(self, scope: str) -> None:
        now = self._clock()
        bucket = self._level(scope, now)
        if bucket is None:
            if len(self._buckets) >= self._max:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[scope] = _Bucket(self._cap, now)
        bucket.tokens -= 1.0

    def refund(self, scope: str) -> None:
        bucket = self._level(scope, self._clock())
        if bucket is not None:
            bucket.tokens += 1.0
            if bucket.tokens >= self._cap:
                del self._buckets[scope]


class _Gate:
    """``slots`` concurrent holders; clean waiters are woken before the others."""

    def __init__(self, slots: int, max_queued: int) -> None:
        if slots < 1 or max_queued < 0:
            raise ValueError("a verification gate needs slots >= 1 and max_queued >= 0")
        self._free = slots
        self._max_queued = max_queued
        self._clean: deque[asyncio.Future[None]] = deque()
        self._others: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._clean) + len(self._others)

    def full_for(self, clean: bool) -> bool:
        """A suspect attempt that would have to wait finds the queue full."""
        return not clean and self._free == 0 and len(self._others) >= self._max_queued

    async def acquire(self, clean: bool) -> None:
        if self._free > 0:  # a released slot goes straight to a waiter, so none waits
            self._free -= 1
            return
        queue = self._clean if clean else self._others
        waiter = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            else:
                queue.remove(waiter)
            raise

    def release(self) -> None:
        for queue in (self._clean, self._others):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot passes straight to this waiter
                    return
        self._free += 1


class VerifyThrottle:
    """Failure budgets per key id and per client IP, and the gate for bcrypt work."""

    def __init__(
        self, *, per_key_per_minute: int = 10, per_ip_per_minute: int = 30,
        max_concurrent: int = 2, max_queued: int = 256, max_scopes: int = 65_536,
        on_throttled: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = FailureBudget(per_key_per_minute, max_scopes=max_scopes, clock=clock)
        self._ips = FailureBudget(per_ip_per_minute, max_scopes=max_scopes, clock=clock)
        self._gate = _Gate(max_concurrent, max_queued)
        self._on_throttled = on_throttled

    @property
    def waiting(self) -> int:
        """Attempts waiting for a bcrypt slot."""
        return self._gate.waiting

    def check(self, key_id: str, client_ip: str | None) -> None:
        """Raise VerificationThrottled if either scope's budget is spent (charges nothing)."""
        if client_ip is not None:
            wait = self._ips.wait_s(client_ip)
            if wait > 0.0:
                self._refuse(CLIENT_IP, wait)
        wait = self._keys.wait_s(key_id)
        if wait > 0.0:
            self._refuse(KEY_ID, wait)

    @asynccontextmanager
    async def verifying(self, key_id: str, client_ip: str | None) -> AsyncIterator[_Outcome]:
        """Hold a bcrypt slot, charged to both scopes; refunded if ``outcome.ok`` is set.

        Raises VerificationThrottled, before any wait, when a budget is spent or the
        queue is full.
        """
        self.check(key_id, client_ip)
        clean = self._keys.clean(key_id) and (client_ip is None or self._ips.clean(client_ip))
        if self._gate.full_for(clean):
            self._refuse(QUEUE, _QUEUE_RETRY_S)
        self._keys.charge(key_id)
        if client_ip is not None:
            self._ips.charge(client_ip)
        outcome = _Outcome()
        try:
            await self._gate.acquire(clean)
            try:
                yield outcome
            finally:
                self._gate.release()
        finally:
            if outcome.ok:
                self._keys.refund(key_id)
                if client_ip is not None:
                    self._ips.refund(client_ip)

    def _refuse(self, scope: str, wait_s: float) -> None:
        if self._on_throttled is not None:
            self._on_throttled(scope)
        raise VerificationThrottled(scope, wait_s)


@dataclass(slots=True)
class _Outcome:
    ok: bool = False
