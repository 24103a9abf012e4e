"""The end-to-end stack: proxy and control plane as real processes in front of mock
upstreams in every provider's wire format, plus the helpers that read what they kept
(rows in Postgres) and prove what they did not keep (canaries anywhere).
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack.mock_server import MockBehaviour
from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_gemini import MockGeminiUpstream
from devstack.upstream_openai import MockOpenAIUpstream, UpstreamBehaviour
from shared.redis_names import RedisNames
from tests.canary import found_in_postgres, found_in_redis
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

ADMIN_TOKEN = "admin-" + secrets.token_hex(8)
UPSTREAM_KEY = "sk-upstream-test"
IDLE_TIMEOUT = "0.5"  # QNP_READ_TIMEOUT: the stream idle timeout, shortened for tests
# A model whose first deployment (all but certainly tried first) answers 503.
FALLBACK_CATALOG = """
[providers.flaky]
base_url = "{flaky_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[models."ha-demo"]
prompt_price = 0.15
completion_price = 0.60
deployments = [{{ provider = "flaky", upstream_model = "x", weight = 1000000 }},
               {{ provider = "mock", upstream_model = "demo-mini-2024", weight = 1 }}]
"""


def _nothing() -> None:
    return None


@dataclass
class Stack:
    proxy_url: str
    admin_url: str
    logs: list[Path]
    names: RedisNames
    stop: Callable[[], None] = field(default=_nothing)  # SIGTERM both; logs are final after

    @property
    def root(self) -> str:
        return self.proxy_url.removesuffix("/v1")

    async def admin(self, method: str, path: str, json: object = None) -> dict[str, object]:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as s, s.request(method, self.admin_url + path, json=json) as resp:
            assert resp.status < 300, await resp.text()
            doc = await resp.json()
            assert isinstance(doc, dict)
            return doc


@pytest.fixture
async def mock_anthropic() -> AsyncIterator[MockAnthropicUpstream]:
    up = MockAnthropicUpstream(behaviour=MockBehaviour(api_key=UPSTREAM_KEY))
    async with up:
        yield up


@pytest.fixture
async def mock_gemini() -> AsyncIterator[MockGeminiUpstream]:
    up = MockGeminiUpstream(behaviour=MockBehaviour(api_key=UPSTREAM_KEY))
    async with up:
        yield up


@pytest.fixture
async def flaky() -> AsyncIterator[MockOpenAIUpstream]:
    """An OpenAI-format upstream that answers 503: the first deployment of ha-demo."""
    behaviour = UpstreamBehaviour(api_key=UPSTREAM_KEY, error_status=503)
    async with MockOpenAIUpstream(behaviour=behaviour) as up:
        yield up


@pytest.fixture
async def stack(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    mock_upstream: MockOpenAIUpstream, mock_anthropic: MockAnthropicUpstream,
    mock_gemini: MockGeminiUpstream, flaky: MockOpenAIUpstream,
) -> AsyncIterator[Stack]:
    proxy_port, admin_port = free_port(), free_port()
    catalog = write_catalog(tmp_path, mock_upstream.base_url, mock_anthropic.base_url,
                            mock_gemini.base_url,
                            FALLBACK_CATALOG.format(flaky_url=flaky.base_url))
    env = {
        **proxy_env(redis_url, redis_names, catalog, QNP_PROXY_PORT=str(proxy_port),
                    QNP_READ_TIMEOUT=IDLE_TIMEOUT),
        "DATABASE_URL": migrated_url,
        "QNP_ADMIN_TOKEN": ADMIN_TOKEN,
        "QNP_ADMIN_PORT": str(admin_port),
        "QNP_WEB_PORT": str(free_port()),
        "QNP_BCRYPT_ROUNDS": "4",
        "QNP_LOG_LEVEL": "DEBUG",  # the most any service would ever log
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run([sys.executable, "-m", "control_plane", "migrate"], env=env, check=True,
                   capture_output=True)
    cp_log, px_log = tmp_path / "control_plane.log", tmp_path / "proxy.log"
    with ModuleProcess("control_plane", ["serve"], log_path=cp_log, env=env) as cp, \
            ModuleProcess("proxy", log_path=px_log, env=env) as px:
        await wait_for_http(f"http://127.0.0.1:{admin_port}/healthz", expect_status=200)
        await wait_for_http(f"http://127.0.0.1:{proxy_port}/readyz", expect_status=200)

        def stop() -> None:
            # Stop both (SIGTERM) before the logs are read: shutdown logging counts too.
            assert px.stop() == 0 and cp.stop() == 0

        yield Stack(f"http://127.0.0.1:{proxy_port}/v1", f"http://127.0.0.1:{admin_port}",
                    [cp_log, px_log], redis_names, stop)
        stop()


async def _rows(migrated_url: str, account_id: str, expected: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(migrated_url)
    try:
        loop = asyncio.get_running_loop()
        # A hang guard, not a measurement: on a busy machine ingest may lag past the
        # spine's ~2 s (a 2 s cut-off once returned a short, shifted list).
        deadline = loop.time() + 30.0
        while True:
            rows = await conn.fetch(
                "SELECT * FROM usage_logs WHERE account_id = $1 ORDER BY received_at",
                account_id,
            )
            if len(rows) >= expected or loop.time() > deadline:
                return list(rows)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()



async def _assert_nowhere(canary: str, redis: aioredis.Redis, migrated_url: str,
                          stack: Stack) -> None:
    # Every key of every type in the database the services used; every row of every
    # table, partitions included, as text.
    assert await found_in_redis(redis, [canary]) == []
    conn = await asyncpg.connect(migrated_url)
    try:
        assert await found_in_postgres(conn, [canary]) == []
    finally:
        await conn.close()
    # Logs of both services (read after they stopped).
    for log in stack.logs:
        assert canary not in log.read_text(errors="replace"), f"canary found in {log.name}"


