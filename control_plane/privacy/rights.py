"""Exercising the privacy rights of an account (issue 14): its jurisdiction, correction
of a name, restriction, objection per purpose, and the requests that go to staff
(a free-text correction, an objection on compelling grounds, a human review).

Every exercise is a privacy request (``requests.record``): self-service ones recorded
fulfilled at once, the rest open for the staff queue (``queue``), with the "received"
e-mail queued in the same transaction. A request's personal details (the person's own
words, what a review is about) go to ``privacy_request_details``, never to
``privacy_requests``. Consumers of account data for anything but serving the API and
billing ask ``processing_allowed``. Logs ids, never names, addresses or texts.
Imports the privacy, mail and error modules; never ``proxy`` or the web app.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

import asyncpg

from control_plane import audit
from control_plane.accounts import clean_name
from control_plane.errors import InvalidInput
from control_plane.mail import outbox
from control_plane.privacy import deadlines, requests

log = logging.getLogger(__name__)

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection

# Legitimate-interest purposes an objection stops at once (GDPR art. 21(1): the
# controller "shall no longer process" unless it shows compelling grounds; for these
# two it has none).
AT_ONCE = ("service_improvement", "analytics")
# Purposes we hold compelling grounds for: an objection goes to staff, who answer it
# with reasons. The explanation is shown next to each.
COMPELLING_GROUNDS: dict[str, str] = {
    "security": "We check every request's key, origin and pattern to keep your account "
                "and others safe from intrusion; without it we could not run the service "
                "securely (GDPR recital 49).",
    "fraud_prevention": "We look for stolen cards, chargebacks and abuse so that "
                        "prepaid credit stays honest for everyone (GDPR recital 47).",
    "rate_limiting": "We count requests per key and account to enforce the limits you "
                     "and we set, so one caller cannot exhaust the service for others.",
}
PURPOSES = (*AT_ONCE, *COMPELLING_GROUNDS)
PURPOSE_LABELS = {"service_improvement": "Service improvement", "analytics": "Analytics",
                  "security": "Security", "fraud_prevention": "Fraud prevention",
                  "rate_limiting": "Rate limiting"}
# What a human review is about: a short code such as "suspension" or "dispute:dp_123".
_ABOUT = re.compile(r"[a-z_]{1,32}(:[A-Za-z0-9_.-]{1,48})?")
MAX_TEXT = 4000
TYPE_LABELS = {"access": "access", "export": "export", "correction": "correction",
               "deletion": "deletion", "restriction": "restriction",
               "objection": "objection", "human_review": "human review",
               "information": "information"}


@dataclass(frozen=True, slots=True)
class PrivacyState:
    jurisdiction: str
    status: str
    restricted_at: datetime | None
    objections: dict[str, datetime]
    requests: list[requests.PrivacyRequest]


async def state(conn: Conn, account_id: uuid.UUID) -> PrivacyState:
    row = await conn.fetchrow(
        "SELECT jurisdiction, status, restricted_at FROM accounts WHERE id = $1", account_id)
    assert row is not None  # the caller's own account
    objected = await conn.fetch(
        "SELECT purpose, objected_at FROM privacy_objections WHERE account_id = $1",
        account_id)
    return PrivacyState(row["jurisdiction"], row["status"], row["restricted_at"],
                        {r["purpose"]: r["objected_at"] for r in objected},
                        await requests.of_account(conn, account_id))


async def jurisdiction_of(conn: Conn, account_id: uuid.UUID) -> str:
    found: str | None = await conn.fetchval(
        "SELECT jurisdiction FROM accounts WHERE id = $1", account_id)
    return found or "default"


async def set_jurisdiction(conn: Conn, account_id: uuid.UUID, value: object) -> str:
    if not isinstance(value, str) or value not in deadlines.JURISDICTIONS:
        raise InvalidInput(f"jurisdiction must be one of {', '.join(deadlines.JURISDICTIONS)}")
    await conn.execute("UPDATE accounts SET jurisdiction = $2 WHERE id = $1",
                       account_id, value)
    return value


async def processing_allowed(conn: Conn, account_id: uuid.UUID, purpose: str) -> bool:
    """May the account's data be used for ``purpose`` (``analytics``,
    ``service_improvement``, ``marketing_email``, ``error_monitoring``...)? Never while
    the account is restricted; not for a purpose it objected to. Serving the API and
    billing do not ask: they are what a restriction still allows."""
    allowed: bool = await conn.fetchval(
        "SELECT a.restricted_at IS NULL AND NOT EXISTS (SELECT 1 FROM privacy_objections o "
        "WHERE o.account_id = a.id AND o.purpose = $2) FROM accounts a WHERE a.id = $1",
        account_id, purpose)
    return bool(allowed)


async def recipients(conn: Conn, account_id: uuid.UUID) -> list[str]:
    """Where the account's privacy mail goes: its owners' addresses."""
    rows = await conn.fetch(
        "SELECT u.email FROM memberships m JOIN users u ON u.id = m.user_id "
        "WHERE m.account_id = $1 AND m.role = 'owner' ORDER BY m.created_at", account_id)
    return [r["email"] for r in rows]


async def mail_account(conn: asyncpg.Connection, account_id: uuid.UUID, template: str,
                       subject: str, body: str) -> None:
    """A transactional message to each owner, queued in ``conn``'s transaction."""
    for address in await recipients(conn, account_id):
        await outbox.enqueue(conn, to_address=address, kind=outbox.MailKind.TRANSACTIONAL,
                             template=template, subject=subject, body=body,
                             account_id=account_id)


async def correct_name(pool: asyncpg.Pool, account_id: uuid.UUID, user_id: uuid.UUID,
                       name: object, now: datetime) -> requests.PrivacyRequest:
    clean = clean_name(name, "your")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE users SET display_name = $2 WHERE id = $1", user_id, clean)
        done = await requests.record(conn, account_id, "correction",
                                     await jurisdiction_of(conn, account_id), now,
                                     "self-service", outcome="fulfilled")
    log.info("name corrected account_id=%s request_id=%s", account_id, done.id)
    return done


async def set_restriction(pool: asyncpg.Pool, account_id: uuid.UUID, restricted: object,
                          now: datetime, actor: str) -> requests.PrivacyRequest | None:
    """Mark (a fulfilled restriction request) or lift (an audit row) the restriction;
    the request, or None when nothing changed or it was lifted."""
    if not isinstance(restricted, bool):
        raise InvalidInput("restricted must be true or false")
    async with pool.acquire() as conn, conn.transaction():
        changed = await conn.fetchval(
            "UPDATE accounts SET restricted_at = $2 WHERE id = $1 "
            "AND (restricted_at IS NULL) = $3 RETURNING id",
            account_id, now if restricted else None, restricted)
        if changed is None:
            return None
        if not restricted:
            await audit.record(conn, actor, "privacy.restriction_lifted",
                               f"account:{account_id}", account_id)
            log.info("restriction lifted account_id=%s", account_id)
            return None
        done = await requests.record(conn, account_id, "restriction",
                                     await jurisdiction_of(conn, account_id), now,
                                     "self-service", outcome="fulfilled")
    log.info("restriction marked account_id=%s request_id=%s", account_id, done.id)
    return done


def _purpose(value: object) -> str:
    if not isinstance(value, str) or value not in PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(PURPOSES)}")
    return value


def _text(value: object, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidInput("text must be a string")
    text = value.strip()
    if required and not text:
        raise InvalidInput("say what should be corrected")
    if len(text) > MAX_TEXT:
        raise InvalidInput(f"text must be at most {MAX_TEXT} characters")
    if any(not (c.isprintable() or c in "\n\r\t") for c in text):
        raise InvalidInput("text must not contain control characters")
    return text


async def object_to(pool: asyncpg.Pool, account_id: uuid.UUID, purpose: object,
                    objected: object, now: datetime, text: object = None,
                    actor: str = "self-service") -> requests.PrivacyRequest | None:
    """An objection to ``purpose``: effective at once for ``AT_ONCE`` (a fulfilled
    request; withdrawing it is an audit row), else a staff request with the person's
    grounds. The request, or None when nothing changed or it was withdrawn."""
    found = _purpose(purpose)
    if not isinstance(objected, bool):
        raise InvalidInput("objected must be true or false")
    if found not in AT_ONCE:
        if not objected:
            raise InvalidInput(f"an objection to {found} is answered by staff; "
                               "there is nothing to withdraw here")
        return await request_staff(pool, account_id, "objection", now, found,
                                   _text(text, False))
    async with pool.acquire() as conn, conn.transaction():
        if objected:
            changed = await conn.fetchval(
                "INSERT INTO privacy_objections (account_id, purpose, objected_at) "
                "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
                account_id, found, now)
        else:
            changed = await conn.fetchval(
                "DELETE FROM privacy_objections WHERE account_id = $1 AND purpose = $2 "
                "RETURNING true", account_id, found)
        if not changed:
            return None
        if not objected:
            await audit.record(conn, actor, "privacy.objection_withdrawn",
                               f"account:{account_id}", account_id, {"purpose": found})
            return None
        done = await requests.record(conn, account_id, "objection",
                                     await jurisdiction_of(conn, account_id), now,
                                     "self-service", outcome="fulfilled")
        await conn.execute(
            "INSERT INTO privacy_request_details (request_id, account_id, subject) "
            "VALUES ($1, $2, $3)", done.id, account_id, found)
    log.info("objection recorded account_id=%s purpose=%s", account_id, found)
    return done


def review_subject(value: object) -> str:
    if not isinstance(value, str) or _ABOUT.fullmatch(value.strip()) is None:
        raise InvalidInput("about must be a short code such as suspension or dispute:dp_123")
    return value.strip()


async def request_correction(pool: asyncpg.Pool, account_id: uuid.UUID, text: object,
                             now: datetime) -> requests.PrivacyRequest:
    return await request_staff(pool, account_id, "correction", now, "other",
                               _text(text, True))


async def request_review(pool: asyncpg.Pool, account_id: uuid.UUID, about: object,
                         now: datetime, text: object = None) -> requests.PrivacyRequest:
    return await request_staff(pool, account_id, "human_review", now,
                               review_subject(about), _text(text, False))


async def request_staff(pool: asyncpg.Pool, account_id: uuid.UUID, type_: str,
                        now: datetime, subject: str, text: str) -> requests.PrivacyRequest:
    """An open request for the staff queue, its details apart, and the "received"
    e-mail, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        done = await requests.record(conn, account_id, type_,
                                     await jurisdiction_of(conn, account_id), now, "staff")
        await conn.execute(
            "INSERT INTO privacy_request_details (request_id, account_id, subject, text) "
            "VALUES ($1, $2, $3, $4)", done.id, account_id, subject, text)
        await mail_account(
            conn, account_id, "privacy_received",
            f"We received your privacy request #{done.id}",
            f"We received your {TYPE_LABELS[type_]} request (reference #{done.id}) on "
            f"{now:%Y-%m-%d %H:%M} UTC.\n\nOur privacy team will answer by "
            f"{done.due_at:%Y-%m-%d %H:%M} UTC at the latest. You can follow it under "
            "Settings > Privacy in your dashboard.\n")
    log.info("privacy request received account_id=%s request_id=%s type=%s", account_id,
             done.id, type_)
    return done
