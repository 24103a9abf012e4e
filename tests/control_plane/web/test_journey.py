"""The issue's journey: a new person signs in through the real OIDC provider over
HTTP, confirms 18+, creates a key through /api/v1/keys, calls the proxy (a real
process) with it through the official openai SDK, and reads that call back from
/api/v1/generation and /api/v1/activity with exactly the tokens and cost the mock
upstream reported."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import openai
import redis.asyncio as aioredis

from control_plane import ledger
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from devstack.upstream_openai import MockOpenAIUpstream
from tests.control_plane.web.conftest import Web, sign_in_new_user
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

HANG_GUARD_S = 30.0


async def test_sign_in_create_a_key_call_the_proxy_and_read_the_call_back(
    web: Web, pool: asyncpg.Pool, redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream,
    tmp_path: Path,
) -> None:
    me = await sign_in_new_user(web)
    headers = {**web.same_origin, "X-CSRF-Token": me["csrf_token"]}
    await ledger.credit(pool, redis, web.settings.names, me["account_id"], "topup",
                        5_000_000, None)
    r = await web.client.post("/api/v1/keys", json={"name": "sdk"}, headers=headers)
    assert r.status == 201, await r.text()
    key = (await r.json())["key"]

    port = free_port()
    env = proxy_env(web.settings.redis_url, web.settings.names,
                    write_catalog(tmp_path, mock_upstream.base_url), QNP_PROXY_PORT=str(port))
    consumer = Consumer(web.settings, pool, redis, Metrics())
    ingesting = asyncio.create_task(consumer.run())
    try:
        with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
            await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                                          max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="demo-mini", messages=[{"role": "user", "content": "Hello!"}])
            completion = raw.parse()
            request_id = raw.headers["x-request-id"]
            assert await asyncio.to_thread(proxy.stop) == 0
        generation = await _poll(web, f"/api/v1/generation?id={request_id}",
                                 {"Authorization": f"Bearer {key}"})
    finally:
        consumer.stop()
        await ingesting
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0
    expected_micros = -(-(usage.prompt_tokens * 150_000
                          + usage.completion_tokens * 600_000) // 1_000_000)
    assert (generation["tokens_prompt"], generation["tokens_completion"]) == (
        usage.prompt_tokens, usage.completion_tokens)
    assert generation["cost_micros"] == expected_micros
    assert generation["total_cost"] == expected_micros / 1_000_000
    assert generation["model"] == completion.model and generation["streamed"] is False

    activity = (await (await web.client.get("/api/v1/activity")).json())["data"]
    assert [(a["date"], a["requests"], a["prompt_tokens"], a["completion_tokens"],
             a["cost_micros"]) for a in activity] == [
        (datetime.now(UTC).date().isoformat(), 1, usage.prompt_tokens,
         usage.completion_tokens, expected_micros)]


async def _poll(web: Web, path: str, headers: dict[str, str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while True:
        r = await web.client.get(path, headers=headers)
        if r.status == 200:
            data: dict[str, Any] = (await r.json())["data"]
            return data
        assert r.status == 404 and loop.time() < deadline, await r.text()
        await asyncio.sleep(0.05)
