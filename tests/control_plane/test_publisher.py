"""The reconciler: Redis restarted empty is refilled from Postgres without anyone asking."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis

from control_plane import accounts, keys, ledger
from control_plane.metrics import Metrics
from control_plane.reconciler import Reconciler
from control_plane.settings import Settings
from shared.apikeys import KeyRecord


async def test_a_flushed_prefix_is_refilled(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics
) -> None:
    names = settings.names
    a = str((await accounts.create_account(pool, rclient, names, "acme")).id)
    key_ids = [(await keys.issue_key(pool, rclient, names, a, bcrypt_rounds=4)).info.key_id
               for _ in range(2)]
    await keys.revoke_key(pool, rclient, names, key_ids[1])
    await ledger.credit(pool, rclient, names, a, "topup", 4_000_000)
    await rclient.hset(names.account_reservations(a), "in-flight", 250_000)
    before = {k: await rclient.get(names.key_record(k)) for k in key_ids}

    reconciler = Reconciler(pool, rclient, names, metrics, interval_s=0.02)
    task = asyncio.create_task(reconciler.run())
    try:
        for _ in range(500):  # the first tick publishes; a hang guard, not a threshold
            if await rclient.exists(names.published):
                break
            await asyncio.sleep(0.01)
        # Redis loses everything under the prefix except a request still in flight.
        doomed = [k async for k in rclient.scan_iter(match=f"{names.prefix}*")
                  if k != names.account_reservations(a).encode()]
        await rclient.delete(*doomed)
        refilled = False
        for _ in range(500):
            if await rclient.exists(names.published):
                refilled = True
                break
            await asyncio.sleep(0.01)
    finally:
        reconciler.stop()
        await task
    assert refilled
    after = {k: await rclient.get(names.key_record(k)) for k in key_ids}
    assert after == before
    assert KeyRecord.decode(after[key_ids[1]]).status == "revoked"
    state = await rclient.hgetall(names.account_state(a))
    assert state[b"bal"] == b"3750000" and state[b"status"] == b"active"
    # Start-up and the flush: each one a refill, counted.
    assert metrics.registry.get_sample_value("qnp_redis_refills_total") == 2
