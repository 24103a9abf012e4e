"""An account's billing history: every top-up it started, with amount, fee, credit,
status, dates, the card's brand and last 4 and Stripe's receipt link, for the credits
page, its CSV download and the account API. A top-up counts as paid when its ledger
credit exists (whoever wrote it: webhook, return path, reconciliation), so the history
never disagrees with the balance. Must not import ``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from control_plane.billing.gateway import Intent
from control_plane.billing.payments import REFERENCE_PREFIX

HISTORY_LIMIT = 100
COLUMNS = ("payment_intent_id", "created_at", "paid_at", "status", "amount_cents",
           "fee_cents", "credit_cents", "currency", "card_brand", "card_last4",
           "receipt_url")


@dataclass(frozen=True, slots=True)
class Payment:
    payment_intent_id: str
    created_at: datetime
    paid_at: datetime | None  # when the credit was written
    status: str
    amount_cents: int
    fee_cents: int
    credit_cents: int
    currency: str
    card_brand: str | None
    card_last4: str | None
    receipt_url: str | None

    def to_json(self) -> dict[str, Any]:
        found = asdict(self)
        for name in ("created_at", "paid_at"):
            found[name] = None if found[name] is None else found[name].isoformat()
        return found

    def row(self) -> list[object]:
        return [value if value is not None else "" for value in self.to_json().values()]


def status_of(intent: Intent) -> str:
    """Our five states from Stripe's PaymentIntent status."""
    if intent.status in ("succeeded", "processing", "canceled"):
        return intent.status
    return "failed" if intent.failure else "open"


async def record(pool: asyncpg.Pool, intent: Intent) -> None:
    """What Stripe says of a top-up now; a paid one never goes back to another state
    (an old answer arriving late), and display data already known is kept."""
    await pool.execute(
        "UPDATE billing_topups SET status = CASE WHEN status = 'succeeded' THEN status "
        "ELSE $2 END, card_brand = coalesce($3, card_brand), "
        "card_last4 = coalesce($4, card_last4), receipt_url = coalesce($5, receipt_url), "
        "updated_at = now() WHERE payment_intent_id = $1",
        intent.id, status_of(intent), intent.card_brand, intent.card_last4,
        intent.receipt_url)


async def payments(pool: asyncpg.Pool, account: uuid.UUID, limit: int = HISTORY_LIMIT
                   ) -> list[Payment]:
    """The account's latest top-ups that went anywhere (paid, declined, processing,
    canceled; not the ones opened and left), newest first."""
    rows = await pool.fetch(
        "SELECT t.payment_intent_id, t.created_at, l.created_at AS paid_at, "
        "CASE WHEN l.id IS NULL THEN t.status ELSE 'succeeded' END AS status, "
        "t.amount_cents, t.fee_cents, t.credit_cents, t.currency, t.card_brand, "
        "t.card_last4, t.receipt_url FROM billing_topups t "
        "LEFT JOIN credit_ledger l ON l.kind = 'topup' "
        "AND l.reference = $3 || t.payment_intent_id "
        "WHERE t.account_id = $1 AND (l.id IS NOT NULL OR t.status <> 'open') "
        "ORDER BY t.created_at DESC LIMIT $2",
        account, limit, REFERENCE_PREFIX)
    return [Payment(**dict(r)) for r in rows]
