"""What a suspended account is told about its suspension (issue 14; KVKK art. 11, GDPR
art. 22(3): a person may contest a decision made about them and ask a person to review
it): since when, who decided (our automation or staff) and the reason, when one was
recorded. All of it comes from the audit row the admin API writes for the suspension
(``reason`` in its detail, from ``POST /admin/accounts/{id}/suspend {"reason"}``); a
suspension without a row or a reason says so instead of guessing. Imports asyncpg;
never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

import asyncpg

from control_plane.errors import InvalidInput

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection

# The admin API's audit action for a suspension, and its automation's actor (the bearer
# token, as opposed to a staff member's session).
SUSPEND_ACTION = "POST /admin/accounts/{account_id}/suspend"
RESUME_ACTION = "POST /admin/accounts/{account_id}/resume"
AUTOMATION_ACTOR = "admin-bearer"
MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Suspension:
    since: datetime | None  # None: no audit row (suspended before they were written)
    reason: str | None
    automated: bool | None  # None: not recorded


def clean_reason(value: object) -> str | None:
    """A suspension's reason as staff or automation give it: shown to the person, so a
    short plain sentence; None when none is given."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("reason must be a string")
    text = " ".join(value.split())
    if len(text) > MAX_REASON:
        raise InvalidInput(f"reason must be at most {MAX_REASON} characters")
    if not all(c.isprintable() for c in text):
        raise InvalidInput("reason must not contain control characters")
    return text or None


async def of_account(conn: Conn, account_id: uuid.UUID) -> Suspension | None:
    """The account's suspension, or None when it is not suspended."""
    # The latest suspension or resumption: a resumption after the last suspension row
    # means this suspension came from elsewhere (the CLI) and recorded nothing.
    row = await conn.fetchrow(
        "SELECT a.status, l.action, l.at, l.actor, l.detail->>'reason' AS reason "
        "FROM accounts a LEFT JOIN LATERAL (SELECT action, at, actor, detail FROM audit_log "
        "WHERE account_id = a.id AND action IN ($2, $3) ORDER BY id DESC LIMIT 1) l ON true "
        "WHERE a.id = $1", account_id, SUSPEND_ACTION, RESUME_ACTION)
    if row is None or row["status"] != "suspended":
        return None
    if row["action"] != SUSPEND_ACTION:
        return Suspension(None, None, None)
    return Suspension(row["at"], row["reason"], row["actor"] == AUTOMATION_ACTOR)


@dataclass(frozen=True, slots=True)
class Review:
    id: int
    received_at: datetime
    due_at: datetime  # the extension's date once staff used it


async def open_reviews(conn: Conn, account_id: uuid.UUID) -> list[Review]:
    """The account's human-review requests about its suspension still with staff."""
    rows = await conn.fetch(
        "SELECT r.id, r.received_at, coalesce(r.extended_until, r.due_at) AS due_at "
        "FROM privacy_requests r JOIN privacy_request_details d ON d.request_id = r.id "
        "WHERE r.account_id = $1 AND r.type = 'human_review' AND r.completed_at IS NULL "
        "AND d.subject = 'suspension' ORDER BY r.id", account_id)
    return [Review(r["id"], r["received_at"], r["due_at"]) for r in rows]
