"""Redis killed with ``kill -9`` and started again EMPTY under a steady trickle (issue 10,
finding 10): no valid request is refused with 401 while Redis is unfilled, and every
answered request is in Postgres exactly once.

Real processes: the control plane (ingest + reconciler), the proxy, a Redis of the
test's own. Two things make the outcome exact rather than lucky:

- Redis dies only once everything answered so far is ingested (the trickle pauses for
  that), so no stream entry is lost with the empty restart — that loss is real and
  documented (README, durability table) but is not what this test is about. Requests
  sent while Redis is down are spooled by the proxy and replayed into the new Redis.
- The control plane is paused (SIGSTOP) from the kill until the proxy has reconnected
  to the empty Redis (its key cache is then stale) and served a couple of seconds of
  the trickle against it; only then does it resume and refill. So the window in which
  the key record is missing and the ``published`` sentinel unset — where the proxy used
  to answer 401 — is certainly crossed, as a slow refill would make it.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.chaos.conftest import (
    OUTAGE_S,
    Load,
    OwnRedis,
    control_plane_env,
    debit_count,
    serve_control_plane,
    stored_ids,
    wait_for,
)
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(120 + 3 * OUTAGE_S)

TRICKLE_S = 0.05  # one request every 50 ms
OUTAGE = min(OUTAGE_S, 5.0)  # the 5 s; QNP_CHAOS_OUTAGE_S may shorten it
UNFILLED_REQUESTS = 40  # answered against the empty Redis before the refill may start
TOTAL = 300  # requests answered in all, as in the run


async def _admin(env: dict[str, str], method: str, path: str, body: dict[str, Any]
                 ) -> dict[str, Any]:
    url = f"http://127.0.0.1:{env['QNP_ADMIN_PORT']}{path}"
    headers = {"Authorization": f"Bearer {env['QNP_ADMIN_TOKEN']}"}
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body,
                                                       headers=headers) as r:
        assert r.status in (200, 201), await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def _funded_key(env: dict[str, str]) -> tuple[str, str]:
    account = await _admin(env, "POST", "/admin/accounts", {"name": "empty-restart"})
    await _admin(env, "POST", f"/admin/accounts/{account['id']}/credit",
                 {"amount_micros": 50_000_000})
    issued = await _admin(env, "POST", f"/admin/accounts/{account['id']}/keys", {"name": "k"})
    return str(account["id"]), str(issued["key"])


async def _spool_empty(metrics_port: int) -> bool:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        text = await r.text()
    match = re.search(r"^qnp_events_in_spool (\S+)$", text, re.MULTILINE)
    return match is not None and float(match.group(1)) == 0


async def _stored_at_least(database_url: str, account: str, n: int) -> bool:
    return len(await stored_ids(database_url, account)) >= n


async def test_redis_restarted_empty_refuses_no_valid_key_and_loses_nothing(
    tmp_path: Path, own_redis: OwnRedis, migrated_url: str, mock_upstream: MockOpenAIUpstream,
) -> None:
    names = RedisNames(prefix=f"chaos{secrets.token_hex(4)}")
    cp_env = control_plane_env(migrated_url, own_redis.url, names.prefix,
                               QNP_CONSUMER_NAME="ingest")
    port, metrics_port = free_port(), free_port()
    env = proxy_env(own_redis.url, names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_METRICS_PORT=str(metrics_port),
                    QNP_SPOOL_DIR=str(tmp_path / "spool"))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    watcher = aioredis.Redis.from_url(own_redis.url)
    cp = await serve_control_plane(cp_env, tmp_path / "control_plane.log")
    paused = False
    try:
        with cp, ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
            account, key = await _funded_key(cp_env)
            await wait_for_http(f"http://127.0.0.1:{port}/healthz", expect_status=200)

            before = Load(url, key, interval=TRICKLE_S)
            sending = asyncio.create_task(before.run())
            await asyncio.sleep(2.0)
            before.stop()
            await sending
            await wait_for(lambda: _stored_at_least(migrated_url, account, before.answered),
                           "the trickle so far is ingested")

            own_redis.kill()
            os.kill(cp.pid, signal.SIGSTOP)
            paused = True
            during = Load(url, key, interval=TRICKLE_S)
            sending = asyncio.create_task(during.run())
            await asyncio.sleep(OUTAGE)
            own_redis.wipe()
            own_redis.start()  # same port, no data

            async def resubscribed() -> bool:
                found = await watcher.pubsub_numsub(names.key_changes)
                return bool(found and found[0][1] >= 1)

            await wait_for(resubscribed, "the proxy reconnects to the empty Redis")
            mark = during.answered
            await wait_for(lambda: _true(during.answered >= mark + UNFILLED_REQUESTS),
                           "the trickle is served against the empty Redis")
            assert not await watcher.exists(names.published), "Redis was refilled early"
            unfilled_statuses = dict(during.statuses)

            os.kill(cp.pid, signal.SIGCONT)
            paused = False
            await wait_for(lambda: _exists(watcher, names.published), "the refill")
            await asyncio.sleep(1.0)  # the trickle goes on over the refilled Redis
            await wait_for(lambda: _true(before.answered + during.answered >= TOTAL),
                           f"{TOTAL} requests answered")
            during.stop()
            await sending
            # Before waiting on ingest: a refused request has no account, so it would
            # never be stored under this one.
            assert before.errors == [] and during.errors == [], (before.errors, during.errors)
            assert 401 not in unfilled_statuses and 401 not in during.statuses, \
                (unfilled_statuses, during.statuses)
            assert set(before.statuses) == {200} and set(during.statuses) == {200}, \
                (before.statuses, during.statuses)

            await wait_for(lambda: _spool_empty(metrics_port), "the proxy replays its spool")
            answered = before.answered + during.answered
            await wait_for(lambda: _stored_at_least(migrated_url, account, answered),
                           "ingest stores every answered request")
            await asyncio.sleep(0.5)  # anything more than expected would show up now
            assert proxy.stop() == 0 and cp.stop() == 0
    finally:
        if paused:
            os.kill(cp.pid, signal.SIGCONT)
        await watcher.aclose()

    stored = await stored_ids(migrated_url, account)
    ids = before.request_ids + during.request_ids
    assert len(stored) == answered == len(ids)  # exact: none lost, none doubled
    assert set(stored) == set(ids)
    assert await debit_count(migrated_url, account) == answered


async def _true(value: bool) -> bool:
    return value


async def _exists(client: aioredis.Redis, name: str) -> bool:
    return bool(await client.exists(name))
