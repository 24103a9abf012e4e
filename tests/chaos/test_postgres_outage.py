"""Postgres stopped while the proxy serves traffic: clients never notice, ingest backs
off and resumes once Postgres is back, and every answered request is stored once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from control_plane.migrate import migrate
from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.chaos.conftest import (
    OUTAGE_S,
    Load,
    OwnPostgres,
    control_plane_env,
    debit_count,
    metric,
    serve_control_plane,
    stored_ids,
    wait_for,
)
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(120 + 3 * OUTAGE_S)


async def test_postgres_stopped_under_load_ingest_resumes_exactly(
    tmp_path: Path, own_postgres: OwnPostgres, redis_url: str, redis_names: RedisNames,
    redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream,
) -> None:
    await migrate(own_postgres.url)
    account = str(uuid.uuid4())
    key, _ = await publish_key(redis, redis_names, account_id=account)
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_SPOOL_DIR=str(tmp_path / "spool"))
    cp_env = control_plane_env(own_postgres.url, redis_url, redis_names.prefix,
                               QNP_CONSUMER_NAME="ingest")
    with await serve_control_plane(cp_env, tmp_path / "control_plane.log") as cp, \
            ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", expect_status=200)
        load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", key)
        sending = asyncio.create_task(load.run())
        await asyncio.sleep(1.0)
        own_postgres.stop()
        await asyncio.sleep(OUTAGE_S)
        await own_postgres.start()  # same port, same data
        await asyncio.sleep(1.0)
        load.stop()
        await sending
        await wait_for(lambda: _stored(own_postgres.url, account, load.answered),
                       "ingest catches up after the outage", timeout=60 + OUTAGE_S)
        ingest_errors = await metric(cp_env, 'qnp_ingest_errors_total{store="postgres"}')
        await _settle(redis, redis_names)
        assert proxy.stop() == 0 and cp.stop() == 0

    assert load.errors == [] and set(load.statuses) == {200}, (load.errors, load.statuses)
    stored = await stored_ids(own_postgres.url, account)
    assert len(stored) == load.answered == len(load.request_ids)  # exact, none doubled
    assert set(stored) == set(load.request_ids)
    assert await debit_count(own_postgres.url, account) == load.answered
    assert ingest_errors > 0, "the outage never reached ingest"
    info = await redis.xpending(redis_names.events, redis_names.ingest_group)
    assert int(info["pending"]) == 0


async def _stored(database_url: str, account: str, n: int) -> bool:
    try:
        return len(await stored_ids(database_url, account)) >= n
    except OSError:
        return False


async def _settle(redis: aioredis.Redis, names: RedisNames) -> None:
    async def acked() -> bool:
        info = await redis.xpending(names.events, names.ingest_group)
        return int(info["pending"]) == 0
    await wait_for(acked, "every stored entry is acked")
