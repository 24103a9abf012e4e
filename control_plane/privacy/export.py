"""The account's data export (issue 14, access and portability): everything held
about one account as ONE JSON document, written piece by piece from server-side
cursors so memory stays flat however many rows the account has.

Owns the export's SQL and its wire format, ``schema_version`` 3, documented in
``EXPORT_SCHEMA.md`` next to this module: change one, change the other and the
version. Which table's rows are in which section is said once, in
``registry`` (a table with rows of the account and no section fails its test). Every
query names the account; nothing is selected by any other filter, so
another account's rows cannot appear. Key secrets (their bcrypt hashes) and session
ids (half of a session cookie) are never selected. All sections are read in one
read-only REPEATABLE READ transaction: one consistent snapshot.

Writes to a ``Sink`` (an async write of bytes), so it knows nothing of HTTP. Imports
asyncpg and orjson; never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

SCHEMA_VERSION = 3
USAGE_LOG_DAYS = 30  # request logs are kept 30 days (policy clause 6), all of them here
FLUSH_BYTES = 64 * 1024  # one write per ~64 KiB: few syscalls, bounded buffer
PREFETCH_ROWS = 500  # rows a cursor fetches at a time

Sink = Callable[[bytes], Awaitable[None]]

# Columns holding jsonb, selected as text and embedded as they are.
_JSON_COLUMNS = frozenset({"limits", "detail"})
_MEMBERS = "SELECT user_id FROM memberships WHERE account_id = $1"
# The account's charges, reached through its top-ups (both indexed there) and checked
# against the charge's own account column; "WHERE t.account_id = $1" follows.
_CHARGES = ("FROM billing_topups t JOIN billing_charges c ON c.payment_intent_id = "
            "t.payment_intent_id AND c.account_id = $1")

# (section, query) in document order; $1 is always the account id, $2 (usage_logs)
# the oldest time exported, (audit) the targets that name the account or its users.
# Consent history is read here rather than through ``consent.records.history``, which
# returns a list: a cursor keeps an account's every choice out of memory.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("users",
     "SELECT u.id, u.email, u.email_verified, u.display_name, u.status, u.created_at, "
     "m.role, m.created_at AS member_since FROM users u "
     "JOIN memberships m ON m.user_id = u.id WHERE m.account_id = $1 "
     "ORDER BY u.created_at, u.id"),
    ("identities",
     "SELECT provider, subject, user_id, email, created_at, last_used_at FROM identities "
     "WHERE user_id IN (SELECT user_id FROM memberships WHERE account_id = $1) "
     "ORDER BY created_at, provider, subject"),
    ("acceptances",
     "SELECT id, user_id, what, policy_version, accepted_at FROM acceptances "
     "WHERE user_id IN (SELECT user_id FROM memberships WHERE account_id = $1) "
     "ORDER BY id"),
    ("staff_roles",
     "SELECT user_id, role, granted_by, granted_at FROM staff_roles "
     "WHERE user_id IN (SELECT user_id FROM memberships WHERE account_id = $1) "
     "ORDER BY granted_at, user_id, role"),
    ("email_changes",
     "SELECT user_id, new_email, created_at, expires_at, used_at FROM email_changes "
     "WHERE user_id IN (SELECT user_id FROM memberships WHERE account_id = $1) "
     "AND account_id = $1 ORDER BY created_at, id"),
    ("consents",
     "SELECT DISTINCT ON (purpose) purpose, granted, source, policy_version, recorded_at "
     "FROM consent_records WHERE account_id = $1 ORDER BY purpose, recorded_at DESC, id DESC"),
    ("consent_history",
     "SELECT id, purpose, granted, source, policy_version, recorded_at, browser_id "
     "FROM consent_records WHERE account_id = $1 ORDER BY recorded_at, id"),
    ("policy_notices",
     "SELECT user_id, version, queued_at FROM policy_notices "
     "WHERE user_id IN (SELECT user_id FROM memberships WHERE account_id = $1) "
     "ORDER BY queued_at, user_id"),
    ("sessions",
     "SELECT user_id, created_at, last_seen_at, expires_at, user_agent, revoked_at "
     "FROM web_sessions WHERE account_id = $1 ORDER BY created_at"),
    ("keys",
     "SELECT key_id, name, kind, status, disabled, created_at, expires_at, revoked_at, "
     "credit_limit_micros, limit_reset, limits::text AS limits FROM api_keys "
     "WHERE account_id = $1 ORDER BY created_at, key_id"),
    ("usage_logs",
     "SELECT id, received_at, first_byte_at, done_at, key_id, endpoint, requested_model, "
     "served_model, provider, stream, status, outcome, error_code, attempts, "
     "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
     "cache_write_tokens, usage_source, cost_micros, latency_ms, ttft_ms, "
     "host(source_ip) AS source_ip FROM usage_logs "
     "WHERE account_id = $1 AND received_at >= $2 ORDER BY received_at, id"),
    ("usage_daily",
     "SELECT day, key_id, model, requests, errors, prompt_tokens, completion_tokens, "
     "cached_tokens, reasoning_tokens, cache_write_tokens, cost_micros FROM usage_daily "
     "WHERE account_id = $1 ORDER BY day, key_id, model"),
    ("usage_daily_providers",
     "SELECT day, provider, requests, first_at, last_at FROM usage_daily_providers "
     "WHERE account_id = $1 ORDER BY day, provider"),
    ("ledger",
     "SELECT id, kind, amount_micros, event_id, reference, created_at FROM credit_ledger "
     "WHERE account_id = $1 ORDER BY id"),
    ("billing_customers",
     "SELECT stripe_customer_id, created_at FROM billing_customers WHERE account_id = $1"),
    ("billing_topups",
     "SELECT payment_intent_id, request_id, credit_cents, fee_cents, amount_cents, currency, "
     "created_at, status, card_brand, card_last4, receipt_url, updated_at "
     "FROM billing_topups WHERE account_id = $1 ORDER BY created_at, payment_intent_id"),
    ("billing_charges",
     "SELECT c.charge_id, c.payment_intent_id, c.refunded_cents, c.reversed_micros, "
     f"c.updated_at {_CHARGES} WHERE t.account_id = $1 ORDER BY t.created_at, c.charge_id"),
    ("billing_refunds",
     "SELECT r.refund_id, r.charge_id, r.amount_cents, r.seen_at "
     f"{_CHARGES} JOIN billing_refunds r ON r.charge_id = c.charge_id "
     "WHERE t.account_id = $1 ORDER BY r.seen_at, r.refund_id"),
    # Chargebacks are rare: the table is small, read by account without an index.
    ("billing_disputes",
     "SELECT dispute_id, charge_id, amount_cents, reason, status, withdrawn, outcome, "
     "opened_at, closed_at FROM billing_disputes WHERE account_id = $1 "
     "ORDER BY opened_at, dispute_id"),
    ("billing_events",
     "SELECT e.event_id, e.type, e.ledger_id, e.received_at FROM billing_events e "
     "JOIN credit_ledger l ON l.id = e.ledger_id WHERE l.account_id = $1 "
     "ORDER BY e.received_at, e.event_id"),
    # The saved card's PaymentMethod id is exported like the customer's and the
    # payments' Stripe ids: an id, not a credential (only our secret key can charge it).
    ("auto_topup_settings",
     "SELECT amount_cents, payment_method_id, card_brand, card_last4, disabled_reason, "
     "updated_at FROM auto_topup_settings WHERE account_id = $1"),
    ("balance_triggers",
     "SELECT kind, enabled, threshold_micros, armed, crossings, fired_at, updated_at "
     "FROM balance_triggers WHERE account_id = $1 ORDER BY kind"),
    ("auto_topup_charges",
     "SELECT crossing, credit_cents, fee_cents, payment_method_id, status, "
     "payment_intent_id, failure_code, attempts, created_at, finished_at "
     "FROM auto_topup_charges WHERE account_id = $1 ORDER BY crossing"),
    ("privacy_requests",
     "SELECT id, type, jurisdiction, received_at, due_at, extended_until, completed_at, "
     "outcome, handled_by FROM privacy_requests WHERE account_id = $1 "
     "ORDER BY received_at, id"),
    ("privacy_request_details",
     "SELECT request_id, subject, text FROM privacy_request_details "
     "WHERE account_id = $1 ORDER BY request_id"),
    ("privacy_objections",
     "SELECT purpose, objected_at FROM privacy_objections WHERE account_id = $1 "
     "ORDER BY objected_at, purpose"),
    # What was e-mailed, not the bodies: see EXPORT_SCHEMA.md.
    ("emails",
     "SELECT id, to_address, kind, template, subject, created_at, sent_at, attempts, "
     "CASE WHEN sent_at IS NOT NULL THEN 'sent' WHEN next_attempt_at IS NULL "
     "THEN 'given_up' ELSE 'queued' END AS status FROM email_outbox "
     "WHERE account_id = $1 ORDER BY created_at, id"),
    ("audit",
     "SELECT id, at, actor, action, target, detail::text AS detail FROM audit_log "
     "WHERE account_id = $1 OR target = ANY($2::text[]) ORDER BY id"),
)
_ACCOUNT = ("SELECT id, name, status, created_at, limits::text AS limits, jurisdiction, "
            "restricted_at FROM accounts WHERE id = $1")
# Which extra parameters each section's query takes after the account id.
_USES_SINCE = frozenset({"usage_logs"})
_USES_TARGETS = frozenset({"audit"})


class AccountNotFound(LookupError):
    """The account to export does not exist."""


def _row(record: asyncpg.Record) -> bytes:
    doc: dict[str, Any] = {}
    for name, value in record.items():
        doc[name] = orjson.Fragment(value) if name in _JSON_COLUMNS and value else value
    return orjson.dumps(doc, default=_text)


def _text(value: object) -> str:
    # asyncpg's own UUID type is not the stdlib's, which is all orjson knows.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} in an export row")


class _Writer:
    """Buffers the document's bytes and hands them to the sink in ~FLUSH_BYTES writes."""

    def __init__(self, sink: Sink) -> None:
        self._sink, self._buffer = sink, bytearray()

    async def add(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            await self._sink(bytes(self._buffer))
            self._buffer.clear()


async def _targets(conn: asyncpg.Connection, account_id: uuid.UUID) -> list[str]:
    """Audit targets that name the account or one of its users."""
    users = await conn.fetch(_MEMBERS, account_id)
    return [f"account:{account_id}", *(f"user:{r['user_id']}" for r in users)]


async def write_export(conn: asyncpg.Connection, account_id: uuid.UUID, now: datetime,
                       sink: Sink) -> dict[str, int]:
    """Write the account's export to ``sink``; the rows written per section.

    Raises AccountNotFound before anything is written. The document is one object, one
    row per line, so it can be read as JSON or line by line."""
    since = now - timedelta(days=USAGE_LOG_DAYS)
    counts: dict[str, int] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        account = await conn.fetchrow(_ACCOUNT, account_id)
        if account is None:
            raise AccountNotFound(f"account {account_id} not found")
        targets = await _targets(conn, account_id)
        out = _Writer(sink)
        head = orjson.dumps({"schema_version": SCHEMA_VERSION, "generated_at": now,
                             "account_id": str(account_id), "usage_logs_since": since})
        await out.add(head[:-1] + b',\n"account":' + _row(account))
        for section, query in SECTIONS:
            args: list[Any] = [account_id]
            if section in _USES_SINCE:
                args.append(since)
            if section in _USES_TARGETS:
                args.append(targets)
            await out.add(b',\n"' + section.encode() + b'":[')
            n = 0
            async for record in conn.cursor(query, *args, prefetch=PREFETCH_ROWS):
                await out.add((b"\n" if n == 0 else b",\n") + _row(record))
                n += 1
            await out.add(b"]")
            counts[section] = n
        await out.add(b"\n}\n")
        await out.flush()
    return counts
