"""Where every table that holds an account's or a person's rows stands when the account
is deleted: the one list the purge (``purge``) runs and the registry test
(``tests/control_plane/privacy/test_registry.py``) checks against the live schema.

Each table is ``PURGED`` (its rows of the account, or of the account's users, are
deleted), ``ANONYMISED`` (its rows stay, the account id replaced by an unlinkable
random one: billing, kept 7 years by policy clause 6, and the record of compliance) or
``KEPT`` with the reason. A table with an ``account_id`` or ``user_id`` column that is
not listed here fails the registry test: whoever adds one decides its fate here.

The same line says where the table's rows are in the account's data export (``export``:
its section names, ``account`` for the account object) or why they are not
(``unexported``); ``THROUGH`` lists the tables with no account column of their own that
are the account's through a parent's key. ``tests/control_plane/privacy/test_export.py``
fails on a purged or anonymised table with neither, and on an export section no table
here names: a table added later is in the export or says why not.
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
    # The export sections holding its rows; when empty, ``unexported`` says why not.
    export: tuple[str, ...] = ()
    unexported: str = ""

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
    Table("web_sessions", P, "user_id", "sign-in history: browser, times",
          export=("sessions",)),
    Table("acceptances", P, "user_id", "what the person accepted, tied to them",
          export=("acceptances",)),
    Table("identities", P, "user_id", "provider subject and e-mail",
          export=("identities",)),
    Table("staff_roles", P, "user_id", "a deleted person holds no role",
          export=("staff_roles",)),
    Table("memberships", P, "user_id", "links the person to the account",
          export=("users",)),  # role and member_since
    Table("policy_notices", P, "user_id", "which policy e-mails the person was sent",
          export=("policy_notices",)),
    Table("email_changes", P, "user_id", "a new e-mail address waiting for its link",
          export=("email_changes",)),
    Table("users", P, "id", "e-mail and name", export=("users",)),
    # What the account did and chose. A browser's choices from before sign-in (no
    # account id, the browser id of one of the account's own rows) go with them.
    Table("consent_records", P, "account_id", "the person's choices", sql=(
        "WITH browsers AS (SELECT DISTINCT browser_id FROM consent_records "
        "WHERE account_id = $1 AND browser_id IS NOT NULL), "
        "before_sign_in AS (DELETE FROM consent_records c USING browsers b "
        "WHERE c.account_id IS NULL AND c.browser_id = b.browser_id) "
        "DELETE FROM consent_records WHERE account_id = $1"),
        export=("consents", "consent_history")),
    Table("email_outbox", P, "account_id", "addresses and bodies of mail",
          export=("emails",)),
    Table("usage_logs", P, "account_id", "request metadata with source IPs "
          "(every day partition: the statement runs on the parent)",
          export=("usage_logs",)),
    Table("usage_daily", P, "account_id", "the account's usage per day and key",
          export=("usage_daily",)),
    Table("usage_daily_providers", P, "account_id", "which providers got the account's "
          "requests, per day", export=("usage_daily_providers",)),
    Table("api_keys", P, "account_id", "key names the person chose (revoked at request)",
          export=("keys",)),
    Table("privacy_request_details", P, "account_id", "the person's own words in a "
          "request (a correction, an objection's grounds); the request row is kept",
          export=("privacy_request_details",)),
    Table("privacy_objections", P, "account_id", "the person's objections",
          export=("privacy_objections",)),
    Table("balance_triggers", P, "account_id", "thresholds the person set",
          export=("balance_triggers",)),
    Table("auto_topup_settings", P, "account_id", "the saved card's brand, last 4 and "
          "PaymentMethod id: display data, gone with the Stripe customer",
          export=("auto_topup_settings",)),
    # Billing: kept 7 years for tax law (clause 6), under an unlinkable id; no row holds
    # more than ids, amounts, Stripe ids and dates (migrations 0002, 0050) once the
    # top-ups' display data (card brand, last 4, the receipt link, whose page shows the
    # customer's e-mail) is cleared with the id.
    Table("credit_pending", P, "account_id", "a hand-off of credits to Redis, not a "
          "record (the ledger row is kept): the account's Redis state is gone",
          unexported="a ledger row on its way to Redis: the row itself is in `ledger`"),
    Table("credit_ledger", A, "account_id", "billing: every balance change, 7 years",
          export=("ledger",)),
    Table("billing_customers", A, "account_id", "billing: the (deleted) Stripe customer's "
          "id, for reconciling Stripe's own records", export=("billing_customers",)),
    Table("billing_topups", A, "account_id", "billing: what each payment charged", sql=(
        "UPDATE billing_topups SET account_id = $2, card_brand = NULL, card_last4 = NULL, "
        "receipt_url = NULL WHERE account_id = $1"), export=("billing_topups",)),
    Table("billing_charges", A, "account_id", "billing: each payment's Stripe charge",
          export=("billing_charges",)),
    Table("billing_disputes", A, "account_id", "billing: disputes and their outcome",
          export=("billing_disputes",)),
    Table("auto_topup_charges", A, "account_id", "billing: each off-session charge",
          export=("auto_topup_charges",)),
    # The record of compliance: that a request was made and answered (no personal data,
    # migration 0060), as the accountability principle asks (GDPR art. 5(2)).
    Table("privacy_requests", A, "account_id", "proof the deletion was asked and done",
          export=("privacy_requests",)),
    # Staff actions stay accountable; the account's id in the target text becomes the
    # anonymous one too, and the free-form detail is dropped.
    Table("audit_log", A, "account_id", "who did what stays, nothing personal", sql=(
        "UPDATE audit_log SET account_id = $2::uuid, detail = '{}'::jsonb, "
        "target = replace(target, $1::uuid::text, $2::uuid::text) "
        "WHERE account_id = $1::uuid"), export=("audit",)),
    Table("accounts", P, "id", "the account itself, last: the rows above point at it",
          export=("account",)),
)

# Tables with no account column that hold an account's rows through a parent's key:
# (table, the registry table it hangs from, its export section). Their rows stay with
# their parent's (billing, under the anonymous id) and are exported with the account.
THROUGH: tuple[tuple[str, str, str], ...] = (
    ("billing_events", "credit_ledger", "billing_events"),
    ("billing_refunds", "billing_charges", "billing_refunds"),
)


def export_sections() -> set[str]:
    """Every export section some table here names."""
    return {s for t in TABLES for s in t.export} | {section for *_, section in THROUGH}


def by_name() -> dict[str, Table]:
    return {t.name: t for t in TABLES}
