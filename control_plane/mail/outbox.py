"""The ``email_outbox`` table: queueing a message, claiming a due one, and recording
what became of it. Every statement about the table lives here. Imports asyncpg only;
never ``proxy``.

``enqueue`` takes the caller's connection, so a message is queued in the caller's own
transaction: rolled back with it, committed with it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import asyncpg
import orjson

# Back-off between attempts: 30 s, 1 min, 2 min, ... capped at an hour; after
# MAX_ATTEMPTS the row is given up (next_attempt_at NULL, last_error kept).
BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0
MAX_ATTEMPTS = 12

# Header values are checked at enqueue: a CR or LF would let text injected into a
# subject add headers or recipients.
_LINE_BREAKS = ("\r", "\n")
# RFC 5322 field names: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_RESERVED_HEADERS = frozenset({"from", "to", "cc", "bcc", "subject", "date", "message-id"})


class MailKind(StrEnum):
    TRANSACTIONAL = "transactional"  # needs no consent (sign-in notices, receipts)
    MARKETING = "marketing"          # only with marketing_email consent: the caller's check


class OutboxError(ValueError):
    """A message that cannot be queued as given (line break in a header, bad kind)."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    to_address: str
    kind: str
    template: str
    subject: str
    body: str
    headers: dict[str, str]
    created_at: datetime
    attempts: int


async def enqueue(conn: asyncpg.Connection, *, to_address: str, kind: MailKind | str,
                  template: str, subject: str, body: str,
                  account_id: uuid.UUID | str | None = None,
                  headers: dict[str, str] | None = None) -> int | None:
    """Queue one message on ``conn`` (inside the caller's transaction, if any); its id.

    None, and nothing queued, for an account being deleted (issue 14: no more e-mail).
    The account row is read FOR SHARE, so a deletion committing meanwhile either waits
    for this message (and then cancels it) or is seen here."""
    extra = dict(headers or {})
    _check(to_address, subject, extra)
    try:
        kind = MailKind(kind)
    except ValueError:
        raise OutboxError("kind must be transactional or marketing") from None
    account = uuid.UUID(str(account_id)) if account_id is not None else None
    if account is not None and await conn.fetchval(
            "SELECT status = 'deleting' FROM accounts WHERE id = $1 FOR SHARE", account):
        return None
    row_id: int = await conn.fetchval(
        "INSERT INTO email_outbox (account_id, to_address, kind, template, subject, body,"
        " headers) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING id",
        account, to_address, kind.value, template, subject, body,
        orjson.dumps(extra).decode())
    return row_id


def _check(to_address: str, subject: str, headers: dict[str, str]) -> None:
    if "@" not in to_address or any(c in to_address for c in (*_LINE_BREAKS, ",", " ")):
        raise OutboxError("to_address must be one plain address")
    for name, value in (("Subject", subject), *headers.items()):
        if _FIELD_NAME.fullmatch(name) is None:
            raise OutboxError(f"header name {name!r} is not a field name")
        if any(c in value for c in _LINE_BREAKS):
            raise OutboxError(f"header {name!r} holds a line break")
    reserved = _RESERVED_HEADERS & {name.lower() for name in headers}
    if reserved:
        raise OutboxError(f"headers {sorted(reserved)} are set by the sender")


async def cancel_for_account(conn: asyncpg.Connection, account_id: uuid.UUID) -> int:
    """Give up every unsent message of an account being deleted; how many. The rows
    themselves go with the purge."""
    status: str = await conn.execute(
        "UPDATE email_outbox SET next_attempt_at = NULL, last_error = 'account_deleted'"
        " WHERE account_id = $1 AND next_attempt_at IS NOT NULL", account_id)
    return int(status.rsplit(" ", 1)[1])


_CLAIM = """
SELECT id, to_address, kind, template, subject, body, headers::text AS headers,
       created_at, attempts
FROM email_outbox
WHERE next_attempt_at <= now()
ORDER BY next_attempt_at
LIMIT 1
FOR UPDATE SKIP LOCKED
"""


async def claim(conn: asyncpg.Connection) -> OutboxRow | None:
    """Lock one due row for the rest of ``conn``'s transaction; rows another sender
    holds are skipped, and a row sent meanwhile no longer matches (Postgres rechecks the
    WHERE clause of a row it locks), so no two senders ever hold the same row."""
    r = await conn.fetchrow(_CLAIM)
    if r is None:
        return None
    return OutboxRow(id=r["id"], to_address=r["to_address"], kind=r["kind"],
                     template=r["template"], subject=r["subject"], body=r["body"],
                     headers=orjson.loads(r["headers"]), created_at=r["created_at"],
                     attempts=r["attempts"])


async def mark_sent(conn: asyncpg.Connection, row_id: int) -> None:
    await conn.execute(
        "UPDATE email_outbox SET sent_at = now(), attempts = attempts + 1,"
        " next_attempt_at = NULL, last_error = NULL WHERE id = $1", row_id)


async def mark_failed(conn: asyncpg.Connection, row: OutboxRow, code: str, *,
                      permanent: bool) -> bool:
    """Record a failed attempt with its error code; True when the row is given up."""
    attempts = row.attempts + 1
    give_up = permanent or attempts >= MAX_ATTEMPTS
    delay = min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_CAP_S)
    await conn.execute(
        "UPDATE email_outbox SET attempts = $2, last_error = $3,"
        " next_attempt_at = CASE WHEN $4 THEN NULL"
        "   ELSE now() + make_interval(secs => $5) END"
        " WHERE id = $1", row.id, attempts, code, give_up, delay)
    return give_up


async def prune(conn: asyncpg.Connection, now: datetime, keep_days: int) -> int:
    """Delete rows sent or given up more than ``keep_days`` ago (by when they were
    queued): a message's address and body are personal data, kept no longer than the
    request logs. Rows still due are kept whatever their age. How many were deleted."""
    status: str = await conn.execute(
        "DELETE FROM email_outbox WHERE next_attempt_at IS NULL AND created_at < $1",
        now - timedelta(days=keep_days))
    return int(status.rsplit(" ", 1)[1])
