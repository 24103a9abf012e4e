"""What the roles of one process share: the Postgres pool, the Redis client, metrics and
the outage tracker, opened once at start-up and closed once, within a time bound.

At start-up it checks the schema is there and creates the days' partitions around
today. Closing never waits on a store that is gone longer than it is given: a pool
that does not close in time is terminated. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis

from control_plane.connections import open_pool, open_redis
from control_plane.errors import Unavailable
from control_plane.metrics import Metrics
from control_plane.outages import Outages
from control_plane.partitions import create_days, days_around
from control_plane.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stores:
    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    metrics: Metrics = field(default_factory=Metrics)
    outages: Outages = field(default_factory=Outages)


@asynccontextmanager
async def open_stores(settings: Settings, *, close_within_s: float = 10.0
                      ) -> AsyncIterator[Stores]:
    # No connection floor (min_size=0): asyncpg would otherwise re-dial Postgres in the
    # background during an outage and log a traceback at WARNING for every attempt.
    pool = await open_pool(settings, min_size=0, init_size=1)
    stores = Stores(settings, pool, open_redis(settings))
    try:
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('usage_logs')") is None:
                raise Unavailable("the schema is missing: run `python -m control_plane migrate`")
            await create_days(conn, days_around(datetime.now(UTC).date()))
        yield stores
    finally:
        await close_stores(stores, close_within_s)


async def close_stores(stores: Stores, within_s: float) -> None:
    await stores.redis.aclose()
    try:
        await asyncio.wait_for(stores.pool.close(), max(within_s, 0.1))
    except TimeoutError:
        log.warning("postgres pool did not close in time; connections terminated")
        stores.pool.terminate()
