"""Redis killed under steady load: no client error from the event path, the proxy
spools and replays, and Postgres ends with exactly one row per answered request."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from pathlib import Path

import aiohttp
import pytest

from control_plane.connections import open_pool, open_redis
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.chaos.conftest import OUTAGE_S, Load, OwnRedis, rows_for
from tests.control_plane.factories import make_settings
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(120 + 3 * OUTAGE_S)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_redis_killed_under_load_loses_and_doubles_nothing(
    tmp_path: Path, own_redis: OwnRedis, migrated_url: str, mock_upstream: MockOpenAIUpstream,
) -> None:
    import redis.asyncio as aioredis

    names = RedisNames(prefix=f"chaos{secrets.token_hex(4)}")
    account = str(uuid.uuid4())
    client = aioredis.Redis.from_url(own_redis.url)
    key, _ = await publish_key(client, names, account_id=account)
    await client.aclose()
    port, metrics_port = free_port(), free_port()
    env = proxy_env(own_redis.url, names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_METRICS_PORT=str(metrics_port),
                    QNP_SPOOL_DIR=str(tmp_path / "spool"),
                    QNP_DEGRADED_POLICY="allow")
    settings = make_settings(migrated_url, own_redis.url, names)
    pool = await open_pool(settings, min_size=1, max_size=2)
    rclient = open_redis(settings)
    consumer = Consumer(settings, pool, rclient, Metrics())
    ingest = asyncio.create_task(consumer.run())
    try:
        with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
            await wait_for_http(f"http://127.0.0.1:{port}/healthz", expect_status=200)
            load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", key)
            sending = asyncio.create_task(load.run())
            await asyncio.sleep(1.0)
            own_redis.kill()
            await asyncio.sleep(OUTAGE_S)
            own_redis.start()  # same port, same append-only file
            await asyncio.sleep(2.0)
            load.stop()
            await sending
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
            for _ in range(100):  # the replay has drained the spool
                if _metric(text, "qnp_events_in_spool") == 0:
                    break
                await asyncio.sleep(0.1)
                async with aiohttp.ClientSession() as s, \
                        s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    text = await r.text()
            assert proxy.stop() == 0
        rows, distinct, debits = await rows_for(migrated_url, account, load.answered)
    finally:
        consumer.stop()
        await asyncio.wait_for(ingest, 10)
        await rclient.aclose()
        await pool.close()

    assert load.errors == [], "client errors while Redis was down"
    assert load.answered > 0 and set(load.statuses) == {200}, load.statuses
    spooled = _metric(text, "qnp_events_spooled_total")
    assert spooled > 0, "nothing went through the spool: the outage missed the load"
    assert _metric(text, "qnp_events_replayed_total") == spooled
    assert _metric(text, "qnp_events_dropped_total") == 0
    assert (rows, distinct) == (load.answered, load.answered)  # exact: none lost, none doubled
    assert debits == rows  # every request here is billed, once
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").glob("*.spool"))


