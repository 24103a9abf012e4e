"""Admission: one atomic Redis step per request for limits and credit, then settlement.

``admit`` runs ``admit.lua`` once: requests, tokens and concurrency per key and per
account over a sliding window, and a credit reservation (estimated prompt + max tokens,
priced by the catalog), held against the account's balance and, for a key with a credit
limit, against what the key may still spend in its period (402 ``key_limit_exceeded``
otherwise). Only such keys pass the two extra script keys and arguments, so a key
without a credit limit costs exactly what it did. ``count`` runs the same script in its
count-only mode for a request refused before admission (unknown model, bad body): it
takes its place in the request windows and reserves nothing, so refusals are not a free
way past ``rpm``; only refused requests pay that round trip. ``settle`` runs
``settle.lua`` after the response with what was really used, off the request's path.
Both scripts are idempotent and their keys share the account's hash tag, so they run
unchanged on Redis Cluster; redis-py's ``Script`` reloads them after a restart or
failover flushed the script cache.

When Redis is unreachable (or has lost the account's state), admission degrades by
policy (``QNP_DEGRADED_POLICY``): ``local`` (default) admits against this process's
share of ``QNP_DEGRADED_FRACTION`` (default half) of each limit (``local_limits.py``),
so a window that spans an outage admits at most 1.5 × the limit fleet-wide; ``allow``
admits everything; ``deny`` refuses with 503. Settlements that cannot reach Redis
wait in memory and are applied once it is back, so the live balance still ends equal
to the ledger. A probe notices Redis returning within ``probe_interval``.

Must not import the handlers, auth or the emitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from proxy import errors, resp
from proxy.local_limits import LocalLimiter
from proxy.tasks import cancel_requested
from shared.apikeys import KeyRecord
from shared.inflight import IN_FLIGHT_LIFETIME_MS
from shared.redis_names import RedisNames

log = logging.getLogger("qnp.proxy.admission")

_REDIS_DOWN = (RedisError, OSError, TimeoutError)
_MAX_PENDING_SETTLEMENTS = 100_000
_SETTLE_BATCH = 256
_WARN_EVERY = 60.0  # seconds between two warnings about one unpublished account
_SHAPES_MAX = 10_000  # keys whose packed script calls are kept
# A key's limit_reset → the period admit.lua holds its credit limit for.
_PERIODS = {None: "total", "daily": "day", "weekly": "week", "monthly": "month"}


def _script(name: str) -> str:
    return resources.files("proxy").joinpath(name).read_text("utf-8")


def _duration(ms: int) -> str:
    """OpenAI's x-ratelimit-reset-* style: 20ms, 1s, 6m0s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    s = -(-ms // 1000)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


@dataclass(frozen=True, slots=True)
class _Shape:
    """One key's script calls packed as RESP once: all but the per-request values."""

    admit_head: bytes  # EVALSHA admit, keys, mode 0
    count_head: bytes  # the same, mode 1 (count only)
    admit_mid: bytes  # key id, window, the key's limits
    admit_tail: bytes  # in-flight lifetime
    settle_head: bytes  # EVALSHA settle, keys, version 0
    key_id: bytes
    limited: bool  # the key has a credit limit: settle names the cost it reserved


@dataclass(slots=True)
class Ticket:
    """One admitted request: what was reserved, where, and the headers to return."""

    request_id: str
    account_id: str
    key_id: str
    tokens: int
    cost: int
    mode: str  # "redis" | "local" | "open"
    keys: list[str] = field(default_factory=list)  # the scripts' keys, named once
    shape: _Shape | None = None  # the same, packed (plain Redis, not Cluster)
    headers: dict[str, str] = field(default_factory=dict)
    local_scopes: list[str] = field(default_factory=list)
    limited: bool = False  # reserved against the key's credit limit: settle counts it


def _limit_args(key: KeyRecord) -> list[str | int]:
    """admit.lua's extra arguments for a key with a credit limit (none without)."""
    if key.credit_limit_micros is None:
        return []
    return [key.credit_limit_micros, _PERIODS[key.limit_reset]]


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    window_ms: int = 60_000
    in_flight_lifetime_ms: int = IN_FLIGHT_LIFETIME_MS
    settled_memory_ms: int = 60 * 60_000
    enabled: bool = True  # off only to measure what admission costs (benchmarks)
    policy: str = "local"  # local | allow | deny
    fleet_processes: int = 1
    # The fraction of each limit the whole fleet may admit from local limiters during
    # an outage: a window spanning one admits at most (1 + this) × the limit.
    degraded_fraction: float = 0.5
    probe_interval: float = 0.2


class Admission:
    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        names: RedisNames,
        config: AdmissionConfig,
        *,
        on_degraded: Callable[[bool], None] = lambda _d: None,
    ) -> None:
        self._redis = redis
        self._names = names
        self._cfg = config
        self._admit = redis.register_script(_script("admit.lua"))
        self._settle = redis.register_script(_script("settle.lua"))
        self._pipe = resp.Pipe.of(redis)
        self._shapes: dict[tuple[str, str, int, int, int, int | None, str | None],
                           _Shape] = {}
        self._local = LocalLimiter(
            window_s=config.window_ms / 1000,
            share=config.degraded_fraction / max(1, config.fleet_processes),
        )
        self._degraded = False
        self._on_degraded = on_degraded
        self._queue: deque[tuple[Ticket, int, int]] = deque()
        self._wake = asyncio.Event()
        self._warned: dict[str, float] = {}

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def admit(self, key: KeyRecord, request_id: str, tokens: int, cost: int) -> Ticket:
        """Reserve for one request, or raise RateLimited / InsufficientCredit / ...."""
        ticket = Ticket(request_id, key.account_id, key.key_id, tokens, cost, "redis")
        if not self._cfg.enabled:
            ticket.mode = "open"
            return ticket
        if not self._degraded:
            try:
                reply = await self._run_admit(ticket, key)
            except _REDIS_DOWN as e:
                self._degrade(f"admission failed ({type(e).__name__})")
            else:
                if reply[0] != 4:
                    return _decide(ticket, reply)
                self._warn_unpublished(key.account_id)
        return self._admit_degraded(ticket, key)

    async def count(self, key: KeyRecord, request_id: str) -> dict[str, str]:
        """Count a request refused before admission against the request limits.

        Returns the x-ratelimit-* headers, or raises RateLimited (the request was over
        the limit: 429 rather than its own refusal) or AccountSuspended. Nothing is
        reserved, so there is nothing to settle. While degraded it counts against the
        local limiter (``local``) or not at all (``allow``, ``deny``: the request is
        refused anyway).
        """
        ticket = Ticket(request_id, key.account_id, key.key_id, 0, 0, "redis")
        if not self._cfg.enabled:
            return ticket.headers
        if not self._degraded:
            try:
                reply = await self._run_admit(ticket, key, count_only=True)
            except _REDIS_DOWN as e:
                self._degrade(f"admission failed ({type(e).__name__})")
            else:
                if reply[0] != 4:
                    return _decide(ticket, reply).headers
                self._warn_unpublished(key.account_id)
        if self._cfg.policy == "local":  # requests only: a refusal holds no slot
            scopes = [f"a:{key.account_id}", f"k:{key.key_id}"]
            refusal = self._local.admit(
                time.monotonic(),
                [(scopes[0], 0, 0, 0), (scopes[1], key.limits.get("rpm", 0), 0, 0)], 0)
            if refusal is not None:
                raise errors.RateLimited(refusal.which, refusal.retry_after_ms, {})
            self._local.release(scopes)
        return ticket.headers

    async def _run_admit(self, ticket: Ticket, key: KeyRecord, *,
                         count_only: bool = False) -> list[object]:
        if self._pipe is None:  # Cluster: redis-py routes each call to its slot's node
            ticket.limited = key.credit_limit_micros is not None
            ticket.keys = self._names.admission_keys(key.account_id, key.key_id,
                                                     credit_limited=ticket.limited)
            reply: list[object] = await self._admit(keys=ticket.keys, args=[
                int(count_only), ticket.request_id, key.key_id, self._cfg.window_ms,
                key.limits.get("rpm", 0), key.limits.get("tpm", 0),
                key.limits.get("conc", 0), ticket.tokens, ticket.cost,
                self._cfg.in_flight_lifetime_ms, *_limit_args(key),
            ])
            return reply
        shape = ticket.shape = self._shape(key)
        ticket.limited = shape.limited
        head = shape.count_head if count_only else shape.admit_head
        packed = b"".join((head, resp.bulk(ticket.request_id), shape.admit_mid,
                           resp.bulk(ticket.tokens), resp.bulk(ticket.cost),
                           shape.admit_tail))
        try:
            reply = await self._pipe.call(packed)
        except NoScriptError:  # Redis restarted or failed over: load, then once more
            await self._redis.script_load(self._admit.script)
            reply = await self._pipe.call(packed)
        return reply

    def _shape(self, key: KeyRecord) -> _Shape:
        limits = (key.limits.get("rpm", 0), key.limits.get("tpm", 0),
                  key.limits.get("conc", 0))
        # The credit limit and its reset are part of the call: a changed limit is a new
        # shape (the key record changed, so this key's entry is looked up afresh).
        cache_key = (key.account_id, key.key_id, *limits, key.credit_limit_micros,
                     key.limit_reset)
        shape = self._shapes.get(cache_key)
        if shape is None:
            if len(self._shapes) >= _SHAPES_MAX:
                self._shapes.clear()
            limited = key.credit_limit_micros is not None
            keys = self._names.admission_keys(key.account_id, key.key_id,
                                              credit_limited=limited)
            extra = _limit_args(key)
            packed_keys = b"".join(resp.bulk(k) for k in keys)
            call = resp.bulk("EVALSHA")
            admit_len = resp.header(13 + len(keys) + len(extra))
            shape = self._shapes[cache_key] = _Shape(
                admit_head=b"".join((admit_len, call,
                                     resp.bulk(self._admit.sha), resp.bulk(len(keys)),
                                     packed_keys, resp.bulk(0))),
                count_head=b"".join((admit_len, call,
                                     resp.bulk(self._admit.sha), resp.bulk(len(keys)),
                                     packed_keys, resp.bulk(1))),
                admit_mid=b"".join(resp.bulk(v) for v in (
                    key.key_id, self._cfg.window_ms, *limits)),
                admit_tail=b"".join(resp.bulk(v) for v in (
                    self._cfg.in_flight_lifetime_ms, *extra)),
                settle_head=b"".join((resp.header(10 + len(keys) + int(limited)), call,
                                      resp.bulk(self._settle.sha), resp.bulk(len(keys)),
                                      packed_keys, resp.bulk(0))),
                key_id=resp.bulk(key.key_id),
                limited=limited,
            )
        return shape

    def _warn_unpublished(self, account_id: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(account_id, -_WARN_EVERY) >= _WARN_EVERY:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned[account_id] = now
            log.warning("no published state for account %s in Redis; admitting it under "
                        "the degraded policy until the control plane publishes it",
                        account_id)

    def _admit_degraded(self, ticket: Ticket, key: KeyRecord) -> Ticket:
        if self._cfg.policy == "deny":
            raise errors.AdmissionUnavailable()
        # Credit is not checked while degraded, but what a limited key spends still
        # counts against its limit once settled.
        ticket.limited = key.credit_limit_micros is not None
        if self._cfg.policy == "allow":
            ticket.mode = "open"
            return ticket
        ticket.mode = "local"
        account = f"a:{key.account_id}"
        keyscope = f"k:{key.key_id}"
        refusal = self._local.admit(
            time.monotonic(),
            [(account, 0, 0, 0),  # account limits live in Redis; the key's we carry
             (keyscope, key.limits.get("rpm", 0), key.limits.get("tpm", 0),
              key.limits.get("conc", 0))],
            ticket.tokens,
        )
        if refusal is not None:
            raise errors.RateLimited(refusal.which, refusal.retry_after_ms, {})
        ticket.local_scopes = [account, keyscope]
        return ticket

    def settle(self, ticket: Ticket, used_tokens: int, cost: int) -> None:
        """Queue the swap of reservation for real usage; never waits on Redis.

        The settlement task sends whatever is queued as one pipeline, so under load many
        requests share one round trip (each script stays atomic and idempotent).
        """
        if ticket.local_scopes:
            self._local.release(ticket.local_scopes)
        if ticket.mode == "open" and not self._cfg.enabled:
            return
        if len(self._queue) >= _MAX_PENDING_SETTLEMENTS:
            log.error("settlement queue full: dropping the oldest (its charge is lost)")
            self._queue.popleft()
        self._queue.append((ticket, used_tokens, cost))
        self._wake.set()

    async def run_settlements(self) -> None:
        """The settlement task: drains the queue whenever Redis is reachable."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self._queue and not self._degraded:
            batch = [self._queue.popleft()
                     for _ in range(min(len(self._queue), _SETTLE_BATCH))]
            try:
                await self._send(batch)
            except _REDIS_DOWN as e:
                self._queue.extendleft(reversed(batch))  # retried, oldest first
                if cancel_requested():
                    raise asyncio.CancelledError() from e
                self._degrade(f"settlement failed ({type(e).__name__})")
            except asyncio.CancelledError:
                # Shutting down mid-send: close() sends them again (settling is idempotent).
                self._queue.extendleft(reversed(batch))
                raise

    async def _send(self, batch: list[tuple[Ticket, int, int]]) -> None:
        if self._pipe is not None and all(t.shape is not None for t, _, _ in batch):
            memory = resp.bulk(self._cfg.settled_memory_ms)
            packed = [
                b"".join((t.shape.settle_head, resp.bulk(t.request_id), t.shape.key_id,
                          resp.bulk(t.tokens), resp.bulk(used), resp.bulk(cost), memory,
                          resp.bulk(t.cost) if t.limited else b""))
                for t, used, cost in batch if t.shape is not None
            ]
            try:
                await self._pipe.call_many(packed)
            except NoScriptError:  # idempotent: the whole batch again, script loaded
                await self._redis.script_load(self._settle.script)
                await self._pipe.call_many(packed)
            return
        calls: list[tuple[list[str], list[str | int]]] = [
            (t.keys or self._names.admission_keys(t.account_id, t.key_id,
                                                  credit_limited=t.limited),
             [0, t.request_id, t.key_id, t.tokens, used, cost, self._cfg.settled_memory_ms,
              *([t.cost] if t.limited else [])])
            for t, used, cost in batch
        ]
        if isinstance(self._redis, RedisCluster):
            # Accounts live in different slots: one call each, concurrently.
            await asyncio.gather(*(self._settle(keys=k, args=a) for k, a in calls))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await self._settle(keys=keys, args=args, client=pipe)
            await pipe.execute()

    def _degrade(self, why: str) -> None:
        if not self._degraded:
            log.error("Redis unreachable: %s; admission degraded to policy %r",
                      why, self._cfg.policy)
            self._degraded = True
            self._on_degraded(True)

    async def probe(self) -> None:
        """Watch Redis while degraded; resume normal admission once it answers."""
        while True:
            await asyncio.sleep(self._cfg.probe_interval)
            if not self._degraded:
                continue
            try:
                await self._redis.ping()
            except _REDIS_DOWN:
                if cancel_requested():
                    return
                continue
            self._degraded = False
            self._on_degraded(False)
            log.warning("Redis is back: normal admission resumed")
            self._wake.set()  # settlements queued meanwhile go now

    async def ready(self) -> bool:
        """True if the admission script runs (the readiness check exercises it)."""
        try:
            reply = await self._admit(
                keys=self._names.admission_keys("readyz", "readyz"),
                args=[0, "readyz", "readyz", 1, 0, 0, 0, 0, 0, 1],
            )
        except _REDIS_DOWN:
            return False
        return bool(reply[0] == 4)

    async def close(self, deadline: float) -> None:
        """Send the settlements still queued (after the settlement task has stopped)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                self._degraded = False
                while self._queue:
                    await self._flush()
                    if self._queue:
                        await asyncio.sleep(0.1)
        if self._queue:
            log.error("shutting down with %d unsettled requests", len(self._queue))


def _decide(ticket: Ticket, reply: list[object]) -> Ticket:
    code = reply[0]
    if code == 0:
        r_lim, r_left, r_reset, t_lim, t_left, t_reset = (int(str(v)) for v in reply[1:7])
        h = ticket.headers
        if r_lim > 0:
            h["x-ratelimit-limit-requests"] = str(r_lim)
            h["x-ratelimit-remaining-requests"] = str(max(r_left, 0))
            h["x-ratelimit-reset-requests"] = _duration(r_reset)
        if t_lim > 0:
            h["x-ratelimit-limit-tokens"] = str(t_lim)
            h["x-ratelimit-remaining-tokens"] = str(max(t_left, 0))
            h["x-ratelimit-reset-tokens"] = _duration(t_reset)
        return ticket
    if code == 1:
        which = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        wait = int(str(reply[2]))
        raise errors.RateLimited(which, wait, {f"x-ratelimit-reset-{which}": _duration(wait)})
    if code == 2:
        raise errors.InsufficientCredit()
    if code == 5:
        raise errors.KeyLimitExceeded()
    raise errors.AccountSuspended()
