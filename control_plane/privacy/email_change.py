"""Correcting a user's e-mail address (issue 14): the new address is confirmed by a
link sent to it, and changes only when the signed-in user opens that link.

The link carries a token signed (HS256, a key derived from QNP_SESSION_SECRET) that
names one ``email_changes`` row and expires with it (``LINK_TTL``); the row makes it
single use. An address another user holds is refused when the link is used (the
unique index on lower(email) decides), never when it is asked for, so asking reveals
nothing about who has an account. The old address is told of the change. Logs ids,
never addresses. Imports the privacy, mail and error modules; never ``proxy``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import datetime, timedelta

import asyncpg
import jwt

from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.mail import outbox
from control_plane.privacy import requests, rights

log = logging.getLogger(__name__)

LINK_TTL = timedelta(hours=24)
CONFIRM_PATH = "/settings/privacy/email/confirm"
MAX_EMAIL_LEN = 254
_EMAIL = re.compile(r"[^@\s,;<>\"]+@[^@\s,;<>\"]+\.[^@\s,;<>\".]+")
_ALG = "HS256"
_AUDIENCE = "qnp-email-change"


class Links:
    """Signs and reads the confirmation tokens."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"qnp-email-change:" + secret.encode()).digest()

    def token(self, change_id: uuid.UUID, expires_at: datetime) -> str:
        return jwt.encode({"cid": str(change_id), "exp": int(expires_at.timestamp()),
                           "aud": _AUDIENCE}, self._key, algorithm=_ALG)

    def read(self, token: object, now: datetime) -> uuid.UUID:
        """The change a token names; NotFound for a tampered, expired or foreign one."""
        if not isinstance(token, str) or not token:
            raise NotFound("this confirmation link is not valid")
        try:
            claims = jwt.decode(token, self._key, algorithms=[_ALG], audience=_AUDIENCE,
                                options={"require": ["cid", "exp", "aud"],
                                         "verify_exp": False})
            change_id = uuid.UUID(str(claims["cid"]))
            expired = int(claims["exp"]) <= now.timestamp()
        except (jwt.PyJWTError, ValueError, TypeError):
            raise NotFound("this confirmation link is not valid") from None
        if expired:  # checked against the injected clock, not the machine's
            raise NotFound("this confirmation link has expired; ask for a new one")
        return change_id


def clean_email(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("email must be an e-mail address")
    email = value.strip()
    if len(email) > MAX_EMAIL_LEN or _EMAIL.fullmatch(email) is None:
        raise InvalidInput("email must be one plain e-mail address, like name@example.com")
    return email


async def start(pool: asyncpg.Pool, links: Links, public_url: str, account_id: uuid.UUID,
                user_id: uuid.UUID, new_email: object, now: datetime) -> uuid.UUID:
    """Queue the confirmation link to the new address; the pending change's id."""
    email = clean_email(new_email)
    change_id, expires = uuid.uuid4(), now + LINK_TTL
    link = f"{public_url}{CONFIRM_PATH}?token={links.token(change_id, expires)}"
    async with pool.acquire() as conn, conn.transaction():
        # A newer request replaces any link still pending.
        await conn.execute("UPDATE email_changes SET used_at = $2 "
                           "WHERE user_id = $1 AND used_at IS NULL", user_id, now)
        await conn.execute(
            "INSERT INTO email_changes (id, user_id, account_id, new_email, created_at, "
            "expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            change_id, user_id, account_id, email, now, expires)
        await outbox.enqueue(
            conn, to_address=email, kind=outbox.MailKind.TRANSACTIONAL,
            template="email_change_confirm", subject="Confirm your new QNP e-mail address",
            body="Someone signed in to QNP asked to use this address for their account.\n\n"
                 f"To confirm, open this link while signed in, within 24 hours:\n{link}\n\n"
                 "If it was not you, ignore this message: nothing changes.\n",
            account_id=account_id)
    log.info("email change started user_id=%s change_id=%s", user_id, change_id)
    return change_id


async def pending(conn: asyncpg.Pool | asyncpg.Connection, user_id: uuid.UUID,
                  change_id: uuid.UUID, now: datetime) -> str:
    """The new address of the user's own unused, unexpired change; NotFound otherwise
    (another user's change is indistinguishable from none)."""
    email: str | None = await conn.fetchval(
        "SELECT new_email FROM email_changes WHERE id = $1 AND user_id = $2 "
        "AND used_at IS NULL AND expires_at > $3", change_id, user_id, now)
    if email is None:
        raise NotFound("this confirmation link is not valid, or was already used")
    return email


async def confirm(pool: asyncpg.Pool, account_id: uuid.UUID, user_id: uuid.UUID,
                  change_id: uuid.UUID, now: datetime) -> requests.PrivacyRequest:
    """Change the address (a fulfilled self-service correction) and tell the old one."""
    async with pool.acquire() as conn, conn.transaction():
        new = await conn.fetchval(
            "UPDATE email_changes SET used_at = $4 WHERE id = $1 AND user_id = $2 "
            "AND used_at IS NULL AND expires_at > $3 RETURNING new_email",
            change_id, user_id, now, now)
        if new is None:
            raise NotFound("this confirmation link is not valid, or was already used")
        old = await conn.fetchval("SELECT email FROM users WHERE id = $1", user_id)
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE users SET email = $2, email_verified = true WHERE id = $1",
                    user_id, new)
        except asyncpg.UniqueViolationError:
            raise Conflict("another account already uses this address") from None
        done = await requests.record(conn, account_id, "correction",
                                     await rights.jurisdiction_of(conn, account_id), now,
                                     "self-service", outcome="fulfilled")
        await outbox.enqueue(
            conn, to_address=old, kind=outbox.MailKind.TRANSACTIONAL,
            template="email_changed_notice", subject="Your QNP e-mail address was changed",
            body=f"The e-mail address of your QNP account was changed on "
                 f"{now:%Y-%m-%d %H:%M} UTC; messages now go to the new address.\n\n"
                 "If you did not do this, sign in and sign out everywhere, then write "
                 "to our privacy team.\n", account_id=account_id)
    log.info("email changed user_id=%s request_id=%s", user_id, done.id)
    return done
