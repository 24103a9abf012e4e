"""``serve``: the admin API, the ingest consumer and the maintenance job in one process.

The maintenance job runs every ``maintenance_interval_s``: it trims the event stream
below what every consumer group still needs (``trim``), and creates partitions ahead
and drops those past retention (``retention``). Every replica runs it; both steps are
safe to run concurrently. SIGTERM or SIGINT stops accepting requests, lets the ingest
task finish its batch and closes the stores. Runs on uvloop. Expects migrations to have
been applied. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
import uvloop
from aiohttp import web
from redis.exceptions import RedisError

from control_plane import retention
from control_plane.admin_api import METRICS, POOL, REDIS, make_app
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from control_plane.tls import listener_context
from control_plane.trim import Trimmer

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def maintain_once(
    settings: Settings, pool: asyncpg.Pool, trimmer: Trimmer, metrics: Metrics,
    clock: Clock = _utc_now,
) -> None:
    """One pass of the maintenance job; a store that is down skips its step."""
    try:
        await trimmer.trim()
    except (RedisError, OSError) as e:
        log.warning("stream trim skipped: redis unavailable (%s)", type(e).__name__)
    try:
        async with pool.acquire() as conn:
            result = await retention.apply(conn, clock(), settings.retention_days)
        metrics.partitions_dropped.inc(len(result.dropped))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
        log.warning("retention skipped: postgres unavailable (%s)", type(e).__name__)


async def maintain(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis, metrics: Metrics,
    clock: Clock = _utc_now,
) -> None:
    trimmer = Trimmer(redis, settings.names.events, metrics)
    while True:
        try:
            await maintain_once(settings, pool, trimmer, metrics, clock)
        except Exception:  # top of the task: a bug must not end maintenance
            log.exception("maintenance pass failed")
        await asyncio.sleep(settings.maintenance_interval_s)


async def serve(settings: Settings) -> None:
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    job = asyncio.create_task(
        maintain(settings, app[POOL], app[REDIS], app[METRICS]), name="maintenance"
    )
    try:
        site = web.TCPSite(runner, settings.admin_host, settings.admin_port,
                           ssl_context=listener_context(settings.tls.admin))  # TLS (H8)
        await site.start()
        log.info("admin API listening host=%s port=%d", settings.admin_host, settings.admin_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        await runner.cleanup()


def run(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
