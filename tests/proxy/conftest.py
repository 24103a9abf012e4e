"""Fixtures for proxy tests: a real proxy on 127.0.0.1 in front of the mock upstream.

Keys are published to Redis in the control plane's record format (shared.apikeys),
exactly as the control plane does; the end-to-end tests use the control plane itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import bcrypt
import openai
import pytest
import redis.asyncio as aioredis

from devstack.mock_server import MockBehaviour
from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_gemini import MockGeminiUpstream
from devstack.upstream_openai import MockOpenAIUpstream
from proxy import server
from proxy.app import SETTINGS, WATCHING
from proxy.settings import Settings, load
from shared import apikeys
from shared.apikeys import KeyRecord
from shared.events import STREAM_FIELD, Event, decode
from shared.redis_names import RedisNames

CATALOG = """
[providers.mock]
base_url = "{base_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[providers.dead]
base_url = "http://127.0.0.1:{dead_port}/v1"

[models."demo-mini"]
provider = "mock"
upstream_model = "demo-mini-2024"
prompt_price = 0.15
completion_price = 0.60

[models."unreachable"]
provider = "dead"
prompt_price = 1
completion_price = 1

[providers.claude]
kind = "anthropic"
base_url = "{anthropic_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[providers.google]
kind = "gemini"
base_url = "{gemini_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[models."claude-demo"]
provider = "claude"
upstream_model = "claude-demo-haiku"
prompt_price = 0.80
completion_price = 4.00
cache_read_price = 0.08
cache_write_price = 1.00

[models."gemini-demo"]
provider = "google"
upstream_model = "gemini-demo-flash"
prompt_price = 0.10
completion_price = 0.40
cache_read_price = 0.025
reasoning_price = 0.70
"""


@dataclass
class Gateway:
    base_url: str
    settings: Settings
    running: server.Running
    redis: aioredis.Redis
    names: RedisNames

    def client(self, key: str, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kw)

    def anthropic(self, key: str, **kw: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.base_url.removesuffix("/v1"),
                                         api_key=key, max_retries=0, **kw)

    async def events(self, expected: int) -> list[Event]:
        """The events on the stream, once ``expected`` of them have been flushed."""
        for _ in range(500):
            if await self.redis.xlen(self.names.events) >= expected:
                break
            await asyncio.sleep(0.01)
        entries = await self.redis.xrange(self.names.events)
        return [decode(fields[STREAM_FIELD]) for _id, fields in entries]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_catalog(tmp_path: Path, upstream_base_url: str, anthropic_url: str = "http://127.0.0.1:9/v1",
                  gemini_url: str = "http://127.0.0.1:9/v1beta", extra: str = "") -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG.format(base_url=upstream_base_url, dead_port=closed_port(),
                                   anthropic_url=anthropic_url, gemini_url=gemini_url) + extra)
    return path


def proxy_env(redis_url: str, names: RedisNames, catalog: Path, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "QNP_REDIS_PREFIX": names.prefix,
        "QNP_CATALOG": str(catalog),
        "MOCK_UPSTREAM_KEY": "sk-upstream-test",
        "QNP_PROXY_PORT": "0",
        "QNP_METRICS_PORT": "0",  # any free port: tests run side by side
        "QNP_NODE_ID": "test-node",
        "QNP_EVENT_FLUSH_MS": "5",
        # The test's own folder: a killed proxy's spool must not outlive the test run.
        "QNP_SPOOL_DIR": str(catalog.parent / f"spool-{names.prefix}"),
        **extra,
    }


async def publish_key(
    redis: aioredis.Redis, names: RedisNames, account_id: str = "acct-test",
    status: str = "active", limits: dict[str, int] | None = None,
    balance_micros: int = 10**12, *, credit_limit_micros: int | None = None,
    limit_reset: str | None = None, expires_at: int | None = None,
) -> tuple[str, KeyRecord]:
    """Issue a key the way the control plane does: bcrypt hash in Redis, secret returned."""
    key, parts = apikeys.generate()
    record = KeyRecord(
        key_id=parts.key_id, account_id=account_id, status=status,
        secret_hash=bcrypt.hashpw(parts.secret.encode(), bcrypt.gensalt(4)).decode(),
        limits=limits or {}, credit_limit_micros=credit_limit_micros,
        limit_reset=limit_reset, expires_at=expires_at,
    )
    await redis.set(names.key_record(parts.key_id), record.encode())
    # Redis is filled, as the control plane's reconciler marks it once it has published
    # every key: from now on a missing key record means an unknown key (401).
    await redis.set(names.published, "tests")
    if not await redis.exists(names.account_state(account_id)):
        # The account's live state, as the control plane publishes it: ample credit.
        await redis.hset(names.account_state(account_id),
                         mapping={"bal": balance_micros, "status": "active"})
    return key, record


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def mock_anthropic() -> AsyncIterator[MockAnthropicUpstream]:
    async with MockAnthropicUpstream(behaviour=MockBehaviour(api_key="sk-upstream-test")) as up:
        yield up


@pytest.fixture
async def mock_gemini() -> AsyncIterator[MockGeminiUpstream]:
    async with MockGeminiUpstream(behaviour=MockBehaviour(api_key="sk-upstream-test")) as up:
        yield up


@pytest.fixture
async def start_gateway(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream, mock_anthropic: MockAnthropicUpstream,
    mock_gemini: MockGeminiUpstream,
) -> AsyncIterator[GatewayFactory]:
    """Start a proxy in this process with extra settings (and catalog entries appended
    with ``catalog_extra``); stopped at teardown."""
    started: list[server.Running] = []

    async def start(catalog_extra: str = "", **extra: str) -> Gateway:
        catalog = write_catalog(tmp_path, mock_upstream.base_url, mock_anthropic.base_url,
                                mock_gemini.base_url, catalog_extra)
        settings = load(proxy_env(redis_url, redis_names, catalog, **extra))
        running = await server.start(settings)
        started.append(running)
        await running.app[WATCHING].wait()  # subscribed to key changes before the test acts
        return Gateway(f"http://127.0.0.1:{running.port}/v1", settings, running, redis,
                       redis_names)

    yield start
    for running in started:
        await running.stop(running.app[SETTINGS].shutdown_grace)


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    gw: Gateway = await start_gateway()
    return gw


@pytest.fixture
async def api_key(redis: aioredis.Redis, redis_names: RedisNames) -> str:
    key, _ = await publish_key(redis, redis_names)
    return key
