"""The ``privacy_requests`` table: recording a request with its due date, completing
it, and counting the overdue ones for ``qnp_privacy_requests_overdue``.

A row never carries personal data (see migration 0060). Self-service requests are
recorded already completed; staff requests stay open until answered. Imports
``deadlines``; never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from control_plane.privacy import deadlines

HANDLERS = ("staff", "self-service")
OUTCOMES = ("fulfilled", "partially_fulfilled", "refused", "withdrawn")


class InvalidRequest(ValueError):
    """A privacy request that names an unknown type, handler or outcome."""


@dataclass(frozen=True, slots=True)
class PrivacyRequest:
    id: int
    account_id: uuid.UUID
    type: str
    jurisdiction: str
    received_at: datetime
    due_at: datetime
    extended_until: datetime | None
    completed_at: datetime | None
    outcome: str | None
    handled_by: str


def _row(r: asyncpg.Record) -> PrivacyRequest:
    return PrivacyRequest(**dict(r.items()))


async def record(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                 type_: str, jurisdiction: str, received: datetime, handled_by: str,
                 outcome: str | None = None) -> PrivacyRequest:
    """One request, due by its jurisdiction's clock; with an ``outcome`` it is recorded
    completed at ``received`` (self-service answers at once)."""
    if type_ not in deadlines.REQUEST_TYPES:
        raise InvalidRequest(f"unknown privacy request type {type_!r}")
    if handled_by not in HANDLERS:
        raise InvalidRequest(f"handled_by must be one of {HANDLERS}")
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest(f"outcome must be one of {OUTCOMES}")
    due = deadlines.due(jurisdiction, received)
    row = await conn.fetchrow(
        "INSERT INTO privacy_requests (account_id, type, jurisdiction, received_at, due_at, "
        "completed_at, outcome, handled_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "RETURNING id, account_id, type, jurisdiction, received_at, due_at, extended_until, "
        "completed_at, outcome, handled_by",
        account_id, type_, jurisdiction, received, due,
        received if outcome is not None else None, outcome, handled_by)
    assert row is not None
    return _row(row)


async def complete(conn: asyncpg.Pool | asyncpg.Connection, request_id: int,
                   at: datetime, outcome: str) -> bool:
    """Answer an open request; False if it was already answered (or does not exist)."""
    if outcome not in OUTCOMES:
        raise InvalidRequest(f"outcome must be one of {OUTCOMES}")
    done = await conn.fetchval(
        "UPDATE privacy_requests SET completed_at = $2, outcome = $3 "
        "WHERE id = $1 AND completed_at IS NULL RETURNING id", request_id, at, outcome)
    return done is not None


async def open_of_type(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                       type_: str) -> int | None:
    """The id of the account's open request of ``type_`` (the latest), if any."""
    found: int | None = await conn.fetchval(
        "SELECT id FROM privacy_requests WHERE account_id = $1 AND type = $2 "
        "AND completed_at IS NULL ORDER BY received_at DESC, id DESC LIMIT 1",
        account_id, type_)
    return found


async def extend(conn: asyncpg.Pool | asyncpg.Connection, request_id: int,
                 at: datetime) -> datetime | None:
    """Use, at ``at``, the one extension the request's law allows; None where the law
    allows none, the request is answered, or its first period has already run out
    (GDPR art. 12(3) and 11 CCR 7021(b): the person is told inside the first period)."""
    row = await conn.fetchrow(
        "SELECT jurisdiction, received_at FROM privacy_requests "
        "WHERE id = $1 AND completed_at IS NULL AND due_at >= $2 "
        "AND extended_until IS NULL", request_id, at)
    if row is None:
        return None
    until = deadlines.extended(row["jurisdiction"], row["received_at"])
    if until is None:
        return None
    await conn.execute("UPDATE privacy_requests SET extended_until = $2 WHERE id = $1",
                       request_id, until)
    return until


async def overdue(conn: asyncpg.Pool | asyncpg.Connection, now: datetime) -> int:
    """Open requests past their (extended) due time."""
    count = await conn.fetchval(
        "SELECT count(*) FROM privacy_requests "
        "WHERE completed_at IS NULL AND COALESCE(extended_until, due_at) < $1", now)
    return int(count)


async def of_account(conn: asyncpg.Pool | asyncpg.Connection,
                     account_id: uuid.UUID) -> list[PrivacyRequest]:
    rows = await conn.fetch(
        "SELECT id, account_id, type, jurisdiction, received_at, due_at, extended_until, "
        "completed_at, outcome, handled_by FROM privacy_requests WHERE account_id = $1 "
        "ORDER BY received_at, id", account_id)
    return [_row(r) for r in rows]
