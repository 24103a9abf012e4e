"""Fixtures every test uses: real PostgreSQL and Redis, and the mock OpenAI upstream.

The servers come from ``devstack.servers.dev_servers``: DATABASE_URL / REDIS_URL when
set, else throwaway servers started once per session. Tests never write to an external
server's own data: they get a database created for the session and a Redis key prefix
of their own, both removed afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from control_plane.migrate import migrate
from devstack.servers import dev_servers
from devstack.upstream_openai import MockOpenAIUpstream, UpstreamBehaviour
from shared.redis_names import RedisNames
from tests.chaos.conftest import OwnPostgres, OwnRedis

UPSTREAM_API_KEY = "sk-upstream-test"


@pytest.fixture(scope="session")
def dev_server_urls() -> Iterator[tuple[str, str]]:
    """``(database_url, redis_url)`` of the servers for this session."""
    with dev_servers() as urls:
        yield urls


@pytest.fixture(scope="session")
async def database_url(dev_server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """DSN of a fresh, empty database that exists for this test session only."""
    server_url = dev_server_urls[0]
    name = f"qnp_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(server_url)
    try:
        # Pools a test forgot to close must not keep the database alive.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def redis_url(dev_server_urls: tuple[str, str]) -> str:
    return dev_server_urls[1]


@pytest.fixture
async def redis_names(redis_url: str) -> AsyncIterator[RedisNames]:
    """Names under a prefix of this test's own; every key under it is deleted afterwards."""
    names = RedisNames(prefix=f"qnptest{secrets.token_hex(6)}")
    yield names
    client = Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{names.prefix}*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def mock_upstream() -> AsyncIterator[MockOpenAIUpstream]:
    """A running mock OpenAI upstream that requires the key ``sk-upstream-test``."""
    async with MockOpenAIUpstream(behaviour=UpstreamBehaviour(api_key=UPSTREAM_API_KEY)) as up:
        yield up


@pytest.fixture
async def scratch_database_url(database_url: str) -> AsyncIterator[str]:
    """An empty database of this test's own (``database_url`` must stay empty as handed
    out: other tests check it is), dropped afterwards."""
    base, name = database_url.rsplit("/", 1)
    ours = f"{name}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{ours}"')
        yield f"{base}/{ours}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{ours}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def migrated_url(database_url: str) -> AsyncIterator[str]:
    """A second database of this session with the control plane's schema applied.

    ``database_url`` stays empty as handed out; tests that need the schema (control
    plane, end to end) share this one and keep apart by account.
    """
    base, name = database_url.rsplit("/", 1)
    ours = f"{name}_cp"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{ours}"')
        await migrate(f"{base}/{ours}")
        yield f"{base}/{ours}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{ours}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    """A PostgreSQL of the test's own, which it may stop and start (chaos, shutdown)."""
    server = OwnPostgres(tmp_path / "postgres.log")
    yield server
    server.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of the test's own, which it may kill, wipe and start again."""
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()
