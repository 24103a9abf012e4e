"""Key authentication against a real Redis: the Authorization scheme, the sync cache
fast path, and forged-secret floods throttled per key id and per client IP while
verified keys are served from the cache without waiting.

bcrypt is the real one at cost 4 (as the fixtures hash), wrapped to count calls and,
where a test needs verifications to be in progress, to hold them until released.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import bcrypt
import openai
import pytest
import redis.asyncio as aioredis

from proxy import errors
from proxy.auth import Authenticator, bearer_token
from proxy.auth_errors import VerificationThrottled
from shared import apikeys
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, publish_key

ATTACKER = "203.0.113.66"
USER = "198.51.100.7"


class Bcrypt:
    """The real ``bcrypt.checkpw``, counted per secret, optionally held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[bytes] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self.started = threading.Semaphore(0)
        if not hold:
            self._open.set()

    def __call__(self, secret: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.calls.append(secret)
        self.started.release()
        assert self._open.wait(30), "hang guard: a held bcrypt was never released"
        return bool(bcrypt.checkpw(secret, hashed))

    def release(self) -> None:
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    async def wait_started(self, n: int) -> None:
        for _ in range(n):
            assert await asyncio.to_thread(self.started.acquire, True, 30), "hang guard"


def forged(key_id: str) -> str:
    """A well-formed key for ``key_id`` with a random secret and a valid checksum."""
    _, other = apikeys.generate()
    body = f"{apikeys.PREFIX}{key_id}_{other.secret}"
    return body + apikeys._checksum(body)


def auth(redis: aioredis.Redis, names: RedisNames, checkpw: Bcrypt, **kw: Any) -> Authenticator:
    return Authenticator(redis, names, ttl=60.0, max_entries=1000, checkpw=checkpw, **kw)


def now(coro: Coroutine[Any, Any, KeyRecord]) -> KeyRecord:
    """The coroutine's result if it completes without suspending once (no wait at all)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: KeyRecord = done.value
        return result
    coro.close()
    raise AssertionError("authenticate() waited")


async def outcomes(calls: list[Coroutine[Any, Any, KeyRecord]]) -> list[object]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(5000):  # hang guard, not a measurement
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("hang guard: condition never held")


# --- the Authorization header -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    key, _ = apikeys.generate()
    assert bearer_token(f"{scheme} {key}") == key


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearerqnp_x", "Token abc", "bearer"])
def test_other_schemes_are_refused(header: str) -> None:
    with pytest.raises(errors.Unauthorized):
        bearer_token(header)


# --- cached(): the sync fast path ---------------------------------------------------


async def test_cached_serves_only_what_the_cache_can_vouch_for(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    a = auth(redis, redis_names, counted)
    key, record = await publish_key(redis, redis_names)
    assert a.cached(key) is None  # miss: only authenticate can tell
    assert await a.authenticate(key) == record
    assert a.cached(key) == record and len(counted.calls) == 1  # no second bcrypt

    wrong = forged(record.key_id)
    assert a.cached(wrong) is None  # a secret not yet verified
    with pytest.raises(errors.Unauthorized):
        await a.authenticate(wrong)
    with pytest.raises(errors.Unauthorized):
        a.cached(wrong)  # rejected before: known from the cache

    with pytest.raises(errors.Unauthorized):
        a.cached(key[:-1] + ("A" if key[-1] != "A" else "B"))  # bad checksum
    for malformed in ("qnp_short", key + "x" * 1_000_000):
        with pytest.raises(errors.Unauthorized):
            a.cached(malformed)
        with pytest.raises(errors.Unauthorized):
            await a.authenticate(malformed)

    unknown, _ = apikeys.generate()
    with pytest.raises(errors.Unauthorized):
        await a.authenticate(unknown)
    with pytest.raises(errors.Unauthorized):
        a.cached(unknown)  # unknown id, remembered

    a.forget_all()
    assert a.cached(key) is None  # stale: authenticate must re-read it
    assert await a.authenticate(key) == record and len(counted.calls) == 2  # refreshed, no bcrypt
    a.forget_all()
    with pytest.raises(errors.Unauthorized):
        await a.authenticate(wrong)  # same record, so the same wrong secret: no bcrypt
    assert len(counted.calls) == 2


@pytest.mark.parametrize(("status", "error"), [("revoked", errors.KeyRevoked),
                                               ("suspended", errors.AccountSuspended)])
async def test_cached_refuses_a_verified_key_the_cache_knows_is_not_active(
    redis: aioredis.Redis, redis_names: RedisNames, status: str, error: type[Exception]
) -> None:
    a = auth(redis, redis_names, Bcrypt())
    key, _ = await publish_key(redis, redis_names, status=status)
    with pytest.raises(error):
        await a.authenticate(key)
    with pytest.raises(error):
        a.cached(key)


# --- forged-secret floods -------------------------------------------------------------


async def test_a_forged_secret_flood_on_one_key_id_is_throttled_before_bcrypt(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    refused: list[str] = []
    a = auth(redis, redis_names, counted, failures_per_key_per_minute=10,
             failures_per_ip_per_minute=1000, on_throttled=refused.append)
    key, record = await publish_key(redis, redis_names)
    assert await a.authenticate(key, USER) == record
    counted.calls.clear()

    # 200 attempts from 200 addresses, so only the key id's budget can hold them.
    results = await outcomes([a.authenticate(forged(record.key_id), f"10.0.{i // 250}.{i % 250}")
                              for i in range(200)])
    assert len(counted.calls) == 10  # the budget, charged before any of them failed
    assert sum(isinstance(r, errors.Unauthorized) for r in results) == 10
    throttled = [r for r in results if isinstance(r, VerificationThrottled)]
    assert len(throttled) == 190 and refused == ["key_id"] * 190
    for err in throttled:
        assert err.status == 429 and int(err.headers["Retry-After"]) >= 1
    assert len(counted.calls) == 10
    # The key's owner is served from the cache, at once and without bcrypt.
    assert now(a.authenticate(key, ATTACKER)) == record and a.cached(key) == record
    assert len(counted.calls) == 10


async def test_one_address_flooding_many_key_ids_is_throttled_per_address(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    refused: list[str] = []
    a = auth(redis, redis_names, counted, failures_per_key_per_minute=10,
             failures_per_ip_per_minute=5, on_throttled=refused.append)
    published = [await publish_key(redis, redis_names) for _ in range(30)]
    results = [await outcomes([a.authenticate(forged(rec.key_id), ATTACKER)])
               for _, rec in published]
    assert len(counted.calls) == 5
    assert [type(r) for [r] in results] == [errors.Unauthorized] * 5 + [VerificationThrottled] * 25
    assert refused == ["client_ip"] * 25
    # The same keys from their owners' address: verified, and a success costs no budget.
    for key, record in published:
        assert await a.authenticate(key, USER) == record
    assert len(counted.calls) == 5 + 30
    # A good key from the throttled address itself, once verified, is a cache hit.
    assert now(a.authenticate(published[0][0], ATTACKER)) == published[0][1]


async def test_a_verified_key_never_waits_while_forged_bcrypts_are_in_progress(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    held = Bcrypt(hold=True)
    a = auth(redis, redis_names, held, failures_per_key_per_minute=50,
             failures_per_ip_per_minute=50, max_concurrent_verifications=2)
    key, record = await publish_key(redis, redis_names)
    first = asyncio.ensure_future(a.authenticate(key, USER))
    await held.wait_started(1)
    held.release()
    assert await first == record
    held.hold()  # the next verifications hang until released
    flood = [asyncio.ensure_future(a.authenticate(forged(record.key_id), ATTACKER))
             for _ in range(40)]
    await held.wait_started(2)  # both slots busy, the rest queued
    await until(lambda: a.throttle.waiting == 38)
    for _ in range(100):
        assert now(a.authenticate(key, USER)) == record
    assert a.cached(key) == record and len(held.calls) == 3  # 1 good, 2 forged
    held.release()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, errors.Unauthorized) for r in results)
    assert len(held.calls) == 41


async def test_a_first_time_key_is_verified_ahead_of_queued_forgeries(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    held = Bcrypt(hold=True)
    refused: list[str] = []
    a = auth(redis, redis_names, held, failures_per_key_per_minute=100,
             failures_per_ip_per_minute=100, max_concurrent_verifications=1,
             max_queued_verifications=20, on_throttled=refused.append)
    victim, victim_rec = await publish_key(redis, redis_names)
    newcomer, newcomer_rec = await publish_key(redis, redis_names)
    forgeries = [forged(victim_rec.key_id) for _ in range(30)]
    flood = [asyncio.ensure_future(a.authenticate(f, ATTACKER)) for f in forgeries]
    await held.wait_started(1)  # one in bcrypt, 20 queued, 9 refused: the queue is full
    await until(lambda: a.throttle.waiting + len(refused) == 29)
    assert a.throttle.waiting == 20 and refused == ["queue"] * 9
    arriving = asyncio.ensure_future(a.authenticate(newcomer, USER))
    await until(lambda: a.throttle.waiting == 21)  # it reads the record, then waits
    held.release()
    assert await arriving == newcomer_rec
    await asyncio.gather(*flood, return_exceptions=True)
    # Second to reach bcrypt: right after the forgery already running, ahead of 20.
    newcomer_secret = apikeys.parse(newcomer).secret.encode()
    assert held.calls.index(newcomer_secret) == 1 and len(held.calls) == 22


async def test_budgets_refill_and_their_maps_stay_bounded() -> None:
    from proxy.auth_throttle import FailureBudget

    clock = [0.0]
    budget = FailureBudget(6, max_scopes=100, clock=lambda: clock[0])
    for _ in range(6):
        budget.charge("k")
    assert budget.wait_s("k") == pytest.approx(10.0)  # 6 a minute: one every 10 s
    clock[0] += 10.0
    assert budget.wait_s("k") == 0.0 and not budget.clean("k")
    for i in range(1000):
        budget.charge(f"ip-{i}")
    assert len(budget) == 100
    budget.refund("ip-999")
    assert len(budget) == 99  # full again: forgotten


async def test_unknown_key_ids_stay_401_and_charge_no_budget(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    a = auth(redis, redis_names, counted, failures_per_ip_per_minute=2)
    await publish_key(redis, redis_names)  # Redis is filled: unknown means unknown
    for _ in range(20):
        unknown, _parts = apikeys.generate()
        with pytest.raises(errors.Unauthorized) as refused:
            await a.authenticate(unknown, ATTACKER)
        assert not isinstance(refused.value, VerificationThrottled)
    assert counted.calls == []


async def test_made_up_key_ids_never_push_verified_keys_out_of_the_cache(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    counted = Bcrypt()
    a = Authenticator(redis, redis_names, ttl=60.0, max_entries=50, checkpw=counted)
    key, record = await publish_key(redis, redis_names)
    assert await a.authenticate(key) == record
    for _ in range(300):  # six times the cache's size of well-formed, unknown keys
        unknown, _parts = apikeys.generate()
        with pytest.raises(errors.Unauthorized):
            await a.authenticate(unknown, ATTACKER)
    with pytest.raises(errors.Unauthorized):
        a.cached(unknown)  # the latest unknown ones are still remembered
    assert a.cached(key) == record and len(counted.calls) == 1


async def test_a_gateway_answers_a_forged_flood_with_429_and_retry_after(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    key, record = await publish_key(redis, redis_names)
    url = f"{gateway.base_url}/chat/completions"
    body = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def post(s: aiohttp.ClientSession, k: str) -> tuple[int, str | None]:
        async with s.post(url, json=body, headers={"Authorization": f"bearer {k}"}) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    async with aiohttp.ClientSession() as s:
        assert (await post(s, key))[0] == 200  # lower-case scheme, verified and cached
        answers = [await post(s, forged(record.key_id)) for _ in range(30)]
        assert (await post(s, key))[0] == 200  # the owner is still served
    assert [status for status, _ in answers] == [401] * 10 + [429] * 20  # 10 a minute
    assert all(int(after or 0) >= 1 for _, after in answers[10:])
    events = await gateway.events(32)
    assert [e.outcome for e in events[11:31]] == ["rate_limited"] * 20


async def test_a_malformed_stored_hash_refuses_the_key_with_401_not_a_500(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    # A record whose hash bcrypt cannot read (a bad migration, a hand edit) must refuse
    # the key cleanly: bcrypt raises ValueError, which once reached the handler as a 500.
    key, record = await publish_key(redis, redis_names)
    broken = KeyRecord(key_id=record.key_id, account_id=record.account_id,
                       status="active", secret_hash="not-a-bcrypt-hash", limits={})
    await redis.set(redis_names.key_record(record.key_id), broken.encode())
    a = Authenticator(redis, redis_names, ttl=60.0, max_entries=1000)
    with pytest.raises(errors.Unauthorized):
        await a.authenticate(key)


# --- expiry ---------------------------------------------------------------------------


async def test_a_key_expiring_while_cached_is_refused_from_the_cache(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    a = auth(redis, redis_names, Bcrypt())
    expires = int(time.time()) + 2
    key, record = await publish_key(redis, redis_names, expires_at=expires)
    assert await a.authenticate(key) == record
    assert a.cached(key) == record  # verified and not yet expired: served from the cache
    for _ in range(100):  # until the wall clock passes expires_at (a hang guard)
        if time.time() > expires:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(errors.KeyExpired) as exc:
        a.cached(key)  # synchronous: the cache alone says so, no Redis read
    assert exc.value.status == 401 and exc.value.code == "key_expired"
    with pytest.raises(errors.KeyExpired):
        await a.authenticate(key)


async def test_an_expired_key_gets_401_key_expired_recorded_as_any_401(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    key, record = await publish_key(redis, redis_names, expires_at=int(time.time()) - 1)
    fresh, _ = await publish_key(redis, redis_names, expires_at=int(time.time()) + 3600)
    async with gateway.client(key) as client:
        with pytest.raises(openai.AuthenticationError) as exc:
            await client.chat.completions.create(
                model="demo-mini", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 401
    assert exc.value.code == "key_expired" and "expired" in exc.value.message
    async with gateway.client(fresh) as client:  # an expiry still ahead: served
        reply = await client.chat.completions.create(
            model="demo-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices
    events = await gateway.events(2)
    refused = [e for e in events if e.status == 401]
    assert len(refused) == 1
    assert refused[0].outcome == "unauthorized" and refused[0].error_code == "key_expired"


async def test_a_disabled_key_is_refused_as_disabled_not_as_a_suspended_account(
    redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    key, _ = await publish_key(redis, redis_names, status="disabled")
    a = Authenticator(redis, redis_names, ttl=60.0, max_entries=1000)
    with pytest.raises(errors.KeyDisabled) as refused:
        await a.authenticate(key)
    assert (refused.value.status, refused.value.code) == (401, "key_disabled")
    with pytest.raises(errors.KeyDisabled):
        a.cached(key)  # known from the cache now, without an await
