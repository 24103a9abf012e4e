"""The low-balance e-mail (issue 13): a transactional message when the balance falls
below the threshold the user chose, once per crossing. It is one kind of balance
trigger (``balance_watch``): the message is queued in the outbox in the same
transaction that claims the crossing, so it is queued exactly once however many
replicas saw the crossing, and never for a claim that rolled back. The message holds
amounts and a link, nothing about usage. Must not import ``control_plane.web`` or
``proxy``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from control_plane import users
from control_plane.billing.balance_watch import LOW_BALANCE, Action
from control_plane.mail import outbox
from shared.pricing import MICROS_PER_DOLLAR

TEMPLATE = "low_balance"


def dollars(micros: int) -> str:
    return f"${micros / MICROS_PER_DOLLAR:,.2f}"


def action(public_url: str) -> Action:
    """The e-mail a low-balance crossing queues."""

    async def queue_mail(conn: asyncpg.Connection, account: uuid.UUID, crossing: int,
                         balance_micros: int, now: datetime) -> None:
        address = await users.owner_address(conn, account)
        if address is None:
            return  # nobody to tell; the crossing is still counted
        threshold = await conn.fetchval(
            "SELECT threshold_micros FROM balance_triggers "
            "WHERE account_id = $1 AND kind = $2", account, LOW_BALANCE)
        await outbox.enqueue(
            conn, to_address=address, kind=outbox.MailKind.TRANSACTIONAL,
            template=TEMPLATE, account_id=account,
            subject=f"Your QNP balance is below {dollars(threshold)}",
            body=(f"Your QNP credit balance is {dollars(balance_micros)}, below the "
                  f"{dollars(threshold)} you asked us to tell you about.\n\n"
                  f"Top up, or turn on auto top-up, at {public_url}/credits\n\n"
                  "You get this e-mail once each time your balance falls below that "
                  "amount; change or turn it off on the same page.\n"))

    return queue_mail


async def configure(conn: asyncpg.Connection, account: uuid.UUID,
                    threshold_micros: int | None, now: datetime) -> None:
    """Set the threshold (None: no low-balance e-mail). A new threshold is armed."""
    if threshold_micros is None:
        await conn.execute(
            "UPDATE balance_triggers SET enabled = false, updated_at = $3 "
            "WHERE account_id = $1 AND kind = $2", account, LOW_BALANCE, now)
        return
    await conn.execute(
        "INSERT INTO balance_triggers (account_id, kind, threshold_micros, updated_at) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, kind) DO UPDATE SET "
        "enabled = true, threshold_micros = $3, updated_at = $4, "
        "armed = balance_triggers.armed OR NOT balance_triggers.enabled "
        "OR balance_triggers.threshold_micros <> $3",
        account, LOW_BALANCE, threshold_micros, now)
