"""Admission against a real Redis, and the same checks on a real 3-master Redis Cluster.

Limits are exact (sliding logs, one atomic script), reservations are settled to real
usage, credit never overdraws beyond what a request can cost past its reservation, and
the scripts survive a flushed script cache. On the cluster, any key outside the
account's hash tag would fail with CROSSSLOT, so passing there proves the tags.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from devstack.servers import start_redis
from proxy import errors
from proxy.admission import Admission, AdmissionConfig
from proxy.app import connect_redis
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames, spend_periods
from tests.chaos.cluster import start_cluster

Client = aioredis.Redis | RedisCluster


def _key(account: str, **limits: int) -> KeyRecord:
    return KeyRecord(uuid.uuid4().hex[:12], account, "active", "-", limits)


async def _account(client: Client, names: RedisNames, balance: int = 10**12,
                   **limits: int) -> str:
    account = str(uuid.uuid4())
    await client.hset(names.account_state(account),  # type: ignore[misc]
                      mapping={"bal": balance, "status": "active", **limits})
    return account


async def _admit_many(adm: Admission, key: KeyRecord, n: int, tokens: int = 10,
                      cost: int = 0) -> tuple[list[object], list[BaseException]]:
    results = await asyncio.gather(
        *(adm.admit(key, str(uuid.uuid4()), tokens, cost) for _ in range(n)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    return ok, refused


async def check_requests_per_window_are_exact(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig(window_ms=60_000))
    account = await _account(client, names)
    key = _key(account, rpm=25)
    # 200 at once, as if at a window boundary: exactly the limit gets through.
    ok, refused = await _admit_many(adm, key, 200)
    assert len(ok) == 25
    assert all(isinstance(e, errors.RateLimited) for e in refused)
    first = refused[0]
    assert isinstance(first, errors.RateLimited)
    retry_after = int(first.headers["Retry-After"])
    assert 1 <= retry_after <= 60  # until the oldest admitted request leaves the window
    # The account's own limit holds across its keys too.
    await client.hset(names.account_state(account), "rpm", 30)  # type: ignore[misc]
    other = _key(account, rpm=100)
    ok2, _ = await _admit_many(adm, other, 50)
    assert len(ok2) == 5  # 30 for the account, 25 already used by the first key


async def check_tokens_reserve_and_settle(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig(window_ms=60_000))
    account = await _account(client, names)
    key = _key(account, tpm=1000)
    first = await adm.admit(key, str(uuid.uuid4()), 600, 0)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(errors.RateLimited) as exc:
        await adm.admit(key, str(uuid.uuid4()), 600, 0)
    assert "tokens" in exc.value.message
    # The first request used only 100 of its 600: the rest is free again.
    adm.settle(first, 100, 0)
    await adm.close(5)
    second = await adm.admit(key, str(uuid.uuid4()), 600, 0)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"


async def check_concurrency_slots(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names, conc=2)
    key = _key(account)
    a = await adm.admit(key, str(uuid.uuid4()), 1, 0)
    await adm.admit(key, str(uuid.uuid4()), 1, 0)
    with pytest.raises(errors.RateLimited):
        await adm.admit(key, str(uuid.uuid4()), 1, 0)
    adm.settle(a, 1, 0)
    await adm.close(5)
    await adm.admit(key, str(uuid.uuid4()), 1, 0)


async def check_credit_never_overdraws(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names, balance=10_000)
    key = _key(account)
    ok, refused = await _admit_many(adm, key, 50, cost=1_000)
    assert len(ok) == 10
    assert all(isinstance(e, errors.InsufficientCredit) for e in refused)
    assert int(await client.hget(names.account_state(account), "bal")) == 0  # type: ignore[misc]
    for ticket in ok:
        adm.settle(ticket, 5, 300)  # each used 300 of the 1,000 it reserved
        adm.settle(ticket, 5, 300)  # a retried settlement charges nothing more
    await adm.close(5)
    assert int(await client.hget(names.account_state(account), "bal")) == 10_000 - 10 * 300  # type: ignore[misc]
    assert await client.hlen(names.account_reservations(account)) == 0  # type: ignore[misc]


async def check_suspended_account_is_refused(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names)
    await client.hset(names.account_state(account), "status", "suspended")  # type: ignore[misc]
    with pytest.raises(errors.AccountSuspended):
        await adm.admit(_key(account), str(uuid.uuid4()), 1, 0)


async def check_script_cache_flush_is_survived(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names)
    await adm.admit(_key(account), str(uuid.uuid4()), 1, 0)
    await client.script_flush()
    await adm.admit(_key(account), str(uuid.uuid4()), 1, 0)  # NOSCRIPT → reloaded
    assert await adm.ready()


async def check_counted_refusals_take_a_place_and_reserve_nothing(
    client: Client, names: RedisNames,
) -> None:
    adm = Admission(client, names, AdmissionConfig(window_ms=60_000))
    account = await _account(client, names, balance=5_000)
    key = _key(account, rpm=3, tpm=100, conc=1)
    held = await adm.admit(key, str(uuid.uuid4()), 100, 5_000)  # every slot and token
    # Refusals hold no concurrency slot, tokens or credit: counted all the same.
    headers = await adm.count(key, str(uuid.uuid4()))
    assert headers["x-ratelimit-remaining-requests"] == "1"
    await adm.count(key, str(uuid.uuid4()))
    with pytest.raises(errors.RateLimited) as exc:  # 1 admitted + 2 refused + this: full
        await adm.count(key, str(uuid.uuid4()))
    assert "requests" in exc.value.message and "Retry-After" in exc.value.headers
    adm.settle(held, 10, 100)
    await adm.close(5)
    with pytest.raises(errors.RateLimited):  # a real request finds the window full too
        await adm.admit(key, str(uuid.uuid4()), 1, 0)
    assert int(await client.hget(names.account_state(account), "bal")) == 4_900  # type: ignore[misc]
    assert await client.hlen(names.account_reservations(account)) == 0  # type: ignore[misc]


def _limited(account: str, limit: int, reset: str | None = "daily", **limits: int) -> KeyRecord:
    return KeyRecord(uuid.uuid4().hex[:12], account, "active", "-", limits,
                     credit_limit_micros=limit, limit_reset=reset)


async def _spend(client: Client, names: RedisNames, key: KeyRecord) -> dict[str, int]:
    raw = await client.hgetall(names.key_spend(key.account_id, key.key_id))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


async def _redis_periods(client: Client) -> dict[str, int]:
    seconds, _ = await client.time()  # the scripts' clock, not this host's
    return spend_periods(int(seconds))


async def check_a_key_credit_limit_admits_exactly_what_it_allows(
    client: Client, names: RedisNames,
) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names, balance=10**9)
    key = _limited(account, 10_000)
    ok, refused = await _admit_many(adm, key, 50, cost=1_000)
    assert len(ok) == 10
    assert all(isinstance(e, errors.KeyLimitExceeded) for e in refused)
    assert refused[0].status == 402 and refused[0].code == "key_limit_exceeded"  # type: ignore[attr-defined]
    # A request refused before admission is still counted, never refused for credit.
    assert await adm.count(key, str(uuid.uuid4())) == {}
    # The account's balance lost only what the key was allowed to reserve.
    assert int(await client.hget(names.account_state(account), "bal")) == 10**9 - 10_000  # type: ignore[misc]
    for ticket in ok:
        adm.settle(ticket, 5, 300)  # each really cost 300 of the 1,000 it held
        adm.settle(ticket, 5, 300)  # a retried settlement counts nothing more
    await adm.close(5)
    spend = await _spend(client, names, key)
    periods = await _redis_periods(client)
    assert (spend["day"], spend["week"], spend["month"]) == (
        periods["daily"], periods["weekly"], periods["monthly"])
    assert spend["held"] == 0
    assert spend["spent_day"] == spend["spent_week"] == spend["spent_month"] == 3_000
    assert spend["spent_total"] == 3_000
    # 7,000 of the limit is left: exactly seven more requests of 1,000 fit.
    ok2, refused2 = await _admit_many(adm, key, 20, cost=1_000)
    assert len(ok2) == 7 and len(refused2) == 13
    # Another key of the account has no limit of its own: the first key's is not its.
    assert len((await _admit_many(adm, _key(account), 20, cost=1_000))[0]) == 20


async def check_changing_a_key_limit_keeps_what_it_spent(
    client: Client, names: RedisNames,
) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names)
    key = _limited(account, 5_000, "daily")
    adm.settle(await adm.admit(key, str(uuid.uuid4()), 10, 4_000), 10, 3_000)
    await adm.close(5)
    raised = replace(key, credit_limit_micros=6_000)  # the control plane raised it
    with pytest.raises(errors.KeyLimitExceeded):
        await adm.admit(raised, str(uuid.uuid4()), 10, 3_001)
    await adm.admit(raised, str(uuid.uuid4()), 10, 3_000)  # 6,000 - 3,000 spent: fits
    # A monthly reset instead of a daily one: the month's spend is kept as well.
    monthly = replace(key, credit_limit_micros=9_000, limit_reset="monthly")
    with pytest.raises(errors.KeyLimitExceeded):  # 3,000 spent + 3,000 held
        await adm.admit(monthly, str(uuid.uuid4()), 10, 3_001)
    lifetime = replace(key, credit_limit_micros=6_000, limit_reset=None)
    with pytest.raises(errors.KeyLimitExceeded):
        await adm.admit(lifetime, str(uuid.uuid4()), 10, 1)


async def check_a_period_that_ended_starts_from_zero(client: Client, names: RedisNames) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = await _account(client, names)
    key = _limited(account, 1_000, "daily")
    p = await _redis_periods(client)
    # Yesterday's day, last week and last month all spent to the limit.
    await client.hset(names.key_spend(account, key.key_id), mapping={  # type: ignore[misc]
        "day": p["daily"] - 1, "week": p["weekly"] - 1, "month": p["monthly"] - 1,
        "spent_day": 1_000, "spent_week": 1_000, "spent_month": 1_000,
        "spent_total": 1_000, "held": 0})
    for reset in ("daily", "weekly", "monthly"):
        await adm.admit(replace(key, limit_reset=reset), str(uuid.uuid4()), 1, 300)
    with pytest.raises(errors.KeyLimitExceeded):  # the lifetime cap never resets
        await adm.admit(replace(key, limit_reset=None), str(uuid.uuid4()), 1, 1)
    spend = await _spend(client, names, key)
    assert spend["day"] == p["daily"] and spend["spent_day"] == 0 and spend["held"] == 900
    assert spend["spent_total"] == 1_000


async def check_a_hold_never_settled_frees_itself(client: Client, names: RedisNames) -> None:
    # A proxy that died mid-request never settles: its hold lapses with its slot.
    adm = Admission(client, names, AdmissionConfig(in_flight_lifetime_ms=300))
    account = await _account(client, names)
    key = _limited(account, 1_000, None)
    await adm.admit(key, str(uuid.uuid4()), 1, 1_000)
    with pytest.raises(errors.KeyLimitExceeded):
        await adm.admit(key, str(uuid.uuid4()), 1, 1)
    for _ in range(100):  # until the hold has lapsed (a hang guard, not a measurement)
        await asyncio.sleep(0.05)
        try:
            await adm.admit(key, str(uuid.uuid4()), 1, 1_000)
            break
        except errors.KeyLimitExceeded:
            continue
    else:
        raise AssertionError("the hold never lapsed")
    assert (await _spend(client, names, key))["held"] == 1_000


async def check_spend_admitted_without_redis_state_still_counts(
    client: Client, names: RedisNames,
) -> None:
    adm = Admission(client, names, AdmissionConfig())
    account = str(uuid.uuid4())  # its state not published yet: admitted locally
    key = _limited(account, 1_000, "weekly")
    ticket = await adm.admit(key, str(uuid.uuid4()), 1, 900)
    assert ticket.mode == "local"
    adm.settle(ticket, 1, 700)
    await adm.close(5)
    spend = await _spend(client, names, key)
    assert spend["spent_week"] == spend["spent_total"] == 700 and spend["held"] == 0
    await client.hset(names.account_state(account),  # type: ignore[misc]
                      mapping={"bal": 10**9, "status": "active"})
    with pytest.raises(errors.KeyLimitExceeded):  # 700 of 1,000 already spent
        await adm.admit(key, str(uuid.uuid4()), 1, 301)
    await adm.admit(key, str(uuid.uuid4()), 1, 300)


CHECKS = [
    check_a_key_credit_limit_admits_exactly_what_it_allows,
    check_spend_admitted_without_redis_state_still_counts,
    check_changing_a_key_limit_keeps_what_it_spent,
    check_a_period_that_ended_starts_from_zero,
    check_a_hold_never_settled_frees_itself,
    check_counted_refusals_take_a_place_and_reserve_nothing,
    check_requests_per_window_are_exact,
    check_tokens_reserve_and_settle,
    check_concurrency_slots,
    check_credit_never_overdraws,
    check_suspended_account_is_refused,
    check_script_cache_flush_is_survived,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_admission_on_redis(check: object, redis_url: str,
                                  redis_names: RedisNames) -> None:
    client = connect_redis(redis_url)  # the proxy's own client and pool
    try:
        await check(client, redis_names)  # type: ignore[operator]
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[RedisCluster]:
    """A real 3-master cluster from the same pip-installed server binary."""
    async with start_cluster() as client:
        yield client


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_admission_on_redis_cluster(check: object, cluster: RedisCluster) -> None:
    await check(cluster, RedisNames(f"qnpcluster{uuid.uuid4().hex[:6]}"))  # type: ignore[operator]


async def test_missing_state_or_dead_redis_degrades_to_local_share(
    redis_names: RedisNames,
) -> None:
    server = start_redis()
    client = connect_redis(server.url)
    flags: list[bool] = []
    adm = Admission(client, redis_names,
                    AdmissionConfig(window_ms=60_000, fleet_processes=4, probe_interval=0.05),
                    on_degraded=flags.append)
    probe = asyncio.create_task(adm.probe())
    try:
        # No state published for this account: admitted under the local policy.
        ticket = await adm.admit(_key("nobody-published-me", rpm=40), "r0", 1, 5)
        assert ticket.mode == "local"
        server.stop()  # Redis gone: nothing fails, the share of the limit holds.
        key = _key(str(uuid.uuid4()), rpm=40)
        ok, refused = await _admit_many(adm, key, 30)
        assert adm.degraded and flags == [True]
        assert len(ok) == 5  # an eighth of 40: half the limit, shared by four processes
        assert all(isinstance(e, errors.RateLimited) for e in refused)
    finally:
        probe.cancel()
        await client.aclose()
        server.stop()


def test_scripts_never_hand_redis_a_negative_zero() -> None:
    """Lua's ``-x`` with x = 0 is -0, sent as "-0", which Redis 7.0 refuses as an integer
    (Valkey accepts it, so only a run against Redis 7 would show it): use ``0 - x``."""
    scripts = Path(__import__("proxy").__file__).parent.glob("*.lua")
    negated = [
        f"{path.name}: {line.strip()}"
        for path in scripts
        for line in path.read_text().splitlines()
        if re.search(r"redis\.call\('HINCRBY'[^)]*,\s*-[A-Za-z_(]", line)
    ]
    assert negated == []


def _lua_periods(script: str) -> str:
    source = (Path(__import__("proxy").__file__).parent / script).read_text()
    start = source.index("local function periods(")
    return source[start:source.index("\n  end\n", start) + 7]


@pytest.mark.parametrize("script", ["admit.lua", "settle.lua"])
async def test_the_scripts_number_periods_as_the_control_plane_does(
    redis_url: str, script: str
) -> None:
    """Every third day from 1999 to 2101, at its first and last second (leap years,
    December into January, Sundays into Mondays): admit.lua's UTC periods are
    ``spend_periods``'s, which the control plane uses to read a key's spend."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        lua = _lua_periods(script) + """
local out = {}
for i = 1, #ARGV do
  local d, w, m = periods(tonumber(ARGV[i]))
  out[#out + 1] = d; out[#out + 1] = w; out[#out + 1] = m
end
return out"""
        stamps = [s + off for s in range(915_148_800, 4_133_980_800, 86_400 * 3)
                  for off in (0, 86_399)]
        got = await client.eval(lua, 0, *stamps)
        want = [v for s in stamps for v in spend_periods(s).values()]
        assert got == want
        # 2026-11-30 is a Monday, 2026-11-29 a Sunday: weeks start on Monday.
        monday, sunday = spend_periods(1_795_996_800), spend_periods(1_795_996_799)
        assert monday["weekly"] == sunday["weekly"] + 1 and monday["daily"] == sunday["daily"] + 1
        assert spend_periods(1_795_996_800 + 6 * 86_400 + 86_399)["weekly"] == monday["weekly"]
    finally:
        await client.aclose()
