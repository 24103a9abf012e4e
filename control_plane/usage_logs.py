"""Writing events into ``usage_logs``: event → row validation and the batch insert.

``to_row`` refuses, with a reason, any event Postgres would reject (so one bad event
can never stall a batch); ``insert_rows`` writes a whole batch with one
``INSERT ... SELECT FROM unnest(...)`` that skips events already stored, and debits the
credit ledger for the new billed ones and adds the new rows to the daily rollups
(``rollups``) in the same statement. Imports
``shared.events``; never ``proxy``.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from control_plane import rollups
from shared.events import Event

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1
# Partitions are created on demand for an event's day; this window keeps a clock gone
# wrong (or a corrupted timestamp) from creating partitions decades away.
MAX_AGE = timedelta(days=400)
MAX_AHEAD = timedelta(days=2)

# (column, array type) in table order; the unnest below follows this list.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("received_at", "timestamptz"),
    ("first_byte_at", "timestamptz"),
    ("done_at", "timestamptz"),
    ("account_id", "uuid"),
    ("key_id", "text"),
    ("endpoint", "text"),
    ("requested_model", "text"),
    ("served_model", "text"),
    ("provider", "text"),
    ("stream", "boolean"),
    ("status", "integer"),
    ("outcome", "text"),
    ("prompt_tokens", "bigint"),
    ("completion_tokens", "bigint"),
    ("cached_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("usage_source", "text"),
    ("cost_micros", "bigint"),
    ("latency_ms", "double precision"),
    ("ttft_ms", "double precision"),
    ("source_ip", "inet"),
    ("node_id", "text"),
    ("error_code", "text"),
    ("schema_version", "smallint"),
    ("attempts", "integer"),
    ("cache_write_tokens", "bigint"),
)
# One statement per batch: the rows that are new (ON CONFLICT skips re-deliveries) and,
# for exactly those, the ledger debit of each billed request, so a usage row and its
# debit are committed together or not at all, and a re-delivery debits nothing.
# Built from the constant column list above, never from input.
_COLUMN_LIST = ", ".join(name for name, _ in _COLUMNS)
_ARRAYS = ", ".join(f"${n}::{kind}[]" for n, (_, kind) in enumerate(_COLUMNS, start=1))
_RETURNING = ", ".join(dict.fromkeys(("id", *rollups.RETURNING)))


def _insert(with_rollups: bool) -> str:
    return (
        f"WITH ins AS (INSERT INTO usage_logs ({_COLUMN_LIST}) "  # noqa: S608
        f"SELECT * FROM unnest({_ARRAYS}) "
        f"ON CONFLICT DO NOTHING RETURNING {_RETURNING}"
        "), debit AS ("
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, event_id) "
        "SELECT account_id, 'debit', -cost_micros, id FROM ins "
        "WHERE cost_micros > 0 AND account_id IS NOT NULL "
        "ON CONFLICT (event_id) DO NOTHING RETURNING 1"
        f"){', ' + rollups.ROLLUP_CTE if with_rollups else ''} "
        "SELECT (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM debit) AS debited"
    )


# The daily rollups (rollups.py) are kept by the same statement, from exactly its new
# rows. Without them only for the benchmark's comparison.
_INSERT = _insert(with_rollups=True)
_INSERT_WITHOUT_ROLLUPS = _insert(with_rollups=False)

Row = tuple[object, ...]


class RowError(ValueError):
    """An event that decoded but cannot be stored; the message is the reason."""


_ACCOUNT_AT = [name for name, _ in _COLUMNS].index("account_id")
_COST_AT = [name for name, _ in _COLUMNS].index("cost_micros")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One validated row, plus the UTC day that names its partition."""

    values: Row
    day: date
    done_at: float = 0.0  # epoch seconds, for the consumer-lag metric

    @property
    def billed_account(self) -> uuid.UUID | None:
        """The account this row debits, if it costs anything."""
        account, cost = self.values[_ACCOUNT_AT], self.values[_COST_AT]
        if isinstance(account, uuid.UUID) and isinstance(cost, int) and cost > 0:
            return account
        return None


def _time(us: int, field: str) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        raise RowError(f"{field} is out of range") from None


def _int(value: int, field: str, limit: int = _INT64) -> int:
    if not -limit - 1 <= value <= limit:
        raise RowError(f"{field} is out of range")
    return value


def _text(value: str | None, field: str) -> str | None:
    if value is not None and "\x00" in value:
        raise RowError(f"{field} contains a NUL character")
    return value


def _uuid(value: str | None, field: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise RowError(f"{field} is not a UUID") from None


def _ip(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise RowError("source_ip is not an IP address") from None


def to_row(event: Event, now: datetime) -> UsageRow:
    """Validate and convert one event; raises RowError saying what is wrong."""
    received = _time(event.received_at_us, "received_at_us")
    if not now - MAX_AGE <= received <= now + MAX_AHEAD:
        raise RowError("received_at_us is outside the accepted window")
    first_byte = (
        None
        if event.first_byte_at_us is None
        else _time(event.first_byte_at_us, "first_byte_at_us")
    )
    ttft = event.ttft_us
    values: Row = (
        _uuid(event.id, "id"),
        received,
        first_byte,
        _time(event.done_at_us, "done_at_us"),
        _uuid(event.account_id, "account_id"),
        _text(event.key_id, "key_id"),
        _text(event.endpoint, "endpoint"),
        _text(event.requested_model, "requested_model"),
        _text(event.served_model, "served_model"),
        _text(event.provider, "provider"),
        event.stream,
        _int(event.status, "status", _INT32),
        event.outcome,
        _int(event.prompt_tokens, "prompt_tokens"),
        _int(event.completion_tokens, "completion_tokens"),
        _int(event.cached_tokens, "cached_tokens"),
        _int(event.reasoning_tokens, "reasoning_tokens"),
        event.usage_source,
        _int(event.cost_micros, "cost_micros"),
        event.latency_us / 1000,
        None if ttft is None else ttft / 1000,
        _ip(event.source_ip),
        _text(event.node_id, "node_id"),
        _text(event.error_code, "error_code"),
        _int(event.v, "v", 2**15 - 1),
        _int(event.attempts, "attempts", _INT32),
        _int(event.cache_write_tokens, "cache_write_tokens"),
    )
    return UsageRow(values, received.date(), event.done_at_us / 1e6)


@dataclass(frozen=True, slots=True)
class Inserted:
    rows: int = 0
    debits: int = 0


async def insert_rows(conn: asyncpg.Connection, rows: list[Row], with_rollups: bool = True
                      ) -> Inserted:
    """Insert a batch, its debits and its daily rollups in one statement; how many rows
    and debits were new."""
    if not rows:
        return Inserted()
    columns = [list(column) for column in zip(*rows, strict=True)]
    record = await conn.fetchrow(_INSERT if with_rollups else _INSERT_WITHOUT_ROLLUPS,
                                 *columns)
    assert record is not None
    return Inserted(int(record["inserted"]), int(record["debited"]))
