"""A Redis that lost its data (restarted empty, failed over to an empty replica, flushed)
must not turn good keys into 401s before the control plane has refilled it.

Until the reconciler's ``published`` sentinel is back, a missing key record is no
verdict: keys this process verified keep working, others get 503 with Retry-After;
once the sentinel is set a missing record is an unknown key again (401).
"""

from __future__ import annotations

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy import errors
from proxy.app import AUTH
from proxy.auth import Authenticator
from shared import apikeys
from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, publish_key
from tests.proxy.test_auth import Bcrypt

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}


async def lose_everything(redis: aioredis.Redis, names: RedisNames) -> None:
    """What an empty restart leaves under the prefix: nothing."""
    keys = [k async for k in redis.scan_iter(match=f"{names.prefix}*", count=500)]
    if keys:
        await redis.delete(*keys)


async def test_after_an_empty_restart_verified_keys_work_and_others_wait(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    auth = Authenticator(redis, redis_names, ttl=60.0, max_entries=100, checkpw=counted)
    key, record = await publish_key(redis, redis_names)
    assert await auth.authenticate(key) == record
    await lose_everything(redis, redis_names)
    auth.forget_all()  # what the key-change subscription does when it reconnects

    for _ in range(3):
        assert await auth.authenticate(key) == record  # served stale, not refused
    assert auth.cached(key) is None  # still stale: Redis is asked again next time
    unknown, _ = apikeys.generate()
    with pytest.raises(errors.AuthUnavailable) as unavailable:
        await auth.authenticate(unknown)
    assert unavailable.value.status == 503 and unavailable.value.headers["Retry-After"] == "1"

    # The refill has published some records but not yet the sentinel: those verify.
    newcomer, newcomer_rec = await publish_key(redis, redis_names)
    await redis.delete(redis_names.published)
    assert await auth.authenticate(newcomer) == newcomer_rec
    assert len(counted.calls) == 2

    # Refilled (the first key was deleted meanwhile): a missing record is a verdict.
    await redis.set(redis_names.published, "refilled")
    for gone in (unknown, key):
        with pytest.raises(errors.Unauthorized):
            await auth.authenticate(gone)


async def test_the_refilled_record_keeps_what_this_process_verified(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    auth = Authenticator(redis, redis_names, ttl=60.0, max_entries=100, checkpw=counted)
    key, record = await publish_key(redis, redis_names)
    assert await auth.authenticate(key) == record
    await lose_everything(redis, redis_names)
    auth.forget_all()
    assert await auth.authenticate(key) == record
    # The reconciler republishes the same record and sets the sentinel.
    await redis.set(redis_names.key_record(record.key_id), record.encode())
    await redis.set(redis_names.published, "refilled")
    assert await auth.authenticate(key) == record
    assert auth.cached(key) == record  # fresh again
    assert len(counted.calls) == 1  # no bcrypt storm after the refill


async def test_a_revocation_seen_before_the_loss_still_holds(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    auth = Authenticator(redis, redis_names, ttl=60.0, max_entries=100, checkpw=Bcrypt())
    key, record = await publish_key(redis, redis_names, status="revoked")
    with pytest.raises(errors.KeyRevoked):
        await auth.authenticate(key)
    await lose_everything(redis, redis_names)
    auth.forget_all()
    with pytest.raises(errors.KeyRevoked):
        await auth.authenticate(key)


async def test_a_gateway_on_an_emptied_redis_serves_its_keys_and_never_401s(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    key, _ = await publish_key(redis, redis_names)
    unknown, _ = apikeys.generate()
    url = f"{gateway.base_url}/chat/completions"

    async def post(s: aiohttp.ClientSession, k: str) -> tuple[int, str | None]:
        async with s.post(url, json=BODY, headers={"Authorization": f"Bearer {k}"}) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    async with aiohttp.ClientSession() as s:
        assert (await post(s, key))[0] == 200
        await lose_everything(redis, redis_names)  # key records, account state, sentinel
        gateway.running.app[AUTH].forget_all()
        # Auth serves the key it verified; admission finds no account state and admits
        # under the degraded policy instead of refusing.
        assert [(await post(s, key))[0] for _ in range(5)] == [200] * 5
        assert await post(s, unknown) == (503, "1")
        await redis.set(redis_names.published, "refilled")
        assert (await post(s, unknown))[0] == 401
