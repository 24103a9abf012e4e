"""Marketing e-mail: queued only with the account's ``marketing_email`` consent and only
while the account is not restricted, each with a one-click unsubscribe (RFC 8058:
``List-Unsubscribe`` with an https link and ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click``; the link is also in the text). Transactional mail needs
none of this and goes through ``outbox.enqueue`` directly. Never imports ``proxy`` or
the web app.

The check and the queueing happen on the caller's connection, so inside its
transaction when it has one; a withdrawal recorded after a message was queued stops the
next message, not one already in the outbox.
"""

from __future__ import annotations

import uuid

import asyncpg

from control_plane import users
from control_plane.consent import choices
from control_plane.consent.unsubscribe import make_token
from control_plane.mail.outbox import MailKind, enqueue
from control_plane.settings import Settings

UNSUBSCRIBE_PATH = "/unsubscribe/"


def unsubscribe_url(settings: Settings, account_id: uuid.UUID) -> str:
    return (settings.public_url + UNSUBSCRIBE_PATH
            + make_token(settings.require_session_secret(), account_id))


async def queue_marketing(conn: asyncpg.Connection, account_id: uuid.UUID, *,
                          settings: Settings, template: str, subject: str,
                          body: str) -> int | None:
    """Queue one marketing message to the account's owner; its outbox id, or None when
    the account has no marketing consent, is restricted, or has no active owner."""
    loaded = await choices.load(conn, account_id=account_id)
    if "marketing_email" not in loaded.state.granted or loaded.restricted:
        return None
    to_address = await users.owner_address(conn, account_id)
    if to_address is None:
        return None
    link = unsubscribe_url(settings, account_id)
    text = f"{body.rstrip()}\n\n--\nTo stop these e-mails, open {link}\n"
    row_id = await enqueue(
        conn, to_address=to_address, kind=MailKind.MARKETING, template=template,
        subject=subject, body=text, account_id=account_id,
        headers={"List-Unsubscribe": f"<{link}>",
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    return row_id
