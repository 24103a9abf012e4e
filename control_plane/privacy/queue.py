"""The privacy staff queue (issue 14): the open requests by due date (overdue first),
extending one (with notice to the person) and answering one (the outcome recorded, the
reasoned answer sent to the person by e-mail and stored nowhere else).

Served by the admin API to role ``privacy`` (``admin_rbac``). A request's details
(``privacy_request_details``) are shown to staff, who need them to answer. Logs ids,
never texts. Imports the privacy, mail and error modules; never ``proxy`` or the web.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import asyncpg

from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.privacy import deadlines, requests, rights

log = logging.getLogger(__name__)

MAX_ANSWER = 20_000


async def open_requests(conn: asyncpg.Pool | asyncpg.Connection, now: datetime
                        ) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT r.id, r.account_id, r.type, r.jurisdiction, r.received_at, r.due_at, "
        "r.extended_until, COALESCE(r.extended_until, r.due_at) AS answer_by, "
        "d.subject, d.text FROM privacy_requests r "
        "LEFT JOIN privacy_request_details d ON d.request_id = r.id "
        "WHERE r.completed_at IS NULL ORDER BY answer_by, r.id")
    return [{"id": r["id"], "account_id": str(r["account_id"]), "type": r["type"],
             "jurisdiction": r["jurisdiction"], "received_at": r["received_at"].isoformat(),
             "due_at": r["due_at"].isoformat(),
             "extended_until": None if r["extended_until"] is None
             else r["extended_until"].isoformat(),
             "answer_by": r["answer_by"].isoformat(), "overdue": r["answer_by"] < now,
             "extendable": r["extended_until"] is None
             and deadlines.rule(r["jurisdiction"]).extendable,
             "subject": r["subject"] or "", "text": r["text"] or ""} for r in rows]


def _reasoned(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty text: the person is owed reasons")
    text = value.strip()
    if len(text) > MAX_ANSWER:
        raise InvalidInput(f"{what} must be at most {MAX_ANSWER} characters")
    return text


async def _open(conn: asyncpg.Connection, request_id: object) -> asyncpg.Record:
    if not isinstance(request_id, int):
        raise NotFound("privacy request not found")
    row = await conn.fetchrow(
        "SELECT id, account_id, type, completed_at FROM privacy_requests WHERE id = $1 "
        "FOR UPDATE", request_id)
    if row is None:
        raise NotFound("privacy request not found")
    if row["completed_at"] is not None:
        raise Conflict("this request was already answered")
    return row


def request_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise NotFound("privacy request not found") from None


async def extend(pool: asyncpg.Pool, request_id: int, now: datetime, reason: object
                 ) -> datetime:
    """Use the request's one extension; the notice with the reasons is queued with it."""
    why = _reasoned(reason, "reason")
    async with pool.acquire() as conn, conn.transaction():
        row = await _open(conn, request_id)
        until = await requests.extend(conn, request_id, now)
        if until is None:
            raise Conflict("this request cannot be extended: its law allows no extension, "
                           "it was extended already, or its first period has run out")
        await rights.mail_account(
            conn, row["account_id"], "privacy_extended",
            f"More time is needed for your privacy request #{request_id}",
            f"We need more time to answer your {rights.TYPE_LABELS[row['type']]} request "
            f"(reference #{request_id}). We will answer by {until:%Y-%m-%d %H:%M} UTC at "
            f"the latest.\n\nWhy:\n{why}\n")
    log.info("privacy request extended request_id=%s", request_id)
    return until


async def answer(pool: asyncpg.Pool, request_id: int, now: datetime, outcome: object,
                 text: object) -> None:
    """Record the outcome and send the reasoned answer (kept only in that e-mail)."""
    if not isinstance(outcome, str) or outcome not in requests.OUTCOMES:
        raise InvalidInput(f"outcome must be one of {', '.join(requests.OUTCOMES)}")
    body = _reasoned(text, "answer")
    async with pool.acquire() as conn, conn.transaction():
        row = await _open(conn, request_id)
        await requests.complete(conn, request_id, now, outcome)
        await rights.mail_account(
            conn, row["account_id"], "privacy_answered",
            f"Our answer to your privacy request #{request_id}",
            f"Your {rights.TYPE_LABELS[row['type']]} request (reference #{request_id}) was "
            f"answered on {now:%Y-%m-%d %H:%M} UTC: {outcome.replace('_', ' ')}.\n\n"
            f"{body}\n\nIf you disagree, you may lodge a complaint with your data "
            "protection authority.\n")
    log.info("privacy request answered request_id=%s outcome=%s", request_id, outcome)
