"""Schema migrations: numbered SQL files applied once each, in order.

``migrations/NNNN_name.sql`` files run each in its own transaction and are recorded in
``schema_migrations``. A session advisory lock makes concurrent replicas wait for
each other instead of racing. After the files, the usage-log partitions around today
are created. Imports ``partitions``; never ``proxy``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files

import asyncpg

from control_plane.partitions import create_days, days_around

log = logging.getLogger(__name__)

_MIGRATE_LOCK = 0x514E5000
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationFilesError(RuntimeError):
    """The migrations folder is inconsistent (bad name or repeated number)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


@dataclass(frozen=True, slots=True)
class MigrateResult:
    applied: list[str]
    partitions_created: list[str]


def load_migrations() -> list[Migration]:
    folder = files("control_plane") / "migrations"
    found: dict[str, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _FILE_NAME.match(entry.name)
        if m is None:
            raise MigrationFilesError(f"migration file {entry.name!r} is not NNNN_name.sql")
        if m.group(1) in found:
            raise MigrationFilesError(f"two migrations numbered {m.group(1)}")
        found[m.group(1)] = Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8"))
    return [found[number] for number in sorted(found)]


async def migrate(database_url: str) -> MigrateResult:
    """Apply every pending migration, then make sure today's partitions exist."""
    conn: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
        try:
            applied = await _apply_pending(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)
        created = await create_days(conn, days_around(datetime.now(UTC).date()))
    finally:
        await conn.close()
    return MigrateResult(applied, created)


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     text        PRIMARY KEY,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    applied: list[str] = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
            )
        log.info("migration applied version=%s", migration.version)
        applied.append(migration.version)
    return applied
