"""Retention of ``usage_logs``: day partitions created ahead, old ones dropped whole.

``apply`` keeps the last ``retention_days`` UTC days (today included), so no row older
than ``retention_days`` days survives a run, and creates the partitions of the days
ahead. Dropping a partition is a catalog operation, never a row-by-row delete, so it
costs the same for ten rows or ten million. Only ``usage_logs`` partitions are touched:
the credit ledger is kept for years by its own rules. The clock is a parameter, so
tests can run it at any date. Never imports ``proxy``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from control_plane.partitions import (
    _PARTITION_LOCK,
    create_days,
    days_around,
    existing_days,
    partition_name,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


async def apply(conn: asyncpg.Connection, now: datetime, retention_days: int) -> RetentionResult:
    """Create the partitions ahead of ``now`` and drop those past retention."""
    today = now.astimezone(UTC).date()
    oldest_kept = (now.astimezone(UTC) - timedelta(days=retention_days)).date()
    oldest_kept += timedelta(days=1)
    created = await create_days(conn, [d for d in days_around(today) if d >= oldest_kept])
    dropped: list[str] = []
    async with conn.transaction():
        # The same lock as creation: a replica creating a day on demand never races us.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        for day in sorted(await existing_days(conn)):
            if day >= oldest_kept:
                break
            name = partition_name(day)  # from a date, never from input text
            await conn.execute(f"DROP TABLE {name}")
            dropped.append(name)
    for name in dropped:
        log.info("retention dropped partition=%s", name)
    return RetentionResult(created, dropped)
