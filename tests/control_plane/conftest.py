"""Fixtures for the control-plane tests: settings, a migrated database, a pool.

Builds on the suite-wide ``database_url``, ``redis_url`` and ``redis_names`` fixtures
(tests/conftest.py). Every test works under its own Redis prefix and its own account
ids, so tests sharing the session database never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane.connections import open_pool, open_redis
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from shared.redis_names import RedisNames
from tests.control_plane.factories import make_settings


@pytest.fixture
def settings(migrated_url: str, redis_url: str, redis_names: RedisNames) -> Settings:
    return make_settings(migrated_url, redis_url, redis_names)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await open_pool(settings, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def rclient(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client configured as the control plane configures its own (bytes replies)."""
    client = open_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def account_id(pool: asyncpg.Pool) -> str:
    account = uuid.uuid4()
    await pool.execute("INSERT INTO accounts (id, name) VALUES ($1, 'test')", account)
    return str(account)
