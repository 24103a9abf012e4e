"""Keeping Redis filled: the task that notices Redis lost its data and refills it.

Every tick (~0.5 s) it checks the ``names.published`` sentinel. When it is missing
(first start, or Redis restarted empty or failed over to an empty replica) it
republishes every key record, rebuilds every account's state from the ledger, and sets
the sentinel again. Each tick also applies credits a crash or a Redis outage left
pending (see ``ledger``), and every ``sweep_interval_s`` (~30 s) the tick refunds the
reservations of requests no proxy will settle (see ``sweeper``). Several replicas may
refill and sweep at once harmlessly: a rebuild only sets a balance where none exists,
and a reservation is refunded at most once. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from control_plane import keys, ledger
from control_plane.metrics import Metrics
from control_plane.outages import POSTGRES, REDIS, Outages, store_of
from control_plane.publisher import publish_all_states
from control_plane.sweeper import DEFAULT_MAX_AGE_MS, ReservationSweeper, SweepResult
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
DEFAULT_SWEEP_INTERVAL_S = 30.0
STARTUP = "start-up"
_STORE_ERRORS = (RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                 TimeoutError)


class Reconciler:
    def __init__(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, metrics: Metrics,
        *, interval_s: float = DEFAULT_INTERVAL_S,
        sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
        reservation_max_age_ms: int = DEFAULT_MAX_AGE_MS,
        outages: Outages | None = None,
    ) -> None:
        self.outages = Outages() if outages is None else outages
        self.pool, self.redis, self.names = pool, redis, names
        self.interval_s = interval_s
        self.sweep_interval_s = sweep_interval_s
        self.sweeper = ReservationSweeper(redis, names, max_age_ms=reservation_max_age_ms)
        self.refills = Counter(
            "qnp_redis_refills",
            "Times Redis was found without published state and refilled from Postgres.",
            registry=metrics.registry,
        )
        self.swept = Counter(
            "qnp_reservations_swept",
            "Credit reservations refunded because no proxy settled them within the max age.",
            registry=metrics.registry,
        )
        self.swept_micros = Counter(
            "qnp_reservations_swept_micros",
            "Micro-dollars given back to live balances by the reservation sweep.",
            registry=metrics.registry,
        )
        self._stopping = asyncio.Event()
        self._next_sweep = 0.0  # loop time; the first tick sweeps

    async def refill(self, reason: str) -> None:
        """Publish every key record and account state, then set the sentinel."""
        n_keys = await keys.republish_all(self.pool, self.redis, self.names)
        n_accounts, rebuilt = await publish_all_states(self.pool, self.redis, self.names)
        await ledger.drain_pending(self.pool, self.redis, self.names)
        await self.redis.set(self.names.published, datetime.now(UTC).isoformat())
        self.refills.inc()
        log.log(
            logging.INFO if reason == STARTUP else logging.WARNING,
            "redis refilled reason=%s keys=%d accounts=%d balances_rebuilt=%d",
            reason, n_keys, n_accounts, rebuilt,
        )

    async def sweep(self) -> SweepResult:
        """Refund every account's reservations older than the max age; count and log it."""
        result = await self.sweeper.sweep(self.pool)
        if result.reservations:
            self.swept.inc(result.reservations)
            self.swept_micros.inc(result.micros)
            log.warning("reservation sweep refunded reservations=%d micros=%d accounts=%d",
                        result.reservations, result.micros, result.accounts)
        return result

    async def tick(self) -> None:
        if not await self.redis.exists(self.names.published):
            await self.refill("sentinel missing")
        await ledger.drain_pending(self.pool, self.redis, self.names)
        now = asyncio.get_running_loop().time()
        if now >= self._next_sweep:
            # Due again a full interval later even if this one fails: an outage is
            # already reported once by run(), and a sweep is never urgent.
            self._next_sweep = now + self.sweep_interval_s
            await self.sweep()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
                self.outages.ok(REDIS)
                self.outages.ok(POSTGRES)
            except _STORE_ERRORS as e:
                self.outages.failed(store_of(e), e, "reconcile")  # one line per outage
            except Exception:  # top of the task: log it, keep the task alive
                log.exception("reconciler tick failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except TimeoutError:
                pass
        log.info("reconciler stopped")

    def stop(self) -> None:
        self._stopping.set()
