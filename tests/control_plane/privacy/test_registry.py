"""Every table that holds an account's or a person's rows has a fate in
``privacy.registry``: a table added without one fails here, before it can outlive a
deleted account. And every one of them is in the data export, or says why not: a
table added without an export section fails here too, as does one that holds an
account's rows only through a foreign key to such a table."""

from __future__ import annotations

import asyncpg
import pytest

from control_plane.privacy import export
from control_plane.privacy.registry import TABLES, THROUGH, Fate, export_sections
from control_plane.settings import Settings, SettingsError

# Tables (partitioned parents, not their partitions) and their columns, from the catalog.
_COLUMNS = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""


# Foreign keys between tables of the schema: (referencing, referenced).
_REFERENCES = """
SELECT c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent
FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
WHERE c.contype = 'f' AND n.nspname = current_schema()
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


def test_every_purged_or_anonymised_table_is_in_the_export_or_says_why_not() -> None:
    sections = {"account"} | {section for section, _ in export.SECTIONS}
    for table in TABLES:
        if table.fate is not Fate.KEPT:
            assert table.export or table.unexported, f"{table.name}: export it or say why not"
        assert not (table.export and table.unexported), table.name
        assert set(table.export) <= sections, table.name
    assert {parent for _, parent, _ in THROUGH} <= {t.name for t in TABLES}
    # ...and the export has no section whose table the registry does not know.
    assert export_sections() == sections


async def _unexported_children(conn: asyncpg.Connection | asyncpg.Pool) -> set[str]:
    """Tables with no account column that point at an account's table, yet are neither
    in the registry nor exported through their parent."""
    known = {t.name for t in TABLES} | {name for name, *_ in THROUGH}
    return {r["child"] for r in await conn.fetch(_REFERENCES)
            if r["parent"] in known and r["child"] not in known}


async def test_a_table_holding_an_accounts_rows_through_a_key_is_exported(
        pool: asyncpg.Pool) -> None:
    assert await _unexported_children(pool) == set(), \
        "add it to THROUGH in control_plane/privacy/registry.py and to the export"
    async with pool.acquire() as conn:
        with pytest.raises(_Rollback):
            async with conn.transaction():  # never committed: other tests never see it
                await conn.execute("CREATE TABLE h26_unexported "
                                   "(charge_id text REFERENCES billing_charges)")
                assert await _unexported_children(conn) == {"h26_unexported"}
                raise _Rollback
