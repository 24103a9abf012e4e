"""The export's human-readable summary (``/settings/privacy/summary``): the export's
categories, each with what it is and how many rows the account has in it.

Cheap by construction: every count is an index lookup on the account, and the two
categories that grow with traffic are read from what is already summed: request logs
from the daily rollups of the last 30 days (so a day's count may include requests a
few hours older than the export's exact 30 days), and the ledger's debits, one per
billed request, counted on the ledger's account index. The sections that hold a few
rows per account by nature (settings, charges, objections: a count of None) count the
export's own query, so the two cannot drift. One read-only snapshot.
Imports asyncpg and ``export`` (for the section names); never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from control_plane.privacy import export

# section -> (label, what it holds, count query; $1 the account, $2 the first log day;
# None: the export's query, counted)
CATEGORIES: dict[str, tuple[str, str, str | None]] = {
    "users": ("People", "your e-mail address, name and role",
              "SELECT count(*) FROM memberships WHERE account_id = $1"),
    "identities": ("Sign-in identities", "the providers you sign in with and their id of you",
                   "SELECT count(*) FROM identities WHERE user_id IN "
                   "(SELECT user_id FROM memberships WHERE account_id = $1)"),
    "acceptances": ("Acceptances", "what you accepted at sign-up and later policy versions",
                    "SELECT count(*) FROM acceptances WHERE user_id IN "
                    "(SELECT user_id FROM memberships WHERE account_id = $1)"),
    "staff_roles": ("Staff roles", "the roles you hold as our staff, if any", None),
    "email_changes": ("E-mail changes", "new addresses you asked to change to, and whether "
                      "you confirmed them", None),
    "consents": ("Consent choices now", "your current choice per purpose",
                 "SELECT count(DISTINCT purpose) FROM consent_records WHERE account_id = $1"),
    "consent_history": ("Consent history", "every choice you made, with its time and source",
                        "SELECT count(*) FROM consent_records WHERE account_id = $1"),
    "policy_notices": ("Policy change notices", "which policy changes we e-mailed you about",
                       "SELECT count(*) FROM policy_notices WHERE user_id IN "
                       "(SELECT user_id FROM memberships WHERE account_id = $1)"),
    "sessions": ("Sessions", "where and when you signed in (a browser summary, never the "
                 "full header)", "SELECT count(*) FROM web_sessions WHERE account_id = $1"),
    "keys": ("API keys", "names, limits and dates; never the secrets",
             "SELECT count(*) FROM api_keys WHERE account_id = $1"),
    "usage_logs": ("Request logs (30 days)", "one row per API request: model, tokens, cost, "
                   "IP address; never any content",
                   "SELECT coalesce(sum(requests), 0)::bigint FROM usage_daily "
                   "WHERE account_id = $1 AND day >= $2"),
    "usage_daily": ("Daily totals", "requests, tokens and cost per day, key and model",
                    "SELECT count(*) FROM usage_daily WHERE account_id = $1"),
    "usage_daily_providers": ("Daily totals per provider", "which upstream provider "
                              "received your requests, per day",
                              "SELECT count(*) FROM usage_daily_providers "
                              "WHERE account_id = $1"),
    "ledger": ("Credit ledger", "every top-up, refund, adjustment and debit (kept 7 years)",
               "SELECT count(*) FROM credit_ledger WHERE account_id = $1"),
    "billing_customers": ("Stripe customer", "the id of your customer record at Stripe",
                          "SELECT count(*) FROM billing_customers WHERE account_id = $1"),
    "billing_topups": ("Payments", "each payment you started: amounts, currency, dates",
                       "SELECT count(*) FROM billing_topups WHERE account_id = $1"),
    "billing_charges": ("Charges", "Stripe's charge of each payment and what was "
                        "refunded of it", None),
    "billing_refunds": ("Refunds", "each refund of a payment", None),
    "billing_disputes": ("Disputes", "chargebacks of a payment and their outcome", None),
    "billing_events": ("Payment events", "Stripe's notices that credited your balance",
                       "SELECT count(*) FROM billing_events e JOIN credit_ledger l "
                       "ON l.id = e.ledger_id WHERE l.account_id = $1"),
    "auto_topup_settings": ("Auto top-up", "the amount and the saved card (brand, last 4, "
                            "Stripe's id of it)", None),
    "balance_triggers": ("Balance alerts", "the balances at which we top up or e-mail you",
                         None),
    "auto_topup_charges": ("Automatic payments", "each automatic top-up and its result", None),
    "privacy_requests": ("Privacy requests", "each time you exercised a right, with its "
                         "deadline", "SELECT count(*) FROM privacy_requests WHERE account_id = $1"),
    "privacy_request_details": ("Your words in requests", "what you wrote when asking for a "
                                "correction or a review", None),
    "privacy_objections": ("Objections", "the uses of your data you objected to", None),
    "emails": ("E-mails", "what we e-mailed you recently: address, subject, dates",
               "SELECT count(*) FROM email_outbox WHERE account_id = $1"),
    "audit": ("Audit log", "what staff or the system did to your account",
              "SELECT count(*) FROM audit_log WHERE account_id = $1 "
              "OR target = 'account:' || $1::text "
              "OR target IN (SELECT 'user:' || user_id::text FROM memberships "
              "WHERE account_id = $1)"),
}


@dataclass(frozen=True, slots=True)
class Category:
    section: str
    label: str
    holds: str
    count: int


async def summary(conn: asyncpg.Connection, account_id: uuid.UUID, now: datetime
                  ) -> list[Category]:
    """Each export section with its row count, in the export's order."""
    first_day = (now - timedelta(days=export.USAGE_LOG_DAYS)).date()
    exported = dict(export.SECTIONS)
    found = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for section, (label, holds, counted) in CATEGORIES.items():
            query = counted or (
                f"SELECT count(*) FROM ({exported[section]}) AS exported")  # noqa: S608
            args: list[object] = [account_id]
            if "$2" in query:
                args.append(first_day)
            found.append(Category(section, label, holds, await conn.fetchval(query, *args)))
    return found
