"""A proxy stopped under load. SIGTERM drains: every answered request is stored once.
SIGKILL loses at most what ``proxy/emitter.py`` states: the events still in memory,
at most two batches (``QNP_EVENT_BATCH``: the one in flight and the next) while Redis
keeps up, as proxy/emitter.py states."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from control_plane.connections import open_pool, open_redis
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.chaos.conftest import Load, debit_count, stored_ids, wait_for
from tests.control_plane.factories import make_settings
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(120)

BATCH = 64  # QNP_EVENT_BATCH: the SIGKILL bound
FLUSH_MS = 50  # long enough that a SIGKILL finds events in memory


@pytest.fixture
async def ingest(migrated_url: str, redis_url: str, redis_names: RedisNames
                 ) -> AsyncIterator[None]:
    settings = make_settings(migrated_url, redis_url, redis_names)
    pool = await open_pool(settings, min_size=1, max_size=2)
    client = open_redis(settings)
    consumer = Consumer(settings, pool, client, Metrics())
    task = asyncio.create_task(consumer.run())
    yield
    consumer.stop()
    await asyncio.wait_for(task, 10)
    await client.aclose()
    await pool.close()


async def _run_and_stop(tmp_path: Path, redis_url: str, names: RedisNames, key: str,
                        upstream: MockOpenAIUpstream, sig: int) -> tuple[Load, int]:
    """Load a proxy, signal it mid-load; the load and the proxy's exit code."""
    port = free_port()
    env = proxy_env(redis_url, names, write_catalog(tmp_path, upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_SPOOL_DIR=str(tmp_path / "spool"),
                    QNP_EVENT_BATCH=str(BATCH), QNP_EVENT_FLUSH_MS=str(FLUSH_MS))
    with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", expect_status=200)
        load = Load(f"http://127.0.0.1:{port}/v1/chat/completions", key, interval=0.005)
        sending = asyncio.create_task(load.run())
        await asyncio.sleep(1.5)
        # Off the loop: the proxy drains while our clients keep sending.
        code = await asyncio.to_thread(proxy.stop, sig)
        load.stop()
        await sending
    return load, code


async def _stored_for(url: str, account: str, expected: int) -> list[str]:
    async def enough() -> bool:
        return len(await stored_ids(url, account)) >= expected
    await wait_for(enough, "every event is ingested")
    await asyncio.sleep(0.5)  # anything more than expected would show up now
    return await stored_ids(url, account)


async def test_sigterm_under_load_stores_every_answered_request_once(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream, ingest: None,
) -> None:
    account = str(uuid.uuid4())
    key, _ = await publish_key(redis, redis_names, account_id=account)

    load, code = await _run_and_stop(tmp_path, redis_url, redis_names, key, mock_upstream,
                                     signal.SIGTERM)

    assert code == 0
    assert load.answered > 100 and len(load.request_ids) == load.answered, load.statuses
    stored = await _stored_for(migrated_url, account, load.answered)
    assert len(stored) == load.answered  # exact: none lost, none doubled
    assert set(stored) == set(load.request_ids)
    assert await debit_count(migrated_url, account) == load.answered


async def test_sigkill_under_load_loses_at_most_two_batches(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream, ingest: None,
) -> None:
    account = str(uuid.uuid4())
    key, _ = await publish_key(redis, redis_names, account_id=account)

    load, code = await _run_and_stop(tmp_path, redis_url, redis_names, key, mock_upstream,
                                     signal.SIGKILL)

    assert code == -signal.SIGKILL
    assert load.answered > 100 and len(load.request_ids) == load.answered, load.statuses
    completed = set(load.request_ids)
    stored = await _stored_for(migrated_url, account, load.answered - 2 * BATCH)
    assert len(stored) == len(set(stored))  # none doubled
    lost = completed - set(stored)
    assert len(lost) <= 2 * BATCH, f"{len(lost)} answered requests lost, bound {2 * BATCH}"
    # Rows beyond the answered ones: requests cut off mid-response by the kill.
    assert len(set(stored) - completed) <= len(load.errors)
    assert await debit_count(migrated_url, account) == len(stored)
