"""The reservation sweep: credit held by a proxy that died before settling comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from importlib import resources

import asyncpg
import redis.asyncio as aioredis

from control_plane import ledger, roles
from control_plane.metrics import Metrics
from control_plane.reconciler import Reconciler
from control_plane.runtime import open_stores
from control_plane.settings import Settings
from control_plane.sweeper import ReservationSweeper
from shared.events import uuid7
from shared.redis_names import RedisNames

KEY_ID = "abcdefghijkl"
MINUTE_MS = 60_000
ADMIT_LUA = resources.files("proxy").joinpath("admit.lua").read_text("utf-8")
SETTLE_LUA = resources.files("proxy").joinpath("settle.lua").read_text("utf-8")


def uuid7_at(ms: int) -> str:
    """A UUIDv7 minted at ``ms`` (Unix milliseconds), laid out as ``uuid7()`` lays it."""
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | (0x7 << 76) | (0x2 << 62) | 0x1234_5678
    return str(uuid.UUID(int=value))


async def redis_now_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def reserve(redis: aioredis.Redis, names: RedisNames, account: str, request_id: str,
                  cost: int) -> None:
    """Admit one request with the proxy's own script (no limits: only credit is held)."""
    reply = await redis.eval(ADMIT_LUA, 10, *names.admission_keys(account, KEY_ID),
                             0, request_id, KEY_ID, MINUTE_MS, 0, 0, 0, 100, cost,
                             15 * MINUTE_MS)
    assert reply[0] == 0


async def settle(redis: aioredis.Redis, names: RedisNames, account: str, request_id: str,
                 cost: int) -> int:
    return int(await redis.eval(SETTLE_LUA, 10, *names.admission_keys(account, KEY_ID),
                                0, request_id, KEY_ID, 100, 80, cost, 60 * MINUTE_MS))


async def new_account(pool: asyncpg.Pool) -> str:
    account = uuid.uuid4()
    await pool.execute("INSERT INTO accounts (id, name) VALUES ($1, 'sweep')", account)
    return str(account)


async def test_an_abandoned_reservation_is_refunded_once_and_a_fresh_one_kept(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    names = settings.names
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)
    old = uuid7_at(await redis_now_ms(rclient) - 20 * MINUTE_MS)
    fresh = str(uuid7())
    await reserve(rclient, names, account_id, old, 300_000)
    await reserve(rclient, names, account_id, fresh, 200_000)
    state, resv = names.account_state(account_id), names.account_reservations(account_id)
    assert await rclient.hget(state, "bal") == b"500000"
    # An account never published: a reservation on record, but no balance to correct.
    idle = await new_account(pool)
    idle_resv = names.account_reservations(idle)
    await rclient.hset(idle_resv, old, 300_000)

    reconciler = Reconciler(pool, rclient, names, metrics)
    result = await reconciler.sweep()

    assert await rclient.hget(state, "bal") == b"800000"
    assert await rclient.hgetall(resv) == {fresh.encode(): b"200000"}
    assert (result.reservations, result.micros) == (1, 300_000)
    assert result.accounts >= 2
    assert not await rclient.exists(names.account_state(idle))
    assert await rclient.hgetall(idle_resv) == {old.encode(): b"300000"}
    sample = metrics.registry.get_sample_value
    assert sample("qnp_reservations_swept_total") == 1
    assert sample("qnp_reservations_swept_micros_total") == 300_000

    before = await rclient.hgetall(state)
    again = await reconciler.sweep()
    assert (again.reservations, again.micros) == (0, 0)
    assert await rclient.hgetall(state) == before
    assert await rclient.hgetall(resv) == {fresh.encode(): b"200000"}
    assert not await rclient.exists(names.account_state(idle))
    assert sample("qnp_reservations_swept_total") == 1


async def test_a_request_settling_after_the_sweep_is_charged_in_full(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    names = settings.names
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)
    slow = uuid7_at(await redis_now_ms(rclient) - 20 * MINUTE_MS)
    await reserve(rclient, names, account_id, slow, 300_000)

    await Reconciler(pool, rclient, names, metrics).sweep()
    # Still running after all: it settles with no reservation left, so it pays in full,
    # and the balance ends where the ledger (1,000,000 − 250,000) will.
    assert await settle(rclient, names, account_id, slow, 250_000) == 750_000
    assert await settle(rclient, names, account_id, slow, 250_000) == 750_000


async def test_only_uuid7_request_ids_are_dated(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    names = settings.names
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)
    resv = names.account_reservations(account_id)
    # A UUIDv4 whose leading digits would read as 1970, and a name that is no UUID.
    kept = {b"00000000-0000-4000-8000-000000000000": b"5", b"in-flight": b"7"}
    for field, held in kept.items():
        await rclient.hset(resv, field, held)
    await rclient.hset(resv, uuid7_at(1), 11)

    # One account per page: every page is visited, ours among them.
    result = await ReservationSweeper(rclient, names, batch=1).sweep(pool)

    assert (result.reservations, result.micros) == (1, 11)
    assert await rclient.hgetall(resv) == kept
    assert await rclient.hget(names.account_state(account_id), "bal") == b"1000011"


async def test_the_reconciler_tick_sweeps(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    names = settings.names
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)
    await reserve(rclient, names, account_id,
                  uuid7_at(await redis_now_ms(rclient) - 20 * MINUTE_MS), 300_000)

    await Reconciler(pool, rclient, names, metrics).tick()

    assert await rclient.hget(names.account_state(account_id), "bal") == b"1000000"
    assert not await rclient.exists(names.account_reservations(account_id))


async def test_the_sweep_age_and_interval_come_from_the_settings(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
) -> None:
    names = settings.names
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "QNP_REDIS_PREFIX": settings.redis_prefix, "QNP_SWEEP_MAX_AGE_S": "300",
           "QNP_SWEEP_INTERVAL_S": "0.2"}
    configured = dataclasses.replace(settings, **{
        f: getattr(Settings.from_env(env), f) for f in ("sweep_max_age_ms", "sweep_interval_s")})
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)
    now = await redis_now_ms(rclient)
    ten_minutes_old = uuid7_at(now - 10 * MINUTE_MS)  # kept by the 15-minute default
    await reserve(rclient, names, account_id, ten_minutes_old, 300_000)
    resv = names.account_reservations(account_id)

    # The ingest role runs the reconciler (and so the sweep) with the settings'.
    async with open_stores(configured) as stores:
        ingest = roles.Ingest(stores)
        await ingest.start()
        try:
            for _ in range(200):  # hang guard: the first tick sweeps
                if not await rclient.hexists(resv, ten_minutes_old):
                    break
                await asyncio.sleep(0.05)
        finally:
            await ingest.stop(5.0)
    assert not await rclient.hexists(resv, ten_minutes_old)
    assert await rclient.hget(names.account_state(account_id), "bal") == b"1000000"
