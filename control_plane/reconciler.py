"""Keeping Redis filled: the task that notices Redis lost its data and refills it.

Every tick (~0.5 s) it checks the ``names.published`` sentinel. When it is missing
(first start, or Redis restarted empty or failed over to an empty replica) it
republishes every key record, rebuilds every account's state from the ledger, and sets
the sentinel again. Each tick also applies credits a crash or a Redis outage left
pending (see ``ledger``). Several replicas may refill at once harmlessly: a rebuild
only sets a balance where none exists. Never imports ``proxy``.
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
from control_plane.publisher import publish_all_states
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
STARTUP = "start-up"
_STORE_ERRORS = (RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                 TimeoutError)


class Reconciler:
    def __init__(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, metrics: Metrics,
        *, interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.pool, self.redis, self.names = pool, redis, names
        self.interval_s = interval_s
        self.refills = Counter(
            "qnp_redis_refills",
            "Times Redis was found without published state and refilled from Postgres.",
            registry=metrics.registry,
        )
        self._stopping = asyncio.Event()
        self._failing = False

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

    async def tick(self) -> None:
        if not await self.redis.exists(self.names.published):
            await self.refill("sentinel missing")
        await ledger.drain_pending(self.pool, self.redis, self.names)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
                if self._failing:
                    log.info("reconciler recovered")
                self._failing = False
            except _STORE_ERRORS as e:
                if not self._failing:  # one line per outage, not one per tick
                    log.warning("reconciler cannot reach a store: %s", type(e).__name__)
                self._failing = True
            except Exception:  # top of the task: log it, keep the task alive
                log.exception("reconciler tick failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except TimeoutError:
                pass
        log.info("reconciler stopped")

    def stop(self) -> None:
        self._stopping.set()
