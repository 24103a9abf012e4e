"""``serve``: the roles one process runs (``roles``), composed over one set of stores,
plus the maintenance job, which every process runs whatever its roles.

The maintenance job runs every ``maintenance_interval_s``: it trims the event stream
below what every consumer group still needs (``trim``), and creates partitions ahead
and drops those past retention (``retention``), and counts the overdue privacy
requests for ``qnp_privacy_requests_overdue``, deletes billing records past 7 years and
purges deleted accounts past their grace (``privacy.purge``). Every step is safe to run
concurrently on every replica. SIGTERM or SIGINT, at any moment (start-up included), stops every
role within QNP_SHUTDOWN_GRACE whatever the stores are doing: listeners stop accepting
and let requests finish, ingest finishes its batch, what is still running is then
cancelled, and the stores are closed. Runs on uvloop. Expects migrations to have been
applied. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import uvloop
from redis.exceptions import RedisError

from control_plane import retention, roles
from control_plane.billing.gateway import StripeGateway
from control_plane.mail import outbox
from control_plane.metrics import Metrics
from control_plane.outages import POSTGRES, POSTGRES_ERRORS, REDIS, Outages
from control_plane.privacy import purge
from control_plane.privacy import requests as privacy_requests
from control_plane.runtime import Stores, open_stores
from control_plane.settings import Settings
from control_plane.trim import Trimmer

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def maintain_once(
    settings: Settings, pool: asyncpg.Pool, trimmer: Trimmer, metrics: Metrics,
    clock: Clock = _utc_now, outages: Outages | None = None,
    purger: purge.Purger | None = None,
) -> None:
    """One pass of the maintenance job; a store that is down skips its step. With a
    ``purger``, deleted accounts past their grace are purged (issue 14)."""
    outages = Outages() if outages is None else outages
    try:
        await trimmer.trim()
        outages.ok(REDIS)
    except (RedisError, OSError) as e:
        outages.failed(REDIS, e, "stream trim")
    try:
        async with pool.acquire() as conn:
            result = await retention.apply(conn, clock(), settings.retention_days)
            await outbox.prune(conn, clock(), settings.retention_days)  # mail (H12)
        await purge.expire_billing(pool, clock())  # billing kept 7 years (H17)
        if purger is not None:
            await purger.run(pool, clock())  # deleted accounts past their grace (H17)
        metrics.partitions_dropped.inc(len(result.dropped))
        metrics.privacy_overdue.set(await privacy_requests.overdue(pool, clock()))
        outages.ok(POSTGRES)
    except POSTGRES_ERRORS as e:
        outages.failed(POSTGRES, e, "retention")


async def maintain(stores: Stores, clock: Clock = _utc_now) -> None:
    settings = stores.settings
    trimmer = Trimmer(stores.redis, settings.names.event_streams(settings.event_shards),
                      stores.metrics)
    stripe = StripeGateway(settings.billing) if settings.billing.stripe_secret_key else None
    purger = purge.Purger(stores.redis, settings.names, stripe,
                          settings.names.event_streams(settings.event_shards))
    try:
        while True:
            try:
                await maintain_once(settings, stores.pool, trimmer, stores.metrics, clock,
                                    stores.outages, purger)
            except Exception:  # top of the task: a bug must not end maintenance
                log.exception("maintenance pass failed")
            await asyncio.sleep(settings.maintenance_interval_s)
    finally:
        if stripe is not None:
            await stripe.close()


async def _run_roles(settings: Settings, names: tuple[str, ...], stop: asyncio.Event,
                     serving: asyncio.Event) -> None:
    grace = settings.shutdown_grace_s
    async with open_stores(settings, close_within_s=grace) as stores:
        started: list[roles.Role] = []
        job = asyncio.create_task(maintain(stores), name="maintenance")
        try:
            for role in roles.build(names, stores):
                await role.start()
                started.append(role)
            log.info("serving roles=%s", ",".join(names))
            serving.set()
            await stop.wait()
            log.info("shutting down")
        finally:
            job.cancel()
            await asyncio.gather(*(role.stop(grace) for role in reversed(started)))
            with contextlib.suppress(asyncio.CancelledError):
                await job


async def serve(settings: Settings, names: tuple[str, ...] = roles.ALL_ROLES) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.Event()
    running = asyncio.create_task(_run_roles(settings, names, stop, serving), name="roles")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done() and not serving.is_set():
            # A signal during start-up (a store slow to answer): nothing to finish, cancel.
            running.cancel()
        try:
            await running
        except asyncio.CancelledError:
            if not running.cancelled():
                raise  # serve itself is being cancelled: the finally below stops the roles
            log.info("start-up cancelled")
    finally:
        stopping.cancel()
        if not running.done():  # serve was cancelled from outside: roles stop in order
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    log.info("control plane stopped")


def run(settings: Settings, names: tuple[str, ...] = roles.ALL_ROLES) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, names))
