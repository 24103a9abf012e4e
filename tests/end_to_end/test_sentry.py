"""Sentry from the real services: ``python -m proxy`` and ``python -m control_plane
serve`` started with SENTRY_DSN pointing at our sink (tests/sentry_sink.py), failing on
real paths while prompt, reply, API key and e-mail canaries ride in bodies, headers and
query strings. Each service's event arrives (so the test can fail), and no canary is in
any byte that reached the sink.

Failure paths: the proxy meets a key record whose hash is not bcrypt's (an ERROR log),
after an upstream that answered 500 (a WARNING: a breadcrumb) and a successful
completion whose reply is a canary; the control plane's web role loses a table under a
request authenticated by a canary key (an unhandled Postgres error).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from shared import apikeys
from shared.redis_names import RedisNames
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.sentry_canaries import EMAIL, PROMPT, REPLY, assert_no_canary
from tests.sentry_sink import SentrySink
from tests.support import ModuleProcess, free_port, wait_for_http

HANG_GUARD_S = 30.0
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def sink() -> AsyncIterator[SentrySink]:
    async with SentrySink() as s:
        yield s


def _messages(sink: SentrySink) -> list[str]:
    return [e.get("logentry", {}).get("message", "") for e in sink.events()]


async def test_proxy_reports_failures_to_sentry_without_content(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream, sink: SentrySink,
) -> None:
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), SENTRY_DSN=sink.dsn())
    good_key, _ = await publish_key(redis, redis_names)
    bad_key, record = await publish_key(redis, redis_names)
    await redis.set(redis_names.key_record(record.key_id),
                    replace(record, secret_hash="not-a-bcrypt-hash").encode())
    secrets = [good_key, bad_key, apikeys.parse(good_key).secret, apikeys.parse(bad_key).secret]
    mock_upstream.behaviour.reply = REPLY
    canaries = {"extra_headers": {"X-Note": f"{PROMPT} {EMAIL}"},
                "extra_query": {"q": PROMPT, "email": EMAIL},
                "extra_body": {"user": EMAIL}}
    with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
        base = f"http://127.0.0.1:{port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key=good_key, max_retries=0) as ok:
            done = await ok.chat.completions.create(model="demo-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                    **canaries)  # type: ignore[arg-type]
            assert REPLY in (done.choices[0].message.content or "")
            mock_upstream.behaviour.error_status = 500
            with pytest.raises(openai.APIStatusError):
                await ok.chat.completions.create(model="demo-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                 **canaries)  # type: ignore[arg-type]
            mock_upstream.behaviour.error_status = None
        async with openai.AsyncOpenAI(base_url=base, api_key=bad_key, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="demo-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                  **canaries)  # type: ignore[arg-type]
        await sink.wait_for(lambda s: any("bcrypt" in m for m in _messages(s)), HANG_GUARD_S)
        assert proc.stop() == 0
    [event] = [e for e in sink.events() if "bcrypt" in e.get("logentry", {}).get("message", "")]
    assert event["tags"] == {"service": "proxy"} and event["level"] == "error"
    crumbs = [c.get("message") for c in event.get("breadcrumbs", {}).get("values", [])]
    assert "upstream %s answered %d" in crumbs  # the template, never its arguments
    assert_no_canary(sink, PROMPT, REPLY, EMAIL, *secrets)


async def test_control_plane_reports_failures_to_sentry_without_content(
    tmp_path: Path, scratch_database_url: str, redis_url: str, redis_names: RedisNames,
    sink: SentrySink,
) -> None:
    web_port = free_port()
    env = {"DATABASE_URL": scratch_database_url, "REDIS_URL": redis_url,
           "QNP_REDIS_PREFIX": redis_names.prefix, "QNP_WEB_PORT": str(web_port),
           "QNP_PUBLIC_URL": f"http://127.0.0.1:{web_port}", "QNP_LOG_LEVEL": "DEBUG",
           "SENTRY_DSN": sink.dsn(), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "control_plane", "migrate"], env=env, check=True,
                   capture_output=True)
    key, parts = apikeys.generate()
    with ModuleProcess("control_plane", ["serve", "--role", "web"],
                       log_path=tmp_path / "control_plane.log", env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{web_port}/healthz", expect_status=200)
        conn = await asyncpg.connect(scratch_database_url)
        try:  # the failure: a table gone under the running service
            await conn.execute("DROP TABLE api_keys CASCADE")
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{web_port}/api/v1/keys", params={"q": PROMPT, "e": EMAIL},
                json={"name": PROMPT, "email": EMAIL, "note": REPLY},
                headers={"Authorization": f"Bearer {key}", "X-Note": EMAIL},
                cookies={"note": PROMPT}) as r:
            assert r.status == 500, await r.text()
        await sink.wait_for(lambda s: "web request failed" in _messages(s), HANG_GUARD_S)
        assert proc.stop() == 0
    [event] = [e for e in sink.events() if e["logentry"]["message"] == "web request failed"]
    assert event["tags"] == {"service": "control_plane"}
    assert [v["type"] for v in event["exception"]["values"]] == ["UndefinedTableError"]
    assert_no_canary(sink, PROMPT, REPLY, EMAIL, key, parts.secret)
