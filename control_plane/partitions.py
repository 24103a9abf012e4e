"""Day partitions of ``usage_logs``: naming, creation ahead of time and on demand.

One partition per UTC day, ``usage_logs_pYYYYMMDD``, so retention can drop a whole
day. ``Partitions`` remembers which days exist so the ingester creates a partition at
most once per process; creation is serialised across replicas with a transaction-level
advisory lock. Imports only asyncpg; never ``proxy``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta

import asyncpg

# Serialises CREATE TABLE ... PARTITION OF between replicas: two sessions racing on
# "IF NOT EXISTS" can otherwise both pass the check and one fail on the catalog.
_PARTITION_LOCK = 0x514E5001
DAYS_BEHIND = 1
DAYS_AHEAD = 7


def partition_name(day: date) -> str:
    return f"usage_logs_p{day:%Y%m%d}"


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def days_around(today: date) -> list[date]:
    """The days created at migrate and start-up: yesterday up to a week ahead."""
    return [today + timedelta(days=n) for n in range(-DAYS_BEHIND, DAYS_AHEAD + 1)]


async def existing_days(conn: asyncpg.Connection) -> set[date]:
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_logs'::regclass
        """
    )
    days: set[date] = set()
    for row in rows:
        name: str = row["relname"]
        try:
            days.add(datetime.strptime(name.removeprefix("usage_logs_p"), "%Y%m%d").date())
        except ValueError:
            continue  # someone else's partition naming; not ours to track
    return days


async def create_days(conn: asyncpg.Connection, days: Iterable[date]) -> list[str]:
    """Create the partitions for ``days`` that do not exist yet; returns their names."""
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
        have = await existing_days(conn)
        for day in sorted(set(days) - have):
            start = datetime.combine(day, time(), UTC)
            end = start + timedelta(days=1)
            # Identifiers and bounds come from a date, never from input text.
            await conn.execute(
                f"CREATE TABLE {partition_name(day)} PARTITION OF usage_logs "  # noqa: S608
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            created.append(partition_name(day))
    return created


class Partitions:
    """The set of days known to have a partition, filled lazily from the catalog."""

    def __init__(self) -> None:
        self._known: set[date] | None = None

    async def ensure(self, conn: asyncpg.Connection, days: Iterable[date]) -> list[str]:
        wanted = set(days)
        if self._known is None:
            self._known = await existing_days(conn)
        missing = wanted - self._known
        if not missing:
            return []
        created = await create_days(conn, missing)
        self._known |= missing
        return created

    def forget(self) -> None:
        """Drop the cache, e.g. after retention removed a partition we thought existed."""
        self._known = None
