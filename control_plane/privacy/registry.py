"""Where every table that holds an account's or a person's rows stands when the account
is deleted: the one list the purge (``purge``) runs and the registry test
(``tests/control_plane/privacy/test_registry.py``) checks against the live schema.

Each table is ``PURGED`` (its rows of the account, or of the account's users, are
deleted), ``ANONYMISED`` (its rows stay, the account id replaced by an unlinkable
random one: billing, kept 7 years by policy clause 6, and the record of compliance) or
``KEPT`` with the reason. A table with an ``account_id`` or ``user_id`` column that is
not listed here fails the registry test: whoever adds one decides its fate here.
Order matters: the purge runs the statements top to bottom, children before the rows
their foreign keys point at. Pure data; imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Fate(StrEnum):
    PURGED = "purged"
    ANONYMISED = "anonymised"
    KEPT = "kept"


@dataclass(frozen=True, slots=True)
class Table:
    """One table's fate. ``by`` is the column that names the account (``account_id``,
    or ``id`` in ``accounts``) or the person (``user_id``, or ``id`` in ``users``)."""

    name: str
    fate: Fate
    by: str
    why: str
    # A statement of its own instead of the fate's default; $1 the account id, $2 the
    # anonymous id (ANONYMISED), or $1 the array of the account's user ids (by users).
    sql: str | None = None

    @property
    def of_users(self) -> bool:
        return self.by == "user_id" or (self.name == "users" and self.by == "id")

    def statement(self) -> str | None:
        """What the purge runs for this table; None for a KEPT one."""
        if self.sql is not None:
            return self.sql
        if self.fate is Fate.KEPT:
            return None
        if self.fate is Fate.ANONYMISED:
            return f"UPDATE {self.name} SET {self.by} = $2 WHERE {self.by} = $1"  # noqa: S608
        if self.of_users:
            return f"DELETE FROM {self.name} WHERE {self.by} = ANY($1::uuid[])"  # noqa: S608
        return f"DELETE FROM {self.name} WHERE {self.by} = $1"  # noqa: S608


P, A, K = Fate.PURGED, Fate.ANONYMISED, Fate.KEPT

TABLES: tuple[Table, ...] = (
    # The person and how they sign in.
    Table("web_sessions", P, "user_id", "sign-in history: browser, times"),
    Table("acceptances", P, "user_id", "what the person accepted, tied to them"),
    Table("identities", P, "user_id", "provider subject and e-mail"),
    Table("staff_roles", P, "user_id", "a deleted person holds no role"),
    Table("memberships", P, "user_id", "links the person to the account"),
    Table("policy_notices", P, "user_id", "which policy e-mails the person was sent"),
    Table("email_changes", P, "user_id", "a new e-mail address waiting for its link"),
    Table("users", P, "id", "e-mail and name"),
    # What the account did and chose.
    Table("consent_records", P, "account_id", "the person's choices"),
    Table("email_outbox", P, "account_id", "addresses and bodies of mail"),
    Table("usage_logs", P, "account_id", "request metadata with source IPs "
          "(every day partition: the statement runs on the parent)"),
    Table("usage_daily", P, "account_id", "the account's usage per day and key"),
    Table("api_keys", P, "account_id", "key names the person chose (revoked at request)"),
    Table("privacy_request_details", P, "account_id", "the person's own words in a "
          "request (a correction, an objection's grounds); the request row is kept"),
    Table("privacy_objections", P, "account_id", "the person's objections"),
    Table("balance_triggers", P, "account_id", "thresholds the person set"),
    Table("auto_topup_settings", P, "account_id", "the saved card's brand, last 4 and "
          "PaymentMethod id: display data, gone with the Stripe customer"),
    # Billing: kept 7 years for tax law (clause 6), under an unlinkable id; no row holds
    # more than ids, amounts, Stripe ids and dates (migrations 0002, 0050).
    Table("credit_pending", P, "account_id", "a hand-off of credits to Redis, not a "
          "record (the ledger row is kept): the account's Redis state is gone"),
    Table("credit_ledger", A, "account_id", "billing: every balance change, 7 years"),
    Table("billing_customers", A, "account_id", "billing: the (deleted) Stripe customer's "
          "id, for reconciling Stripe's own records"),
    Table("billing_topups", A, "account_id", "billing: what each payment charged"),
    Table("billing_charges", A, "account_id", "billing: each payment's Stripe charge"),
    Table("billing_disputes", A, "account_id", "billing: disputes and their outcome"),
    Table("auto_topup_charges", A, "account_id", "billing: each off-session charge"),
    # The record of compliance: that a request was made and answered (no personal data,
    # migration 0060), as the accountability principle asks (GDPR art. 5(2)).
    Table("privacy_requests", A, "account_id", "proof the deletion was asked and done"),
    # Staff actions stay accountable; the account's id in the target text becomes the
    # anonymous one too, and the free-form detail is dropped.
    Table("audit_log", A, "account_id", "who did what stays, nothing personal", sql=(
        "UPDATE audit_log SET account_id = $2::uuid, detail = '{}'::jsonb, "
        "target = replace(target, $1::uuid::text, $2::uuid::text) "
        "WHERE account_id = $1::uuid")),
    Table("accounts", P, "id", "the account itself, last: the rows above point at it"),
)


def by_name() -> dict[str, Table]:
    return {t.name: t for t in TABLES}
