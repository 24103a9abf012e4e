"""Opening the control plane's Postgres pool and Redis client from Settings.

The one place that chooses pool sizes and timeouts. Callers own what they open and
close it (``pool.close()``, ``client.aclose()``). Never imports ``proxy``.
"""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from control_plane.settings import Settings

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0


async def open_pool(
    settings: Settings, *, min_size: int = 1, max_size: int = 10, init_size: int | None = None
) -> asyncpg.Pool:
    """A pool; with ``min_size=0`` (and no ``init_size``) nothing connects until the
    first use, and nothing re-dials in the background after an outage."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        init_size=min_size if init_size is None else init_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
    )
    return pool


def open_redis(settings: Settings) -> aioredis.Redis:
    """A client whose socket timeout outlasts the ingest BLOCK, so a blocked read is
    never mistaken for a dead connection."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=settings.ingest_block_ms / 1000 + CONNECT_TIMEOUT_S,
        health_check_interval=30,
    )
    return client
