"""Migrations: applied once each, safely from several replicas at once, with the
usage-log day partitions around today."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from control_plane.migrate import load_migrations, migrate
from control_plane.partitions import existing_days


@pytest.fixture
async def fresh_url(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own, so the migrations really run from scratch."""
    name = f"qnp_migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    base = database_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f"DROP DATABASE {name}")
        await admin.close()


async def test_concurrent_migrations_apply_each_file_once(fresh_url: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_url) for _ in range(4)))

    versions = [m.version for m in load_migrations()]
    assert sorted(sum((r.applied for r in results), [])) == sorted(versions)
    assert (await migrate(fresh_url)).applied == []
    conn = await asyncpg.connect(fresh_url)
    try:
        recorded = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert sorted(recorded) == sorted(versions)
        today = datetime.now(UTC).date()
        days = await existing_days(conn)
        assert {today + timedelta(days=n) for n in range(-1, 8)} <= days
        default = await conn.fetchval(
            "SELECT count(*) FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
            "WHERE c.relname = 'usage_logs' AND p.partdefid <> 0"
        )
        assert default == 0  # retention drops days; a DEFAULT partition would defeat it
    finally:
        await conn.close()
