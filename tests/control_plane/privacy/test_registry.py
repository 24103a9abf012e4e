"""Every table that holds an account's or a person's rows has a fate in
``privacy.registry``: a table added without one fails here, before it can outlive a
deleted account."""

from __future__ import annotations

import asyncpg
import pytest

from control_plane.privacy.registry import TABLES, Fate
from control_plane.settings import Settings, SettingsError

# Tables (partitioned parents, not their partitions) and their columns, from the catalog.
_COLUMNS = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""


class _Rollback(Exception):
    pass


async def _columns(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, set[str]]:
    columns: dict[str, set[str]] = {}
    for r in await conn.fetch(_COLUMNS):
        columns.setdefault(r["table_name"], set()).add(r["column_name"])
    return columns


def _unclassified(columns: dict[str, set[str]]) -> set[str]:
    owned = {t for t, cols in columns.items() if cols & {"account_id", "user_id"}}
    return owned - {t.name for t in TABLES}


async def test_every_table_with_an_account_or_user_column_is_classified(
        pool: asyncpg.Pool) -> None:
    columns = await _columns(pool)
    assert _unclassified(columns) == set(), "classify them in control_plane/privacy/registry.py"
    for table in TABLES:  # and what is classified exists, with the column it names
        assert table.by in columns.get(table.name, set()), table
        assert table.why
        assert (table.statement() is None) == (table.fate is Fate.KEPT)
    assert len({t.name for t in TABLES}) == len(TABLES)
    assert TABLES[-1].name == "accounts"  # last: the rows above point at it


async def test_a_table_nobody_classified_fails_the_check(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(_Rollback):
            async with conn.transaction():  # never committed: other tests never see it
                await conn.execute("CREATE TABLE h17_unclassified (user_id uuid)")
                assert _unclassified(await _columns(conn)) == {"h17_unclassified"}
                raise _Rollback


@pytest.mark.parametrize("value", ["30", "-1", "seven"])
def test_a_grace_past_the_policys_30_days_is_refused_by_name(value: str) -> None:
    with pytest.raises(SettingsError, match="QNP_DELETION_GRACE_DAYS"):
        Settings.from_env({"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x",
                           "QNP_DELETION_GRACE_DAYS": value})
    assert Settings.from_env({"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
                             ).deletion_grace_days == 7
